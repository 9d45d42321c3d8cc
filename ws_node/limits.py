"""Limits that keep one client from hurting others: connection rate per node, commands and REST
requests per user. Each refusal is a documented code (docs/security.md). The hard limits are
counted where they are taken, each in one atomic Redis step: devices per user in presence.lua
(`ws_node.presence`), runs in flight per user in `runs.admission`.

The token-bucket arithmetic is one pure function, `take`, shared by the node-local bucket (new
connections) and mirrored line for line by ws_node/ratelimit.lua (commands, and REST requests, per
user: a bucket each in Redis for the whole cluster, so a user cannot multiply the limit by spreading
devices over nodes).
Tokens are counted in thousandths and time in milliseconds, as integers: Lua and Python then compute
bit-identical results, which tests/test_security.py checks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from redis.asyncio import Redis

from common.keys import Keys

_RATELIMIT_LUA = resources.files("ws_node").joinpath("ratelimit.lua").read_text()
MILLI = 1000


@dataclass(frozen=True)
class Rate:
    """`per_s` tokens per second, at most `burst` saved up. `per_s` 0 means unlimited."""

    per_s: float
    burst: int

    @property
    def unlimited(self) -> bool:
        return self.per_s <= 0


@dataclass(frozen=True)
class Bucket:
    milli_tokens: int
    at_ms: int


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_ms: int  # 0 when allowed
    bucket: Bucket


def take(bucket: Bucket | None, *, now_ms: int, rate: Rate, cost: int = 1) -> Decision:
    """Refill `bucket` for the time since it was last used, then take `cost` tokens if there are
    enough. A new bucket starts full. A clock that went backwards refills nothing."""
    if rate.unlimited:
        return Decision(True, 0, bucket or Bucket(0, now_ms))
    capacity = rate.burst * MILLI
    if bucket is None:
        milli, at_ms = capacity, now_ms
    else:
        milli, at_ms = bucket.milli_tokens, bucket.at_ms
    if now_ms > at_ms:
        milli = min(capacity, milli + math.floor((now_ms - at_ms) * rate.per_s))
        at_ms = now_ms
    need = cost * MILLI
    if milli >= need:
        return Decision(True, 0, Bucket(milli - need, at_ms))
    return Decision(False, math.ceil((need - milli) / rate.per_s), Bucket(milli, at_ms))


class LocalBucket:
    """A token bucket in this process (new connections per node)."""

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self._bucket: Bucket | None = None

    def take(self) -> Decision:
        if self.rate.unlimited:
            return Decision(True, 0, Bucket(0, 0))
        decision = take(self._bucket, now_ms=int(self.clock() * 1000), rate=self.rate)
        self._bucket = decision.bucket
        return decision


class RedisBuckets:
    """Token buckets in Redis, one per user (`key`: `Keys.command_bucket` unless told), shared by
    every node; the clock is Redis's own (TIME), so nodes with skewed clocks agree."""

    def __init__(self, redis: Redis, keys: Keys, rate: Rate, key: Callable[[str], str] | None = None) -> None:
        self.keys = keys
        self.rate = rate
        self._key = key or keys.command_bucket
        self._script = redis.register_script(_RATELIMIT_LUA)

    async def take(self, user: str, *, now_ms: int = 0) -> Decision:
        """`now_ms` 0 uses Redis's clock; tests pass their own."""
        if self.rate.unlimited:
            return Decision(True, 0, Bucket(0, 0))
        allowed, retry_after_ms, milli, at_ms = await self._script(
            keys=[self._key(user)], args=[self.rate.per_s, self.rate.burst, 1, now_ms]
        )
        return Decision(bool(allowed), int(retry_after_ms), Bucket(int(milli), int(at_ms)))

