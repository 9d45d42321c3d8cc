#!/usr/bin/env bash
# Chorus developer entry point, for a fresh Debian/Ubuntu machine with Python 3.11+.
#   ./chorus.sh up [-d]      install what running needs into .venv (and nginx when missing and we
#                            are root), then start a local cluster (Redis, Postgres, 2 nodes,
#                            1 worker, nginx) and print how to connect; -d: in the background
#   ./chorus.sh down         stop the cluster
#   ./chorus.sh status       its processes, and whether each node is ready
#   ./chorus.sh logs [name]  follow the logs (all, or one: node-a, worker-1, redis, postgres, nginx)
#   ./chorus.sh test         install into .venv with the test tools (and nginx, promtool, pgbouncer,
#                            chromium when missing and we are root), then run the linters (ruff,
#                            mypy, import contracts) and the full test suite; extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")"
VENV=${CHORUS_VENV:-.venv}
PY=${PYTHON:-python3}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

step() { printf '==> %s\n' "$*"; }

install() {
  local extras=$1
  step "Python packages into $VENV (.[$extras]; the first time takes a few minutes)"
  if ! "$PY" -m venv --help >/dev/null 2>&1 || ! "$PY" -c 'import ensurepip' 2>/dev/null; then
    apt_install python3-venv || { echo "python3-venv is missing and cannot be installed" >&2; exit 1; }
  fi
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # pip 23.2 backtracks for ever on this dependency set: upgrade it first.
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # The versions CI tested (scripts/constraints.py): a new release cannot break a fresh install.
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[$extras]" -e clients/python
}

ensure() {  # ensure <command>:<Debian package>...: install the packages whose command is missing
  local missing=() pair pkg
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || [ -x "/usr/sbin/${pair%%:*}" ] || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} = 0 ] && return 0
  step "Debian packages: ${missing[*]}"
  apt_install "${missing[@]}" || echo "warning: could not install ${missing[*]}" >&2
  # Only our own servers (on free ports, started by the tests) are wanted, not the packages' services.
  for pkg in "${missing[@]}"; do as_root service "$pkg" stop >/dev/null 2>&1 || true; done
}

case "${1:-}" in
  up)
    shift
    install "dev"
    ensure nginx:nginx
    step "the cluster"
    exec "$VENV/bin/python" -m loadtest.cluster up "$@"
    ;;
  down|status|logs)
    [ -x "$VENV/bin/python" ] || { echo "nothing installed yet: ./chorus.sh up" >&2; exit 1; }
    exec "$VENV/bin/python" -m loadtest.cluster "$@"
    ;;
  test)
    shift
    install "test"
    # promtool checks the chart's alert rules and dashboard queries; pgbouncer and chromium: the
    # tests of PgBouncer in transaction mode and of the chat page in a real browser; redis-server
    # (7, for sharded Pub/Sub; the pip wheel is 6.2): the Redis Cluster tests.
    ensure nginx:nginx promtool:prometheus pgbouncer:pgbouncer chromium:chromium redis-server:redis-server
    step "linters"
    "$VENV/bin/ruff" check .
    "$VENV/bin/mypy" protocol common fanout runs ws_node persistence agent_worker loadtest clients/python/chorus_client
    "$VENV/bin/lint-imports"  # the package boundaries: pyproject.toml, [tool.importlinter]
    step "tests"
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: $0 up [-d] | down | status | logs [name] | test [pytest args]" >&2
    exit 2
    ;;
esac
