"""Runs under worker failure: takeover after a crash, the dead letter, model errors, cancel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import asyncpg
import pytest
from chorus_client.testing import RecordingClient as ChorusClient
from redis.asyncio import Redis

from common.keys import Keys
from loadtest.cluster import ClusterConfig, LocalCluster
from loadtest.procs import Proc
from tests.fake_llm import FakeLLM
from tests.support import unique

LONG = "[[tokens:60]] [[slow:0.05]] a long answer please"


@pytest.fixture(scope="module")
def crashy(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLM) -> Iterator[LocalCluster]:
    """One node, two workers, short leases so a dead worker's run is taken over quickly, and a
    tiny history (10 events, trimmed approximately) so a device can fall off its end."""
    config = ClusterConfig(nodes=1, workers=2, nginx=False, env={
        "LLM_BASE_URL": fake_llm.base_url, "RUN_LEASE_SECONDS": "2", "RUN_MAX_DELIVERIES": "2",
        "HISTORY_MAX_EVENTS": "10", "CHECKPOINT_SECONDS": "0.2",
    })
    with LocalCluster(tmp_path_factory.mktemp("crashy"), config) as cluster:
        yield cluster


def worker_named(cluster: LocalCluster, name: str) -> Proc:
    return next(w for w in cluster.workers if w.name == name)


async def started_by(device: ChorusClient, run: str, attempt: int) -> str:
    await device.wait_for(lambda: any(e["run"] == run and e["event"] == "run.started"
                                      and e["data"]["attempt"] == attempt for e in device.events), 20)
    event = next(e for e in device.events if e["run"] == run and e["event"] == "run.started"
                 and e["data"]["attempt"] == attempt)
    worker: str = event["data"]["worker"]
    return worker


def attempt_text(device: ChorusClient, run: str, attempt: int) -> str:
    """The tokens a device shows for one attempt of a run."""
    text, current = [], 0
    for event in device.events:
        if event["run"] != run:
            continue
        if event["event"] == "run.started":
            current = event["data"]["attempt"]
        elif event["event"] == "token" and current == attempt:
            text.append(event["data"]["text"])
    return "".join(text)


@pytest.mark.timeout(90)
async def test_a_killed_workers_run_is_taken_over_and_ends_once(crashy: LocalCluster) -> None:
    user = unique("alice")
    device = ChorusClient(f"ws://127.0.0.1:{crashy.node_ports[0]}/ws", crashy.token(user), device="phone")
    start = (await device.connect())["seq"]
    db = await asyncpg.connect(crashy.database_url)
    try:
        ack = await device.send(LONG)
        run = ack["run"]
        first = await started_by(device, run, 1)
        await device.wait_for(lambda: attempt_text(device, run, 1).count("word") >= 5, 20)
        worker_named(crashy, first).kill()
        second = await started_by(device, run, 2)
        end = await device.wait_run_end(run, 40)
        assert second != first
        assert end["event"] == "run.completed"
        expected = " ".join(f"word{i}" for i in range(1, 61))
        assert attempt_text(device, run, 2) == end["data"]["text"] == expected
        assert device.gaps == [] and device.duplicates == 0
        assert device.seqs()[0] == start + 1
        rows = await db.fetch("SELECT content FROM messages WHERE run_id = $1 AND role = 'assistant'", run)
        assert [r["content"] for r in rows] == [end["data"]["text"]], "exactly one assistant message"
        status, attempts = await db.fetchrow("SELECT status, attempts FROM runs WHERE id = $1", run)
        assert (status, attempts) == ("completed", 2)
        assert sum(1 for e in device.events if e["run"] == run and e["event"] in
                   ("run.completed", "run.failed", "run.cancelled")) == 1
    finally:
        await db.close()
        await device.close()
        for index, worker in enumerate(crashy.workers):
            if not worker.alive:
                crashy.workers[index] = crashy.start_worker()


@pytest.fixture(scope="module")
def defaults(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLM) -> Iterator[LocalCluster]:
    """One node and two workers with the default lease."""
    config = ClusterConfig(nodes=1, workers=2, nginx=False, env={"LLM_BASE_URL": fake_llm.base_url})
    with LocalCluster(tmp_path_factory.mktemp("defaults"), config) as cluster:
        yield cluster


@pytest.mark.timeout(90)
async def test_with_default_settings_a_killed_workers_run_is_taken_over_within_10_s(
    defaults: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    device = ChorusClient(f"ws://127.0.0.1:{defaults.node_ports[0]}/ws", defaults.token(unique("alice")),
                          device="phone")
    await device.connect()
    db = await asyncpg.connect(defaults.database_url)
    try:
        ack = await device.send("[[tokens:20]] [[slow:0.05]] an answer of a second")
        run = ack["run"]
        first = await started_by(device, run, 1)
        await device.wait_for(lambda: attempt_text(device, run, 1).count("word") >= 5, 20)
        killed_at = time.monotonic()
        worker_named(defaults, first).kill()
        second = await started_by(device, run, 2)
        takeover_s = time.monotonic() - killed_at
        end = await device.wait_run_end(run, 40)
        finished_s = time.monotonic() - killed_at
        with capsys.disabled():
            print(f"\nworker SIGKILLed mid-answer: run {run} restarted on {second} after {takeover_s:.1f} s, "
                  f"completed after {finished_s:.1f} s")
        assert second != first and end["event"] == "run.completed"
        assert finished_s < 10, "taken over and finished within 10 s"
        rows = await db.fetch("SELECT content FROM messages WHERE run_id = $1 AND role = 'assistant'", run)
        assert [r["content"] for r in rows] == [end["data"]["text"]], "exactly one stored answer"
    finally:
        await db.close()
        await device.close()


@pytest.mark.timeout(100)
async def test_a_run_that_keeps_killing_workers_is_dead_lettered_and_fails(crashy: LocalCluster) -> None:
    user = unique("alice")
    device = ChorusClient(f"ws://127.0.0.1:{crashy.node_ports[0]}/ws", crashy.token(user), device="phone")
    await device.connect()
    redis = Redis.from_url(crashy.redis_url, decode_responses=True)
    try:
        ack = await device.send(LONG)
        run = ack["run"]
        for attempt in (1, 2):  # RUN_MAX_DELIVERIES=2: two deliveries die, the third is refused
            holder = await started_by(device, run, attempt)
            worker_named(crashy, holder).kill()
            crashy.start_worker()
        end = await device.wait_run_end(run, 40)
        assert end["event"] == "run.failed"
        assert end["data"]["code"] == "run_dead_lettered"
        assert end["data"]["message"]
        # The worker publishes the run's end before it sets the job aside: wait for that, bounded.
        for _ in range(200):
            if run in [fields["run"] for _, fields in await redis.xrange(Keys().runs_dead)]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"run {run} was not dead-lettered within 10 s")
        assert device.gaps == [] and device.duplicates == 0
    finally:
        await redis.aclose()
        await device.close()


async def test_a_failing_model_ends_the_run_failed_with_a_readable_code(cluster: LocalCluster) -> None:
    device = ChorusClient(cluster.ws_url, cluster.token(unique("alice")), device="phone")
    await device.connect()
    try:
        ack = await device.send("[[status:500]] this will fail")
        end = await device.wait_run_end(ack["run"], 30)
        assert end["event"] == "run.failed"
        assert end["data"]["code"] == "llm_error"
        assert end["data"]["message"] == "the model endpoint returned an error"
        # the conversation goes on after a failed run
        ack2 = await device.send("and now?", conversation=ack["conversation"])
        assert (await device.wait_run_end(ack2["run"], 30))["event"] == "run.completed"
    finally:
        await device.close()


async def test_cancel_from_another_device_fences_the_stream(cluster: LocalCluster, fake_llm: FakeLLM) -> None:
    token = cluster.token(unique("alice"))
    phone = ChorusClient(f"ws://127.0.0.1:{cluster.node_ports[0]}/ws", token, device="phone")
    laptop = ChorusClient(f"ws://127.0.0.1:{cluster.node_ports[1]}/ws", token, device="laptop")
    await phone.connect()
    await laptop.connect()
    db = await asyncpg.connect(cluster.database_url)
    try:
        ack = await phone.send("[[tokens:200]] [[slow:0.03]] go on and on")
        run = ack["run"]
        await laptop.wait_for(lambda: laptop.run_text(run).count("word") >= 5, 20)
        aborted_before = fake_llm.disconnects
        reply = await laptop.cancel(run)
        assert reply == {"type": "ack", "id": reply["id"], "run": run}
        for device in (phone, laptop):
            end = await device.wait_run_end(run, 20)
            assert end["event"] == "run.cancelled"
            after_end = [e for e in device.events if e["run"] == run and e["seq"] > end["seq"]]
            assert after_end == [], "nothing of the run after its cancel"
        end = phone.run_end(run)
        assert end is not None
        shown = phone.run_text(run)
        assert shown == laptop.run_text(run) == end["data"]["text"]
        assert 0 < shown.count("word") < 200
        assert end["data"]["stopped_at"] == max(e["seq"] for e in phone.events
                                                if e["run"] == run and e["event"] == "token")
        # the worker really stopped calling the model: the streaming HTTP request was aborted
        await fake_llm.wait_until_async(lambda llm: llm.disconnects > aborted_before, 10)
        stored = await db.fetchval(
            "SELECT content FROM messages WHERE run_id = $1 AND role = 'assistant'", run
        )
        assert stored == shown
        # Cancelling a finished run is a clear no-op error
        with pytest.raises(Exception, match="conflict"):
            await phone.cancel(run)
    finally:
        await db.close()
        await phone.close()
        await laptop.close()


async def test_a_busy_worker_still_notices_it_must_stop() -> None:
    """run() waits for a free slot; SIGTERM (stop) must end that wait even when none frees up."""
    from agent_worker.worker import Slots

    slots, stop = Slots(1), asyncio.Event()
    assert await slots.wait(stop) and slots.take() == 1  # a free slot: taken
    waiting = asyncio.create_task(slots.wait(stop))
    await asyncio.sleep(0)
    assert not waiting.done()
    stop.set()
    assert await asyncio.wait_for(waiting, 2) is False
    slots.give()
    assert slots.free == 1
    assert await slots.wait(stop) is False


async def test_slots_are_taken_in_bulk_and_a_wait_ends_when_one_is_given_back() -> None:
    from agent_worker.worker import Slots

    slots, stop = Slots(5), asyncio.Event()
    assert slots.take(2) == 2 and slots.take() == 3 and slots.take() == 0
    waiting = asyncio.create_task(slots.wait(stop))
    await asyncio.sleep(0)
    assert not waiting.done()
    slots.give(0)  # giving back nothing wakes nobody
    await asyncio.sleep(0)
    assert not waiting.done()
    slots.give()
    assert await asyncio.wait_for(waiting, 2) is True
    assert slots.take(5) == 1


@pytest.mark.timeout(120)
async def test_a_device_back_after_its_history_was_trimmed_gets_the_answer_so_far_exactly(
    crashy: LocalCluster,
) -> None:
    """No cliff: the history no longer reaches the device's position, yet the run in flight is
    shown exactly (checkpoint in Postgres plus the history's tail), then streams on."""
    token = crashy.token(unique("alice"))
    url = f"ws://127.0.0.1:{crashy.node_ports[0]}/ws"
    phone = ChorusClient(url, token, device="phone")
    laptop = ChorusClient(url, token, device="laptop")
    await phone.connect()
    await laptop.connect()
    try:
        ack = await phone.send("[[tokens:1000]] [[slow:0.02]] a very long answer")
        run = ack["run"]
        await laptop.wait_for(lambda: laptop.run_text(run).count("word") >= 3, 20)
        await laptop.drop()
        away_at = laptop.last_seq
        assert away_at is not None
        # the phone streams on until the history has moved well past the laptop's position
        await phone.wait_for(lambda: (phone.last_seq or 0) > away_at + 200, 40)
        hello = await laptop.connect()
        await laptop.wait_for(lambda: any(f["type"] == "snapshot" for f in laptop.frames[-5:]), 10)
        resync = next(f for f in laptop.frames if f["type"] == "resync")
        snapshot = [f for f in laptop.frames if f["type"] == "snapshot"][-1]  # the reconnect's
        assert resync["reason"] == "history_trimmed" and hello["seq"] == resync["seq"] == snapshot["seq"]
        shown = next(r["text"] for r in snapshot["runs"] if r["run"] == run)
        at_snapshot = "".join(e["data"]["text"] for e in phone.events
                              if e["run"] == run and e["event"] == "token" and e["seq"] <= snapshot["seq"])
        assert shown == at_snapshot, "the snapshot is exactly what the phone had at that seq"
        end = await laptop.wait_run_end(run, 40)
        after = "".join(e["data"]["text"] for e in laptop.events
                        if e["run"] == run and e["event"] == "token" and e["seq"] > snapshot["seq"])
        assert shown + after == end["data"]["text"] == " ".join(f"word{i}" for i in range(1, 1001))
        assert [g for g in laptop.gaps if g[0] != away_at] == [], "no gap but the one the resync covered"
    finally:
        await phone.close()
        await laptop.close()
