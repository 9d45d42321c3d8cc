"""`Worker`: takes run jobs from the consumer group and carries each run to exactly one end.

The Postgres run row is the source of truth and the queue only delivers (at least once): a
worker claims a run with a lease before doing anything, renews the lease while it works, and
ends the run in Postgres before publishing the end, so a crash at any point leaves a run that
another worker can claim (lease expired) or finish publishing (ended but unpublished).
Pending jobs of dead workers are reclaimed (XAUTOCLAIM-style, via XPENDING idle times); a job
delivered too often goes to the dead-letter stream and its run ends `run.failed`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis

from agent_worker.graph import InputRequired, InputTimeout, Text, ToolCompleted, ToolStarted
from agent_worker.resilience import failure_code
from agent_worker.settings import WorkerSettings
from common.backoff import delays_s, retrying
from common.keys import RUNS_GROUP, Keys
from common.redis_client import TRANSIENT
from fanout.stream import Fenced, UserStream
from persistence.records import Finished, RunClaim
from persistence.store import Store, Unavailable
from runs.lifecycle import END_EVENTS, Job, RunDeps, enqueue_run, ensure_group, publish_end, start_next

log = logging.getLogger(__name__)


# (agent, history, thread, resume) -> the answer's items (graph.Text, ToolStarted, ToolCompleted,
# InputRequired) as they stream; `thread` names the attempt, `resume` answers its InputRequired.
AnswerStream = Callable[[str, Sequence[tuple[str, str]], str, str | None], AsyncIterator[object]]

STALE_SWEEP_S = 15.0


@dataclass
class Worker:
    settings: WorkerSettings
    redis: Redis
    keys: Keys
    store: Store
    stream: UserStream
    answer: AnswerStream
    forget: Callable[[str], None] = lambda thread: None  # drop an ended attempt's paused state
    running: dict[str, Job] = field(default_factory=dict)  # entry id -> job in progress

    @property
    def consumer(self) -> str:
        return self.settings.worker_id

    @property
    def deps(self) -> RunDeps:
        return RunDeps(redis=self.redis, keys=self.keys, stream=self.stream, store=self.store,
                       store_retry_s=self.settings.store_retry_s)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve jobs until `stop` is set, then let runs in progress finish for up to the drain
        window; runs still going after it are abandoned to other workers via their lease."""
        tasks: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(self.settings.concurrency)
        maintenance = asyncio.create_task(self._maintain(slots, tasks, stop))
        delays = delays_s(base_s=0.1, cap_s=2.0)
        while await _acquire_unless_stopped(slots, stop):
            try:
                await ensure_group(self.redis, self.keys)
                reply: Any = await self.redis.xreadgroup(
                    RUNS_GROUP, self.consumer, {self.keys.runs: ">"}, count=1, block=500
                )
                delays = delays_s(base_s=0.1, cap_s=2.0)
            except TRANSIENT as exc:
                slots.release()
                log.warning("reading jobs failed: %r", exc)
                await asyncio.sleep(next(delays))
                continue
            jobs = [Job.from_entry(entry, fields) for _, entries in reply or () for entry, fields in entries]
            if not jobs:
                slots.release()
                continue
            for job in jobs:
                self._spawn(job, slots, tasks)
        maintenance.cancel()
        if tasks:
            log.info("draining %d runs for up to %.1fs", len(tasks), self.settings.drain_s)
            _, pending = await asyncio.wait(tasks, timeout=self.settings.drain_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.gather(maintenance, return_exceptions=True)

    def _spawn(self, job: Job, slots: asyncio.Semaphore, tasks: set[asyncio.Task[None]]) -> None:
        async def process() -> None:
            self.running[job.entry] = job
            try:
                await self.process(job)
            finally:
                self.running.pop(job.entry, None)
                slots.release()

        task = asyncio.create_task(process(), name=f"run-{job.run}")
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def process(self, job: Job) -> None:
        """Carry one job's run to its end, then ack the job. On an outage, leave it pending:
        it is delivered again after its lease runs out."""
        try:
            await self._execute(job)
            await self._ack(job)
        except (Unavailable, *TRANSIENT) as exc:
            log.warning("run %s left for a retry: %r", job.run, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("run %s crashed the worker's handling; left for a retry", job.run)

    async def _execute(self, job: Job) -> None:
        claim = await self.store.claim_run(job.run, worker=self.consumer, lease_s=self.settings.lease_s)
        if claim is None:
            await self._publish_unpublished_end(job.run)
            return
        execution = RunExecution(self, claim)
        await execution.go()

    async def _publish_unpublished_end(self, run: str) -> None:
        """A run that ended in Postgres but whose end event was never published (its worker died
        in between) gets it published now; the end's producer id makes this idempotent."""
        state = await self.store.run_state(run)
        if state is None or state["status"] not in END_EVENTS or state["terminal_seq"] is not None:
            return
        error = (state["error_code"], state["error_message"]) if state["error_code"] else None
        await publish_end(self.deps, state["user_id"], state["conversation_id"], run, state["status"],
                          text=state["partial"], message=state["answer_message_id"], error=error)

    # Leases, reclaiming and lost jobs

    async def _maintain(
        self, slots: asyncio.Semaphore, tasks: set[asyncio.Task[None]], stop: asyncio.Event
    ) -> None:
        interval_s = self.settings.lease_s / 3
        since_sweep_s = 0.0
        while not stop.is_set():
            await asyncio.sleep(interval_s)
            since_sweep_s += interval_s
            try:
                await self._renew_leases()
                await self._reclaim(slots, tasks)
                if since_sweep_s >= STALE_SWEEP_S:
                    since_sweep_s = 0.0
                    await self._requeue_lost()
            except (Unavailable, *TRANSIENT) as exc:
                log.warning("maintenance deferred: %r", exc)
            except Exception:
                log.exception("maintenance failed")

    async def _renew_leases(self) -> None:
        jobs = list(self.running.values())
        if not jobs:
            return
        # Reset the entries' idle time so no other worker reclaims a live run; first, because it
        # needs only Redis: a run that streams on through a Postgres outage keeps its job.
        # JUSTID leaves the delivery count alone (it counts real deliveries for the dead letter).
        await self.redis.xclaim(self.keys.runs, RUNS_GROUP, self.consumer, 0,
                                [job.entry for job in jobs], justid=True)
        for job in jobs:
            await self.store.renew_lease(job.run, worker=self.consumer, lease_s=self.settings.lease_s)

    async def _reclaim(self, slots: asyncio.Semaphore, tasks: set[asyncio.Task[None]]) -> None:
        idle_ms = int(self.settings.lease_s * 1000)
        pending: Any = await self.redis.xpending_range(self.keys.runs, RUNS_GROUP, min="-", max="+", count=50,
                                                  idle=idle_ms)
        for entry in pending:
            entry_id = entry["message_id"]
            if entry_id in self.running or slots.locked():
                continue
            claimed: Any = await self.redis.xclaim(
                self.keys.runs, RUNS_GROUP, self.consumer, idle_ms, [entry_id]
            )
            if not claimed or claimed[0][1] is None:
                continue  # another worker was faster, or the entry is gone
            job = Job.from_entry(claimed[0][0], claimed[0][1])
            if entry["times_delivered"] >= self.settings.max_deliveries:
                await self._dead_letter(job, entry["times_delivered"])
                continue
            log.info("reclaimed run %s from %s", job.run, entry["consumer"])
            await slots.acquire()
            self._spawn(job, slots, tasks)

    async def _dead_letter(self, job: Job, deliveries: int) -> None:
        await self.redis.xadd(self.keys.runs_dead, {"run": job.run, "user": job.user,
                                                    "conversation": job.conversation,
                                                    "deliveries": str(deliveries)})
        message = f"the run failed {deliveries} times and was given up"
        await self.store.finish_run(job.run, status="failed", text="", worker=None,
                                    error_code="run_dead_lettered", error_message=message)
        await self._publish_unpublished_end(job.run)
        await self._ack(job)

    async def _ack(self, job: Job) -> None:
        """The job is done with: acknowledged, and removed so the stream stays small."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.keys.runs, RUNS_GROUP, job.entry)
            pipe.xdel(self.keys.runs, job.entry)
            await pipe.execute()

    async def _requeue_lost(self) -> None:
        """Runs acked to a user whose job is gone (Redis lost its data) are queued again, and a
        conversation whose next run was never started (its starter crashed) gets it started."""
        for conversation in await self.store.stranded_conversations(waiting_for_s=self.settings.lease_s):
            await start_next(self.deps, conversation)
        for row in await self.store.stale_runs(queued_for_s=max(30.0, self.settings.lease_s)):
            log.warning("requeueing run %s (job lost or lease expired)", row["id"])
            await self.store.touch_run(row["id"])
            await enqueue_run(self.redis, self.keys, run=row["id"], user=row["user_id"],
                              conversation=row["conversation_id"])


class RunExecution:
    """One attempt at one run: start, stream coalesced tokens, end."""

    def __init__(self, worker: Worker, claim: RunClaim) -> None:
        self.worker = worker
        self.claim = claim
        self.producer = f"run:{claim.run}:{claim.attempts}"
        self.pseq = 0
        self.text: list[str] = []
        self.tools: list[dict[str, Any]] = []  # tool calls of this attempt, stored with the answer
        self.question: InputRequired | None = None  # what the model asked the user, if it paused
        self.last_seq: int | None = None
        self.epoch = ""
        self._checkpointed_at = 0.0

    async def publish(self, event: str, data: dict[str, Any]) -> int:
        """Publish one event of this attempt. If it landed in a new epoch (Redis lost the
        history, even writes it had acknowledged), follow it with `run.resumed` carrying the
        whole answer so far: devices replace the run's text with it, so none shows a hole."""
        self.pseq += 1
        c = self.claim
        result = await self.worker.stream.publish(
            c.user, conversation=c.conversation, run=c.run, event=event, data=data,
            producer=self.producer, pseq=self.pseq, fenced_run=c.run,
        )
        moved = bool(self.epoch) and result.epoch != self.epoch
        self.last_seq = result.seq
        self.epoch = result.epoch
        if moved:
            text = "".join(self.text) + (data["text"] if event == "token" else "")
            await self.publish("run.resumed", {"text": text, "attempt": c.attempts})
            self._checkpointed_at = 0.0  # checkpoint in the new epoch at once
        return result.seq

    async def go(self) -> None:
        c, worker = self.claim, self.worker
        history = await worker.store.history(c.conversation, c.message)
        try:
            # attempt > 1: a restart after a worker died; devices drop this run's partial text.
            await self.publish("run.started", {"message": c.message, "attempt": c.attempts,
                                               "worker": worker.consumer})
            resume = None
            while (question := await self._stream(history, resume)) is not None:
                resume = await self._await_answer(question)
            if await worker.stream.is_fenced(c.user, c.run):
                raise Fenced(c.run)
        except Fenced:
            await self._end("cancelled")
        except (Unavailable, *TRANSIENT):
            raise  # infrastructure: leave the run to be retried under its lease
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("run %s failed: %r", c.run, exc)
            await self._end("failed", error=failure_code(exc))
        else:
            await self._end("completed")
        finally:
            worker.forget(self.producer)

    async def _end(self, status: str, error: tuple[str, str] | None = None) -> None:
        """Store the end, then publish it. Postgres being away does not lose the answer the
        devices already saw: storing is retried until it comes back (the run stays leased)."""
        c, worker = self.claim, self.worker
        text = "".join(self.text)

        async def store() -> Finished | None:
            return await worker.store.finish_run(
                c.run, status=status, text=text, worker=worker.consumer, tools=self.tools,
                error_code=error[0] if error else None, error_message=error[1] if error else None,
            )

        finished = await retrying(store, retry_on=(Unavailable,), deadline_s=worker.settings.store_retry_s,
                                  what=f"storing the end of run {c.run}")
        if finished is None:
            # Ended or taken over by someone else (a cancel while queued, another worker after
            # our lease ran out): their end is the one that counts.
            await worker._publish_unpublished_end(c.run)
            return
        await publish_end(worker.deps, c.user, c.conversation, c.run, status,
                          text="" if finished.discarded else text,
                          message=finished.message, error=error, discarded=finished.discarded,
                          stopped_at=self.last_seq if status == "cancelled" else None)

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
                self.claim.run, "".join(self.text), self.last_seq, self.epoch
            )
        except Unavailable as exc:
            log.debug("checkpoint of run %s skipped: %r", self.claim.run, exc)

    async def _await_answer(self, question: InputRequired) -> str:
        """Wait for the first answer from any device (the node that takes it tells every device);
        a cancel still stops the run while it waits. No answer in time fails the run."""
        c, worker = self.claim, self.worker
        key = worker.keys.answers(c.user, c.run)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + worker.settings.input_timeout_s
        while loop.time() < deadline:
            popped = await worker.redis.blpop([key], timeout=1)
            if popped is not None:
                answer = orjson.loads(popped[1])
                if answer.get("request") == question.request:
                    return str(answer["text"])
                continue  # an answer to an earlier question of this run, repeated
            if await worker.stream.is_fenced(c.user, c.run):
                raise Fenced(c.run)
        raise InputTimeout(f"no answer to {question.prompt!r} within {worker.settings.input_timeout_s:g}s")

    async def _forward(self, items: list[object]) -> None:
        """Publish a batch of the model's output in order: runs of text as one `token` event,
        each tool call and result as its own event."""
        text: list[str] = []
        for item in [*items, None]:
            if isinstance(item, str | Text):
                text.append(item if isinstance(item, str) else item.text)
                continue
            if text:
                chunk = "".join(text)
                text.clear()
                await self.publish("token", {"text": chunk})
                self.text.append(chunk)
            if isinstance(item, ToolStarted):
                await self.publish("tool.started", {"call": item.call_id, "name": item.name,
                                                    "arguments": item.arguments})
                self.tools.append({"call": item.call_id, "name": item.name, "arguments": item.arguments})
            elif isinstance(item, InputRequired):
                await self.publish("run.input_required", {"request": item.request, "prompt": item.prompt})
                self.question = item
            elif isinstance(item, ToolCompleted):
                await self.publish("tool.completed", {"call": item.call_id, "name": item.name,
                                                      "summary": item.summary, "error": item.error})
                for call in self.tools:
                    if call["call"] == item.call_id:
                        call.update(summary=item.summary, error=item.error)
        await self._checkpoint()

    async def _stream(self, history: Sequence[tuple[str, str]], resume: str | None) -> InputRequired | None:
        """Forward the model's text as `token` events, coalesced over `coalesce_s` so a fast
        model costs a few publishes a second per run, not one per token. A cancel fence stops
        the model (its HTTP request is aborted with the task)."""
        buffer: list[object] = []
        arrived = asyncio.Event()

        self.question = None

        async def produce() -> None:
            async for item in self.worker.answer(self.claim.agent, history, self.producer, resume):
                buffer.append(item)
                arrived.set()

        model = asyncio.create_task(produce())
        try:
            while True:
                waiter = asyncio.create_task(arrived.wait())
                done, _ = await asyncio.wait({model, waiter}, timeout=0.5,
                                             return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if not done and await self.worker.stream.is_fenced(self.claim.user, self.claim.run):
                    raise Fenced(self.claim.run)
                if buffer and not model.done():
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


async def _acquire_unless_stopped(slots: asyncio.Semaphore, stop: asyncio.Event) -> bool:
    """Take a free slot, unless `stop` comes first (a busy worker must still notice SIGTERM)."""
    if stop.is_set():
        return False
    acquire = asyncio.ensure_future(slots.acquire())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({acquire, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if stop.is_set():
        if acquire.done() and not acquire.cancelled():
            slots.release()
        acquire.cancel()
        return False
    return True
