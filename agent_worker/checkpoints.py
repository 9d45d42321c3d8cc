"""The worker's LangGraph checkpointer: graph state within a run, in Postgres.

A run that asks its user a question (``ask_user``, or an ``interrupt`` in a graph of the team's own)
is paused in Postgres and holds no worker while it waits (`runs.lifecycle`); the graph's state at
the question lives here, in `langgraph-checkpoint-postgres`'s tables (created by migration 0004 of
``python -m persistence migrate``), so whichever worker takes the answered run resumes it. Threads
are runs: a run's state is deleted when it ends (`AgentRegistry.forget`), and the worker's sweep
deletes that of runs ended elsewhere (`persistence.store.Store.prune_checkpoints`).

psycopg, not asyncpg: the checkpointer is written for it. Its own pool, small (a checkpoint is one
write per graph step, and only graphs that can pause have a checkpointer); with
``DATABASE_STATEMENT_CACHE_SIZE=0`` (PgBouncer in transaction mode) no statement is prepared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger(__name__)

POOL_MAX_SIZE = 10


@dataclass
class Checkpoints:
    saver: AsyncPostgresSaver
    pool: AsyncConnectionPool[AsyncConnection[dict[str, Any]]]

    async def close(self) -> None:
        await self.pool.close()


async def connect(database_url: str, *, statement_cache_size: int) -> Checkpoints:
    """A checkpointer on `database_url`, its tables brought up to date (`setup` applies the
    migrations a newer langgraph-checkpoint-postgres adds; none when migration 0004 ran)."""
    kwargs: dict[str, Any] = {"autocommit": True, "row_factory": dict_row}
    if statement_cache_size == 0:
        kwargs["prepare_threshold"] = None  # never prepare: PgBouncer in transaction mode
    pool: AsyncConnectionPool[AsyncConnection[dict[str, Any]]] = AsyncConnectionPool(
        database_url, min_size=1, max_size=POOL_MAX_SIZE, kwargs=kwargs, open=False)
    await pool.open(wait=True, timeout=60)
    saver = AsyncPostgresSaver(pool)
    try:
        await saver.setup()
    except Exception:
        await pool.close()
        raise
    return Checkpoints(saver, pool)
