"""`Collector`: short cyclic-collector passes on a process holding many long-lived objects.

A full pass of Python's cyclic garbage collector walks every tracked object the process holds,
with the event loop stopped. A node holding 15,000 sockets holds millions (aiohttp's request,
protocol, transport, response, reader and writer for each), and its full passes, about one per
half minute while idle, took 1-2.5 s (docs/performance.md). `gc.freeze()` moves every object
tracked now into a permanent generation that no pass walks: done at start-up it only covers the
modules; done every `every_s` (after a pass over the young generations) it keeps everything held
that long out of the passes, which then walk only what was allocated since. Python's own full
passes are off (`gc.set_threshold`'s third threshold): between two steps they would walk every
object made since the last, 0.1-0.6 s while sockets open at 500 a second (issue 14, measured with
the pass log of `common.metrics`); a step every second walks a second's worth, a few ms.

The price: a frozen object that becomes cyclic garbage is not collected while frozen, and a
closed socket can be such garbage (aiohttp's transport, protocol, request and response refer to
one another; an exception's traceback refers to its frames). So `step` unfreezes and collects
everything (a stall as long as the old passes) when memory is left behind: the sockets closed
since the last such pass reach `closed_share` of those held (at least `closed_min`) and the
memory in use (`sys.getallocatedblocks()`) per socket held (counting at least `closed_min`) has
grown `closed_growth` times since, or it has grown `growth` times whatever closed (other
garbage); and either still holds `settle_steps` steps in a row with memory not falling. Sockets
freed by their reference counts take their memory with them and need no pass (at 15,000 sockets
closing at once, two passes of 0.6-1.1 s each collected nothing, issue 14), but not at once: a
socket's handler, transport and presence entry go over a few seconds after it closed (at 3,000
closed at once, most in 1.5 s, the rest in 5), and a busy node takes longer. A node whose
sockets only open, or stay, makes none.

Memory, not a count of the objects frozen, is the growth measure: a frozen object freed by its
reference count (an idle socket's timer handles and read futures, replaced every heartbeat,
~6,000 a second at 15,000 sockets) leaves no garbage, yet a count of what was frozen grows with
it, and made a needless full pass every few minutes. `gc.get_freeze_count()` is never read: it
walks the whole frozen list (~20 ms at 160,000 objects, ~0.4 s at a node's millions).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)
_NEVER = 2**31 - 1  # a third threshold no count reaches


class Collector:
    def __init__(self, *, every_s: float, held: Callable[[], int] = lambda: 0,
                 closed: Callable[[], int] = lambda: 0, closed_share: float = 0.5, closed_min: int = 1000,
                 closed_growth: float = 1.25, settle_steps: int = 10, growth: float = 4.0) -> None:
        """`held`: the sockets open now; `closed`: the sockets closed since start (a counter)."""
        self.every_s = every_s
        self._held, self._closed = held, closed
        self.closed_share, self.closed_min = closed_share, closed_min
        self.closed_growth, self.settle_steps, self.growth = closed_growth, settle_steps, growth
        self._unsettled = 0  # steps in a row that found memory left behind, and not falling
        self._blocks = 0  # memory blocks in use at the last step
        self._closed_at = 0  # `closed()` at the last full pass
        self.reclaims = 0  # full passes over everything, unfrozen
        self._per_socket = 0.0  # memory blocks in use per socket after the last full pass (or at start)
        self._thresholds = gc.get_threshold()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Freeze what start-up made (the modules, the app), counting it; then, unless `every_s`
        is 0, step every `every_s`."""
        gc.collect()
        self._per_socket = self._per_socket_of(sys.getallocatedblocks())
        gc.freeze()
        if self.every_s > 0:
            young, middle, _ = self._thresholds
            gc.set_threshold(young, middle, _NEVER)  # the steps freeze what would reach them
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
            gc.set_threshold(*self._thresholds)

    def step(self) -> None:
        """Collect the young generations and freeze what survived; then a full pass over
        everything, unfrozen, once memory has been left behind, and not falling, for
        `settle_steps` steps."""
        gc.collect(1)
        gc.freeze()
        closed = self._closed()
        blocks = sys.getallocatedblocks()
        falling, self._blocks = blocks < self._blocks * 0.99, blocks
        grown = self._per_socket_of(blocks) / self._per_socket
        left_behind = grown > self.growth or (grown > self.closed_growth and closed - self._closed_at
                                              >= max(self.closed_min, self.closed_share * self._held()))
        self._unsettled = self._unsettled + 1 if left_behind and not falling else 0
        if self._unsettled >= self.settle_steps:
            self._unsettled = 0
            began = time.perf_counter()
            self._closed_at = closed
            gc.unfreeze()
            collected = gc.collect()
            self._per_socket = self._per_socket_of(sys.getallocatedblocks())
            gc.freeze()
            self.reclaims += 1
            log.info("full garbage-collector pass: %d objects collected, %.0f memory blocks per socket "
                     "left, %.0f ms", collected, self._per_socket, (time.perf_counter() - began) * 1000)

    def _per_socket_of(self, blocks: int) -> float:
        return blocks / max(self._held(), self.closed_min)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            self.step()
