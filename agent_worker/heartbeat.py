"""The worker's heartbeat: a small record in Redis saying it is alive, what it serves and how busy it is.

The nodes' admin API (`GET /v1/admin/workers`, `ws_node.admin`) lists the records of the hash
`Keys.workers`, field = the worker's consumer name, value = JSON::

    {"worker", "agents": [pools], "busy" (runs in progress), "concurrency", "pauses" (runs it paused
     for their user's answer, in all), "draining",
     "started_at", "updated_at", "expires_at" (ms)}

rewritten every `HEARTBEAT_S` (`common.heartbeat`, which the nodes' records share). A record past
its `expires_at` (a worker that died) is left out and pruned by the reader; a worker that stops
removes its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence

from redis.asyncio import Redis

from agent_worker.worker import Worker
from common.heartbeat import HEARTBEAT_S, beat, iso
from common.keys import Keys

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def beating(redis: Redis, keys: Keys, worker: Worker, agents: Sequence[str],
                  stop: asyncio.Event) -> AsyncIterator[None]:
    """Keep `worker`'s heartbeat while the block runs (its drain after `stop` included)."""
    task = asyncio.create_task(_beat(redis, keys, worker, list(agents), stop, started_at=iso(time.time())),
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
    while True:
        record = {"worker": worker.consumer, "agents": agents, "busy": len(worker.running),
                  "concurrency": worker.settings.concurrency, "pauses": worker.stats.pauses,
                  "draining": stop.is_set(), "started_at": started_at}
        try:
            await beat(redis, keys.workers, worker.consumer, record)
        except Exception as exc:  # Redis away: the record expires meanwhile, the worker goes on
            log.warning("worker heartbeat failed: %r", exc)
        await asyncio.sleep(HEARTBEAT_S)
