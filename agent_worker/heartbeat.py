"""The worker's heartbeat: a small record in Redis saying it is alive, what it serves and how busy it is.

The nodes' admin API (`GET /v1/admin/workers`, `ws_node.admin`) lists the records of the hash
`Keys.workers`, field = the worker's consumer name, value = JSON::

    {"worker", "agents": [names], "busy" (runs in progress), "concurrency", "paused", "draining",
     "started_at", "updated_at", "expires_at" (ms)}

rewritten every `HEARTBEAT_S`. A record past its `expires_at` (a worker that died) is left out and
pruned by the reader; a worker that stops removes its own. The format and timings match the
nodes' own records in `ws_node.admin` (nodes and workers may not import each other).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

import orjson
from redis.asyncio import Redis

from agent_worker.worker import Worker
from common.keys import Keys

log = logging.getLogger(__name__)

HEARTBEAT_S = 2.0
HEARTBEAT_TTL_S = 10.0


@contextlib.asynccontextmanager
async def beating(redis: Redis, keys: Keys, worker: Worker, agents: Sequence[str],
                  stop: asyncio.Event) -> AsyncIterator[None]:
    """Keep `worker`'s heartbeat while the block runs (its drain after `stop` included)."""
    task = asyncio.create_task(_beat(redis, keys, worker, list(agents), stop, started_at=_now_iso()),
                               name="heartbeat")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        with contextlib.suppress(Exception):
            await redis.hdel(keys.workers, worker.consumer)


async def _beat(redis: Redis, keys: Keys, worker: Worker, agents: list[str], stop: asyncio.Event, *,
                started_at: str) -> None:
    ttl_ms = int(HEARTBEAT_TTL_S * 1000)
    while True:
        record = {"worker": worker.consumer, "agents": agents, "busy": len(worker.running),
                  "concurrency": worker.settings.concurrency, "paused": worker.stats.paused,
                  "draining": stop.is_set(), "started_at": started_at, "updated_at": _now_iso(),
                  "expires_at": int(time.time() * 1000) + ttl_ms}
        try:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hset(keys.workers, worker.consumer, orjson.dumps(record))
                pipe.pexpire(keys.workers, ttl_ms)
                await pipe.execute()
        except Exception as exc:  # Redis away: the record expires meanwhile, the worker goes on
            log.warning("worker heartbeat failed: %r", exc)
        await asyncio.sleep(HEARTBEAT_S)


def _now_iso() -> str:
    return datetime.fromtimestamp(time.time(), UTC).isoformat()
