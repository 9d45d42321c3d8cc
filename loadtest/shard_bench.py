"""Shard benchmark: how Chorus's publish path spreads over the primaries of a Redis Cluster.

    python -m loadtest.shard_bench                       # 1, 2 and 3 primaries at 3,000 events/s
    python -m loadtest.shard_bench --shards 1 3 --rate 5000 --seconds 10

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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import tempfile
import time
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


def _publisher(url: str, users: int, seconds: float, rate: float, seed: int, out: Any) -> None:
    """One publisher process: publishes at `rate` events/s for `seconds`; sends the events done and
    the wall-clock window it published in (start-up, seconds of imports, is not in it)."""
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
            due = int((now - start) * rate)
            while sent < due and len(in_flight) < 256:  # at most 256 in flight: no unbounded backlog
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


async def run_shards(shards: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        cluster = RedisClusterServer(Path(workdir), primaries=shards, replicas=0)
        cluster.start()
        try:
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
                                                               args.rate / args.processes, index, send))
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
        finally:
            cluster.stop()
    busiest = max(busy.values())
    return {"shards": shards, "rate": args.rate, "published_per_s": round(published / elapsed),
            "delivered_per_s": round(counted[0] / elapsed),
            "primary_cpu_share": sorted(round(share, 3) for share in busy.values()),
            "projected_ceiling_per_s": round(args.rate / busiest) if busiest else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rate", type=float, default=3000.0, help="events/s published in all")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    results = [asyncio.run(run_shards(shards, args)) for shards in args.shards]
    print(json.dumps({"machine": machine(), "results": results}, indent=2))
    print(f"\n{'shards':>6} {'published/s':>12} {'delivered/s':>12} {'busiest primary':>16} "
          f"{'ceiling/s':>10}")
    for r in results:
        print(f"{r['shards']:>6} {r['published_per_s']:>12} {r['delivered_per_s']:>12} "
              f"{max(r['primary_cpu_share']):>16.1%} {r['projected_ceiling_per_s']:>10}")


if __name__ == "__main__":
    main()
