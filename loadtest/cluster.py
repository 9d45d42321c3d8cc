"""The one-command local cluster: ``python -m loadtest.cluster up|down|status|logs`` (``./chorus.sh``).

Redis, Postgres (migrated), N ws nodes, M agent workers and nginx in front, all on 127.0.0.1 in one
workdir (every process logs to ``<workdir>/<name>.log``). ``LocalCluster`` is the same thing as a
context manager for functional tests and the soak tool. ``up`` shows each part starting, then a
banner with ready-made JWTs and a two-device chat, and stays in the foreground until Ctrl-C /
SIGTERM (or, with ``--detach``, returns once the cluster is ready); it keeps its state in
``<home>/cluster.json`` (home: ``.chorus/``), which ``down``, ``status`` and ``logs`` read. The
workdir, ``<home>/run``, is emptied by the next ``up``, not on exit, so the logs can still be read.

Environment read by ``main`` only (``LocalCluster`` takes everything from ``ClusterConfig``):
``REDIS_URL`` / ``DATABASE_URL`` (use these instead of starting servers), ``AUTH_JWT_SECRET``
(else random), ``LLM_*`` and ``AGENTS_JSON`` / ``AGENTS_FILE`` (passed to workers when set).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, NoReturn

import jwt

from loadtest.procs import (
    REPO_ROOT,
    NginxServer,
    PostgresServer,
    Proc,
    RedisServer,
    free_port,
    nginx_binary,
    wait_http_ok,
)

# Passed on to the nodes and workers by `up` when set: the model endpoint and the agents.
_AGENT_VARS = ("LLM_BASE_URL", "LLM_API_KEY", "LLM_MODEL", "LLM_STREAM_USAGE", "AGENTS_JSON", "AGENTS_FILE")
# Above the services' own drain budgets (node DRAIN_SECONDS 10, worker WORKER_DRAIN_SECONDS 30), so an
# orderly drain is not cut short by SIGKILL.
_NODE_STOP_TIMEOUT_S = 15
_WORKER_STOP_TIMEOUT_S = 35
_MIGRATE_TIMEOUT_S = 120


@dataclass
class ClusterConfig:
    """What to run. ``env`` is extra environment for nodes and workers (e.g. ``LLM_BASE_URL``)."""

    nodes: int = 2
    workers: int = 1
    nginx: bool = True
    jwt_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    env: dict[str, str] = field(default_factory=dict)
    redis_url: str | None = None  # an existing Redis; None starts one in the workdir
    database_url: str | None = None  # an existing, reachable database; None starts Postgres
    ready_timeout_s: float = 60


class LocalCluster:
    """A whole Chorus deployment on loopback. Ports are fixed at construction, so a node restarted
    with ``start_node`` comes back where nginx and clients expect it.

    ``start`` raises (after stopping whatever it started) if any part fails to come up, with that
    process's log tail in the message.
    """

    def __init__(self, workdir: Path, config: ClusterConfig) -> None:
        self.workdir = workdir
        self.config = config
        self.redis: RedisServer | None = None
        self.postgres: PostgresServer | None = None
        if config.redis_url:
            self.redis_url = config.redis_url
        else:
            self.redis = RedisServer(workdir)
            self.redis_url = self.redis.url
        if config.database_url:
            self.database_url = config.database_url
        else:
            self.postgres = PostgresServer(workdir)
            self.database_url = self.postgres.url
        self.node_ports: list[int] = [free_port() for _ in range(config.nodes)]
        # Each process's INTERNAL_PORT (health and /metrics), by its name (node-a, worker-1, ...).
        self.internal_ports: dict[str, int] = {}
        self.nodes: list[Proc] = [self._node_proc(i) for i in range(config.nodes)]
        self.workers: list[Proc] = [self._worker_proc(i + 1) for i in range(config.workers)]
        self.nginx: NginxServer | None = None
        if config.nginx and nginx_binary() is not None and self.node_ports:
            self.nginx = NginxServer(workdir, self.node_ports)

    @property
    def ws_url(self) -> str:
        """WebSocket URL clients should use: nginx when running, else node 0 directly."""
        return self.nginx.ws_url if self.nginx else f"ws://127.0.0.1:{self.node_ports[0]}/ws"

    @property
    def node_ws_urls(self) -> list[str]:
        """Each node's own WebSocket URL, not through nginx (as Locust's CHORUS_NODE_URLS takes them)."""
        return [f"ws://127.0.0.1:{port}/ws" for port in self.node_ports]

    @property
    def http_url(self) -> str:
        """Base URL for REST (``/v1/...``): nginx when running, else node 0 directly."""
        return self.nginx.url if self.nginx else f"http://127.0.0.1:{self.node_ports[0]}"

    def start(self, step: Callable[[str], AbstractContextManager[object]] = lambda _: nullcontext()) -> None:
        """Start everything and return once every node's /readyz answers 200. Each part starts
        inside ``step(name)`` (``main`` shows progress with it)."""
        try:
            if self.redis:
                with step("Redis"):
                    self.redis.start()
            if self.postgres:
                with step("Postgres"):
                    self.postgres.start()
            with step("migrations"):
                self._migrate()
            with step(f"{len(self.nodes)} ws nodes, {len(self.workers)} agent workers"):
                for proc in [*self.nodes, *self.workers]:
                    proc.start()
                for index in range(len(self.nodes)):
                    self._wait_ready(index)
                for worker in self.workers:
                    if not worker.alive:
                        raise RuntimeError(f"{worker.name} exited on start:\n{_tail(worker.log_text())}")
            if self.nginx:
                with step("nginx"):
                    self.nginx.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop everything in reverse order of start; each tier is SIGTERMed at once, then awaited."""
        if self.nginx:
            self.nginx.stop()
        _stop_all(self.workers, _WORKER_STOP_TIMEOUT_S)
        _stop_all(self.nodes, _NODE_STOP_TIMEOUT_S)
        if self.postgres:
            self.postgres.stop()
        if self.redis:
            self.redis.stop()

    def start_node(self, index: int) -> None:
        """(Re)start node ``index`` on its own port and wait for its /readyz."""
        node = self.nodes[index]
        if node.alive:
            node.stop(timeout_s=_NODE_STOP_TIMEOUT_S)
        node.start()
        self._wait_ready(index)

    def start_worker(self, env: dict[str, str] | None = None) -> Proc:
        """Add and start one more agent worker (``worker-<n>``), with `env` over the cluster's."""
        worker = self._worker_proc(len(self.workers) + 1, env or {})
        self.workers.append(worker)
        worker.start()
        return worker

    def token(self, user: str, ttl_s: int = 3600) -> str:
        """An HS256 JWT for ``user`` (``sub``) signed with the cluster's secret."""
        return jwt.encode({"sub": user, "exp": int(time.time()) + ttl_s}, self.config.jwt_secret, "HS256")

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _base_env(self) -> dict[str, str]:
        # The repo is run from a checkout, not necessarily pip-installed; unbuffered so logs are live.
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        return {
            "PYTHONPATH": pythonpath,
            "PYTHONUNBUFFERED": "1",
            "REDIS_URL": self.redis_url,
            "DATABASE_URL": self.database_url,
        }

    def _node_proc(self, index: int) -> Proc:
        env = {
            **self._base_env(),
            "AUTH_JWT_SECRET": self.config.jwt_secret,
            "CHORUS_DEV": "1",
            "DEV_LOGIN": "1",  # the chat page's dev login: tokens for any user name, signed with jwt_secret
            "HOST": "127.0.0.1",  # loopback only; the node's default is every interface
            **self.config.env,
            "PORT": str(self.node_ports[index]),
            "NODE_ID": f"node-{chr(ord('a') + index)}",
        }
        env["INTERNAL_PORT"] = str(self.internal_ports.setdefault(env["NODE_ID"], free_port()))
        return Proc(env["NODE_ID"], [sys.executable, "-m", "ws_node"], env=env, workdir=self.workdir)

    def _worker_proc(self, number: int, extra: dict[str, str] | None = None) -> Proc:
        env = {**self._base_env(), **self.config.env, **(extra or {}), "NODE_ID": f"worker-{number}"}
        env["INTERNAL_PORT"] = str(self.internal_ports.setdefault(env["NODE_ID"], free_port()))
        return Proc(env["NODE_ID"], [sys.executable, "-m", "agent_worker"], env=env, workdir=self.workdir)

    def _migrate(self) -> None:
        migrate = Proc(
            "migrate",
            [sys.executable, "-m", "persistence", "migrate"],
            env=self._base_env(),
            workdir=self.workdir,
        )
        migrate.start()
        try:
            code = migrate.wait(_MIGRATE_TIMEOUT_S)
        except TimeoutError:
            migrate.kill()
            raise
        if code != 0:
            raise RuntimeError(f"migrations failed (exit {code}):\n{_tail(migrate.log_text())}")

    def _wait_ready(self, index: int) -> None:
        url = f"http://127.0.0.1:{self.node_ports[index]}/readyz"
        wait_http_ok(url, self.config.ready_timeout_s, proc=self.nodes[index])


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _stop_all(procs: list[Proc], timeout_s: float) -> None:
    # SIGTERM all first so they drain in parallel: the total wait is one drain, not N of them.
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.stop(timeout_s=max(0.1, deadline - time.monotonic()))


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def _raise_fd_limit() -> int:
    """Raise this process's soft open-files limit to its hard limit and return it: the nodes and
    nginx inherit it, and a node holds one descriptor per socket (a shell's usual soft 1,024 would
    stop a node near 1,000 sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


def _banner(cluster: LocalCluster, fd_limit: int) -> str:
    alice, bob = cluster.token("alice", 24 * 3600), cluster.token("bob", 24 * 3600)
    nodes = ", ".join(f"{p.name} :{port}" for p, port in zip(cluster.nodes, cluster.node_ports, strict=True))
    front = (
        f"nginx :{cluster.nginx.port} in front of {nodes}"
        if cluster.nginx
        else f"no nginx (not installed or --no-nginx): clients connect to node A directly; nodes {nodes}"
    )
    return f"""
Chorus local cluster is up. {front}
  workdir    {cluster.workdir}  (one <name>.log per process: ./chorus.sh logs [name])
  WebSocket  {cluster.ws_url}
  REST       {cluster.http_url}/v1/
  Redis      {cluster.redis_url}
  Postgres   {cluster.database_url}
  workers    {", ".join(w.name for w in cluster.workers) or "none"}
  open files {fd_limit} per process (a node needs 1 per socket, nginx 2 per proxied socket)
  JWT alice  {alice}
  JWT bob    {bob}
             (HS256, valid 24 h; the WebSocket takes it as ?access_token=, REST as a Bearer header)

Locust (loadtest/locustfile.py; a person's devices go to different nodes; same AUTH_JWT_SECRET):
  CHORUS_NODE_URLS={",".join(cluster.node_ws_urls)}

Chat as alice from two devices: open {cluster.http_url}/ in two browser windows (dev login: any
user name), or paste these into two terminals:
  {sys.executable} -m chorus_client chat {cluster.ws_url} --token {alice} --device phone
  {sys.executable} -m chorus_client chat {cluster.ws_url} --token {alice} --device laptop

REST:
  curl -H "Authorization: Bearer {alice}" {cluster.http_url}/v1/conversations

./chorus.sh down (or Ctrl-C, in the foreground) stops everything.
"""


STATE_FILE = "cluster.json"
_STOP_WAIT_S = _WORKER_STOP_TIMEOUT_S + _NODE_STOP_TIMEOUT_S + 30
_DETACH_READY_S = 300  # the first Postgres initdb and a cold import of the worker are slow


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.cluster",
                                     description="Run a local Chorus cluster (what ./chorus.sh up starts).")
    home = Path(os.environ.get("CHORUS_HOME") or REPO_ROOT / ".chorus")
    parser.add_argument("--home", type=Path, default=home,
                        help="data, logs and state of the cluster (default: $CHORUS_HOME or .chorus/)")
    commands = parser.add_subparsers(dest="command")
    up = commands.add_parser("up", help="start a cluster (in the foreground unless --detach)")
    up.add_argument("--detach", "-d", action="store_true", help="in the background; return once ready")
    up.add_argument("--workdir", type=Path, help="data and logs here instead of <home>/run (kept on exit)")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--workers", type=int, default=1)
    up.add_argument("--no-nginx", action="store_true", help="no nginx; clients use node A directly")
    commands.add_parser("down", help="stop the cluster started with up")
    commands.add_parser("status", help="each process: alive or not; each node: ready or not")
    logs = commands.add_parser("logs", help="follow the processes' logs")
    logs.add_argument("name", nargs="?", help="one process (node-a, worker-1, redis, postgres, nginx, ...)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not {"up", "down", "status", "logs", "-h", "--help"} & set(args):
        args.insert(0, "up")  # the form before the commands: options of up only
    parsed = _parser().parse_args(args)
    home: Path = parsed.home
    if parsed.command == "down":
        return _down(home)
    if parsed.command == "status":
        return _status(home)
    if parsed.command == "logs":
        return _logs(home, parsed.name)
    return _up(parsed, home)


def _state(home: Path) -> dict[str, Any] | None:
    """The running cluster's state file, or None when there is none or its process is gone."""
    path = home / STATE_FILE
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if _alive(state["pid"]) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _up(args: argparse.Namespace, home: Path) -> int:
    running = _state(home)
    if running is not None:
        print(f"a cluster is already running (pid {running['pid']}): ./chorus.sh status, ./chorus.sh down",
              file=sys.stderr)
        return 1
    home.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or home / "run"
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)  # the last run's data and logs
    workdir.mkdir(parents=True, exist_ok=True)
    if args.detach:
        return _detach(args, home, workdir)
    env = os.environ
    config = ClusterConfig(
        nodes=args.nodes,
        workers=args.workers,
        nginx=not args.no_nginx,
        # Logs for people here (JSON is the processes' default, for log pipelines).
        env={**{name: env[name] for name in _AGENT_VARS if env.get(name)},
             "LOG_FORMAT": env.get("LOG_FORMAT", "text")},
        redis_url=env.get("REDIS_URL") or None,
        database_url=env.get("DATABASE_URL") or None,
    )
    if env.get("AUTH_JWT_SECRET"):
        config.jwt_secret = env["AUTH_JWT_SECRET"]
    # Children run in their own sessions, so Ctrl-C reaches only us; SIGTERM takes the same path.
    signal.signal(signal.SIGTERM, _interrupt)
    fd_limit = _raise_fd_limit()
    cluster = LocalCluster(workdir, config)
    state_path = home / STATE_FILE
    try:
        print(f"starting a local cluster; data and logs in {workdir}", flush=True)
        cluster.start(_progress)
        banner = _banner(cluster, fd_limit)
        state_path.write_text(json.dumps(_state_of(cluster, banner), indent=2))
        print(banner, flush=True)
        reported: set[str] = set()
        while True:
            time.sleep(1)
            for proc in [*cluster.nodes, *cluster.workers]:
                if not proc.alive and proc.name not in reported:
                    reported.add(proc.name)
                    print(f"!! {proc.name} exited; see {proc.log_path}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        # A second Ctrl-C must not abandon half-stopped children; the stop is bounded anyway.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping ...", flush=True)
        cluster.stop()
        state_path.unlink(missing_ok=True)
        print(f"stopped; the logs stay in {workdir} until the next up", flush=True)
    return 0


@contextmanager
def _progress(name: str) -> Iterator[None]:
    print(f"  {name:<32}", end="", flush=True)
    began = time.monotonic()
    try:
        yield
    except BaseException:
        print("did not start", flush=True)
        raise
    print(f"ok  {time.monotonic() - began:.1f} s", flush=True)


def _state_of(cluster: LocalCluster, banner: str) -> dict[str, Any]:
    servers = (cluster.redis, cluster.postgres, *cluster.nodes, *cluster.workers, cluster.nginx)
    procs = [server if isinstance(server, Proc) else server.proc for server in servers if server is not None]
    return {
        "pid": os.getpid(),
        "workdir": str(cluster.workdir),
        "banner": banner,
        "processes": [{"name": p.name, "pid": p.pid, "log": str(p.log_path)} for p in procs],
        "ready": {node.name: f"http://127.0.0.1:{port}/readyz"
                  for node, port in zip(cluster.nodes, cluster.node_ports, strict=True)},
    }


def _detach(args: argparse.Namespace, home: Path, workdir: Path) -> int:
    """Run ``up`` in a session of its own, its output in <workdir>/cluster.log; return once it is
    ready (its state file appears) or has failed."""
    argv = [sys.executable, "-m", "loadtest.cluster", "--home", str(home), "up", "--workdir", str(workdir),
            "--nodes", str(args.nodes), "--workers", str(args.workers)]
    argv += ["--no-nginx"] if args.no_nginx else []
    log_path = workdir / "cluster.log"
    with open(log_path, "ab") as log:
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, cwd=REPO_ROOT)
    shown = 0
    deadline = time.monotonic() + _DETACH_READY_S
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        print(text[shown:].split("\nChorus local cluster is up", 1)[0], end="", flush=True)
        shown = len(text)
        state = _state(home)
        if state is not None and state["pid"] == child.pid:
            print(state["banner"], flush=True)
            return 0
        if child.poll() is not None:
            print(f"the cluster did not start; see {log_path}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    child.terminate()
    print(f"the cluster was not ready in {_DETACH_READY_S} s; see {log_path}", file=sys.stderr)
    return 1


def _down(home: Path) -> int:
    state = _state(home)
    if state is None:
        print("no cluster is running")
        return 0
    os.kill(state["pid"], signal.SIGTERM)
    deadline = time.monotonic() + _STOP_WAIT_S
    while _alive(state["pid"]):
        if time.monotonic() > deadline:
            print(f"the cluster (pid {state['pid']}) did not stop in {_STOP_WAIT_S} s", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(f"stopped; logs in {state['workdir']}")
    return 0


def _status(home: Path) -> int:
    state = _state(home)
    if state is None:
        print("no cluster is running (./chorus.sh up)")
        return 3
    print(f"cluster pid {state['pid']}, workdir {state['workdir']}")
    healthy = True
    for proc in state["processes"]:
        alive = _alive(proc["pid"])
        ready = ""
        if proc["name"] in state["ready"] and alive:
            try:
                with urllib.request.urlopen(state["ready"][proc["name"]], timeout=2) as response:
                    ready = "ready" if response.status == 200 else f"not ready ({response.status})"
            except urllib.error.HTTPError as exc:
                ready = f"not ready ({exc.code})"
            except OSError as exc:
                ready = f"not answering ({exc})"
        healthy = healthy and alive and ready in ("", "ready")
        print(f"  {proc['name']:<12} {'running' if alive else 'exited':<8} pid {proc['pid']:<8} {ready}")
    return 0 if healthy else 1


def _logs(home: Path, name: str | None) -> int:
    state = _state(home)
    workdir = Path(state["workdir"]) if state else home / "run"
    if state is not None:
        known = {p["name"]: p["log"] for p in state["processes"]}
    else:  # the last run's
        known = {path.stem: str(path) for path in sorted(workdir.glob("*.log"))}
    if name is not None and name not in known:
        print(f"no log named {name!r}; there are: {', '.join(known) or 'none'}", file=sys.stderr)
        return 2
    paths = [known[name]] if name else list(known.values())
    if not paths:
        print(f"no logs in {workdir}", file=sys.stderr)
        return 2
    os.execvp("tail", ["tail", "-n", "50", "-F", *paths])


if __name__ == "__main__":
    sys.exit(main())
