"""Publish benchmark: what Chorus's publish path costs Redis, against a plain PUBLISH.

    python -m loadtest.publish_bench                       # flat out: the most events/s
    python -m loadtest.publish_bench --rate 20000          # Redis CPU of both modes at one rate

One Redis (a fresh `loadtest.procs.RedisServer`), `--subscribers` Pub/Sub connections subscribed to
every user's channel (as that many nodes would be, each event is delivered to each), and
`--processes` publisher processes, each keeping `--concurrency` publishes in flight to random users
among `--users`, for `--seconds`, flat out or at `--rate` events/s in all. Two modes, one after
the other on the same Redis:

- `chorus`: `fanout.redis_broker.RedisBroker.publish`, the script every event of Chorus goes
  through (seq, history append with trim, producer dedupe, TTLs, PUBLISH), pipelined through
  `fanout.resp_pipe.RespPipe` as the workers and nodes publish;
- `publish`: a plain `PUBLISH` of the same ~150-byte payload on the same kind of connection.

Printed per mode: events/s published, deliveries/s the subscribers counted, Redis CPU per event
and per delivery (psutil, user+system of redis-server over the window), publisher CPU per event,
and the ratio of the two modes' Redis CPU per delivery.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from redis.asyncio import Redis

from common.keys import Keys
from fanout.redis_broker import RedisBroker
from fanout.resp_pipe import RespPipe
from fanout.resp_pubsub import RespPubSub
from loadtest.fanout_bench import machine
from loadtest.procs import RedisServer

PREFIX = "pbench"
PAYLOAD = '{"type":"event","conversation":"c_0123456789abcdef","run":"r_0123456789abcdef","event":"token",' \
          '"data":{"text":"a coalesced token or two of an answer"},"ts":1795358019091}'


def _publisher(url: str, mode: str, users: int, concurrency: int, seconds: float, rate: float, seed: int,
               out: Any) -> None:
    """One publisher process: `concurrency` loops publishing for `seconds`, together `rate` events
    a second (0: as fast as they can); sends (events, cpu_s)."""
    import uvloop

    async def main() -> tuple[int, float]:
        redis = Redis.from_url(url, decode_responses=True)
        broker = RedisBroker(redis, Keys(PREFIX), history_max=1000)
        pipe = RespPipe.from_url(url)
        keys = Keys(PREFIX)
        rng = random.Random(seed)
        count = 0
        deadline = time.monotonic() + seconds

        async def loop(index: int) -> None:
            nonlocal count
            every_s = concurrency / rate if rate else 0.0
            due = time.monotonic() + every_s * index / concurrency
            while time.monotonic() < deadline:
                if every_s:
                    due += every_s
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
                user = f"u{rng.randrange(users)}"
                if mode == "chorus":
                    await broker.publish(user, PAYLOAD)
                else:
                    await pipe.execute("PUBLISH", keys.channel(user), PAYLOAD)
                count += 1

        started = time.process_time()
        await asyncio.gather(*(loop(index) for index in range(concurrency)))
        cpu_s = time.process_time() - started
        await broker.aclose()
        await pipe.aclose()
        await redis.aclose()
        return count, cpu_s

    out.send(uvloop.run(main()))


class Delivered:
    """Messages the subscribers received, and an event for when they reach `target`."""

    def __init__(self) -> None:
        self.count = 0
        self.target: int | None = None
        self.reached = asyncio.Event()

    def add(self) -> None:
        self.count += 1
        if self.target is not None and self.count >= self.target:
            self.reached.set()

    def expect(self, target: int) -> None:
        self.target = target
        if self.count >= target:
            self.reached.set()


async def _subscribe(url: str, channels: list[str], delivered: Delivered) -> RespPubSub:
    sub = RespPubSub.from_url(url)
    await sub.ping()
    for i in range(0, len(channels), 500):
        await sub.subscribe(*channels[i:i + 500])
    confirmed = 0
    while confirmed < len(channels):
        message = await sub.get_message(timeout=10)
        if message is None:
            raise TimeoutError("subscriptions not confirmed")
        confirmed += message["type"] == "subscribe"

    async def drain() -> None:
        while True:
            message = await sub.get_message(timeout=1)
            if message is not None and message["type"] == "message":
                delivered.add()

    sub.drain_task = asyncio.ensure_future(drain())  # type: ignore[attr-defined]
    return sub


async def _run_mode(redis_server: RedisServer, redis_pid: int, mode: str,
                    args: argparse.Namespace) -> dict[str, Any]:
    channels = [Keys(PREFIX).channel(f"u{n}") for n in range(args.users)]
    delivered = Delivered()
    subs = [await _subscribe(redis_server.url, channels, delivered) for _ in range(args.subscribers)]
    context = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    redis_proc = psutil.Process(redis_pid)
    cpu_before = sum(redis_proc.cpu_times()[:2])
    began = time.monotonic()
    for index in range(args.processes):
        receive, send = context.Pipe(duplex=False)
        share = args.rate / args.processes
        proc = context.Process(target=_publisher, args=(redis_server.url, mode, args.users, args.concurrency,
                                                         args.seconds, share, index, send))
        proc.start()
        pipes.append(receive)
        procs.append(proc)
    results = [await asyncio.to_thread(receive.recv) for receive in pipes]
    expected = sum(count for count, _ in results) * args.subscribers
    delivered.expect(expected)
    with contextlib.suppress(TimeoutError):  # what has not arrived 10 s later is lost
        await asyncio.wait_for(delivered.reached.wait(), 10)
    elapsed_s = time.monotonic() - began
    redis_cpu_s = sum(redis_proc.cpu_times()[:2]) - cpu_before
    for proc in procs:
        proc.join(10)
    for sub in subs:
        sub.drain_task.cancel()  # type: ignore[attr-defined]
        await sub.aclose()
    events = sum(count for count, _ in results)
    publisher_cpu_s = sum(cpu for _, cpu in results)
    return {
        "mode": mode, "events": events, "events_per_s": round(events / args.seconds),
        "deliveries": delivered.count, "deliveries_per_s": round(delivered.count / elapsed_s),
        "lost": max(0, expected - delivered.count),
        "redis_cpu_us_per_event": round(redis_cpu_s / events * 1e6, 2),
        "redis_cpu_us_per_delivery": round(redis_cpu_s / max(1, delivered.count) * 1e6, 2),
        "redis_busy": round(redis_cpu_s / elapsed_s, 2),
        "publisher_cpu_us_per_event": round(publisher_cpu_s / events * 1e6, 2),
    }


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="chorus-publish-bench-"))
    redis_server = RedisServer(workdir)
    redis_server.start()
    try:
        redis = Redis.from_url(redis_server.url)
        info = await redis.info("server")
        pid = int(info["process_id"])
        await redis.aclose()
        modes = [await _run_mode(redis_server, pid, mode, args) for mode in ("chorus", "publish")]
    finally:
        redis_server.stop()
    chorus, plain = modes
    return {"machine": machine(), "config": vars(args), "modes": modes,
            "redis_cpu_ratio_per_delivery": round(chorus["redis_cpu_us_per_delivery"]
                                                  / plain["redis_cpu_us_per_delivery"], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.publish_bench",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="publisher processes")
    parser.add_argument("--concurrency", type=int, default=256, help="publishes in flight per process")
    parser.add_argument("--seconds", type=float, default=5.0, help="per mode")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--subscribers", type=int, default=2, help="Pub/Sub connections (nodes)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="events/s offered in all (0: flat out); compare Redis CPU at one rate")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import uvloop

    figures = uvloop.run(_main(args))
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        offered = f"{args.rate:g} events/s offered" if args.rate else "flat out"
        print(f"publish bench: {args.processes} publisher processes x {args.concurrency} in flight, "
              f"{offered}, {args.users} users, {args.subscribers} subscribers, {args.seconds:g} s per mode")
        print("mode    | events/s | deliveries/s | lost | redis us/event | redis us/delivery | redis busy | "
              "publisher us/event")
        for m in figures["modes"]:
            print(f"{m['mode']:7} | {m['events_per_s']:8} | {m['deliveries_per_s']:12} | {m['lost']:4} | "
                  f"{m['redis_cpu_us_per_event']:14} | {m['redis_cpu_us_per_delivery']:17} | "
                  f"{m['redis_busy']:10} | {m['publisher_cpu_us_per_event']:18}")
        print(f"Redis CPU per delivery, chorus / plain PUBLISH: {figures['redis_cpu_ratio_per_delivery']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
