"""The one way Chorus opens a Redis client (nodes and workers alike), and what its errors mean."""

from __future__ import annotations

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# Errors that mean Redis is unreachable right now (restarting, loading, network): the operation
# may or may not have run, so only what is safe to repeat is retried on them.
TRANSIENT = (redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.BusyLoadingError, OSError)


def connect(url: str, *, socket_timeout_s: float) -> Redis:
    """A pooled client with decoded responses.

    Under uvloop, the first command on a pooled connection that Redis reset (a restart, a proxy
    RST) fails with a bare RuntimeError ("the handler is closed") before any byte is sent; one
    immediate retry on a fresh connection is safe and turns it into a non-event
    (tests/test_faults.py, the reset scenario).
    """
    retry = Retry(NoBackoff(), 1, supported_errors=(RuntimeError,))  # type: ignore[arg-type]
    return Redis.from_url(url, decode_responses=True, socket_timeout=socket_timeout_s,
                          socket_connect_timeout=3, health_check_interval=15, retry=retry)


def as_text(value: str | bytes) -> str:
    """A Redis reply as text, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value
