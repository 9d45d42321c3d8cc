"""Capped exponential backoff with full jitter, and a retry loop for Redis/Postgres outages."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


def delays_s(base_s: float = 0.05, cap_s: float = 2.0) -> Iterator[float]:
    """Endless delays: full jitter over an exponentially growing, capped window (AWS style),
    so a thousand clients or nodes that lost Redis together do not come back in lockstep."""
    attempt = 0
    while True:
        yield random.uniform(0, min(cap_s, base_s * 2**attempt))
        attempt += 1


async def retrying(
    op: Callable[[], Awaitable[T]],
    *,
    retry_on: tuple[type[BaseException], ...],
    deadline_s: float,
    what: str,
) -> T:
    """Run `op` until it succeeds, retrying `retry_on` errors with backoff for up to `deadline_s`;
    after that the last error propagates. `op` must be safe to repeat."""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + deadline_s
    for delay_s in delays_s():
        try:
            return await op()
        except retry_on as exc:
            if loop.time() + delay_s > give_up_at:
                raise
            log.warning("%s failed (%s: %s); retrying in %.2fs", what, type(exc).__name__, exc, delay_s)
            await asyncio.sleep(delay_s)
    raise AssertionError("unreachable")
