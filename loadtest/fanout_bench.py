"""Fan-out benchmark: how many event deliveries a node makes per CPU-second, and how fast.

    python -m loadtest.fanout_bench                       # 2000 sockets of 200 users, 2 nodes
    python -m loadtest.fanout_bench --rate 500            # paced: 500 publishes/s in total

It starts a `LocalCluster` without nginx and without workers, opens `--sockets` WebSockets straight
to the nodes (the devices of each user spread over the nodes), then publishes `--events` events
per user through `fanout.redis_broker.RedisBroker` from this process (the same Lua script the workers
use), so only the nodes' delivery path is measured: Pub/Sub in, seq gate, per-socket queue and
writer, WebSocket out. Every event carries its publish time (``data.t``, wall clock) and each
socket's reader takes ``now - t`` on arrival; publisher, sockets and nodes share one clock.

Printed: deliveries per second (first publish to last arrival), p50/p90/p99/max delivery latency,
CPU-seconds used by the node processes during the publishing phase (psutil, user + system), and
deliveries per node CPU-second; Redis's and this process's CPU for context, since on a small
machine they compete with the nodes for the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import psutil
from redis.asyncio import Redis

from common.keys import Keys
from fanout.redis_broker import RedisBroker
from loadtest.cluster import ClusterConfig, LocalCluster
from protocol import Event, FrameType

CONNECT_CONCURRENCY = 100
CONNECT_ATTEMPTS = 5
T = TypeVar("T")


@dataclass(frozen=True)
class BenchConfig:
    sockets: int = 2000
    users: int = 200
    events: int = 50  # published per user
    rate: float = 0.0  # publishes per second in total; 0 = as fast as `concurrency` publishers go
    concurrency: int = 32
    nodes: int = 2
    payload_chars: int = 40  # a coalesced token's worth of text
    timeout_s: float = 300.0


class Sink:
    """Where every socket's reader reports an arrival."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.latencies_s: list[float] = []
        self.last_at = 0.0
        self.done = asyncio.Event()

    def arrived(self, published_at: float) -> None:
        now = time.time()
        self.latencies_s.append(now - published_at)
        self.last_at = now
        if len(self.latencies_s) >= self.expected:
            self.done.set()


async def _open(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse:
    ws, _hello = await open_with_hello(session, url)
    return ws


async def open_with_hello(
    session: aiohttp.ClientSession, url: str, *, attempts: int = CONNECT_ATTEMPTS
) -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
    """A Chorus socket once its `hello` arrived, and the hello (retried as `retried` says)."""

    async def once() -> tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]:
        ws = await session.ws_connect(url, heartbeat=None, max_msg_size=0)
        hello: dict[str, Any] = orjson.loads((await asyncio.wait_for(ws.receive(), 10)).data)
        if hello.get("type") != FrameType.HELLO:
            raise RuntimeError(f"first frame {hello}")
        return ws, hello

    return await retried(once, attempts)


async def retried(open_once: Callable[[], Awaitable[T]], attempts: int) -> T:
    """`open_once()`, tried again after a refusal or failure (a node may rate-limit a burst of new
    connections) after 0.2 s, doubling (at most 2 s), `attempts` times in all."""
    for attempt in itertools.count():
        try:
            return await open_once()
        except (aiohttp.ClientError, TimeoutError, RuntimeError):
            if attempt + 1 >= attempts:
                raise
            await asyncio.sleep(min(2.0, 0.2 * 2**attempt))
    raise AssertionError("unreachable")


async def _read(ws: aiohttp.ClientWebSocketResponse, sink: Sink, closed: list[int | None]) -> None:
    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.TEXT:
            frame = orjson.loads(msg.data)
            if frame.get("type") == FrameType.EVENT:
                sink.arrived(frame["data"]["t"])
    closed.append(ws.close_code)


def _busy_s() -> tuple[float, float]:
    """CPU-seconds the whole machine spent busy (all cores; not idle, iowait, steal or the guest
    times already inside user), and the part of it in softirq (loopback TCP is processed there,
    charged to no process)."""
    t = psutil.cpu_times()
    idle = t.idle + sum(getattr(t, f, 0.0) for f in ("iowait", "steal", "guest", "guest_nice"))
    return sum(t) - idle, getattr(t, "softirq", 0.0)


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


async def _publish(cluster: LocalCluster, users: list[str], config: BenchConfig) -> float:
    """Publish `config.events` per user; returns the monotonic time publishing started."""
    redis = Redis.from_url(cluster.redis_url, decode_responses=True,
                           max_connections=config.concurrency + 4)
    broker = RedisBroker(redis, Keys())
    text = "x" * config.payload_chars
    jobs = [(user, n) for n in range(config.events) for user in users]  # round-robin over users
    interval_s = config.concurrency / config.rate if config.rate else 0.0
    started = time.monotonic()

    async def publisher(index: int) -> None:
        # Publisher i goes at i/rate, then every concurrency/rate: evenly spaced, not in bursts.
        next_at = started + (index / config.rate if config.rate else 0.0)
        for user, n in jobs[index::config.concurrency]:
            if interval_s:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                next_at += interval_s
            # A token event whose data also carries the publish time (`t`) and its number (`n`).
            payload = orjson.dumps({"type": FrameType.EVENT, "conversation": "bench", "run": "bench",
                                    "event": Event.TOKEN, "data": {"t": time.time(), "n": n, "text": text},
                                    "ts": int(time.time() * 1000)}).decode()
            await broker.publish(user, payload)

    try:
        await asyncio.gather(*(publisher(i) for i in range(config.concurrency)))
    finally:
        await redis.aclose()
    return started


async def bench(config: BenchConfig, workdir: Path) -> dict[str, float]:
    cluster = LocalCluster(workdir, ClusterConfig(nodes=config.nodes, workers=0, nginx=False))
    await asyncio.to_thread(cluster.start)
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    readers: list[asyncio.Task[None]] = []
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:
        users = [f"bench{u}" for u in range(config.users)]
        urls = []
        for index in range(config.sockets):
            user, device = index % config.users, index // config.users
            port = cluster.node_ports[(user + device) % config.nodes]
            token = cluster.token(users[user])
            urls.append(f"ws://127.0.0.1:{port}/ws?access_token={token}&device=d{device}")
        slots = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def opened(url: str) -> aiohttp.ClientWebSocketResponse:
            async with slots:
                return await _open(session, url)

        began = time.monotonic()
        sockets = list(await asyncio.gather(*(opened(url) for url in urls)))
        connect_s = time.monotonic() - began
        sink = Sink(expected=config.sockets * config.events)
        closed: list[int | None] = []
        readers = [asyncio.create_task(_read(ws, sink, closed)) for ws in sockets]

        node_pids = [node.pid for node in cluster.nodes]
        redis_pid = cluster.redis.proc.pid if cluster.redis else None
        me = psutil.Process()
        load_before = os.getloadavg()[0]
        cpu_nodes, cpu_redis = _cpu_s(node_pids), _cpu_s([redis_pid] if redis_pid else [])
        cpu_me = sum(me.cpu_times()[:2])
        busy_before = _busy_s()
        wall_start = time.time()
        await _publish(cluster, users, config)
        published_s = time.time() - wall_start
        try:
            await asyncio.wait_for(sink.done.wait(), config.timeout_s)
        except TimeoutError:
            print(f"!! only {len(sink.latencies_s)} of {sink.expected} deliveries arrived; "
                  f"{len(closed)} sockets closed ({sorted(set(closed), key=str)})", file=sys.stderr)
        cpu_nodes = _cpu_s(node_pids) - cpu_nodes
        cpu_redis = (_cpu_s([redis_pid]) if redis_pid else 0.0) - cpu_redis
        cpu_me = sum(me.cpu_times()[:2]) - cpu_me
        busy_after = _busy_s()
        busy, softirq = busy_after[0] - busy_before[0], busy_after[1] - busy_before[1]
        delivered = len(sink.latencies_s)
        span_s = max(sink.last_at - wall_start, 1e-9)
        latencies_ms = sorted(s * 1000 for s in sink.latencies_s) or [0.0]
        return {
            "sockets": config.sockets, "users": config.users, "events_per_user": config.events,
            "connect_s": connect_s, "publishes": config.users * config.events,
            "publish_s": published_s, "deliveries": delivered, "expected": sink.expected,
            "span_s": span_s, "deliveries_per_s": delivered / span_s,
            "p50_ms": statistics.median(latencies_ms), "p90_ms": _pct(latencies_ms, 0.90),
            "p99_ms": _pct(latencies_ms, 0.99), "max_ms": latencies_ms[-1],
            "node_cpu_s": cpu_nodes, "deliveries_per_node_cpu_s": delivered / max(cpu_nodes, 1e-9),
            "redis_cpu_s": cpu_redis, "bench_cpu_s": cpu_me, "closed_sockets": len(closed),
            "softirq_cpu_s": softirq,
            "other_cpu_s": max(0.0, busy - softirq - cpu_nodes - cpu_redis - cpu_me),
            "load_before": load_before, "load_after": os.getloadavg()[0],
        }
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        await session.close()
        await asyncio.to_thread(cluster.stop)


def _pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def machine() -> str:
    debian = Path("/etc/debian_version")
    os_name = f"Debian {debian.read_text().strip()}" if debian.exists() else platform.platform()
    memory_gib = psutil.virtual_memory().total / 2**30
    return (f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), {memory_gib:.0f} GiB, "
            f"{os_name}, kernel {platform.release()}, Python {platform.python_version()}")


def render(result: dict[str, float], config: BenchConfig) -> str:
    mode = (f"paced at {config.rate:.0f} publishes/s" if config.rate
            else f"{config.concurrency} publishers flat out")
    return "\n".join([
        f"fan-out bench: {result['sockets']} sockets, {result['users']} users, {config.nodes} nodes, "
        f"{result['events_per_user']} events per user, {mode}",
        f"  machine                  {machine()}",
        f"  load average             {result['load_before']:.2f} before, {result['load_after']:.2f} after",
        f"  connected in             {result['connect_s']:.1f} s",
        f"  published                {result['publishes']:.0f} events in {result['publish_s']:.2f} s "
        f"({result['publishes'] / max(result['publish_s'], 1e-9):.0f}/s)",
        f"  delivered                {result['deliveries']:.0f} of {result['expected']:.0f} in "
        f"{result['span_s']:.2f} s = {result['deliveries_per_s']:.0f} deliveries/s",
        f"  delivery latency         p50 {result['p50_ms']:.1f} ms, p90 {result['p90_ms']:.1f} ms, "
        f"p99 {result['p99_ms']:.1f} ms, max {result['max_ms']:.1f} ms",
        f"  node CPU                 {result['node_cpu_s']:.2f} CPU-s = "
        f"{result['deliveries_per_node_cpu_s']:.0f} deliveries per node CPU-second",
        f"  redis CPU / bench CPU    {result['redis_cpu_s']:.2f} s / {result['bench_cpu_s']:.2f} s",
        f"  kernel softirq CPU       {result['softirq_cpu_s']:.2f} s (loopback TCP, charged to no process)",
        f"  other processes' CPU     {result['other_cpu_s']:.2f} s (the rest of the machine, same span)",
        f"  sockets closed early     {result['closed_sockets']:.0f}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.fanout_bench",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--sockets", type=int, default=2000)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--events", type=int, default=50, help="events published per user")
    parser.add_argument("--rate", type=float, default=0.0, help="publishes/s in total (0: flat out)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent publishers")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--payload", type=int, default=40, help="characters of text per event")
    parser.add_argument("--workdir", type=Path, help="keep the cluster's logs here")
    args = parser.parse_args(argv)
    config = BenchConfig(sockets=args.sockets, users=args.users, events=args.events, rate=args.rate,
                         concurrency=args.concurrency, nodes=args.nodes, payload_chars=args.payload)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chorus-bench-"))
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(bench(config, workdir))
    else:
        result = uvloop.run(bench(config, workdir))
    print(render(result, config), flush=True)
    if args.workdir is None:
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)
    return 0 if result["deliveries"] == result["expected"] else 1


if __name__ == "__main__":
    sys.exit(main())
