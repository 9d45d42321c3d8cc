"""`Collector`: short cyclic-collector passes on a process holding many long-lived objects.

A full pass of Python's cyclic garbage collector walks every tracked object the process holds,
with the event loop stopped. A node holding 15,000 sockets holds millions (aiohttp's request,
protocol, transport, response, reader and writer for each), and its full passes, about one per
half minute while idle, took 1-2.5 s (docs/performance.md). `gc.freeze()` moves every object
tracked now into a permanent generation that no pass walks: done at start-up it only covers the
modules; done every `every_s` (after a pass over the young generations) it keeps everything held
that long out of the passes, which then walk only what was allocated since.

The price: a frozen object that becomes cyclic garbage is not collected while frozen, and a
closed aiohttp socket is such garbage (its transport, protocol, request and response refer to
one another: ~34 objects a socket, most of its memory). So `step` unfreezes and collects
everything (a stall as long as the old passes) once the sockets closed since the last such pass
reach `closed_share` of those held (at least `closed_min`), keeping what closed sockets hold under
that share of the live ones, or once the objects frozen since reach `growth` times those frozen
by it (other garbage). A node whose sockets only open, or stay, makes none.

Counting is by `len(gc.get_objects())` of what is not frozen, never `gc.get_freeze_count()`:
that walks the whole frozen list (~20 ms at 160,000 objects, ~0.4 s at a node's millions). A
step collects only the young generations: a pass over everything not frozen would walk every
socket opened since the last step (~90 ms for 2,000), and what garbage it leaves to be frozen is
counted towards the next full pass.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Collector:
    def __init__(self, *, every_s: float, held: Callable[[], int] = lambda: 0,
                 closed: Callable[[], int] = lambda: 0, closed_share: float = 0.5, closed_min: int = 1000,
                 growth: float = 4.0) -> None:
        """`held`: the sockets open now; `closed`: the sockets closed since start (a counter)."""
        self.every_s = every_s
        self._held, self._closed = held, closed
        self.closed_share, self.closed_min = closed_share, closed_min
        self.growth = growth
        self._closed_at = 0  # `closed()` at the last full pass
        self.reclaims = 0  # full passes over everything, unfrozen
        self._base = 0  # objects frozen by the last full pass (or at start)
        self._since = 0  # objects frozen since
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Freeze what start-up made (the modules, the app), counting it; then, unless `every_s`
        is 0, step every `every_s`."""
        gc.collect()
        self._base = len(gc.get_objects())
        gc.freeze()
        if self.every_s > 0:
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def step(self) -> None:
        """Collect the young generations and freeze what survived; then a full pass over
        everything, unfrozen, once `growth` is reached."""
        gc.collect(1)
        survivors = len(gc.get_objects())  # what is not frozen: newer than the last step
        gc.freeze()
        self._since += survivors
        closed = self._closed()
        if (closed - self._closed_at >= max(self.closed_min, self.closed_share * self._held())
                or self._since > self._base * self.growth):
            began = time.perf_counter()
            self._closed_at = closed
            gc.unfreeze()
            gc.collect()
            self._base, self._since = len(gc.get_objects()), 0
            gc.freeze()
            self.reclaims += 1
            log.info("full garbage-collector pass over %d objects: %.0f ms", self._base,
                     (time.perf_counter() - began) * 1000)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            self.step()
