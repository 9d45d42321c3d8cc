"""The run lifecycle in-process: send -> queue -> cancel -> end -> next, human-in-the-loop answers
and a worker carrying runs to their end, against the memory queue and broker (Postgres is real:
it is the runs' truth)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import pytest

from agent_worker.graph import InputRequired, Resumption, Text
from agent_worker.settings import WorkerSettings
from agent_worker.worker import Worker
from fanout.memory_broker import MemoryBroker, MemoryPubSub
from loadtest.cluster import LocalCluster
from persistence.records import Question, Resume
from persistence.store import Conflict, NotFound, Store
from protocol import DoubleTexting, Event, RunStatus
from runs.lifecycle import AlreadyAnswered, Ending, NotWaiting, Overloaded, RunEnded, Runs
from runs.queue import MemoryRunQueue

WAIT_S = 10.0


@pytest.fixture
async def store(cluster: LocalCluster) -> AsyncIterator[Store]:
    store = await Store.connect(cluster.database_url)
    yield store
    await store.close()


@pytest.fixture
def runs(store: Store) -> Runs:
    return Runs(store, MemoryBroker(), MemoryRunQueue(), store_retry_s=5)


@pytest.fixture
def user() -> str:
    return f"life-{uuid.uuid4().hex[:8]}"


async def events(runs: Runs, user: str) -> list[dict[str, Any]]:
    """Every event of the user's stream, oldest first."""
    frames = await runs.broker.read_after(user, 0, upto=0)
    assert frames is not None
    return [orjson.loads(f) for f in frames]


async def of_run(runs: Runs, user: str, run: str) -> list[str]:
    return [e["event"] for e in await events(runs, user) if e["run"] == run]


async def watch(runs: Runs, user: str) -> MemoryPubSub:
    """A subscriber to the user's channel: sees every event published from now on."""
    broker = runs.broker
    assert isinstance(broker, MemoryBroker)
    pubsub = broker.pubsub()
    await pubsub.subscribe(broker.channel(user))
    return pubsub


async def published(pubsub: MemoryPubSub, run: str, name: Event, **data: Any) -> dict[str, Any]:
    """The next event `name` of `run` (with these `data` members) on the watched channel, bounded
    by WAIT_S; the events before it are passed over."""
    async def wait() -> dict[str, Any]:
        while True:
            message = await pubsub.get_message(timeout=WAIT_S)
            assert message is not None, f"no {name} of {run} within {WAIT_S}s"
            if message["type"] == "message":
                event: dict[str, Any] = orjson.loads(message["data"])
                if event["run"] == run and event["event"] == name and data.items() <= event["data"].items():
                    return event

    return await asyncio.wait_for(wait(), WAIT_S)


def queued(runs: Runs) -> list[str]:
    queue = runs.queue
    assert isinstance(queue, MemoryRunQueue)
    return [d.job.run for d in queue.waiting]


async def send(runs: Runs, user: str, text: str, conversation: str | None = None, client_id: str | None = None,
               policy: DoubleTexting | None = None) -> tuple[Any, int]:
    return await runs.accept_send(user, "phone", client_id=client_id or uuid.uuid4().hex, text=text,
                                  conversation=conversation, agent="default", policy=policy)


async def finish(runs: Runs, run: str, text: str) -> None:
    """What a worker does, without the model: claim, store the end, publish it."""
    claim = await runs.store.claim_run(run, worker="w", lease_s=30)
    assert claim is not None
    finished = await runs.store.finish_run(run, status=RunStatus.COMPLETED, text=text, worker="w")
    assert finished is not None
    await runs.end(claim.user, claim.conversation, run, Ending(RunStatus.COMPLETED, text, finished.message))


async def test_a_send_is_stored_published_and_queued_once_however_often_it_is_retried(
    runs: Runs, user: str
) -> None:
    record, seq = await send(runs, user, "hello", client_id="c1")
    assert (record.status, seq) == (RunStatus.QUEUED, 1)
    assert await of_run(runs, user, record.run) == [Event.MESSAGE_CREATED]
    assert queued(runs) == [record.run]
    again, again_seq = await send(runs, user, "hello", client_id="c1")
    assert (again.run, again_seq) == (record.run, seq)
    assert len(await events(runs, user)) == 1 and queued(runs) == [record.run]


async def test_enqueue_waits_behind_the_run_in_flight_and_starts_when_it_ends(runs: Runs, user: str) -> None:
    first, _ = await send(runs, user, "first")
    second, _ = await send(runs, user, "second", conversation=first.conversation)
    assert second.status == RunStatus.WAITING and second.behind == first.run
    queued_event = [e for e in await events(runs, user) if e["event"] == Event.RUN_QUEUED]
    assert queued_event[0]["data"] == {"behind": first.run, "policy": "enqueue", "message": second.message}
    assert queued(runs) == [first.run], "the second run waits, off the queue"
    await finish(runs, first.run, "answer one")
    assert await of_run(runs, user, first.run) == [Event.MESSAGE_CREATED, Event.RUN_COMPLETED]
    assert queued(runs) == [first.run, second.run], "the end started the next run"


async def test_cancel_ends_a_queued_run_fences_it_and_starts_the_next(runs: Runs, user: str) -> None:
    first, _ = await send(runs, user, "first")
    second, _ = await send(runs, user, "second", conversation=first.conversation)
    await runs.cancel(user, first.run, by="laptop")
    end = [e for e in await events(runs, user) if e["run"] == first.run][-1]
    assert end["event"] == Event.RUN_CANCELLED and end["data"] == {"message": None, "text": "", "by": "laptop"}
    assert await runs.broker.is_fenced(user, first.run)
    assert queued(runs)[-1] == second.run
    with pytest.raises(RunEnded):
        await runs.cancel(user, first.run, by="laptop")
    with pytest.raises(NotFound):
        await runs.cancel(f"{user}-other", second.run, by="laptop")


async def test_interrupt_cancels_the_run_in_flight_and_reject_refuses(runs: Runs, user: str) -> None:
    first, _ = await send(runs, user, "first")
    second, _ = await send(runs, user, "second", conversation=first.conversation, policy=DoubleTexting.INTERRUPT)
    assert second.supersedes == (first.run,)
    assert (await of_run(runs, user, first.run))[-1] == Event.RUN_CANCELLED
    assert queued(runs)[-1] == second.run
    with pytest.raises(Conflict):
        await send(runs, user, "third", conversation=first.conversation, policy=DoubleTexting.REJECT)


QUESTION = Question("q1", "colour?", checkpoint="cp-1")
SAID = [{"call": "c1", "name": "ask_user", "arguments": {"question": "colour?"}}]


async def test_the_first_answer_from_any_device_queues_the_paused_run_again(runs: Runs, user: str) -> None:
    record, _ = await send(runs, user, "ask me")
    with pytest.raises(NotWaiting):  # queued: it asked nothing yet
        await runs.respond(user, record.run, request="q1", text="yes", device="phone")
    claim = await runs.store.claim_run(record.run, worker="w", lease_s=30)
    assert claim is not None and claim.resume is None
    paused = await runs.store.pause_run(record.run, worker="w", question=QUESTION, text="Let me ask. ", tools=SAID,
                                        seq=7, epoch="e1", timeout_s=60)
    assert paused == (True, None)
    assert (await runs.store.get_run(user, record.run))["status"] == RunStatus.PAUSED
    with pytest.raises(NotWaiting):  # paused on q1, not on q2
        await runs.respond(user, record.run, request="q2", text="no", device="phone")
    jobs_before = queued(runs).count(record.run)
    await runs.respond(user, record.run, request="q1", text="blue", device="laptop")
    await runs.respond(user, record.run, request="q1", text="blue", device="laptop")  # a retry: harmless
    with pytest.raises(AlreadyAnswered):
        await runs.respond(user, record.run, request="q1", text="red", device="phone")
    assert queued(runs).count(record.run) > jobs_before, "the answered run is queued again"
    received = [e for e in await events(runs, user) if e["event"] == Event.RUN_INPUT_RECEIVED]
    assert [e["data"] for e in received] == [{"request": "q1", "text": "blue", "by": "laptop"}]
    # Any worker takes it on from the question, with what it had said and done.
    resumed = await runs.store.claim_run(record.run, worker="w2", lease_s=30)
    assert resumed is not None
    assert resumed.resume == Resume(question=QUESTION, answer="blue", text="Let me ask. ", tools=SAID)
    assert await runs.store.claim_run(record.run, worker="w3", lease_s=30) is None  # one holder


async def test_an_answer_that_beats_the_pause_keeps_the_run_with_its_worker(runs: Runs, user: str) -> None:
    record, _ = await send(runs, user, "ask me")
    assert await runs.store.claim_run(record.run, worker="w", lease_s=30) is not None
    with pytest.raises(NotWaiting):  # nothing asked yet: no answer is taken
        await runs.respond(user, record.run, request="q1", text="blue", device="phone")
    assert await runs.store.ask_run(record.run, worker="w", question=QUESTION, text="", tools=[])
    # The question went out and a device answered before the worker stored the pause.
    await runs.respond(user, record.run, request="q1", text="blue", device="phone")
    with pytest.raises(NotWaiting):  # only the question asked is answered
        await runs.respond(user, record.run, request="q0", text="red", device="laptop")
    paused = await runs.store.pause_run(record.run, worker="w", question=QUESTION, text="", tools=[], seq=None,
                                        epoch="", timeout_s=60)
    assert paused == (True, "blue")
    assert (await runs.store.get_run(user, record.run))["status"] == RunStatus.RUNNING
    # A worker that lost the run asks and pauses nothing.
    assert not await runs.store.ask_run(record.run, worker="someone-else", question=QUESTION, text="", tools=[])
    assert await runs.store.pause_run(record.run, worker="someone-else", question=QUESTION, text="", tools=[],
                                      seq=None, epoch="", timeout_s=60) == (False, None)


async def test_cancelling_a_paused_run_ends_it_with_what_it_said(runs: Runs, user: str) -> None:
    record, _ = await send(runs, user, "ask me")
    assert await runs.store.claim_run(record.run, worker="w", lease_s=30) is not None
    await runs.store.pause_run(record.run, worker="w", question=QUESTION, text="Let me ask. ", tools=SAID, seq=7,
                               epoch="e1", timeout_s=60)
    await runs.cancel(user, record.run, by="phone")
    [end] = [e for e in await events(runs, user) if e["run"] == record.run and e["event"] == Event.RUN_CANCELLED]
    assert end["data"]["text"] == "Let me ask. " and end["data"]["stopped_at"] == 7 and end["data"]["by"] == "phone"
    assert (await runs.store.get_run(user, record.run))["status"] == RunStatus.CANCELLED
    with pytest.raises(NotWaiting):
        await runs.respond(user, record.run, request="q1", text="too late", device="phone")


def scripted(answers: dict[str, Sequence[object]]) -> Any:
    """An answer stream: the items a model would produce, per last user message."""

    async def answer(agent: str, history: Sequence[tuple[str, str]], thread: str,
                     resume: Resumption | None) -> AsyncIterator[object]:
        items = answers[history[-1][1]] if resume is None else [Text(f" you said {resume.answer}")]
        for item in items:
            await asyncio.sleep(0)
            yield item

    return answer


async def test_a_worker_carries_queued_runs_to_their_end_in_order(runs: Runs, user: str) -> None:
    settings = WorkerSettings(redis_url="redis://unused", database_url="postgresql://unused", worker_id="w1",
                              coalesce_s=0.0, lease_s=5.0)
    worker = Worker(settings=settings, runs=runs, answer=scripted({
        "one": [Text("first "), Text("answer")],
        "two": [InputRequired(request="q", prompt="colour?")],
    }))
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.run(stop))
    pubsub = await watch(runs, user)
    try:
        first, _ = await send(runs, user, "one")
        second, _ = await send(runs, user, "two", conversation=first.conversation)
        done = await published(pubsub, first.run, Event.RUN_COMPLETED)
        assert done["data"]["text"] == "first answer"
        await published(pubsub, second.run, Event.RUN_INPUT_REQUIRED)
        await runs.respond(user, second.run, request="q", text="green", device="phone")
        done = await published(pubsub, second.run, Event.RUN_COMPLETED)
        assert done["data"]["text"] == " you said green"
        names = [e["event"] for e in await events(runs, user) if e["run"] == second.run]
        assert names.index(Event.RUN_QUEUED) < names.index(Event.RUN_STARTED), "it waited for the first"
    finally:
        stop.set()
        await asyncio.wait_for(serving, WAIT_S)  # a stopping worker lets its runs finish first
    queue = runs.queue
    assert isinstance(queue, MemoryRunQueue) and queue.pending == {}, "every job acked"


async def test_the_lost_job_sweep_requeues_only_runs_whose_job_is_gone(runs: Runs, user: str) -> None:
    kept, _ = await send(runs, user, "one")
    lost, _ = await send(runs, user, "two")
    # Both look stale to Postgres (queued an hour ago, acked); only one's job left the queue.
    await runs.store.pool.execute("UPDATE runs SET updated_at = now() - interval '1 hour' WHERE id = ANY($1)",
                                  [kept.run, lost.run])
    queue = runs.queue
    assert isinstance(queue, MemoryRunQueue)
    queue.waiting = [d for d in queue.waiting if d.job.run != lost.run]
    settings = WorkerSettings(redis_url="redis://unused", database_url="postgresql://unused", worker_id="w2")
    worker = Worker(settings=settings, runs=runs, answer=scripted({}))
    await worker._requeue_lost()
    mine = [run for run in queued(runs) if run in (kept.run, lost.run)]
    assert mine == [kept.run, lost.run], "the lost job is queued again, the waiting one is not doubled"


async def test_the_first_token_is_published_at_once_however_long_the_coalescing_window(
    runs: Runs, user: str
) -> None:
    release = asyncio.Event()

    async def answer(agent: str, history: Sequence[tuple[str, str]], thread: str,
                     resume: Resumption | None) -> AsyncIterator[object]:
        yield Text("first")
        await release.wait()  # the model goes on only once the device has seen the first token
        yield Text(" second")

    settings = WorkerSettings(redis_url="redis://unused", database_url="postgresql://unused", worker_id="w3",
                              coalesce_s=30.0)
    worker = Worker(settings=settings, runs=runs, answer=answer)
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.run(stop))
    pubsub = await watch(runs, user)
    try:
        record, _ = await send(runs, user, "hi")
        token = await published(pubsub, record.run, Event.TOKEN)  # within WAIT_S, far less than 30 s
        assert token["data"]["text"] == "first"
        release.set()
        done = await published(pubsub, record.run, Event.RUN_COMPLETED)
        assert done["data"]["text"] == "first second"
    finally:
        stop.set()
        await asyncio.wait_for(serving, WAIT_S + 30)


async def test_a_full_queue_refuses_new_sends_but_not_retries(store: Store, user: str) -> None:
    runs = Runs(store, MemoryBroker(), MemoryRunQueue(), max_queue_depth=2)
    first, _ = await send(runs, user, "one", client_id="c1")
    await send(runs, user, "two")
    with pytest.raises(Overloaded) as refused:
        await send(runs, user, "three")
    assert refused.value.retry_after_ms > 0 and "2 runs are waiting" in str(refused.value)
    again, _ = await send(runs, user, "one", client_id="c1")  # a retry starts nothing: never refused
    assert again.run == first.run


async def test_runs_waiting_for_a_worker_are_told_their_place_as_it_moves(
    runs: Runs, user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent_worker.worker.POSITIONS_EVERY_S", 0.05)
    gates = {text: asyncio.Event() for text in ("a", "b", "c")}

    async def answer(agent: str, history: Sequence[tuple[str, str]], thread: str,
                     resume: Resumption | None) -> AsyncIterator[object]:
        await gates[history[-1][1]].wait()
        yield Text(f"done {history[-1][1]}")

    pubsub = await watch(runs, user)
    a, _ = await send(runs, user, "a")
    b, _ = await send(runs, user, "b")
    c, _ = await send(runs, user, "c")  # no worker yet: b and c are told 2 and 3 as they queue
    settings = WorkerSettings(redis_url="redis://unused", database_url="postgresql://unused", worker_id="w4",
                              concurrency=1)
    worker = Worker(settings=settings, runs=runs, answer=answer)
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.run(stop))
    try:
        await published(pubsub, a.run, Event.RUN_STARTED)
        await published(pubsub, c.run, Event.RUN_QUEUED, position=2)  # a took the one slot
        gates["a"].set()
        await published(pubsub, c.run, Event.RUN_QUEUED, position=1)  # then b did
        gates["b"].set()
        gates["c"].set()
        await published(pubsub, c.run, Event.RUN_COMPLETED)
    finally:
        stop.set()
        await asyncio.wait_for(serving, WAIT_S)

    def positions(run: str) -> list[int]:
        return [e["data"]["position"] for e in history if e["run"] == run and e["event"] == Event.RUN_QUEUED]

    history = await events(runs, user)
    assert (positions(a.run), positions(b.run), positions(c.run)) == ([], [2, 1], [3, 2, 1])


async def test_runs_in_flight_of_users_asked_together_are_each_users_own(runs: Runs, user: str) -> None:
    """Sockets of several users opening at once: their runs in flight are read in one query
    (`common.batching`), and each user gets only their own."""
    users = [f"{user}-a", f"{user}-b", f"{user}-c"]
    sent = [await send(runs, someone, "hi") for someone in users[:2]]
    got = await asyncio.gather(*(runs.store.runs_in_flight(someone) for someone in users))
    assert [[r.run for r in mine] for mine in got] == [[sent[0][0].run], [sent[1][0].run], []]
