"""The Python publishers of S2: one step of events at a fixed offered rate, each through one
system's own path to Redis.

    python -m loadtest.peers.publisher --system plain --redis URL --rate 5000 --duration-s 8 \
        --users 2000 --first-n 0 --payload-bytes 150

Systems: ``chorus`` (``fanout.redis_broker.RedisBroker.publish``: the Lua script every Chorus
producer runs; Chorus's interpreter), ``python-socketio`` (a write-only ``AsyncRedisManager``
emitting ``ev`` to room ``U``) and ``channels`` (``group_send`` on channels_redis's layer), both in
the peers venv, and ``plain`` (``PUBLISH probe:U payload``, for the probes). ``node/publisher.js``
does the same for Node Socket.IO.

Pacing: every millisecond the events due by then (``elapsed * rate``) are started as tasks, each
taking the wall clock (``t``) just before its publish call; at most ``--in-flight`` publishes wait
at once, so a path slower than the rate shows as a publish rate under the offered one. Event ``n``
(from ``--first-n`` on) goes to a random user ``u0..u{users-1}``; the payload is JSON padded to
``--payload-bytes``. Prints one JSON line: published, first_n, started_at, span_s, cpu_s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any

Publish = Callable[[str, dict[str, Any]], Awaitable[object]]


def event(user: str, n: int, payload_bytes: int, extra: int = 0) -> dict[str, Any]:
    """The event every system delivers: user, number, publish time (wall clock), padding; ``extra``
    is the size of whatever envelope the system's own payload puts around it."""
    bare = {"u": user, "n": n, "t": time.time(), "p": ""}
    bare["p"] = "x" * max(0, payload_bytes - extra - len(json.dumps(bare, separators=(",", ":"))))
    return bare


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


async def _path(system: str, redis_url: str) -> tuple[Publish, Callable[[], Awaitable[None]], int]:
    """(publish, close, envelope bytes) for one system."""
    if system == "plain":
        from redis.asyncio import Redis

        redis = Redis.from_url(redis_url, max_connections=512)

        async def plain(user: str, data: dict[str, Any]) -> object:
            return await redis.publish("probe:" + user, _dumps(data))

        return plain, redis.aclose, 0
    if system == "chorus":
        from redis.asyncio import Redis

        from common.keys import Keys
        from fanout.redis_broker import RedisBroker
        from protocol import Event, FrameType

        chorus_redis = Redis.from_url(redis_url, decode_responses=True, max_connections=512)
        broker = RedisBroker(chorus_redis, Keys())
        envelope = {"type": FrameType.EVENT, "conversation": "bench", "run": "bench", "event": Event.TOKEN,
                    "ts": 0, "seq": 0, "data": None}

        async def chorus(user: str, data: dict[str, Any]) -> object:
            frame = {**envelope, "data": data, "ts": int(data["t"] * 1000)}
            del frame["seq"]  # the script adds it
            return await broker.publish(user, _dumps(frame))

        # The event inside Chorus's frame: type, conversation, run, event, ts and the seq around it.
        extra = len(_dumps({**envelope, "ts": int(time.time() * 1000), "seq": 100000, "data": {}})) - 2
        return chorus, chorus_redis.aclose, extra
    if system == "python-socketio":
        import socketio

        # A pool large enough for --in-flight: on "too many connections" the manager would make a
        # new client (and pool) per retry.
        manager = socketio.AsyncRedisManager(redis_url, write_only=True,
                                             redis_options={"max_connections": 1024})

        async def emit(user: str, data: dict[str, Any]) -> object:
            return await manager.emit("ev", data, room=user, namespace="/")

        async def close_manager() -> None:
            redis = getattr(manager, "redis", None)
            if redis is not None:
                await redis.aclose()

        return emit, close_manager, 0
    if system == "channels":
        import os

        os.environ["CHORUS_PEER_REDIS"] = redis_url
        from channels.layers import get_channel_layer

        import loadtest.peers.channels_app  # noqa: F401  (configures Django and the layer)

        layer = get_channel_layer()

        async def group_send(user: str, data: dict[str, Any]) -> object:
            return await layer.group_send(user, {"type": "ev", "text": _dumps(data)})

        async def close_layer() -> None:
            await layer.close_pools()

        return group_send, close_layer, 0
    raise ValueError(f"unknown system {system!r}")


async def publish_step(publish: Publish, *, rate: float, duration_s: float, users: int, first_n: int,
                       payload_bytes: int, extra: int, in_flight: int) -> dict[str, Any]:
    total = round(rate * duration_s)
    slots = asyncio.Semaphore(in_flight)
    tasks: set[asyncio.Task[None]] = set()
    errors: list[str] = []

    async def one(n: int) -> None:
        async with slots:
            user = f"u{random.randrange(users)}"
            try:
                await publish(user, event(user, n, payload_bytes, extra))
            except Exception as exc:  # counted and reported: the step's loss says the rest
                errors.append(repr(exc))

    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started_at, start = time.time(), time.monotonic()
    sent = 0
    while sent < total:
        due = min(total, int((time.monotonic() - start) * rate))
        for n in range(first_n + sent, first_n + due):
            task = asyncio.create_task(one(n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        sent = max(sent, due)
        await asyncio.sleep(0.001)
    while tasks:
        await asyncio.gather(*tasks)
    span_s = time.time() - started_at
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    # A publish that failed is still counted: its event is then missing on both devices.
    return {"published": total, "first_n": first_n, "started_at": started_at, "span_s": span_s,
            "cpu_s": cpu.ru_utime + cpu.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime,
            "errors": len(errors), "first_error": errors[0] if errors else ""}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    publish, close, extra = await _path(args.system, args.redis)
    try:
        return await publish_step(publish, rate=args.rate, duration_s=args.duration_s, users=args.users,
                                  first_n=args.first_n, payload_bytes=args.payload_bytes, extra=extra,
                                  in_flight=args.in_flight)
    finally:
        await close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.peers.publisher")
    parser.add_argument("--system", required=True, choices=["plain", "chorus", "python-socketio", "channels"])
    parser.add_argument("--redis", required=True)
    parser.add_argument("--rate", type=float, required=True, help="events per second")
    parser.add_argument("--duration-s", type=float, required=True)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--first-n", type=int, default=0)
    parser.add_argument("--payload-bytes", type=int, default=150)
    parser.add_argument("--in-flight", type=int, default=256)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(args))
    else:
        result = uvloop.run(run(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
