"""Prometheus metrics for both processes: cheap counters on the hot path, exposed at scrape time.

A node counts every frame it writes and every message it fans out, tens of thousands a second.
prometheus_client's `Counter.inc` takes a lock each time, and a labelled one looks its child up
in a dict first; so the hot paths here only add to plain attributes (`stats.delivered += 1`) or
`observe` into a `Histogram` of fixed buckets, and a collector turns them into metric families
when Prometheus scrapes `/metrics` (prometheus_client's custom-collector pattern). Labels are
bounded by construction (close codes, command types, outcomes): never a user, device or run.

`serve(app, collect)` adds `/metrics` to an aiohttp app; `LoopLag` measures how late the event
loop runs a timer, which is how long everything else on it waited (a stall).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import gc
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

log = logging.getLogger(__name__)
# A stall this long is one a person notices in a stream of tokens. A collector pass this long is
# logged, with its generation: the stalls it causes are the ones operators chase
# (docs/operations.md, "Garbage collection and loop stalls").
STALL_S = 0.02

# Seconds: from a millisecond to a minute (delivery lag, first token, loop lag, durations).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RUN_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Histogram:
    """Fixed buckets, no lock, no labels: `observe` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def since(self, counts: Sequence[int]) -> list[int]:
        """What was observed since `counts` (a copy of `self.counts` taken then), per bucket."""
        return [now - then for now, then in zip(self.counts, counts, strict=True)]

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative, total = [], 0
        for bound, count in zip((*map(_bound, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            cumulative.append((bound, total))
        return HistogramMetricFamily(name, documentation, buckets=cumulative, sum_value=self.sum)


def _beyond(counts: Sequence[int], bounds: Sequence[float], over_s: float) -> tuple[int, float]:
    """Of a histogram's counts per bucket: how many are over `over_s` (a bucket bound), and the
    bound of the highest bucket counting any (inf past the last; 0 when none)."""
    above = sum(counts[bisect.bisect_right(bounds, over_s):])
    worst = max((bound for bound, seen in zip((*bounds, math.inf), counts, strict=True) if seen), default=0.0)
    return above, worst


def _bound(value: float) -> str:
    return repr(float(value))


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    """`name` without `_total`: prometheus_client adds it."""
    return CounterMetricFamily(name, documentation, value=value)


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def labelled(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily], name: str, documentation: str,
    labels: Sequence[str], values: Mapping[tuple[str, ...], float],
) -> Metric:
    """A counter or gauge with one sample per label tuple in `values`."""
    family = kind(name, documentation, labels=list(labels))
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


class Tally(collections.Counter[tuple[str, ...]]):
    """Counts by a bounded tuple of label values: `tally["send", "ok"] += 1`."""


class _Collector:
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()


def registry(collect: Callable[[], Iterable[Metric]]) -> CollectorRegistry:
    """A registry with the process's own metrics (`process_*`, `python_gc_*`, `python_info`) and
    what `collect` yields at each scrape."""
    reg = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    reg.register(_Collector(collect))
    return reg


def serve(app: web.Application, collect: Callable[[], Iterable[Metric]]) -> None:
    """`GET /metrics` on `app`, in Prometheus's text format."""
    reg = registry(collect)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(reg), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", metrics)


class Stalls(NamedTuple):
    """A loop's ticks over a while: how many, how many ran late by over the bound and the worst
    one's bucket bound, and the same of the lateness its own work accounts for (`LoopLag.busy`)."""

    ticks: int
    over: int
    worst_le_s: float
    busy_over: int
    busy_worst_le_s: float


class LoopLag:
    """How late the loop runs a timer set every `interval_s`: while a callback holds the loop
    (a full GC, a slow presence pass, a burst of frames) every socket waits that long. The
    histogram counts every tick (most are ~0), `max_s` keeps the worst seen. A bare timer
    callback, re-armed each tick: no task or future per tick. The cyclic garbage collector's
    pauses, the usual suspect of a long stall, are timed too (`gc.callbacks`).

    A tick is also late when the process waits for a CPU: the host is overloaded, or the pod hit
    its CPU limit. On a 2-core box shared with Redis, Postgres and load generators, every tick
    over 20 ms while S1 opened sockets was of that kind: 60-98 ms late with 5-14 ms of the
    thread's CPU used since the tick before, the rest waited in the kernel's run queue
    (/proc/thread-self/schedstat, issue 14). So `busy` counts each tick's lateness at most as
    long as the CPU time the loop's thread used since the tick before: the part the process's
    own work can account for. A stall there is the node's to fix; one only in `histogram` is
    the machine's."""

    def __init__(self, interval_s: float = 0.025) -> None:
        self.interval_s = interval_s
        self.histogram = Histogram(LATENCY_BUCKETS_S)
        self.busy = Histogram(LATENCY_BUCKETS_S)
        self.max_s = 0.0
        self.gc_pauses = Histogram(LATENCY_BUCKETS_S)
        self.gc_max_s = 0.0
        self._gc_began = self._gc_cpu_began = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._cpu_s = 0.0  # the thread's CPU time at the last tick

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._due = loop.time() + self.interval_s
        self._cpu_s = time.thread_time()
        self._timer = loop.call_at(self._due, self._tick, loop)
        gc.callbacks.append(self._gc)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._gc in gc.callbacks:
            gc.callbacks.remove(self._gc)

    def mark(self) -> tuple[list[int], list[int]]:
        """Where the histograms stand now, for `stalls_since`."""
        return list(self.histogram.counts), list(self.busy.counts)

    def stalls_since(self, mark: tuple[list[int], list[int]], over_s: float = STALL_S) -> Stalls:
        """The ticks since `mark`: how many, and of those late by over `over_s` (a bucket bound),
        in all and counting only the loop's own work, how many and the worst one's bucket bound
        (inf past the last)."""
        late, busy = self.histogram.since(mark[0]), self.busy.since(mark[1])
        return Stalls(sum(late), *_beyond(late, self.histogram.bounds, over_s),
                      *_beyond(busy, self.busy.bounds, over_s))

    def _gc(self, phase: str, info: Mapping[str, int]) -> None:
        if phase == "start":
            self._gc_began, self._gc_cpu_began = time.perf_counter(), time.thread_time()
            return
        pause_s = time.perf_counter() - self._gc_began
        self.gc_pauses.observe(pause_s)
        if pause_s > STALL_S:  # its CPU time tells a long pass from one that waited for a CPU
            log.warning("garbage-collector pass of generation %d took %.0f ms, %.0f ms of it on a CPU "
                        "(collected %d)", info["generation"], pause_s * 1000,
                        (time.thread_time() - self._gc_cpu_began) * 1000, info["collected"])
        if pause_s > self.gc_max_s:
            self.gc_max_s = pause_s

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now, cpu_s = loop.time(), time.thread_time()
        late_s = max(0.0, now - self._due)
        self.histogram.observe(late_s)
        self.busy.observe(min(late_s, cpu_s - self._cpu_s))
        self._cpu_s = cpu_s
        if late_s > self.max_s:
            self.max_s = late_s
        self._due = now + self.interval_s
        self._timer = loop.call_at(self._due, self._tick, loop)

    def families(self) -> Iterator[Metric]:
        yield self.histogram.family(
            "chorus_event_loop_lag_seconds",
            f"How late the event loop ran a timer due every {self.interval_s * 1000:g} ms (a stall)")
        yield gauge("chorus_event_loop_lag_max_seconds", "The longest event-loop stall since start",
                    self.max_s)
        yield self.busy.family(
            "chorus_event_loop_busy_lag_seconds",
            "How late the event loop ran its timer, counting at most the CPU time its thread used since "
            "the tick before: the part of a stall the process's own work accounts for (the rest it "
            "waited for a CPU)")
        yield self.gc_pauses.family("chorus_gc_pause_seconds",
                                    "How long each pass of the cyclic garbage collector held the process")
        yield gauge("chorus_gc_pause_max_seconds", "The longest garbage-collector pass since start",
                    self.gc_max_s)
