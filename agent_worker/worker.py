"""`Worker`: takes run jobs from the consumer group and carries each run to exactly one end.

The Postgres run row is the source of truth and the queue only delivers (at least once): a
worker claims a run with a lease before doing anything, renews the lease while it works, and
ends the run in Postgres before publishing the end, so a crash at any point leaves a run that
another worker can claim (lease expired) or finish publishing (ended but unpublished).
The lifecycle (publishing, ending, starting the next run, answers) is `runs.Runs`'s; this module
keeps the graph streaming, coalescing, leases and checkpoints. Jobs of dead workers are
reclaimed (`RunQueue.reclaim`, XAUTOCLAIM); a job delivered too often goes to the dead letter and
its run ends `run.failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from agent_worker.graph import (
    InputRequired,
    InputTimeout,
    Resumption,
    Text,
    ToolCompleted,
    ToolStarted,
    Usage,
)
from agent_worker.metrics import QUEUE_EVERY_S, WorkerStats
from agent_worker.resilience import failure_code
from agent_worker.settings import WorkerSettings
from common import logs, tracing
from common.backoff import delays_s, retrying
from common.redis_client import TRANSIENT
from fanout.broker import Fenced, Lost
from persistence.records import Finished, Question, RunClaim
from persistence.store import Store, Unavailable
from protocol import events as ev
from protocol.text import shown_text
from protocol.vocabulary import RunStatus
from runs.agents import parse_pool
from runs.lifecycle import Ending, Runs
from runs.queue import Delivery, Job, RunQueue

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("chorus.agent_worker")


# (agent pool, history, thread, resume) -> the answer's items (graph.Text, ToolStarted, ToolCompleted,
# InputRequired, ...) as they stream; `thread` is the run, `resume` goes on from its question.
AnswerStream = Callable[[str, Sequence[tuple[str, str]], str, Resumption | None], AsyncIterator[object]]


async def _forget_nothing(thread: str) -> None:
    return None

STALE_SWEEP_S = 15.0
# Runs waiting this long for a worker are told their position (`run.queued`), again as it changes;
# only the first POSITIONS_SHOWN, so a deep backlog costs a bounded number of publishes.
POSITIONS_EVERY_S = 2.0
POSITIONS_SHOWN = 200
# The longest a run's model stream keeps the event loop to itself (see RunExecution._stream).
TURN_S = 0.0003


@dataclass
class Worker:
    settings: WorkerSettings
    runs: Runs
    answer: AnswerStream
    forget: Callable[[str], Awaitable[None]] = _forget_nothing  # drop a run's saved graph state
    running: dict[str, Delivery] = field(default_factory=dict)  # entry id -> job in progress
    stats: WorkerStats = field(default_factory=WorkerStats)

    @property
    def consumer(self) -> str:
        return self.settings.worker_id

    @property
    def store(self) -> Store:
        return self.runs.store

    @property
    def queue(self) -> RunQueue:
        return self.runs.queue

    async def run(self, stop: asyncio.Event) -> None:
        """Serve jobs until `stop` is set, then let runs in progress finish for up to the drain
        window; runs still going after it are abandoned to other workers via their lease."""
        tasks: set[asyncio.Task[None]] = set()
        slots = Slots(self.settings.concurrency)
        maintenance = asyncio.create_task(self._maintain(stop))
        positions = asyncio.create_task(self._announce_positions(stop))
        watch = asyncio.create_task(self._watch_queue(stop))
        self.stats.loop_lag.start()
        delays = delays_s(base_s=0.1, cap_s=2.0)
        created = False
        loop = asyncio.get_running_loop()
        reclaim_at = 0.0
        # Slots are taken here only (new jobs, reclaimed ones), so a free slot is never counted
        # by two readers at once.
        while await slots.wait(stop):
            if not created:  # the group first: reclaiming or reading without it fails (NOGROUP)
                try:
                    await self.queue.create()
                    created = True
                except TRANSIENT as exc:
                    log.warning("creating the run queue failed: %r", exc)
                    await asyncio.sleep(next(delays))
                    continue
            if loop.time() >= reclaim_at:
                reclaim_at = loop.time() + self.settings.lease_s / 3
                await self._reclaim(slots, tasks)
                if not slots.free:
                    continue
            # As many jobs as there are free slots, in one read: a burst of sends all start at
            # once instead of one per round trip (issue 15: at 50 runs, taking them one by one
            # between the chunks of the runs already streaming kept the last ones waiting 2 s).
            free = slots.take()
            try:
                deliveries = await self.queue.take(self.consumer, count=free, block_ms=500)
                delays = delays_s(base_s=0.1, cap_s=2.0)
            except TRANSIENT as exc:
                deliveries = []
                log.warning("reading jobs failed: %r", exc)
                await asyncio.sleep(next(delays))
            slots.give(free - len(deliveries))
            for delivery in deliveries:
                self._spawn(delivery, slots, tasks)
        maintenance.cancel()
        positions.cancel()
        watch.cancel()
        await self.stats.loop_lag.close()
        if tasks:
            log.info("draining %d runs for up to %.1fs", len(tasks), self.settings.drain_s)
            _, pending = await asyncio.wait(tasks, timeout=self.settings.drain_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(maintenance, positions, watch, return_exceptions=True)

    def _spawn(self, delivery: Delivery, slots: Slots, tasks: set[asyncio.Task[None]]) -> None:
        async def process() -> None:
            self.running[delivery.entry] = delivery
            try:
                await self.process(delivery)
            finally:
                self.running.pop(delivery.entry, None)
                slots.give()

        task = asyncio.create_task(process(), name=f"run-{delivery.job.run}")
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def process(self, delivery: Delivery) -> None:
        """Carry one job's run to its end, then ack the job. On an outage, leave it pending:
        it is delivered again after its lease runs out."""
        job = delivery.job
        with _tracer.start_as_current_span("chorus.run", context=tracing.extracted(job.trace),
                                           kind=SpanKind.CONSUMER) as span:
            if span.is_recording():
                span.set_attributes({"chorus.run": job.run, "chorus.conversation": job.conversation,
                                     "chorus.worker": self.consumer,
                                     "chorus.deliveries": delivery.deliveries})
            await self._process(delivery)

    async def _process(self, delivery: Delivery) -> None:
        job = delivery.job
        logs.bind(run=job.run, user=job.user, conversation=job.conversation)  # this run's task only
        try:
            name, version = parse_pool(job.pool)
            claim = await self.store.claim_run(job.run, worker=self.consumer, lease_s=self.settings.lease_s,
                                               version=version)
            if claim is not None and name == claim.agent:
                claim = dataclasses.replace(claim, agent=job.pool)  # the version this pool serves
            if claim is None:
                await self.runs.publish_unpublished_end(job.run)
            else:
                queued_at = delivery.queued_at()
                self.stats.queue_wait.observe(max(0.0, time.time() - queued_at))
                await RunExecution(self, claim, queued_at=queued_at).go()
            await self.queue.ack(delivery)
        except (Unavailable, *TRANSIENT) as exc:
            log.warning("run %s left for a retry: %r", job.run, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("run %s crashed the worker's handling; left for a retry", job.run)

    # Leases, reclaiming and lost jobs

    async def _maintain(self, stop: asyncio.Event) -> None:
        interval_s = self.settings.lease_s / 3
        since_sweep_s = 0.0
        while not stop.is_set():
            await asyncio.sleep(interval_s)
            since_sweep_s += interval_s
            try:
                await self._renew_leases()
                await self._expire_pauses()  # an indexed read: every tick, so a deadline is kept to lease_s/3
                if since_sweep_s >= STALE_SWEEP_S:
                    since_sweep_s = 0.0
                    await self._requeue_lost()
                    await self.republish_lost_ends()
                    await self.store.prune_checkpoints()
            except (Unavailable, *TRANSIENT) as exc:
                log.warning("maintenance deferred: %r", exc)
            except Exception:
                log.exception("maintenance failed")

    async def _watch_queue(self, stop: asyncio.Event) -> None:
        """Keep the queue's depth and the paused runs' count for the metrics (a scrape must not wait
        on Redis or Postgres)."""
        while not stop.is_set():
            try:
                self.stats.backlog = await self.queue.backlog()
                self.stats.paused = await self.store.count_paused()
            except (Unavailable, *TRANSIENT) as exc:
                log.debug("reading the queue's depth deferred: %r", exc)
            await asyncio.sleep(QUEUE_EVERY_S)

    async def _announce_positions(self, stop: asyncio.Event) -> None:
        """Backpressure a person can see: every few seconds, each run waiting for a worker is told
        its place in the queue when it changed."""
        announced: dict[str, int] = {}
        while not stop.is_set():
            await asyncio.sleep(POSITIONS_EVERY_S)
            try:
                now: dict[str, int] = {}
                for pool in self.queue.pools:  # a place in the queue of the run's own pool
                    waiting = await self.queue.next_jobs(pool, limit=POSITIONS_SHOWN)
                    for position, (job, waited_s) in enumerate(waiting, 1):
                        if waited_s < POSITIONS_EVERY_S:
                            continue  # about to be taken; nothing to tell yet
                        now[job.run] = position
                        if announced.get(job.run) != position:
                            await self.runs.announce_position(job, position)
                announced = now
            except (Unavailable, *TRANSIENT) as exc:
                log.warning("announcing queue positions deferred: %r", exc)
            except Exception:
                log.exception("announcing queue positions failed")

    async def _renew_leases(self) -> None:
        deliveries = list(self.running.values())
        if not deliveries:
            return
        # The queue first, because it needs only Redis: a run that streams on through a Postgres
        # outage keeps its job, so no other worker reclaims a live run.
        await self.queue.keep(self.consumer, deliveries)
        for delivery in deliveries:
            await self.store.renew_lease(delivery.job.run, worker=self.consumer,
                                         lease_s=self.settings.lease_s)

    async def _reclaim(self, slots: Slots, tasks: set[asyncio.Task[None]]) -> None:
        """Take over jobs whose worker died (not kept for a lease), one per free slot."""
        idle_ms = int(self.settings.lease_s * 1000)
        try:
            while slots.free:
                reclaimed = await self.queue.reclaim(self.consumer, idle_ms=idle_ms, count=1)
                if not reclaimed:
                    return
                delivery = reclaimed[0]
                if delivery.entry in self.running:
                    continue  # our own, kept late: it is still being worked on here
                if delivery.deliveries > self.settings.max_deliveries:
                    await self._dead_letter(delivery)
                    continue
                log.info("reclaimed run %s", delivery.job.run)
                self.stats.reclaimed += 1
                slots.take(1)
                self._spawn(delivery, slots, tasks)
        except (Unavailable, *TRANSIENT) as exc:
            log.warning("reclaiming jobs deferred: %r", exc)
        except Exception:
            log.exception("reclaiming jobs failed")

    async def _dead_letter(self, delivery: Delivery) -> None:
        message = f"the run failed {delivery.deliveries - 1} times and was given up"
        await self.store.finish_run(delivery.job.run, status=RunStatus.FAILED, text="", worker=None,
                                    error_code="run_dead_lettered", error_message=message)
        await self.runs.publish_unpublished_end(delivery.job.run)
        await self.queue.dead_letter(delivery)
        self.stats.dead_lettered += 1

    async def _expire_pauses(self) -> None:
        """Paused runs nobody answered within `INPUT_TIMEOUT_SECONDS` end failed (`input_timeout`),
        keeping what they said before asking."""
        code, message = failure_code(InputTimeout())
        for row in await self.store.expired_pauses():
            finished = await self.store.finish_run(row["id"], status=RunStatus.FAILED, text=row["partial"],
                                                   worker=None, tools=orjson.loads(row["partial_tools"]),
                                                   error_code=code, error_message=message)
            if finished is not None:
                log.info("run %s ended: nobody answered its question in time", row["id"])
                await self.runs.publish_unpublished_end(row["id"])

    async def _requeue_lost(self) -> None:
        """Runs acked to a user whose job is gone (Redis lost its data) are queued again, and a
        conversation whose next run was never started (its starter crashed) gets it started."""
        for conversation in await self.store.stranded_conversations(waiting_for_s=self.settings.lease_s):
            await self.runs.start_next(conversation)
        stale = await self.store.stale_runs(queued_for_s=max(30.0, self.settings.lease_s))
        # A run merely waiting in a backlog (or pending with a worker that died, which `reclaim`
        # handles) still has its job: queueing it again only feeds the backlog (issue 15 saw
        # 38-100 such duplicates in 90 s).
        if not stale:
            return
        pools = await self.runs.pools_of({row["agent"] for row in stale})
        held = await self.queue.holding([row["id"] for row in stale], pools)
        for row in stale:
            if row["id"] in held:
                continue
            log.warning("requeueing run %s (its job was lost)", row["id"])
            await self.store.touch_run(row["id"])
            job = Job(run=row["id"], user=row["user_id"], conversation=row["conversation_id"])
            await self.runs.enqueue(job, row["agent"])
            self.stats.requeued += 1

    async def republish_lost_ends(self, *, within_s: float = 120.0, settle_s: float = 5.0,
                                  limit: int = 1000) -> int:
        """Publish again the end of each run that ended in the last `within_s` and is missing from
        its user's stream as devices now read it; returns how many. When Redis loses writes it
        had acknowledged, or comes back empty, devices resync to the head of the stream's new
        life and get a snapshot of the runs still in flight only: a run whose end was among the
        lost writes, or landed in the new epoch before they resynced past it, would reach them
        over REST alone (the redis_lossy soak saw both). Such an end is published again (with
        `run.resumed`, see `Runs.publish_end_again`) once per epoch, when the epoch is at least
        `settle_s` old (devices have resynced to it):

        - an end already checked in another epoch, or in this one at a seq the stream has not
          reached (Redis went back to an older snapshot), is published again;
        - an end not checked yet is, unless both the run's `message.created` and its end are in
          the history of this epoch, and so the run began and ended in this life of the stream.

        Bounded: one indexed read, then one position read and one Postgres round trip per user
        with runs ended in the window."""
        ends: dict[str, list[Any]] = {}
        for row in await self.store.recent_ends(within_s=within_s, limit=limit):
            ends.setdefault(row["user_id"], []).append(row)
        published = 0
        for user, rows in ends.items():
            position = await self.runs.broker.position(user)
            if await self.store.see_epoch(user, position.epoch) < settle_s:
                continue  # a new life: its devices may still be resyncing to it
            in_life: list[str] = []
            lost: list[str] = []
            for row in rows:
                if row["end_epoch"] is None:
                    began = row["message_seq"]
                    whole = (began is not None and 0 < position.first_seq <= began
                             and row["terminal_seq"] <= position.seq)
                    (in_life if whole else lost).append(row["id"])
                elif row["end_epoch"] != position.epoch or row["terminal_seq"] > position.seq:
                    lost.append(row["id"])
            if in_life:
                await self.store.set_end_epoch(in_life, position.epoch)
            for run in lost:
                log.warning("publishing the end of run %s again (not in epoch %s of its stream)",
                            run, position.epoch)
                if await self.runs.publish_end_again(run, position.epoch) is not None:
                    published += 1
        return published


def _stored(question: InputRequired) -> Question:
    return Question(question.request, question.prompt, question.checkpoint)


class Released(Exception):
    """The worker no longer holds the run (its lease ran out and another took it): stop, quietly."""


class RunExecution:
    """One attempt at one run: start, stream coalesced tokens, end."""

    def __init__(self, worker: Worker, claim: RunClaim, *, queued_at: float) -> None:
        self.worker = worker
        self.claim = claim
        self.queued_at = queued_at  # wall clock, when the node queued the run
        self.claimed_at = time.monotonic()
        self.span = trace.get_current_span()  # the run's (`Worker.process`); not recording: untraced
        self._tool_spans: dict[str, trace.Span] = {}
        self.producer = f"run:{claim.run}:{claim.attempts}"
        self.pseq = 0
        resumed = claim.resume
        # A paused run goes on with what it said and did before asking.
        self.text: list[str] = [resumed.text] if resumed and resumed.text else []
        self.shown = resumed.text if resumed else ""  # the text devices show (protocol.text)
        self.tools: list[dict[str, Any]] = list(resumed.tools) if resumed else []  # stored with the answer
        self.question: InputRequired | None = None  # what the model asked the user, if it paused
        self.usage: Usage | None = None  # the tokens this attempt's model calls counted, if reported
        self.last_seq: int | None = None
        self.epoch = ""
        self._checkpointed_at = 0.0

    async def publish(self, data: ev.EventData) -> int:
        """Publish one event of this attempt. If it landed in a new epoch (Redis lost the
        history, even writes it had acknowledged), follow it with `run.resumed` carrying the
        whole answer so far: devices replace the run's text with it, so none shows a hole."""
        self.pseq += 1
        c = self.claim
        traced = self.span.is_recording()  # else not even a no-op span per publish
        with (_tracer.start_as_current_span("chorus.publish", attributes={"chorus.event": data.event})
              if traced else contextlib.nullcontext()) as span:
            result = await self.worker.runs.publish(c.user, c.conversation, c.run, data,
                                                    producer=self.producer, pseq=self.pseq, fenced=True,
                                                    producer_epoch=self.epoch)
            if span is not None:
                span.set_attribute("chorus.seq", result.seq)
        moved = bool(self.epoch) and result.epoch != self.epoch
        self.last_seq = result.seq
        self.epoch = result.epoch
        self.shown = shown_text(self.shown, data.event, data.to_data())
        if moved and data.event != ev.RunResumed.event:
            await self.publish(ev.RunResumed(text=self.shown, attempt=c.attempts))
            self._checkpointed_at = 0.0  # checkpoint in the new epoch at once
        return result.seq

    async def go(self) -> None:
        c, worker = self.claim, self.worker
        history = await worker.store.history(c.conversation, c.message)
        if self.span.is_recording():
            self.span.set_attributes({"chorus.agent": c.agent, "chorus.attempt": c.attempts})
        try:
            resume = None
            if c.resume is not None:
                # Its question was answered: on from there. The text devices show is set to what
                # it was at the question (a worker that died after resuming may have shown more).
                resume = Resumption(c.resume.answer, c.resume.question.checkpoint)
                await self.publish(ev.RunResumed(text=self.shown, attempt=c.attempts))
            else:
                # attempt > 1: a restart after a worker died; devices drop this run's partial text,
                # and the graph starts over rather than from the dead attempt's saved state (a
                # first attempt has none: no Postgres round trip for it).
                if c.attempts > 1:
                    await worker.forget(c.run)
                started = ev.RunStarted(message=c.message, attempt=c.attempts, worker=worker.consumer)
                await self.publish(started)
            while (question := await self._stream(history, resume)) is not None:
                answer = await self._pause(question)
                if answer is None:
                    # Paused (or no longer ours): the answer queues it again, for any worker. A
                    # cancel that came as it paused found it running: it ends here instead.
                    if await self._fenced_now():
                        raise Fenced(c.run)
                    return
                resume = Resumption(answer, question.checkpoint)
            if await retrying(lambda: worker.runs.broker.is_fenced(c.user, c.run), retry_on=TRANSIENT,
                              deadline_s=worker.settings.store_retry_s, what=f"checking run {c.run}'s fence"):
                raise Fenced(c.run)
        except Fenced:
            await self._end(RunStatus.CANCELLED)
        except Released:
            log.info("run %s is no longer this worker's (its lease ran out)", c.run)
        except (Unavailable, *TRANSIENT):
            raise  # infrastructure: leave the run to be retried under its lease
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("run %s failed: %r", c.run, exc)
            await self._end(RunStatus.FAILED, error=failure_code(exc))
        else:
            await self._end(RunStatus.COMPLETED)

    def _ended(self, status: RunStatus) -> None:
        stats = self.worker.stats
        duration_s = time.monotonic() - self.claimed_at
        stats.runs[self.claim.agent, str(status)] += 1
        stats.run_duration.observe(duration_s)
        log.info("run ended", extra={"status": str(status), "agent": self.claim.agent,
                                     "attempt": self.claim.attempts, "duration_s": round(duration_s, 3),
                                     "chars": sum(map(len, self.text))})

    async def _end(self, status: RunStatus, error: tuple[str, str] | None = None) -> None:
        """Store the end, then publish it. Postgres being away does not lose the answer the
        devices already saw: storing is retried until it comes back (the run stays leased)."""
        c, worker = self.claim, self.worker
        text, usage = "".join(self.text), self.usage

        async def store() -> Finished | None:
            return await worker.store.finish_run(
                c.run, status=status, text=text, worker=worker.consumer, tools=self.tools,
                error_code=error[0] if error else None, error_message=error[1] if error else None,
                usage=(usage.prompt_tokens, usage.completion_tokens) if usage else None,
            )

        finished = await retrying(store, retry_on=(Unavailable,), deadline_s=worker.settings.store_retry_s,
                                  what=f"storing the end of run {c.run}")
        self._ended(status)
        if finished is None:
            # Ended or taken over by someone else (a cancel while queued, another worker after
            # our lease ran out): their end is the one that counts.
            await worker.runs.publish_unpublished_end(c.run)
            return
        ending = Ending(status, text="" if finished.discarded else text, message=finished.message,
                        error=error, discarded=finished.discarded,
                        stopped_at=self.last_seq if status == RunStatus.CANCELLED else None,
                        usage=ev.TokenUsage(usage.prompt_tokens, usage.completion_tokens) if usage else None)
        try:
            await worker.runs.end(c.user, c.conversation, c.run, ending,
                                  follows=(self.producer, self.pseq) if self.pseq else None)
        except Lost:
            # Redis lost this attempt's last events (it restarted from an older snapshot): show
            # the whole answer again first (its numbering's hole starts a new epoch), so no device
            # shows the run cut short, then end it.
            log.warning("run %s: its last events were lost by Redis; publishing the answer again", c.run)
            with contextlib.suppress(Fenced):  # cancelled: the end says where it stopped
                await self.publish(ev.RunResumed(text=self.shown, attempt=c.attempts))
            await worker.runs.end(c.user, c.conversation, c.run, ending)
        try:
            await worker.forget(c.run)  # its graph state; the sweep deletes what this leaves
        except Exception as exc:
            log.debug("deleting run %s's graph state deferred: %r", c.run, exc)

    async def _fenced_now(self) -> bool:
        """Whether the run was cancelled, checked while the model is quiet. Redis being away for a
        moment is not a reason to abandon the run: the answer is "not yet", the next check or the
        publish script (which refuses a fenced run's events) will see the fence."""
        try:
            return await self.worker.runs.broker.is_fenced(self.claim.user, self.claim.run)
        except TRANSIENT as exc:
            log.debug("fence check of run %s deferred: %r", self.claim.run, exc)
            return False

    def _first_token(self) -> None:
        stats = self.worker.stats
        stats.first_token.observe(time.monotonic() - self.claimed_at)
        stats.send_to_first_token.observe(max(0.0, time.time() - self.queued_at))

    async def _checkpoint(self) -> None:
        """Save the answer so far with the seq it reflects, at most every `checkpoint_s`: a device
        whose history was trimmed resumes from this snapshot instead of a blank (docs/protocol.md).
        Best effort: a Postgres outage must not stop the stream."""
        loop = asyncio.get_running_loop()
        if self.last_seq is None or loop.time() - self._checkpointed_at < self.worker.settings.checkpoint_s:
            return
        self._checkpointed_at = loop.time()
        try:
            await self.worker.store.save_partial(
                self.claim.run, "".join(self.text), self.last_seq, self.epoch, self.tools
            )
        except Unavailable as exc:
            log.debug("checkpoint of run %s skipped: %r", self.claim.run, exc)

    async def _ask(self, question: InputRequired) -> None:
        """Store the question before devices see it: answers are taken to it alone."""
        c, worker = self.claim, self.worker

        async def ask() -> bool:
            return await worker.store.ask_run(c.run, worker=worker.consumer, question=_stored(question),
                                              text="".join(self.text), tools=self.tools)

        if not await retrying(ask, retry_on=(Unavailable,), deadline_s=worker.settings.store_retry_s,
                              what=f"storing run {c.run}'s question"):
            raise Released(c.run)

    async def _pause(self, question: InputRequired) -> str | None:
        """Let the run wait for its user's answer in Postgres, freeing this worker's slot: None.
        The answer when it came already (a device answered as the question went out): the run
        goes on here. None too when the run is no longer this worker's (its lease ran out)."""
        c, worker = self.claim, self.worker

        async def pause() -> tuple[bool, str | None]:
            return await worker.store.pause_run(
                c.run, worker=worker.consumer, question=_stored(question),
                text="".join(self.text), tools=self.tools, seq=self.last_seq, epoch=self.epoch,
                timeout_s=worker.settings.input_timeout_s)

        held, answer = await retrying(pause, retry_on=(Unavailable,),
                                      deadline_s=worker.settings.store_retry_s, what=f"pausing run {c.run}")
        if held and answer is None:
            worker.stats.pauses += 1
            log.info("run paused for its user's answer", extra={"agent": c.agent, "attempt": c.attempts})
        return answer

    async def _forward(self, items: list[object]) -> None:
        """Publish a batch of the model's output in order: runs of text as one `token` event,
        each tool call and result, and each custom payload of the graph, as its own event."""
        text: list[str] = []
        for item in [*items, None]:
            if isinstance(item, str | Text):
                text.append(item if isinstance(item, str) else item.text)
                continue
            if text:
                chunk = "".join(text)
                if not self.text:
                    self._first_token()
                self.worker.stats.tokens += len(text)
                text.clear()
                await self.publish(ev.Token(text=chunk))
                self.text.append(chunk)
            if isinstance(item, ToolStarted):
                if self.span.is_recording():
                    self._tool_spans[item.call_id] = _tracer.start_span(
                        f"chorus.tool {item.name}", attributes={"chorus.tool.call": item.call_id})
                await self.publish(ev.ToolStarted(call=item.call_id, name=item.name,
                                                  arguments=item.arguments))
                self.tools.append({"call": item.call_id, "name": item.name, "arguments": item.arguments})
            elif isinstance(item, ev.RunCustom):  # a graph's custom stream payload, already the event
                await self.publish(item)
            elif isinstance(item, InputRequired):
                await self._ask(item)
                await self.publish(ev.RunInputRequired(request=item.request, prompt=item.prompt))
                self.question = item
            elif isinstance(item, Usage):
                before = self.usage or Usage(0, 0)
                self.usage = Usage(before.prompt_tokens + item.prompt_tokens,
                                   before.completion_tokens + item.completion_tokens)
            elif isinstance(item, ToolCompleted):
                if (tool_span := self._tool_spans.pop(item.call_id, None)) is not None:
                    if item.error:
                        tool_span.set_status(StatusCode.ERROR, item.summary or "the tool failed")
                    tool_span.end()
                await self.publish(ev.ToolCompleted(call=item.call_id, name=item.name, summary=item.summary,
                                                    error=item.error))
                for call in self.tools:
                    if call["call"] == item.call_id:
                        call.update(summary=item.summary, error=item.error)
        await self._checkpoint()

    async def _stream(self, history: Sequence[tuple[str, str]], resume: Resumption | None
                      ) -> InputRequired | None:
        """Forward the model's text as `token` events, coalesced over `coalesce_s` so a fast
        model costs a few publishes a second per run, not one per token; the first token of an
        attempt is not held back. A cancel fence stops
        the model (its HTTP request is aborted with the task)."""
        buffer: list[object] = []
        arrived = asyncio.Event()

        self.question = None
        attributes = {"chorus.agent": self.claim.agent}
        with _tracer.start_as_current_span("chorus.model", attributes=attributes) as span:
            chunks_before = self.worker.stats.tokens
            try:
                return await self._stream_into(buffer, arrived, history, resume)
            finally:
                if span.is_recording():
                    span.set_attribute("chorus.model.chunks", self.worker.stats.tokens - chunks_before)

    async def _stream_into(self, buffer: list[object], arrived: asyncio.Event,
                           history: Sequence[tuple[str, str]], resume: Resumption | None
                           ) -> InputRequired | None:

        async def produce() -> None:
            # A model stream whose bytes are already buffered yields chunk after chunk without
            # ever returning to the event loop: this run's publisher and every other run would
            # wait until the socket runs dry (a first token 67 ms late once ChatOpenAI's
            # per-chunk wait_for was gone). So the reader gives the loop a turn after the first
            # item and then at least every TURN_S.
            loop = asyncio.get_running_loop()
            turn_ends = 0.0
            async for item in self.worker.answer(self.claim.agent, history, self.claim.run, resume):
                buffer.append(item)
                arrived.set()
                if loop.time() >= turn_ends:
                    await asyncio.sleep(0)
                    turn_ends = loop.time() + TURN_S

        model = asyncio.create_task(produce())
        try:
            while True:
                waiter = asyncio.create_task(arrived.wait())
                done, _ = await asyncio.wait({model, waiter}, timeout=0.5,
                                             return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if not done and await self._fenced_now():
                    raise Fenced(self.claim.run)
                if buffer and not model.done() and self.text:
                    # Coalesce, but not the first token: it goes out at once (time to first token).
                    await asyncio.sleep(self.worker.settings.coalesce_s)
                arrived.clear()
                if buffer:
                    items = buffer[:]
                    buffer.clear()
                    await self._forward(items)
                if model.done() and not buffer:
                    model.result()
                    return self.question
        finally:
            if not model.done():
                model.cancel()
                await asyncio.gather(model, return_exceptions=True)


class Slots:
    """How many more runs this worker may take on: `WORKER_CONCURRENCY` at first, one taken per
    run and given back when it ends."""

    def __init__(self, count: int) -> None:
        self.free = count
        self._freed = asyncio.Event()

    def take(self, count: int | None = None) -> int:
        """Take up to `count` free slots (all of them when None), without waiting; how many."""
        taken = self.free if count is None else min(count, self.free)
        self.free -= taken
        return taken

    def give(self, count: int = 1) -> None:
        self.free += count
        if count:
            self._freed.set()

    async def wait(self, stop: asyncio.Event) -> bool:
        """Until a slot is free (True), or `stop` is set first (False): a busy worker must still
        notice SIGTERM."""
        while not self.free and not stop.is_set():
            self._freed.clear()
            freed, stopped = asyncio.ensure_future(self._freed.wait()), asyncio.ensure_future(stop.wait())
            await asyncio.wait({freed, stopped}, return_when=asyncio.FIRST_COMPLETED)
            freed.cancel()
            stopped.cancel()
        return not stop.is_set()
