"""Heartbeats: a small JSON record per live process in a Redis hash, rewritten every `HEARTBEAT_S`.

Nodes write theirs to `Keys.nodes` (`ws_node.admin`), workers to `Keys.workers`
(`agent_worker.heartbeat`); the admin API reads both. A record carries its own expiry
(`expires_at`, ms), so a process that died drops out after `HEARTBEAT_TTL_S` though the hash
lives on; the reader prunes such records, and the hash itself expires once nobody writes.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio import Redis

HEARTBEAT_S = 2.0
HEARTBEAT_TTL_S = 10.0  # a record not rewritten for this long is a process gone


def iso(seconds: float) -> str:
    """A wall-clock time (seconds) as ISO 8601 in UTC, as the records and the admin API show it."""
    return datetime.fromtimestamp(seconds, UTC).isoformat()


async def beat(redis: Redis, key: str, name: str, record: dict[str, Any]) -> None:
    """Write `name`'s heartbeat `record`, valid for `HEARTBEAT_TTL_S`; the hash itself expires once
    no process wrote for that long."""
    ttl_ms = int(HEARTBEAT_TTL_S * 1000)
    stamped = {**record, "updated_at": iso(time.time()), "expires_at": int(time.time() * 1000) + ttl_ms}
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hset(key, name, orjson.dumps(stamped))
        pipe.pexpire(key, ttl_ms)
        await pipe.execute()


async def heartbeats(redis: Redis, key: str) -> list[dict[str, Any]]:
    """The records in heartbeat hash `key` that have not expired, by name; expired ones are removed."""
    entries: dict[str, str] = await redis.hgetall(key)  # type: ignore[assignment]
    now_ms, alive, expired = time.time() * 1000, [], []
    for name, raw in sorted(entries.items()):
        try:
            record = orjson.loads(raw)
            fresh = record.pop("expires_at") > now_ms
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            fresh = False
        if fresh:
            alive.append(record)
        else:
            expired.append(name)
    if expired:
        await redis.hdel(key, *expired)
    return alive
