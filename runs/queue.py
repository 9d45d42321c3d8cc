"""`RunQueue`: how runs reach workers, and how a device's answer reaches a paused run.

The queue only delivers, at least once; a run's Postgres row is the truth (a worker claims it
with a lease before doing anything, so a second delivery is harmless). The shape follows
taskiq-redis's consumer group: `take` (XREADGROUP) -> work -> `ack`, `reclaim` (XAUTOCLAIM) for
jobs whose consumer died, a dead-letter stream for jobs delivered too often.

Two implementations: `RedisRunQueue` (a Redis Stream and consumer group, the group created once
at start and again if Redis lost it) and `MemoryRunQueue` (in-process, for fast tests).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import orjson
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from common.keys import RUNS_GROUP, Keys
from common.redis_client import as_text


@dataclass(frozen=True)
class Job:
    """A run to carry out."""

    run: str
    user: str
    conversation: str
    # The W3C trace context of whoever queued the run (`common.tracing.carrier`), so the worker's
    # spans join the send's trace; empty when nothing is traced.
    trace: Mapping[str, str] = field(default_factory=dict, compare=False)

    def fields(self) -> dict[str, str]:
        return {"run": self.run, "user": self.user, "conversation": self.conversation, **self.trace}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Job:
        trace = {name: fields[name] for name in _TRACE_FIELDS if name in fields}
        return cls(run=fields["run"], user=fields["user"], conversation=fields["conversation"], trace=trace)


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


@dataclass(frozen=True)
class Answer:
    """A device's answer to a paused run's question (human in the loop)."""

    request: str
    text: str


class RunQueue(Protocol):
    async def create(self) -> None:
        """Make the queue ready to consume (idempotent); called once at a worker's start."""

    async def enqueue(self, job: Job) -> None: ...

    async def take(self, consumer: str, *, count: int, block_ms: int) -> list[Delivery]:
        """New jobs for `consumer`, waiting up to `block_ms` for one."""

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

    async def holding(self, runs: Sequence[str]) -> set[str]:
        """Which of `runs` still have a job in the queue, read or not (so need no new one)."""

    async def backlog(self) -> Backlog:
        """The jobs waiting for a worker (taken ones are not counted)."""

    async def next_jobs(self, *, limit: int) -> list[tuple[Job, float]]:
        """The first `limit` jobs waiting for a worker, the next one first, with the seconds each
        has waited."""

    async def first_answer(self, user: str, run: str, request: str, *, device: str, ttl_s: int) -> str:
        """Record `device` as answering `request` unless a device did already; returns the
        device whose answer counts (the first)."""

    async def put_answer(self, user: str, run: str, answer: Answer, *, ttl_s: int) -> None:
        """Hand `answer` to the run's worker (after `first_answer` chose it)."""

    async def next_answer(self, user: str, run: str, *, timeout_s: float) -> Answer | None:
        """The next answer handed to `run`, waiting up to `timeout_s`."""


class RedisRunQueue:
    """A Redis Stream read by the workers' consumer group; answers in a list per run."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def create(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.runs, RUNS_GROUP, id="0", mkstream=True)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def enqueue(self, job: Job) -> None:
        await self.redis.xadd(self.keys.runs, job.fields())  # type: ignore[arg-type]

    async def take(self, consumer: str, *, count: int, block_ms: int) -> list[Delivery]:
        try:
            reply: Any = await self.redis.xreadgroup(
                RUNS_GROUP, consumer, {self.keys.runs: ">"}, count=count, block=block_ms
            )
        except redis_errors.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.create()  # Redis restarted without its data: the group is gone
            return []
        return [Delivery(entry, Job.from_fields(fields))
                for _, entries in reply or () for entry, fields in entries]

    async def ack(self, delivery: Delivery) -> None:
        # Acknowledged, and removed so the stream stays small.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.keys.runs, RUNS_GROUP, delivery.entry)
            pipe.xdel(self.keys.runs, delivery.entry)
            await pipe.execute()

    async def keep(self, consumer: str, deliveries: Sequence[Delivery]) -> None:
        if not deliveries:
            return
        # JUSTID resets the idle time and leaves the delivery count alone (it counts real
        # deliveries, for the dead letter).
        await self.redis.xclaim(self.keys.runs, RUNS_GROUP, consumer, 0,
                                [d.entry for d in deliveries], justid=True)

    async def reclaim(self, consumer: str, *, idle_ms: int, count: int) -> list[Delivery]:
        reply: Any = await self.redis.xautoclaim(self.keys.runs, RUNS_GROUP, consumer, idle_ms,
                                                 start_id="0-0", count=count)
        claimed = [(entry, fields) for entry, fields in reply[1] if fields]  # deleted entries have none
        deliveries = []
        for entry, fields in claimed:
            pending: Any = await self.redis.xpending_range(self.keys.runs, RUNS_GROUP, min=entry, max=entry,
                                                           count=1)
            times = int(pending[0]["times_delivered"]) if pending else 1
            deliveries.append(Delivery(entry, Job.from_fields(fields), deliveries=times))
        return deliveries

    async def _last_taken(self) -> str | None:
        """The id of the last job the group handed out (None: no group yet)."""
        try:
            groups: Any = await self.redis.xinfo_groups(self.keys.runs)
        except redis_errors.ResponseError:
            return None  # no stream yet
        for group in groups:
            if as_text(group["name"]) == RUNS_GROUP:
                return as_text(group["last-delivered-id"])
        return None

    async def _untaken(self, count: int) -> list[tuple[Job, float]]:
        """The first `count` jobs after the last one the group handed out, with the seconds each has
        waited (an entry id is its enqueue time in ms)."""
        last = await self._last_taken()
        entries: Any = await self.redis.xrange(self.keys.runs, min=f"({last}" if last else "-", max="+",
                                               count=count)
        now = time.time()
        return [(Job.from_fields(fields), max(0.0, now - int(as_text(entry).split("-")[0]) / 1000))
                for entry, fields in entries if fields]

    async def backlog(self) -> Backlog:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self.keys.runs)
            pipe.xpending(self.keys.runs, RUNS_GROUP)
            length_reply, summary = await pipe.execute(raise_on_error=False)
        length = int(length_reply) if isinstance(length_reply, int) else 0
        taken = int(summary["pending"]) if isinstance(summary, dict) else 0  # NOGROUP: none taken
        first = await self._untaken(1)
        if not first:
            return Backlog(depth=0, oldest_s=0.0, taken=taken)
        return Backlog(depth=max(1, length - taken), oldest_s=first[0][1], taken=taken)

    async def next_jobs(self, *, limit: int) -> list[tuple[Job, float]]:
        return await self._untaken(limit)

    async def holding(self, runs: Sequence[str]) -> set[str]:
        # Acked jobs are deleted, so the stream holds only jobs not done: a backlog, not history.
        wanted, found, start = set(runs), set[str](), "-"
        while wanted - found:
            entries: Any = await self.redis.xrange(self.keys.runs, min=start, max="+", count=1000)
            found |= {fields.get("run") for _, fields in entries} & wanted
            if len(entries) < 1000:
                break
            start = "(" + entries[-1][0]
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

    async def first_answer(self, user: str, run: str, request: str, *, device: str, ttl_s: int) -> str:
        answered = self.keys.answered(user, run)
        by = device
        if not await self.redis.hsetnx(answered, request, device):
            by = await self.redis.hget(answered, request) or device  # type: ignore[assignment]
        await self.redis.expire(answered, ttl_s)
        return by

    async def put_answer(self, user: str, run: str, answer: Answer, *, ttl_s: int) -> None:
        answers = self.keys.answers(user, run)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(answers, orjson.dumps({"request": answer.request, "text": answer.text}))
            pipe.expire(answers, ttl_s)
            await pipe.execute()

    async def next_answer(self, user: str, run: str, *, timeout_s: float) -> Answer | None:
        popped = await self.redis.blpop([self.keys.answers(user, run)], timeout=timeout_s)
        if popped is None:
            return None
        answer = orjson.loads(popped[1])
        return Answer(request=str(answer["request"]), text=str(answer["text"]))


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

    waiting: list[Delivery] = field(default_factory=list)
    pending: dict[str, _Pending] = field(default_factory=dict)
    dead: list[Delivery] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    _enqueued: dict[str, float] = field(default_factory=dict)  # entry -> monotonic time queued
    _answered: dict[tuple[str, str, str], str] = field(default_factory=dict)
    _answers: dict[tuple[str, str], asyncio.Queue[Answer]] = field(default_factory=dict)

    async def create(self) -> None:
        return None

    async def enqueue(self, job: Job) -> None:
        # Ids as Redis makes them: the time queued in ms, then a sequence number.
        delivery = Delivery(f"{int(time.time() * 1000)}-{next(self._ids)}", job)
        self._enqueued[delivery.entry] = time.monotonic()
        self.waiting.append(delivery)
        async with self._arrived:
            self._arrived.notify_all()

    async def take(self, consumer: str, *, count: int, block_ms: int) -> list[Delivery]:
        if not self.waiting:
            async with self._arrived:
                try:
                    async with asyncio.timeout(block_ms / 1000):  # not wait_for: see fanout.resp_pubsub
                        await self._arrived.wait_for(lambda: bool(self.waiting))
                except TimeoutError:
                    return []
        taken, self.waiting = self.waiting[:count], self.waiting[count:]
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
            if (now - held.since) * 1000 >= idle_ms:
                delivery = replace(held.delivery, deliveries=held.delivery.deliveries + 1)
                self.pending[entry] = _Pending(delivery, consumer, now)
                claimed.append(delivery)
        return claimed

    async def backlog(self) -> Backlog:
        if not self.waiting:
            return Backlog(depth=0, oldest_s=0.0, taken=len(self.pending))
        oldest_s = time.monotonic() - self._enqueued[self.waiting[0].entry]
        return Backlog(depth=len(self.waiting), oldest_s=oldest_s, taken=len(self.pending))

    async def next_jobs(self, *, limit: int) -> list[tuple[Job, float]]:
        now = time.monotonic()
        return [(d.job, now - self._enqueued[d.entry]) for d in self.waiting[:limit]]

    async def holding(self, runs: Sequence[str]) -> set[str]:
        jobs = {d.job.run for d in self.waiting} | {p.delivery.job.run for p in self.pending.values()}
        return jobs & set(runs)

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

    async def first_answer(self, user: str, run: str, request: str, *, device: str, ttl_s: int) -> str:
        return self._answered.setdefault((user, run, request), device)

    async def put_answer(self, user: str, run: str, answer: Answer, *, ttl_s: int) -> None:
        self._mailbox(user, run).put_nowait(answer)

    async def next_answer(self, user: str, run: str, *, timeout_s: float) -> Answer | None:
        try:
            async with asyncio.timeout(timeout_s):
                return await self._mailbox(user, run).get()
        except TimeoutError:
            return None

    def _mailbox(self, user: str, run: str) -> asyncio.Queue[Answer]:
        return self._answers.setdefault((user, run), asyncio.Queue())
