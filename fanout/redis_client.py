"""The one way Chorus opens a Redis client (nodes and workers alike)."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


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
