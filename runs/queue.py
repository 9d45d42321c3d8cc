"""`RunQueue`: how runs reach workers.

The queue only delivers, at least once; a run's Postgres row is the truth (a worker claims it
with a lease before doing anything, so a second delivery is harmless). The shape follows
taskiq-redis's consumer group: `take` (XREADGROUP) -> work -> `ack`, `reclaim` (XAUTOCLAIM) for
jobs whose consumer died, a dead-letter stream for jobs delivered too often.

Each agent pool (`runs.agents`: an agent, or one version of it) has a queue of its own, so runs
of an agent reach only the workers that serve it and no single stream carries every run. A queue
object reads the pools it was made for (`pools`: a worker's `WORKER_AGENTS`); anyone may enqueue
to any pool.

Two implementations: `RedisRunQueue` (a Redis Stream and consumer group per pool, each group
created once at start and again if Redis lost it) and `MemoryRunQueue` (in-process, for fast tests).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from common.keys import RUNS_GROUP, Keys
from common.redis_client import as_text
from runs.agents import DEFAULT

# How long jobs read beyond a `take`'s count wait for the next `take` of the same consumer.
SPARE_S = 1.0


@dataclass(frozen=True)
class Job:
    """A run to carry out."""

    run: str
    user: str
    conversation: str
    pool: str = DEFAULT  # the agent pool (`runs.agents`) whose queue holds the job
    # The W3C trace context of whoever queued the run (`common.tracing.carrier`), so the worker's
    # spans join the send's trace; empty when nothing is traced.
    trace: Mapping[str, str] = field(default_factory=dict, compare=False)

    def fields(self) -> dict[str, str]:
        return {"run": self.run, "user": self.user, "conversation": self.conversation, "pool": self.pool,
                **self.trace}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Job:
        trace = {name: fields[name] for name in _TRACE_FIELDS if name in fields}
        return cls(run=fields["run"], user=fields["user"], conversation=fields["conversation"],
                   pool=fields.get("pool", DEFAULT), trace=trace)


_TRACE_FIELDS = ("traceparent", "tracestate")


@dataclass(frozen=True)
class Delivery:
    """One delivery of a job; `entry` identifies it for `ack`, `deliveries` counts this one."""

    entry: str
    job: Job
    deliveries: int = 1

    def queued_at(self) -> float:
        """When the job was queued (wall clock, seconds), from its stream entry id."""
        return int(self.entry.split("-", 1)[0]) / 1000


@dataclass(frozen=True)
class DeadLetter:
    """A job set aside for good: `entry` is its id in the dead-letter stream (so also when it was
    set aside, in ms), `deliveries` how often it had been delivered by then."""

    entry: str
    job: Job
    deliveries: int

    def dead_at(self) -> float:
        """When the job was dead-lettered (wall clock, seconds)."""
        return int(self.entry.split("-", 1)[0]) / 1000


@dataclass(frozen=True)
class Backlog:
    """Jobs no worker has taken yet: how many, and how long the oldest has waited."""

    depth: int
    oldest_s: float
    taken: int = 0  # jobs taken by workers and not acked yet (runs in progress, or of dead workers)




class RunQueue(Protocol):
    pools: tuple[str, ...]  # the pools `take` and `reclaim` read (a worker's); empty on a node

    async def create(self) -> None:
        """Make the pools' queues ready to consume (idempotent); called once at a worker's start."""

    async def enqueue(self, job: Job) -> None:
        """Queue `job` on its pool's queue."""

    async def take(self, consumer: str, *, count: int, block_ms: int) -> list[Delivery]:
        """New jobs of the pools for `consumer`, waiting up to `block_ms` for one."""

    async def ack(self, delivery: Delivery) -> None:
        """Done with: the job will not be delivered again."""

    async def keep(self, consumer: str, deliveries: Sequence[Delivery]) -> None:
        """`consumer` still works on these: nobody may reclaim them for another `idle_ms`."""

    async def reclaim(self, consumer: str, *, idle_ms: int, count: int) -> list[Delivery]:
        """Jobs delivered but not acked nor kept for `idle_ms` (their consumer died), now
        `consumer`'s; each counts one delivery more."""

    async def dead_letter(self, delivery: Delivery) -> None:
        """Set a job aside for good (delivered too often) and ack it."""

    async def dead_letters(self, *, after: str | None, limit: int) -> list[DeadLetter]:
        """Up to `limit` dead letters, oldest first, after the entry `after` (None: from the first)."""

    async def dead_letter_count(self) -> int:
        """How many dead letters there are."""

    async def dead_letter_entry(self, entry: str) -> DeadLetter | None:
        """The dead letter `entry`, or None when there is none (any more)."""

    async def drop_dead_letter(self, entry: str) -> bool:
        """Remove a dead letter (retried or discarded); False when it was already gone."""

    async def holding(self, runs: Sequence[str], pools: Sequence[str]) -> set[str]:
        """Which of `runs` still have a job in the queues of `pools`, read or not (so need no new one)."""

    async def backlog(self, pools: Sequence[str] | None = None) -> Backlog:
        """The jobs waiting for a worker in `pools` (None: the queue's own), taken ones not counted."""

    async def next_jobs(self, pool: str, *, limit: int) -> list[tuple[Job, float]]:
        """The first `limit` jobs of `pool` waiting for a worker, the next one first, with the
        seconds each has waited."""




class RedisRunQueue:
    """A Redis Stream per pool, read by the consumer group of the workers serving it."""

    def __init__(self, redis: Redis, keys: Keys, pools: Sequence[str] = ()) -> None:
        self.redis = redis
        self.keys = keys
        self.pools = tuple(pools)
        self._spare: dict[str, list[tuple[Delivery, float]]] = {}  # read beyond a take's count

    async def create(self) -> None:
        for pool in self.pools:
            try:
                await self.redis.xgroup_create(self.keys.runs(pool), RUNS_GROUP, id="0", mkstream=True)
            except redis_errors.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def enqueue(self, job: Job) -> None:
        await self.redis.xadd(self.keys.runs(job.pool), job.fields())  # type: ignore[arg-type]

    async def take(self, consumer: str, *, count: int, block_ms: int) -> list[Delivery]:
        now = time.monotonic()
        spare = [d for d, read_at in self._spare.pop(consumer, []) if now - read_at < SPARE_S]
        if len(spare) >= count:
            self._keep_spare(consumer, spare[count:], now)
            return spare[:count]
        # One read over every pool's stream; COUNT is per stream, so it may bring more than asked.
        streams: dict[Any, Any] = {self.keys.runs(pool): ">" for pool in self.pools}
        try:
            reply: Any = await self.redis.xreadgroup(RUNS_GROUP, consumer, streams, count=count - len(spare),
                                                     block=None if spare else block_ms)
        except redis_errors.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.create()  # Redis restarted without its data: the group is gone
            return spare
        deliveries = spare + [Delivery(as_text(entry), Job.from_fields(fields))
                              for _, entries in reply or () for entry, fields in entries]
        # The extra are this consumer's already: they come first next time. Kept only briefly: a
        # worker that stays full leaves them to be reclaimed by another after their lease.
        self._keep_spare(consumer, deliveries[count:], time.monotonic())
        return deliveries[:count]

    def _keep_spare(self, consumer: str, deliveries: Sequence[Delivery], read_at: float) -> None:
        if deliveries:
            self._spare[consumer] = [(d, read_at) for d in deliveries]

    async def ack(self, delivery: Delivery) -> None:
        # Acknowledged, and removed so the stream stays small.
        stream = self.keys.runs(delivery.job.pool)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(stream, RUNS_GROUP, delivery.entry)
            pipe.xdel(stream, delivery.entry)
            await pipe.execute()

    async def keep(self, consumer: str, deliveries: Sequence[Delivery]) -> None:
        by_pool: dict[str, list[Any]] = {}
        for delivery in deliveries:
            by_pool.setdefault(delivery.job.pool, []).append(delivery.entry)
        for pool, entries in by_pool.items():
            # JUSTID resets the idle time and leaves the delivery count alone (it counts real
            # deliveries, for the dead letter).
            await self.redis.xclaim(self.keys.runs(pool), RUNS_GROUP, consumer, 0, entries, justid=True)

    async def reclaim(self, consumer: str, *, idle_ms: int, count: int) -> list[Delivery]:
        deliveries: list[Delivery] = []
        for pool in self.pools:
            if len(deliveries) >= count:
                break
            stream = self.keys.runs(pool)
            try:
                reply: Any = await self.redis.xautoclaim(
                    stream, RUNS_GROUP, consumer, idle_ms, start_id="0-0", count=count - len(deliveries))
            except redis_errors.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                continue  # lost with Redis's data; `take` creates it again
            for entry, fields in reply[1]:
                if not fields:
                    continue  # deleted entries have none
                pending: Any = await self.redis.xpending_range(stream, RUNS_GROUP, min=entry, max=entry,
                                                               count=1)
                times = int(pending[0]["times_delivered"]) if pending else 1
                deliveries.append(Delivery(as_text(entry), Job.from_fields(fields), deliveries=times))
        return deliveries

    async def _last_taken(self, stream: str) -> str | None:
        """The id of the last job the group handed out (None: no group yet)."""
        try:
            groups: Any = await self.redis.xinfo_groups(stream)
        except redis_errors.ResponseError:
            return None  # no stream yet
        for group in groups:
            if as_text(group["name"]) == RUNS_GROUP:
                return as_text(group["last-delivered-id"])
        return None

    async def _untaken(self, pool: str, count: int) -> list[tuple[Job, float]]:
        """The first `count` jobs of `pool` after the last one its group handed out, with the seconds
        each has waited (an entry id is its enqueue time in ms)."""
        stream = self.keys.runs(pool)
        last = await self._last_taken(stream)
        entries: Any = await self.redis.xrange(stream, min=f"({last}" if last else "-", max="+", count=count)
        now = time.time()
        return [(Job.from_fields(fields), max(0.0, now - int(as_text(entry).split("-")[0]) / 1000))
                for entry, fields in entries if fields]

    async def backlog(self, pools: Sequence[str] | None = None) -> Backlog:
        depth, oldest_s, taken = 0, 0.0, 0
        for pool in self.pools if pools is None else pools:
            stream = self.keys.runs(pool)
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xlen(stream)
                pipe.xpending(stream, RUNS_GROUP)
                length_reply, summary = await pipe.execute(raise_on_error=False)
            length = int(length_reply) if isinstance(length_reply, int) else 0
            held = int(summary["pending"]) if isinstance(summary, dict) else 0  # NOGROUP: none taken
            taken += held
            first = await self._untaken(pool, 1)
            if first:
                depth += max(1, length - held)
                oldest_s = max(oldest_s, first[0][1])
        return Backlog(depth=depth, oldest_s=oldest_s, taken=taken)

    async def next_jobs(self, pool: str, *, limit: int) -> list[tuple[Job, float]]:
        return await self._untaken(pool, limit)

    async def holding(self, runs: Sequence[str], pools: Sequence[str]) -> set[str]:
        # Acked jobs are deleted, so a stream holds only jobs not done: a backlog, not history.
        wanted, found = set(runs), set[str]()
        for pool in pools:
            start = "-"
            while wanted - found:
                entries: Any = await self.redis.xrange(self.keys.runs(pool), min=start, max="+", count=1000)
                found |= {fields.get("run") for _, fields in entries} & wanted
                if len(entries) < 1000:
                    break
                start = "(" + as_text(entries[-1][0])
        return found

    async def dead_letter(self, delivery: Delivery) -> None:
        fields: dict[Any, Any] = {**delivery.job.fields(), "deliveries": str(delivery.deliveries)}
        await self.redis.xadd(self.keys.runs_dead, fields)
        await self.ack(delivery)

    async def dead_letters(self, *, after: str | None, limit: int) -> list[DeadLetter]:
        start = f"({after}" if after else "-"
        entries: Any = await self.redis.xrange(self.keys.runs_dead, min=start, max="+", count=limit)
        return [_dead_letter(entry, fields) for entry, fields in entries]

    async def dead_letter_count(self) -> int:
        return int(await self.redis.xlen(self.keys.runs_dead))

    async def dead_letter_entry(self, entry: str) -> DeadLetter | None:
        entries: Any = await self.redis.xrange(self.keys.runs_dead, min=entry, max=entry, count=1)
        return _dead_letter(*entries[0]) if entries else None

    async def drop_dead_letter(self, entry: str) -> bool:
        return bool(await self.redis.xdel(self.keys.runs_dead, entry))




def _dead_letter(entry: str | bytes, fields: dict[str, str]) -> DeadLetter:
    return DeadLetter(as_text(entry), Job.from_fields(fields), deliveries=int(fields.get("deliveries", 0)))


def _entry_order(entry: str) -> tuple[int, ...]:
    return tuple(int(part) for part in entry.split("-"))


@dataclass
class _Pending:
    delivery: Delivery
    consumer: str
    since: float


@dataclass
class MemoryRunQueue:
    """`RunQueue` in this process, for fast tests."""

    pools: tuple[str, ...] = (DEFAULT,)  # what `take` and `reclaim` read
    waiting: list[Delivery] = field(default_factory=list)
    pending: dict[str, _Pending] = field(default_factory=dict)
    dead: list[Delivery] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    _enqueued: dict[str, float] = field(default_factory=dict)  # entry -> monotonic time queued

    async def create(self) -> None:
        return None

    async def enqueue(self, job: Job) -> None:
        # Ids as Redis makes them: the time queued in ms, then a sequence number.
        delivery = Delivery(f"{int(time.time() * 1000)}-{next(self._ids)}", job)
        self._enqueued[delivery.entry] = time.monotonic()
        self.waiting.append(delivery)
        async with self._arrived:
            self._arrived.notify_all()

    def _mine(self, delivery: Delivery, pools: Sequence[str] | None = None) -> bool:
        return delivery.job.pool in (self.pools if pools is None else pools)

    async def take(self, consumer: str, *, count: int, block_ms: int) -> list[Delivery]:
        if not any(map(self._mine, self.waiting)):
            async with self._arrived:
                try:
                    async with asyncio.timeout(block_ms / 1000):  # not wait_for: see fanout.resp_pubsub
                        await self._arrived.wait_for(lambda: any(map(self._mine, self.waiting)))
                except TimeoutError:
                    return []
        taken = [d for d in self.waiting if self._mine(d)][:count]
        self.waiting = [d for d in self.waiting if d not in taken]
        for delivery in taken:
            self.pending[delivery.entry] = _Pending(delivery, consumer, time.monotonic())
        return taken

    async def ack(self, delivery: Delivery) -> None:
        self.pending.pop(delivery.entry, None)

    async def keep(self, consumer: str, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            if delivery.entry in self.pending:
                self.pending[delivery.entry] = _Pending(delivery, consumer, time.monotonic())

    async def reclaim(self, consumer: str, *, idle_ms: int, count: int) -> list[Delivery]:
        now, claimed = time.monotonic(), list[Delivery]()
        for entry, held in list(self.pending.items())[:]:
            if len(claimed) >= count:
                break
            if (now - held.since) * 1000 >= idle_ms and self._mine(held.delivery):
                delivery = replace(held.delivery, deliveries=held.delivery.deliveries + 1)
                self.pending[entry] = _Pending(delivery, consumer, now)
                claimed.append(delivery)
        return claimed

    async def backlog(self, pools: Sequence[str] | None = None) -> Backlog:
        waiting = [d for d in self.waiting if self._mine(d, pools)]
        taken = sum(1 for p in self.pending.values() if self._mine(p.delivery, pools))
        if not waiting:
            return Backlog(depth=0, oldest_s=0.0, taken=taken)
        oldest_s = time.monotonic() - self._enqueued[waiting[0].entry]
        return Backlog(depth=len(waiting), oldest_s=oldest_s, taken=taken)

    async def next_jobs(self, pool: str, *, limit: int) -> list[tuple[Job, float]]:
        now = time.monotonic()
        return [(d.job, now - self._enqueued[d.entry]) for d in self.waiting if d.job.pool == pool][:limit]

    async def holding(self, runs: Sequence[str], pools: Sequence[str]) -> set[str]:
        queued = [*self.waiting, *(p.delivery for p in self.pending.values())]
        return {d.job.run for d in queued if d.job.pool in pools} & set(runs)

    async def dead_letter(self, delivery: Delivery) -> None:
        self.dead.append(delivery)
        await self.ack(delivery)

    async def dead_letters(self, *, after: str | None, limit: int) -> list[DeadLetter]:
        # A memory dead letter's entry is its job's entry: unique, and ordered as Redis ids are.
        letters = [DeadLetter(d.entry, d.job, d.deliveries) for d in self.dead
                   if after is None or _entry_order(d.entry) > _entry_order(after)]
        return letters[:limit]

    async def dead_letter_count(self) -> int:
        return len(self.dead)

    async def dead_letter_entry(self, entry: str) -> DeadLetter | None:
        return next((DeadLetter(d.entry, d.job, d.deliveries) for d in self.dead if d.entry == entry), None)

    async def drop_dead_letter(self, entry: str) -> bool:
        before = len(self.dead)
        self.dead[:] = [d for d in self.dead if d.entry != entry]
        return len(self.dead) < before
