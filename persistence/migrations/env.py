"""Alembic environment: online migrations over SQLAlchemy's asyncpg dialect."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

# No prepared-statement caches, neither asyncpg's nor SQLAlchemy's over it: a migration runs each
# statement once, so they buy nothing, and named statements left on a server connection break the
# next migration through PgBouncer in transaction mode ('prepared statement "__asyncpg_stmt_1__"
# already exists' on the second `migrate`: tests/test_pgbouncer.py). Uncached, asyncpg sends
# unnamed statements, parsed again with each execution, which any pooler passes through.
UNCACHED = {"statement_cache_size": 0, "prepared_statement_cache_size": 0}


def _migrate(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()


async def _run() -> None:
    url = context.config.get_main_option("sqlalchemy.url") or ""
    engine = create_async_engine(url, connect_args=UNCACHED)
    async with engine.connect() as connection:
        await connection.run_sync(_migrate)
    await engine.dispose()


asyncio.run(_run())
