"""The one way Chorus opens a Redis client (nodes and workers alike), and what its errors mean."""

from __future__ import annotations

import asyncio
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# Errors that mean Redis is unreachable right now (restarting, loading, network): the operation
# may or may not have run, so only what is safe to repeat is retried on them.
TRANSIENT = (redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.BusyLoadingError, OSError)


class PoolExhausted(Exception):
    """No pooled Redis connection came free within the wait: the pool is too small for the load
    (`REDIS_POOL_SIZE`). Deliberately not a `redis.ConnectionError`, so it is never retried as a
    Redis outage (a worker once retried a publish 1,450 times on the pool's old error)."""


class WaitingPool(BlockingConnectionPool):
    """A pool that makes a command wait for a free connection instead of failing at once."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Connection:
        try:
            connection: Connection = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except redis_errors.ConnectionError as exc:
            if isinstance(exc.__cause__, asyncio.TimeoutError):
                raise PoolExhausted(f"no Redis connection free within {self.timeout}s of "
                                    f"{self.max_connections}; raise REDIS_POOL_SIZE") from exc
            raise
        return connection


def connect(url: str, *, socket_timeout_s: float, pool_size: int, pool_wait_s: float) -> Redis:
    """A client with decoded responses over a pool of at most `pool_size` connections, in which a
    command waits up to `pool_wait_s` for a free connection (`PoolExhausted` after that).

    Under uvloop, the first command on a pooled connection that Redis reset (a restart, a proxy
    RST) fails with a bare RuntimeError ("the handler is closed") before any byte is sent; one
    immediate retry on a fresh connection is safe and turns it into a non-event
    (tests/test_faults.py, the reset scenario).
    """
    retry = Retry(NoBackoff(), 1, supported_errors=(RuntimeError,))  # type: ignore[arg-type]
    pool = WaitingPool.from_url(url, decode_responses=True, socket_timeout=socket_timeout_s,
                                socket_connect_timeout=3, health_check_interval=15, retry=retry,
                                max_connections=pool_size, timeout=pool_wait_s)
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it too


def as_text(value: str | bytes) -> str:
    """A Redis reply as text, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value
