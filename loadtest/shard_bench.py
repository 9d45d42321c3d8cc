"""Shard benchmark: how Chorus's publish path spreads over the primaries of a Redis Cluster.

    python -m loadtest.shard_bench                       # 1, 2 and 3 primaries at 3,000 events/s
    python -m loadtest.shard_bench --shards 1 3 --rate 5000 --seconds 10
    python -m loadtest.shard_bench --primary-cpu 0.1     # each primary capped at 10% of a core,
                                                         # publishers as fast as the cluster takes

For each shard count: a fresh `loadtest.procs.RedisClusterServer` (no replicas), one subscriber
(`fanout.cluster_pubsub.ClusterPubSub`, as a node's hub) subscribed to every user's channel, and
`--processes` publisher processes publishing through `fanout.redis_broker.RedisBroker` on a cluster
client (the script with SPUBLISH) to random users among `--users`, at `--rate` events/s in all, for
`--seconds`.

Printed per shard count: events/s published and delivered, each primary's CPU (psutil, user+system
over the window, as a share of one core), and the *projected* ceiling: the rate divided by the
busiest primary's share, i.e. the events/s at which that primary would be saturated. On this 2-core
machine the publishers (Python) and Redis share the cores, so a shard count cannot be driven to its
ceiling here; the per-primary CPU at one fixed rate is the robust figure, and the ceiling is what it
projects for a machine per primary.

`--primary-cpu F` measures the scaling itself instead: each primary is confined to a fraction F of
one core (a cgroup CPU quota: root, and cgroup v1's `cpu` controller or v2's `cpu.max`), which
stands in for a machine per primary, and the publishers keep `--in-flight` publishes outstanding
each, with no rate, so the primaries are the bottleneck: delivered events/s is then what 1, 2 and 3
primaries of that size carry, measured. F must leave the publishers and the subscriber room on the
machine's cores (0.1 on 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from common.keys import Keys
from common.redis_client import connect
from fanout.redis_broker import RedisBroker
from loadtest.fanout_bench import machine
from loadtest.procs import RedisClusterServer
from loadtest.publish_bench import PAYLOAD

PREFIX = "sbench"


def _publisher(url: str, users: int, seconds: float, rate: float, in_flight_max: int, seed: int,
               out: Any) -> None:
    """One publisher process: publishes at `rate` events/s (0: as fast as `in_flight_max`
    outstanding publishes allow) for `seconds`; sends the events done and the wall-clock window it
    published in (start-up, seconds of imports, is not in it)."""
    import uvloop

    async def main() -> tuple[int, float, float]:
        redis = connect(url, socket_timeout_s=10, pool_size=64, pool_wait_s=10, cluster=True)
        broker = RedisBroker(redis, Keys(PREFIX), history_max=1000)
        rng = random.Random(seed)
        done = sent = 0
        in_flight: set[asyncio.Task[Any]] = set()

        def finished(task: asyncio.Task[Any]) -> None:
            nonlocal done
            in_flight.discard(task)
            done += 1

        start, began = time.monotonic(), time.time()
        while (now := time.monotonic()) - start < seconds:
            due = int((now - start) * rate) if rate > 0 else sent + in_flight_max
            while sent < due and len(in_flight) < in_flight_max:  # no unbounded backlog
                task = asyncio.create_task(broker.publish(f"u{rng.randrange(users)}", PAYLOAD))
                in_flight.add(task)
                task.add_done_callback(finished)
                sent += 1
            await asyncio.sleep(0.002)
        await asyncio.gather(*in_flight, return_exceptions=True)
        ended = time.time()
        await broker.aclose()
        await redis.aclose()
        return done, began, ended

    out.send(uvloop.run(main()))


async def _count_deliveries(url: str, users: int, ready: asyncio.Event, stop: asyncio.Event,
                            counted: list[int]) -> None:
    redis = connect(url, socket_timeout_s=10, pool_size=8, pool_wait_s=10, cluster=True)
    broker = RedisBroker(redis, Keys(PREFIX))
    pubsub = broker.pubsub()
    await pubsub.ping()
    channels = [broker.channel(f"u{i}") for i in range(users)]
    for index in range(0, len(channels), 500):
        await pubsub.subscribe(*channels[index:index + 500])
    counted.append(0)
    ready.set()
    while not stop.is_set():
        message = await pubsub.get_message(timeout=0.2)
        if message is not None and message["type"] == "message":
            counted[0] += 1
    await pubsub.aclose()
    await redis.aclose()


@contextlib.contextmanager
def cpu_capped(pids: list[int], fraction: float | None) -> Iterator[None]:
    """Each process in `pids` confined to `fraction` of one core, in a cgroup of its own (none:
    no cap). Needs root; cgroup v1's `cpu` controller, else v2's `cpu.max`."""
    if fraction is None:
        yield
        return
    v1 = Path("/sys/fs/cgroup/cpu")
    root = v1 if (v1 / "cpu.cfs_quota_us").exists() else Path("/sys/fs/cgroup")
    period_us = 100_000
    groups = []
    try:
        for pid in pids:
            group = root / f"chorus-shard-bench-{pid}"
            group.mkdir()
            groups.append(group)
            if root == v1:
                (group / "cpu.cfs_period_us").write_text(str(period_us))
                (group / "cpu.cfs_quota_us").write_text(str(int(fraction * period_us)))
            else:
                (group / "cpu.max").write_text(f"{int(fraction * period_us)} {period_us}")
            (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        for group in groups:
            for member in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (root / "cgroup.procs").write_text(member)
            group.rmdir()


async def run_shards(shards: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        cluster = RedisClusterServer(Path(workdir), primaries=shards, replicas=0)
        cluster.start()
        try:
            with cpu_capped([cluster.procs[port].pid for port in cluster.primaries()], args.primary_cpu):
                return await _measure(cluster, shards, args)
        finally:
            cluster.stop()


async def _measure(cluster: RedisClusterServer, shards: int, args: argparse.Namespace) -> dict[str, Any]:
    procs = {port: psutil.Process(cluster.procs[port].pid) for port in cluster.primaries()}
    ready, stop = asyncio.Event(), asyncio.Event()
    counted: list[int] = []
    reader = asyncio.create_task(_count_deliveries(cluster.url, args.users, ready, stop, counted))
    await asyncio.wait_for(ready.wait(), 60)
    before = {port: sum(p.cpu_times()[:2]) for port, p in procs.items()}
    ctx = multiprocessing.get_context("spawn")
    pipes, workers = [], []
    for index in range(args.processes):
        receive, send = ctx.Pipe(duplex=False)
        worker = ctx.Process(target=_publisher, args=(cluster.url, args.users, args.seconds,
                                                       args.rate / args.processes, args.in_flight,
                                                       index, send))
        worker.start()
        pipes.append(receive)
        workers.append(worker)
    reports = await asyncio.gather(*(asyncio.to_thread(pipe.recv) for pipe in pipes))
    for worker in workers:
        worker.join()
    published = sum(done for done, _, _ in reports)
    # The window the publishers published in; Redis is idle while they start.
    elapsed = max(ended for _, _, ended in reports) - min(began for _, began, _ in reports)
    await asyncio.sleep(0.5)  # the last deliveries
    stop.set()
    await reader
    busy = {port: (sum(p.cpu_times()[:2]) - before[port]) / elapsed for port, p in procs.items()}
    busiest = max(busy.values())
    return {"shards": shards, "rate": args.rate, "primary_cpu_cap": args.primary_cpu,
            "published_per_s": round(published / elapsed), "delivered_per_s": round(counted[0] / elapsed),
            "primary_cpu_share": sorted(round(share, 3) for share in busy.values()),
            "projected_ceiling_per_s": round(args.rate / busiest) if busiest and args.rate > 0 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rate", type=float, default=3000.0, help="events/s published in all")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=256, help="most publishes outstanding per publisher")
    parser.add_argument("--primary-cpu", type=float, default=None,
                        help="cap each primary at this fraction of a core, and publish as fast as they take "
                             "(root; sets --rate 0)")
    args = parser.parse_args()
    if args.primary_cpu is not None:
        args.rate = 0.0
    results = [asyncio.run(run_shards(shards, args)) for shards in args.shards]
    print(json.dumps({"machine": machine(), "results": results}, indent=2))
    print(f"\n{'shards':>6} {'published/s':>12} {'delivered/s':>12} {'busiest primary':>16} "
          f"{'ceiling/s':>10}")
    for r in results:
        print(f"{r['shards']:>6} {r['published_per_s']:>12} {r['delivered_per_s']:>12} "
              f"{max(r['primary_cpu_share']):>16.1%} {r['projected_ceiling_per_s'] or '-':>10}")


if __name__ == "__main__":
    main()
