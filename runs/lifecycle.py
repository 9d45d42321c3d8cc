"""`Runs`: a run's life, each step in one place, for nodes and workers alike.

    send -> accept_send --(nothing in flight)--> queue -> worker claims (Postgres lease) -> end
                       \\--(a run in flight)--> waiting --(its predecessor ends)--> start_next
    cancel: fence the run's events; a run no worker took is ended here, a running one by its
            worker when the fence stops it
    respond (human in the loop): a run that asked its user a question is `paused` in Postgres,
            holding no worker; the first answer from any device is told to every device, stored,
            and queues the run again: any worker resumes it from LangGraph's checkpoint

Every step is idempotent under its id (the client's send id, the run id, the question's id):
each event is published under a producer id of its own, so a step retried after any failure
completes the same step instead of doubling it. Postgres is the truth; the stream tells the
devices; the queue only delivers.

Errors for the caller to translate (the node into `error` frames):

    persistence.store.NotFound   no such conversation or run for this user
    persistence.store.Conflict   the `reject` policy refused a send
    TooManyRuns                  the user has `max_in_flight` runs not yet ended (runs.admission)
    Overloaded                   the run queue is past `max_queue_depth` or `max_queue_age_s`
    runs.agents.UnknownAgent     a send that starts a conversation names an agent no worker serves
    runs.agents.AgentUnavailable a send to an agent none of whose workers is alive
    RunEnded                     cancelling a run that already ended
    NotWaiting                   answering a run that waits on no question
    AlreadyAnswered              another device answered that question first
    fanout.broker.Fenced         the run was cancelled (answering it)
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import orjson

from common import tracing
from common.backoff import retrying
from fanout.broker import Broker, Fenced, PublishResult
from persistence.records import SendRecord
from persistence.store import Store, Unavailable, new_id
from protocol.events import (
    EventData,
    MessageCreated,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunInputReceived,
    RunQueued,
    RunResumed,
    TokenUsage,
    event_body,
)
from protocol.vocabulary import ENDED, DoubleTexting, RunStatus
from runs import admission
from runs.agents import DEFAULT, AgentDirectory, AgentUnavailable, UnknownAgent, pool_of
from runs.queue import Backlog, Job, RunQueue


class TooManyRuns(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} runs already in flight; wait for one to end or cancel one")


class Overloaded(Exception):
    """Runs wait for workers longer (or in greater number) than the operator allows: a new send
    is refused rather than queued behind them; `retry_after_ms` suggests when to try again."""

    def __init__(self, depth: int, oldest_s: float, retry_after_ms: int) -> None:
        super().__init__(f"{depth} runs are waiting for a worker, the oldest for {oldest_s:.0f}s; "
                         "retry later with the same id")
        self.retry_after_ms = retry_after_ms


class RunEnded(Exception):
    def __init__(self, run: str, status: str) -> None:
        super().__init__(f"run {run} already {status}")


class NotWaiting(Exception):
    def __init__(self, run: str, status: str) -> None:
        super().__init__(f"run {run} is {status}, not waiting for input")


class AlreadyAnswered(Exception):
    def __init__(self, by: str) -> None:
        super().__init__(f"already answered from {by}")


@dataclass(frozen=True)
class Ending:
    """How a run ended, for its one end event. `error` is (code, readable reason) for a failed
    run; `message` the stored answer (None without text); `discarded`: rolled back."""

    status: RunStatus
    text: str
    message: str | None
    error: tuple[str, str] | None = None
    stopped_at: int | None = None
    discarded: bool = False
    by: str | None = None
    usage: TokenUsage | None = None  # shown in run.completed

    def event(self) -> EventData:
        if self.status == RunStatus.FAILED:
            code, reason = self.error or ("internal", "the run failed")
            return RunFailed(code=code, message=reason, text=self.text, answer_message=self.message,
                             rolled_back=self.discarded, by=self.by)
        if self.status == RunStatus.CANCELLED:
            return RunCancelled(message=self.message, text=self.text, stopped_at=self.stopped_at,
                                rolled_back=self.discarded, by=self.by)
        return RunCompleted(message=self.message, text=self.text, rolled_back=self.discarded, by=self.by,
                            usage=self.usage)


@dataclass
class Runs:
    store: Store
    broker: Broker
    queue: RunQueue
    store_retry_s: float = 600.0  # how long ending a run waits for Postgres to come back
    agents: AgentDirectory | None = None  # checks the agent a new conversation names
    max_in_flight: int = 0  # runs not yet ended per user; 0: no limit
    max_queue_depth: int = 0  # runs waiting for a worker before new sends are refused; 0: no limit
    max_queue_age_s: float = 0.0  # the oldest run's wait before new sends are refused; 0: no limit

    async def publish(
        self, user: str, conversation: str, run: str | None, data: EventData, *, producer: str, pseq: int = 1,
        fenced: bool = False, pass_fence: bool = False, producer_epoch: str = "",
        follows: tuple[str, int] | None = None,
    ) -> PublishResult:
        """Publish one event of `run` to `user`'s devices. `fenced`: refuse it (`Fenced`) once the
        run was cancelled, unless `pass_fence` (the run's own end). `producer_epoch` and `follows`:
        see `fanout.broker.Broker.publish`."""
        payload = event_body(conversation, run, data, int(time.time() * 1000), dumps=compact_json)
        return await self.broker.publish(user, payload, producer=producer, pseq=pseq,
                                         fence=run if fenced else None, pass_fence=pass_fence,
                                         producer_epoch=producer_epoch, follows=follows)

    # Sends

    async def accept_send(
        self, user: str, device: str, *, client_id: str | None, text: str, conversation: str | None,
        agent: str | None, policy: DoubleTexting | None,
    ) -> tuple[SendRecord, int]:
        """Store the message and its run, publish `message.created`, queue the run (or let it
        wait, cancelling what the policy replaces); returns the record and the message's seq.
        Without a `client_id` the send cannot be retried safely (one is made up)."""
        retryable = client_id is not None
        client_id = client_id or new_id("s")  # before admission: it names the send's run slot
        backlog = await self._admit(user, client_id)
        try:
            pool = DEFAULT
            if self.agents is not None:
                pool = await self._route_send(user, client_id if retryable else None, conversation, agent)
            record = await self.store.accept_send(user, client_id=client_id, conversation=conversation,
                                                  text=text, device=device, agent=agent or DEFAULT,
                                                  policy=policy)
        except BaseException:
            if self.max_in_flight > 0:
                await admission.abandon(self.queue, user, client_id)
            raise
        if self.max_in_flight > 0:
            await admission.hold(self.queue, user, client_id, record.run, record.status)
        if record.seq is not None:
            return record, record.seq  # a retry of a send fully done before
        created = MessageCreated(message=record.message, text=text, device=device, client_id=client_id)
        published = await self.publish(user, record.conversation, record.run, created,
                                       producer=f"msg:{record.message}")
        await self._double_text(user, device, record, backlog, pool)
        await self.store.set_message_seq(user, record.message, published.seq)
        return record, published.seq

    async def _route_send(self, user: str, client_id: str | None, conversation: str | None,
                          agent: str | None) -> str:
        """The pool of a send's run, chosen before anything is stored: a send to an agent with no
        live worker is refused (`AgentUnavailable`), unless it repeats one already stored (its
        client gets its ack). A conversation's agent that no worker advertises any more (all its
        workers gone for longer than the directory keeps them) is unavailable too, not unknown."""
        assert self.agents is not None
        name = agent or DEFAULT
        if conversation is not None:
            name = await self.store.conversation_agent(user, conversation)
        try:
            return await self._route(name, strict=True)
        except (UnknownAgent, AgentUnavailable) as exc:
            if client_id and (await self.store.count_runs_in_flight(user, client_id))[1]:
                return name  # a retry: accept_send returns what was stored, nothing is queued
            if conversation is not None and isinstance(exc, UnknownAgent):
                raise AgentUnavailable(name) from None
            raise

    async def _admit(self, user: str, client_id: str) -> Backlog | None:
        """Refuse a new send that would join a queue past its limits (`Overloaded`), or start one
        run more than `max_in_flight` runs not yet ended (`TooManyRuns`); else, under that limit,
        the send holds one of the user's run slots (`runs.admission`: one atomic step in Redis, so
        concurrent sends cannot overshoot; `accept_send` turns it into the run's or gives it back).
        A retry of a send already stored (same client id) is never refused: it starts nothing
        new. Returns the queue's backlog when it had to read it (the send's place in the queue
        then comes from it)."""
        backlog = None
        if self.max_queue_depth > 0 or self.max_queue_age_s > 0:  # first: a refusal here holds no slot
            if (await self.store.count_runs_in_flight(user, client_id))[1]:
                return None
            backlog = await self.queue.backlog(await self.all_pools())
            too_deep = 0 < self.max_queue_depth <= backlog.depth
            too_old = 0 < self.max_queue_age_s <= backlog.oldest_s
            if too_deep or too_old:
                retry_s = max(1.0, self.max_queue_age_s / 2 if too_old else 5.0)
                raise Overloaded(backlog.depth, backlog.oldest_s, int(retry_s * 1000))
        if self.max_in_flight > 0 and not await admission.admit(self.queue, self.store, user, client_id,
                                                                limit=self.max_in_flight):
            raise TooManyRuns(self.max_in_flight)
        return backlog

    async def _double_text(self, user: str, device: str, record: SendRecord, backlog: Backlog | None,
                           pool: str) -> None:
        """Start the new run, or tell every device it waits, and cancel what the policy replaces.
        `backlog`: the queue as admission read it, if it did (not read twice for one send)."""
        if record.status == RunStatus.QUEUED:
            ahead = (backlog or await self.queue.backlog([pool])).depth
            job = Job(run=record.run, user=user, conversation=record.conversation, pool=pool,
                      trace=tracing.carrier())
            await self.queue.enqueue(job)
            if ahead:  # no free worker: say where the run stands (workers update it as it moves)
                await self.announce_position(job, ahead + 1)
            return
        queued = RunQueued(behind=record.behind, policy=record.policy, message=record.message)
        await self.publish(user, record.conversation, record.run, queued, producer=f"run:{record.run}:queued")
        for run in record.supersedes:
            await self._cancel(user, run, by=device)
        # The run it waited behind may have ended meanwhile; then nobody else would start it.
        await self.start_next(record.conversation)

    async def answer_again(self, user: str, failed: str, run: str) -> SendRecord | None:
        """Store and start `run`, a new run answering the user message of the failed run `failed`
        (an operator retrying a dead letter: the failed run already published its one end, so it
        cannot run again). Devices learn of it before it starts (`run.queued` with the message).
        Every step is safe to repeat under `run`. None when `failed` has nothing to answer again;
        `NotFound` when it or its message is gone."""
        record = await self.store.retry_run(failed, run)
        if record is None:
            return None
        queued = RunQueued(behind=record.behind, policy=record.policy, message=record.message)
        await self.publish(user, record.conversation, run, queued, producer=f"run:{run}:queued")
        if record.status == RunStatus.QUEUED:
            await self.enqueue(Job(run=run, user=user, conversation=record.conversation), record.agent)
        elif record.status == RunStatus.WAITING:
            await self.start_next(record.conversation)  # the run it waits behind may have ended meanwhile
        return record

    async def announce_position(self, job: Job, position: int) -> None:
        """Tell the devices the run waits for a worker at `position` (1: next). Each position of a
        run is published once, whoever announces it (its own producer id)."""
        with contextlib.suppress(Fenced):  # cancelled meanwhile: its end says so
            await self.publish(job.user, job.conversation, job.run, RunQueued(behind=None, position=position),
                               producer=f"run:{job.run}:queued:{position}", fenced=True)

    # Cancelling and ending

    async def cancel(self, user: str, run: str, *, by: str) -> None:
        row = await self.store.get_run(user, run)
        if row["status"] in ENDED:
            raise RunEnded(run, row["status"])
        await self._cancel(user, run, by=by)

    async def _cancel(self, user: str, run: str, *, by: str) -> None:
        """Fence the run so no later event of it gets a seq; a run no worker took yet is ended here
        (and the next one started), a running one by its worker when the fence stops it."""
        await self.broker.fence(user, run)
        paused = await self.store.paused_run(user, run)
        if paused is None:
            cancelled = await self.store.cancel_queued_run(user, run)
            if cancelled is not None:
                ending = Ending(RunStatus.CANCELLED, text="", message=None, discarded=cancelled["discard"],
                                by=by)
                await self.end(user, cancelled["conversation_id"], run, ending)
        else:
            # No worker holds it: it ends here, keeping what it said before it asked. (A worker
            # pausing it, or taking it, right now is stopped by the fence: one end wins.)
            text, tools = paused["partial"], orjson.loads(paused["partial_tools"])
            finished = await self.store.finish_run(run, status=RunStatus.CANCELLED, text=text, worker=None,
                                                   tools=tools)
            if finished is not None:
                ending = Ending(RunStatus.CANCELLED, text="" if finished.discarded else text,
                                message=finished.message, discarded=finished.discarded, by=by,
                                stopped_at=paused["partial_seq"])
                await self.end(user, paused["conversation_id"], run, ending)

    async def end(self, user: str, conversation: str, run: str, ending: Ending, *,
                  follows: tuple[str, int] | None = None) -> None:
        """Publish a run's one end event (its end is already stored), then start the conversation's
        next waiting run. The end's producer id is shared by every publisher of the run's end (a
        worker, a later one, a node cancelling a queued run), so exactly one gets a seq.
        `follows`: the worker's producer and its last publish, which the end must come after
        (`Lost` when Redis lost it: see `fanout.broker.Broker.publish`)."""
        published = await self.publish(user, conversation, run, ending.event(), producer=f"run:{run}:end",
                                       fenced=True, pass_fence=True, follows=follows)

        async def record() -> None:
            await self.store.set_terminal_seq(run, published.seq)

        await retrying(record, retry_on=(Unavailable,), deadline_s=self.store_retry_s,
                       what=f"recording the end of run {run}")
        await admission.free(self.queue, user, run)  # every end comes here (a worker's, a cancel's)
        await self.start_next(conversation)

    async def publish_unpublished_end(self, run: str) -> None:
        """A run that ended in Postgres but whose end event was never published (its publisher
        died in between) gets it published now; the end's producer id makes this idempotent."""
        state = await self.store.run_state(run)
        if state is None or state["status"] not in ENDED or state["terminal_seq"] is not None:
            return
        error = (state["error_code"], state["error_message"]) if state["error_code"] else None
        usage = None
        if state["prompt_tokens"] is not None:
            usage = TokenUsage(state["prompt_tokens"], state["completion_tokens"])
        ending = Ending(RunStatus(state["status"]), text=state["partial"], message=state["answer_message_id"],
                        error=error, usage=usage)
        await self.end(state["user_id"], state["conversation_id"], run, ending)

    async def publish_end_again(self, run: str, epoch: str) -> PublishResult | None:
        """Publish the end of an ended run again, in the user's stream's epoch `epoch`: its devices
        resynced into that epoch without it (its first publish was among writes Redis lost, or it
        landed before they resynced past it). `run.resumed` with the stored answer goes first, so a
        device that missed the run's last tokens shows it whole. Both are published once per
        epoch, whoever calls this (one producer id per epoch); the end's seq and the epoch it
        landed in are recorded. None when the run has not ended (or is gone)."""
        state = await self.store.ended_run(run)
        if state is None:
            return None
        status = RunStatus(state["status"])
        error = (state["error_code"], state["error_message"] or "") if state["error_code"] else None
        usage = None
        if state["prompt_tokens"] is not None:
            usage = TokenUsage(state["prompt_tokens"], state["completion_tokens"])
        ending = Ending(status, text=state["partial"], message=state["answer_message_id"], error=error,
                        discarded=state["discard"], usage=usage)
        user, conversation, producer = state["user_id"], state["conversation_id"], f"run:{run}:end:{epoch}"
        resumed = await self.publish(user, conversation, run, RunResumed(text=state["partial"],
                                                                         attempt=state["attempts"]),
                                     producer=producer, pseq=1)
        published = await self.publish(user, conversation, run, ending.event(), producer=producer, pseq=2,
                                       producer_epoch=resumed.epoch)

        async def record() -> None:
            await self.store.set_end_again(run, published.seq, published.epoch)

        await retrying(record, retry_on=(Unavailable,), deadline_s=self.store_retry_s,
                       what=f"recording the end of run {run} published again")
        return published

    async def start_next(self, conversation: str) -> None:
        """Queue the conversation's next waiting run, if nothing else is in flight."""

        async def promote() -> object:
            return await self.store.promote_next(conversation)

        promoted = await retrying(promote, retry_on=(Unavailable,), deadline_s=self.store_retry_s,
                                  what=f"starting the next run of {conversation}")
        if promoted is not None:
            row: Any = promoted
            job = Job(run=row["id"], user=row["user_id"], conversation=conversation)
            await self.enqueue(job, row["agent"])

    async def enqueue(self, job: Job, agent: str) -> None:
        """Queue `job`, a run of `agent`, on the pool `runs.agents` routes it to; when none of the
        agent's workers is alive, on one of its pools anyway (the run was accepted: it waits for one)."""
        pool = await self._route(agent, strict=False)
        await self.queue.enqueue(dataclasses.replace(job, pool=pool, trace=job.trace or tracing.carrier()))

    async def _route(self, agent: str, *, strict: bool) -> str:
        if self.agents is None:
            return agent
        try:
            return (await self.agents.route(agent)).pool
        except (UnknownAgent, AgentUnavailable):
            if strict:
                raise
            pools = [r.pool for r in await self.agents.routes() if r.name == agent]
            return pools[0] if pools else agent

    async def pools_of(self, agents: set[str]) -> list[str]:
        """The pools of `agents` (where their runs' jobs may be)."""
        if self.agents is None:
            return sorted(agents)
        return sorted({r.pool for r in await self.agents.routes() if r.name in agents} | agents)

    async def all_pools(self) -> list[str] | None:
        """Every pool there is (admission weighs the whole queue); None: the queue's own."""
        if self.agents is None:
            return None
        return sorted({r.pool for r in await self.agents.routes()})

    # Human in the loop

    async def respond(self, user: str, run: str, *, request: str, text: str, device: str) -> None:
        """Answer a run's question. The first answer from any device wins; every device is told
        who answered (`run.input_received`) before the worker gets it. Repeating one's own answer
        (a retry) is harmless: the event is deduped and the worker takes one answer per question."""
        row = await self.store.get_run(user, run)
        if row["status"] not in (RunStatus.RUNNING, RunStatus.PAUSED, RunStatus.QUEUED):
            raise NotWaiting(run, row["status"])
        # Postgres decides which answer counts (the first), and holds it for whichever worker resumes
        # the run; a run still running (its question just went out) finds it as its worker pauses it.
        answered = await self.store.answer_run(user, run, request, text, device=device)
        if isinstance(answered, str):
            raise AlreadyAnswered(answered)
        if answered is None:
            raise NotWaiting(run, f"{row['status']} and not waiting on {request}")
        received = RunInputReceived(request=request, text=answered["text"], by=device)
        await self.publish(user, row["conversation_id"], run, received, producer=f"run:{run}:input:{request}",
                           fenced=True)
        if answered["status"] == RunStatus.QUEUED:  # after the devices were told
            job = Job(run=run, user=user, conversation=answered["conversation_id"])
            if answered["agent_version"] is not None:
                # Back to the version that asked: its graph's checkpoint is the one to resume.
                pool = pool_of(answered["agent"], answered["agent_version"])
                await self.queue.enqueue(dataclasses.replace(job, pool=pool, trace=tracing.carrier()))
            else:
                await self.enqueue(job, answered["agent"])


def compact_json(frame: dict[str, Any]) -> str:
    # orjson writes the same compact JSON as protocol.events' json.dumps, at a fifth of the cost
    # (issue 15: stdlib encoding was 4% of a worker's CPU at 50 runs); tests compare the two.
    return orjson.dumps(frame).decode()
