#!/usr/bin/env bash
# Chorus developer entry point, for a fresh Debian/Ubuntu machine with Python 3.11+.
#   ./chorus.sh up     install into .venv, then start a local cluster (Redis, Postgres, 2 nodes,
#                      1 worker, nginx when installed) and print how to connect
#   ./chorus.sh test   install into .venv (and nginx and promtool when missing and we are root),
#                      then run the linters (ruff, mypy, import contracts) and the full test
#                      suite; extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")"
VENV=${CHORUS_VENV:-.venv}
PY=${PYTHON:-python3}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

apt_install() {
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

install() {
  local extras=$1
  if ! "$PY" -m venv --help >/dev/null 2>&1 || ! "$PY" -c 'import ensurepip' 2>/dev/null; then
    apt_install python3-venv || { echo "python3-venv is missing and cannot be installed" >&2; exit 1; }
  fi
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # pip 23.2 backtracks for ever on this dependency set: upgrade it first.
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[$extras]"
}

ensure_nginx() {
  if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    apt_install nginx || echo "warning: nginx could not be installed" >&2
    # Only our own nginx processes (on free ports) are wanted, not the distribution's service.
    as_root service nginx stop >/dev/null 2>&1 || true
  fi
}

ensure_promtool() {
  # promtool checks the chart's alert rules and dashboard queries (tests/test_dashboards.py).
  if ! command -v promtool >/dev/null; then
    apt_install prometheus || echo "warning: prometheus (promtool) could not be installed" >&2
    as_root service prometheus stop >/dev/null 2>&1 || true
  fi
}

case "${1:-}" in
  up)
    shift
    install "test"
    exec "$VENV/bin/python" -m loadtest.cluster "$@"
    ;;
  test)
    shift
    install "test"
    ensure_nginx
    ensure_promtool
    "$VENV/bin/ruff" check .
    "$VENV/bin/mypy" protocol common fanout runs ws_node persistence agent_worker loadtest
    "$VENV/bin/lint-imports"  # the package boundaries: pyproject.toml, [tool.importlinter]
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    echo "usage: $0 up|test [args]" >&2
    exit 2
    ;;
esac
