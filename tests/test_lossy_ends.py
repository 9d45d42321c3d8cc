"""A run's end among the writes Redis lost is published again, once, in the stream devices now read.

Real Redis (a server of the test's own, made to lose its last writes the way the redis_lossy soak
fault does: SAVE, then SIGTERM, which does not save, then start) and real Postgres (the runs'
truth, a database of the test's own); the lifecycle and the worker's sweep run in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from agent_worker.graph import Resumption, Text
from agent_worker.settings import WorkerSettings
from agent_worker.worker import Worker
from common.keys import Keys
from common.redis_client import TRANSIENT
from fanout.redis_broker import RedisBroker
from loadtest.procs import PostgresServer, RedisServer
from persistence.migrate import upgrade_head
from persistence.store import Store
from protocol import Event, RunStatus
from runs.lifecycle import Ending, Runs
from runs.queue import MemoryRunQueue
from tests.support import until

ANSWER = "the whole answer"


@pytest.fixture
def database_url(postgres: PostgresServer) -> str:
    """A database of the test's own: the sweep reads every user's recent runs."""
    url = postgres.create_database(f"lossy_{uuid.uuid4().hex[:10]}")
    upgrade_head(url)
    return url


@pytest.fixture
async def runs(database_url: str, fresh_redis: RedisServer, keys: Keys) -> AsyncIterator[Runs]:
    store = await Store.connect(database_url)
    redis = Redis.from_url(fresh_redis.url, decode_responses=True)
    broker = RedisBroker(redis, keys, retry_for_s=10)
    yield Runs(store, broker, MemoryRunQueue(), store_retry_s=5)
    await broker.aclose()
    await redis.aclose()
    await store.close()


def sweeper(runs: Runs, name: str) -> Worker:
    async def nothing(*_: Any) -> AsyncIterator[object]:
        return
        yield

    settings = WorkerSettings(redis_url="redis://unused", database_url="postgresql://unused", worker_id=name)
    return Worker(settings=settings, runs=runs, answer=nothing)


async def answered(runs: Runs, user: str, text: str) -> str:
    """A run sent, claimed, ended in Postgres and its end published (as a worker does); its id."""
    record, _ = await runs.accept_send(user, "phone", client_id=uuid.uuid4().hex, text=text, conversation=None,
                                       agent=None, policy=None)
    assert await runs.store.claim_run(record.run, worker="w1", lease_s=30) is not None
    finished = await runs.store.finish_run(record.run, status=RunStatus.COMPLETED, text=ANSWER, worker="w1")
    assert finished is not None
    await runs.end(user, record.conversation, record.run, Ending(RunStatus.COMPLETED, text=ANSWER,
                                                                  message=finished.message))
    return record.run


async def stream(runs: Runs, user: str) -> list[dict[str, Any]]:
    frames = await runs.broker.read_after(user, 0, upto=0)
    assert frames is not None
    return [orjson.loads(f) for f in frames]


async def reconnected(runs: Runs) -> None:
    """Until the client's pooled connections, closed by the restart, are replaced (the worker's
    maintenance defers a sweep that meets one)."""
    assert isinstance(runs.broker, RedisBroker)
    for _ in range(20):
        with contextlib.suppress(*TRANSIENT):
            await runs.broker.redis.ping()
            await runs.broker.position("nobody")
            return
    raise AssertionError("Redis did not come back")


def lose_writes_after(server: RedisServer, save: bool) -> None:
    """Redis restarts from its last SAVE: what was written since is gone."""
    if save:
        with SyncRedis.from_url(server.url, socket_timeout=30) as client:
            client.save()
        return
    server.stop()  # SIGTERM, with snapshots off: no save
    server.start()


@pytest.mark.timeout(60)
async def test_a_lost_end_is_published_again_once_in_the_stream_devices_read(
    runs: Runs, fresh_redis: RedisServer
) -> None:
    user, kept_user = f"lossy-{uuid.uuid4().hex[:8]}", f"kept-{uuid.uuid4().hex[:8]}"
    kept = await answered(runs, kept_user, "one before the snapshot")
    record, _ = await runs.accept_send(user, "phone", client_id="s1", text="hello", conversation=None, agent=None,
                                       policy=None)
    saved = [(e["event"], e["run"]) for e in await stream(runs, user)]  # message.created (and run.queued)
    await asyncio.to_thread(lose_writes_after, fresh_redis, True)
    # The run ends after the snapshot: its end is published, recorded, then lost with Redis.
    assert await runs.store.claim_run(record.run, worker="w1", lease_s=30) is not None
    finished = await runs.store.finish_run(record.run, status=RunStatus.COMPLETED, text=ANSWER, worker="w1")
    assert finished is not None
    await runs.end(user, record.conversation, record.run, Ending(RunStatus.COMPLETED, text=ANSWER,
                                                                  message=finished.message))
    assert (await runs.store.run_state(record.run))["terminal_seq"] == len(saved) + 1
    await asyncio.to_thread(lose_writes_after, fresh_redis, False)
    await reconnected(runs)
    assert [(e["event"], e["run"]) for e in await stream(runs, user)] == saved, "the end was lost"

    first, second = sweeper(runs, "w1"), sweeper(runs, "w2")
    assert await first.republish_lost_ends(settle_s=1.0) == 0, "a stream first seen now is left to settle"
    await asyncio.sleep(1.0)
    assert await first.republish_lost_ends(settle_s=1.0) == 1
    position = await runs.broker.position(user)
    events = await stream(runs, user)
    assert [(e["event"], e["run"]) for e in events] == [
        *saved, (Event.RUN_RESUMED, record.run), (Event.RUN_COMPLETED, record.run)]
    resumed, completed = events[-2:]
    assert resumed["data"] == {"text": ANSWER, "attempt": 1}
    assert completed["data"]["text"] == ANSWER and completed["data"]["message"] == finished.message
    state = await runs.store.run_state(record.run)
    assert state["terminal_seq"] == completed["seq"] == position.seq

    # Exactly once: neither this sweeper again, nor another, publishes it a second time.
    assert await first.republish_lost_ends(settle_s=1.0) == 0
    assert await second.republish_lost_ends(settle_s=1.0) == 0
    assert await runs.publish_end_again(record.run, position.epoch) is not None  # a racing sweeper: deduped
    assert len(await stream(runs, user)) == len(events)
    # A run that began and ended in the stream's present life is left alone.
    assert [e["event"] for e in await stream(runs, kept_user) if e["run"] == kept] == [
        Event.MESSAGE_CREATED, Event.RUN_COMPLETED]


@pytest.mark.timeout(60)
async def test_after_redis_came_back_empty_the_end_is_published_in_the_new_epoch_once(
    runs: Runs, fresh_redis: RedisServer
) -> None:
    user = f"empty-{uuid.uuid4().hex[:8]}"
    run = await answered(runs, user, "hello")
    before = await runs.broker.position(user)
    sweep = sweeper(runs, "w1")
    assert await sweep.republish_lost_ends(settle_s=0.0) == 0, "its end is in the stream"
    await asyncio.to_thread(fresh_redis.restart, keep_data=False)
    await reconnected(runs)

    assert await sweep.republish_lost_ends(settle_s=0.0) == 1
    after = await runs.broker.position(user)
    assert after.epoch != before.epoch
    assert [e["event"] for e in await stream(runs, user)] == [Event.RUN_RESUMED, Event.RUN_COMPLETED]
    assert await sweep.republish_lost_ends(settle_s=0.0) == 0
    assert [e["run"] for e in await stream(runs, user)] == [run, run]


@pytest.mark.timeout(60)
async def test_a_run_whose_last_tokens_redis_lost_is_shown_whole_before_its_end(
    runs: Runs, fresh_redis: RedisServer
) -> None:
    """Redis restarts from a snapshot taken mid-answer, losing the last tokens it had acknowledged,
    and nothing of the run is published until its end (whose producer has no hole to show the
    loss). The end would land after a stream that cut the answer short; instead the worker sees
    the loss, publishes the whole answer again (`run.resumed`, in a new epoch), then the end."""
    user = f"cut-{uuid.uuid4().hex[:8]}"
    saved, lost = asyncio.Event(), asyncio.Event()

    async def answer(agent: str, history: Sequence[tuple[str, str]], thread: str,
                     resume: Resumption | None) -> AsyncIterator[object]:
        yield Text("the whole ")
        await saved.wait()
        yield Text("answer")
        await lost.wait()

    settings = WorkerSettings(redis_url="redis://unused", database_url="postgresql://unused", worker_id="w1",
                              coalesce_s=0.0)
    worker = Worker(settings=settings, runs=runs, answer=answer)
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.run(stop))

    def tokens(events: list[dict[str, Any]]) -> str:
        return "".join(e["data"]["text"] for e in events if e["event"] == Event.TOKEN)

    try:
        record, _ = await runs.accept_send(user, "phone", client_id="s1", text="hi", conversation=None,
                                           agent=None, policy=None)
        assert tokens(await until(lambda: stream(runs, user), lambda e: tokens(e) == "the whole ", 10)) == "the whole "
        before = await runs.broker.position(user)
        await asyncio.to_thread(lose_writes_after, fresh_redis, True)
        saved.set()
        assert tokens(await until(lambda: stream(runs, user), lambda e: tokens(e) == ANSWER, 10)) == ANSWER
        await asyncio.to_thread(lose_writes_after, fresh_redis, False)
        await reconnected(runs)
        assert tokens(await stream(runs, user)) == "the whole ", "the last token was lost"
        lost.set()
        events = await until(lambda: stream(runs, user),
                             lambda e: any(x["event"] == Event.RUN_COMPLETED for x in e), 20)
        assert [(e["event"], e["data"].get("text")) for e in events] == [
            (Event.RUN_RESUMED, ANSWER), (Event.RUN_COMPLETED, ANSWER)], "a new epoch: its history starts there"
        assert (await runs.broker.position(user)).epoch != before.epoch
        assert (await runs.store.run_state(record.run))["terminal_seq"] == events[-1]["seq"]
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)
