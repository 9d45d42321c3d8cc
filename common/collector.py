"""`Collector`: short cyclic-collector passes on a process holding many long-lived objects.

A full pass of Python's cyclic garbage collector walks every tracked object the process holds,
with the event loop stopped. A node holding 15,000 sockets holds millions (aiohttp's request,
protocol, transport, response, reader and writer for each), and its full passes, about one per
half minute while idle, took 1-2.5 s (docs/performance.md). `gc.freeze()` moves every object
tracked now into a permanent generation that no pass walks: done at start-up it only covers the
modules; done every `every_s` (after collecting the young generations) it keeps everything held
that long out of the passes, which then walk only what was allocated since.

The price: a frozen object that becomes cyclic garbage is not collected while frozen, and a
closed aiohttp socket is such garbage (its transport, protocol, request and response refer to
one another: ~34 objects a socket, most of its memory). So once the frozen objects have grown by
`growth` (a half) since the last full pass, whether from new sockets or from closed ones, `step`
unfreezes and collects everything: a stall as long as the old passes, but while sockets are
opening or churning only, never on a steady node, and the memory closed sockets hold stays
under that share of the rest.
"""

from __future__ import annotations

import asyncio
import gc


class Collector:
    def __init__(self, *, every_s: float, growth: float = 0.5) -> None:
        self.every_s = every_s
        self.growth = growth
        self.reclaims = 0  # full passes over everything, unfrozen
        self._base: int | None = None  # objects frozen after the last full pass
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.every_s > 0:
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def step(self) -> None:
        """Collect the young generations and freeze what survived; a full pass over everything
        first (unfrozen) when the frozen objects grew by `growth` since the last one, or on the
        first step."""
        gc.collect(1)
        gc.freeze()
        if self._base is None or gc.get_freeze_count() > self._base * (1 + self.growth):
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self._base = gc.get_freeze_count()
            self.reclaims += 1

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            self.step()
