"""What S1 and S2 share: the systems under test, their deployments, and the load generators.

A ``Deployment`` is one system on loopback: a fresh Redis, two server processes ("node process 1
and 2") and how a device connects and how events are published. Chorus is a ``LocalCluster``
(2 nodes, no worker, no nginx; Postgres too, since a node needs it) with real JWTs; the peers
are ``loadtest/peers/`` (installed on first use by ``loadtest.peers.install``). ``LoadGen`` is
one ``loadtest.scenarios.loadgen`` process, driven over its stdin/stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import socket
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import psutil
from prometheus_client.parser import text_string_to_metric_families

from loadtest.cluster import ClusterConfig, LocalCluster
from loadtest.fanout_bench import machine
from loadtest.peers import install, tokens
from loadtest.procs import REPO_ROOT, Proc, RedisServer, free_port
from loadtest.scenarios import eio

SYSTEMS = ("chorus", "socketio-node", "python-socketio", "channels", "redispy-probe", "raw-probe")
_READY_TIMEOUT_S = 60


def systems(value: str) -> tuple[str, ...]:
    """``--systems``: a comma-separated subset of ``SYSTEMS``, in the order given."""
    chosen = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [name for name in chosen if name not in SYSTEMS]
    if not chosen or unknown:
        raise ValueError(f"systems must be among {', '.join(SYSTEMS)}; got {value!r}")
    return chosen


def chorus_env_argument(parser: argparse.ArgumentParser, example: str) -> None:
    """``--chorus-env NAME=VALUE`` (repeatable): a Chorus node setting beyond the defaults."""
    def setting(value: str) -> tuple[str, str]:
        name, sep, chosen = value.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"NAME=VALUE: {value!r}")
        return name, chosen

    parser.add_argument("--chorus-env", type=setting, action="append", default=[], metavar="NAME=VALUE",
                        help=f"a Chorus node setting, e.g. {example} (repeatable)")


def report(f: dict[str, Any], title: str, notes: Sequence[str], header: list[str], rows: list[list[str]],
           legend: str) -> str:
    """A scenario's printed report: its title, the machine and its load, `notes`, the legend and
    the table of `rows`, then the errors."""
    return "\n".join([
        title, f"  machine        {machine()}",
        f"  load average   {f.get('load_before', 0):.2f} before, {f.get('load_after', 0):.2f} after",
        *notes, "", legend, *table(header, rows), "",
        f"errors: {len(f['errors'])}", *(f"  {e}" for e in f["errors"][:20]),
    ])


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Right-aligned columns joined by `` | ``, header first."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, *rows]
    return [" | ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in lines]


def cpu_s(pids: list[int]) -> float:
    """User+system CPU-seconds of these processes so far (0 for one that is gone)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += psutil.Process(pid).memory_info().rss
    return total


def wait_port(port: int, proc: Proc, timeout_s: float = _READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        if not proc.alive:
            raise RuntimeError(f"{proc.name} exited on start:\n{proc.log_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.name} not accepting on :{port} in {timeout_s} s")
        time.sleep(0.05)


class Deployment:
    """One system: a fresh Redis and two server processes; ``start``/``stop`` are blocking."""

    def __init__(self, system: str, workdir: Path, *, chorus_env: dict[str, str] | None = None) -> None:
        self.system = system
        self.chorus_env = chorus_env or {}  # Chorus's nodes' settings beyond the defaults
        self.workdir = workdir / system
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.secret = secrets.token_hex(16)
        self.cluster: LocalCluster | None = None
        self.redis: RedisServer | None = None
        self.servers: list[Proc] = []
        self.ports: list[int] = []

    @property
    def server_pids(self) -> list[int]:
        return [proc.pid for proc in (self.cluster.nodes if self.cluster else self.servers)]

    @property
    def redis_pid(self) -> int:
        redis = self.cluster.redis if self.cluster else self.redis
        assert redis is not None
        return redis.proc.pid

    @property
    def redis_url(self) -> str:
        if self.cluster:
            return self.cluster.redis_url
        assert self.redis is not None
        return self.redis.url

    def histograms(self, *names: str) -> dict[str, dict[float, float]] | None:
        """The named histograms of Chorus's nodes, each summed over the nodes (bucket bound ->
        cumulative count); None for the peers, which export none."""
        return None if self.cluster is None else node_histograms(self.cluster, *names)

    def start(self) -> None:
        if self.system == "chorus":
            self.cluster = LocalCluster(self.workdir, ClusterConfig(nodes=2, workers=0, nginx=False,
                                                                    env=self.chorus_env))
            self.cluster.start()
            self.ports = self.cluster.node_ports
            return
        self.redis = RedisServer(self.workdir)
        self.redis.start()
        self.ports = [free_port(), free_port()]
        self.servers = [self._server(index, port) for index, port in enumerate(self.ports)]
        try:
            for proc in self.servers:
                proc.start()
            for proc, port in zip(self.servers, self.ports, strict=True):
                wait_port(port, proc)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.cluster:
            self.cluster.stop()
        for proc in self.servers:
            proc.stop()
        if self.redis:
            self.redis.stop()

    def _server(self, index: int, port: int) -> Proc:
        base = ["--port", str(port), "--redis", self.redis_url, "--secret", self.secret]
        env = {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
        name = f"{self.system}-{index + 1}"
        if self.system == "socketio-node":
            node_dir = install.node_peer_dir()
            argv = [install.node_binary(), str(node_dir / "server.js"), *base]
            return Proc(name, argv, workdir=self.workdir)
        if self.system == "python-socketio":
            argv = [str(install.peers_python()), "-m", "loadtest.peers.socketio_server", *base]
            return Proc(name, argv, env=env, workdir=self.workdir)
        if self.system == "channels":
            argv = [str(install.peers_python()), "-m", "uvicorn", "loadtest.peers.channels_app:application",
                    "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--ws", "websockets",
                    "--log-level", "warning", "--no-access-log", "--backlog", "4096"]
            env |= {"CHORUS_PEER_REDIS": self.redis_url, "CHORUS_PEER_SECRET": self.secret}
            return Proc(name, argv, env=env, workdir=self.workdir)
        module = {"redispy-probe": "redispy_probe", "raw-probe": "raw_probe"}[self.system]
        argv = [sys.executable, "-m", f"loadtest.peers.{module}", *base]
        return Proc(name, argv, env=env, workdir=self.workdir)

    def kill_server(self, index: int) -> None:
        """SIGKILL server process ``index`` (0: process 1): its sockets drop at once."""
        (self.cluster.nodes if self.cluster else self.servers)[index].kill()

    def device(self, user: str, slot: int, server: int | None = None) -> dict[str, Any]:
        """How device ``slot`` of ``user`` connects: to server process ``server`` (by default
        ``slot``'s: 0 on process 1, 1 on process 2, 2 on process 1)."""
        port = self.ports[(slot if server is None else server) % len(self.ports)]
        if self.cluster:
            url = f"ws://127.0.0.1:{port}/ws?access_token={self.cluster.token(user)}&device=d{slot}"
            return {"kind": "chorus", "url": url, "user": user, "slot": slot, "auth": None}
        token = tokens.token(self.secret, user)
        if self.system in ("socketio-node", "python-socketio"):
            return {"kind": "sio", "url": f"ws://127.0.0.1:{port}{eio.PATH}", "user": user, "slot": slot,
                    "auth": {"user": user, "token": token}}
        return {"kind": "ws", "url": f"ws://127.0.0.1:{port}/ws?user={user}&token={token}", "user": user,
                "slot": slot, "auth": None}

    def publisher(self, *, rate: float, duration_s: float, users: int, first_n: int,
                  payload_bytes: int) -> tuple[list[str], dict[str, str]]:
        """argv and extra environment of one step's publisher process."""
        args = ["--redis", self.redis_url, "--rate", str(rate), "--duration-s", str(duration_s),
                "--users", str(users), "--first-n", str(first_n), "--payload-bytes", str(payload_bytes)]
        env = {"PYTHONPATH": str(REPO_ROOT)}
        if self.system == "socketio-node":
            return [install.node_binary(), str(install.node_peer_dir() / "publisher.js"), *args], env
        if self.system == "channels":
            # channels_redis's connection pool refuses more than its size (MaxConnectionsError).
            return [str(install.peers_python()), "-m", "loadtest.peers.publisher", "--system", "channels",
                    "--in-flight", "64", *args], env
        if self.system == "python-socketio":
            return [str(install.peers_python()), "-m", "loadtest.peers.publisher",
                    "--system", "python-socketio", *args], env
        path = "chorus" if self.system == "chorus" else "plain"
        return [sys.executable, "-m", "loadtest.peers.publisher", "--system", path, *args], env


class LoadGen:
    """One load-generator process (``loadtest.scenarios.loadgen``)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start_many(cls, workdir: Path, count: int, *, nice: int = 0) -> list[LoadGen]:
        """``count`` generators, each logging to ``workdir/loadgen-<i>.log``. `nice` lowers their
        scheduling priority (`setpriority`): on a box the servers share with the clients, the
        clients then wait for a core rather than the servers, so what the servers measure of
        their own loops is theirs."""
        return [await cls._start(workdir / f"loadgen-{index}.log", nice) for index in range(count)]

    @classmethod
    async def _start(cls, log_path: Path, nice: int) -> LoadGen:
        log = await asyncio.to_thread(log_path.open, "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loadtest.scenarios.loadgen", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=log, limit=2**28,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        finally:
            log.close()  # the child holds its own descriptor
        if nice:
            os.setpriority(os.PRIO_PROCESS, proc.pid, nice)
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def ask(self, command: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(orjson.dumps(command) + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout_s)
        if not line:
            raise RuntimeError(f"load generator {self.pid} exited (see its log)")
        reply: dict[str, Any] = orjson.loads(line)
        return reply

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ask({"op": "close"}, timeout_s=30)
        with contextlib.suppress(ProcessLookupError):
            if self.proc.returncode is None:
                self.proc.kill()
        await self.proc.wait()


def node_histograms(cluster: LocalCluster, *names: str) -> dict[str, dict[float, float]]:
    """The named histograms of a local cluster's running nodes (their /metrics), each summed over
    the nodes: bucket bound -> cumulative count."""
    found: dict[str, dict[float, float]] = {name: {} for name in names}
    serving = {node.name for node in cluster.nodes if node.alive}
    for process, port in cluster.internal_ports.items():
        if process not in serving:  # a worker, or a node that was stopped (S1's drain)
            continue
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name not in found:
                continue
            buckets = found[family.name]
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return found


@contextlib.asynccontextmanager
async def deployed(
    system: str, workdir: Path, loadgens: int, *, chorus_env: dict[str, str] | None = None,
    loadgen_nice: int = 0,
) -> AsyncIterator[tuple[Deployment, list[LoadGen]]]:
    """`system` started, with `loadgens` load generators (at `loadgen_nice`, see
    `LoadGen.start_many`); all of it stopped on the way out."""
    dep = Deployment(system, workdir, chorus_env=chorus_env)
    await asyncio.to_thread(dep.start)
    gens: list[LoadGen] = []
    try:
        gens = await LoadGen.start_many(dep.workdir, loadgens, nice=loadgen_nice)
        yield dep, gens
    finally:
        await asyncio.gather(*(g.close() for g in gens), return_exceptions=True)
        await asyncio.to_thread(dep.stop)


def opened_figures(system: str, opened: dict[str, Any]) -> dict[str, Any]:
    """The figures every scenario starts with: the sockets `open_devices` opened."""
    return {"system": system, "sockets": opened["ok"], "open_failed": opened["refused"],
            "open_errors": opened["errors"], "open_s": opened["open_s"]}


async def open_devices(loadgens: list[LoadGen], devices: list[dict[str, Any]],
                       concurrency: int) -> dict[str, Any]:
    """Spread ``devices`` over the generators (a user's devices on the same one) and open them all;
    returns ok, failed, errors and the wall time to open them (s)."""
    shares: list[list[dict[str, Any]]] = [[] for _ in loadgens]
    for device in devices:
        shares[int(device["user"][1:]) % len(loadgens)].append(device)
    began = time.monotonic()
    replies = await asyncio.gather(*(
        gen.ask({"op": "open", "sockets": share, "concurrency": max(1, concurrency // len(loadgens))},
                timeout_s=600)
        for gen, share in zip(loadgens, shares, strict=True)))
    return {"ok": sum(r["ok"] for r in replies), "refused": sum(r["refused"] for r in replies),
            "errors": [e for r in replies for e in r["errors"]], "open_s": time.monotonic() - began}


async def each_system(
    systems: Sequence[str], run: Callable[[str], Awaitable[dict[str, Any]]],
    problems: Callable[[str, dict[str, Any]], list[str]] = lambda system, result: [],
) -> dict[str, Any]:
    """Run every system in turn, keeping going when one fails to start: the figures of all, and
    the errors (a system that failed, sockets that did not open, what `problems` finds)."""
    figures: dict[str, Any] = {"errors": [], "systems": {}, "load_before": os.getloadavg()[0]}
    for system in systems:
        try:
            result = await run(system)
        except Exception as exc:  # one system failing to start must not lose the others' figures
            figures["errors"].append(f"{system}: {exc!r}"[:2000])
            continue
        figures["systems"][system] = result
        if result["open_failed"]:
            figures["errors"].append(f"{system}: {result['open_failed']} sockets failed to open: "
                                     f"{result['open_errors'][:2]}")
        figures["errors"].extend(problems(system, result))
    figures["load_after"] = os.getloadavg()[0]
    return figures
