"""Durable pauses: a run that asks its user a question waits in Postgres (`paused`), holding no
worker; LangGraph's state at the question is in the Postgres checkpointer, so the first answer from
any device resumes it on any worker, a worker killed while the run waits (or while it goes on) loses
nothing and asks nothing twice, and a device that connects meanwhile gets the question in its
snapshot and can answer it.

One module cluster: two nodes, two workers of one slot each (WORKER_CONCURRENCY=1), ChatOpenAI
against the fake LLM, an agent with `ask_user`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from chorus_client import ChorusError
from chorus_client.testing import RecordingClient as ChorusClient

from loadtest.cluster import ClusterConfig, LocalCluster
from loadtest.procs import Proc
from tests.fake_llm import FakeLLM
from tests.support import get_agents, rest, unique, until

ASK = '[[tool:ask_user:{"question": "Which city?"}]] plan my trip'


@pytest.fixture(scope="module")
def paused(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLM) -> Iterator[LocalCluster]:
    agents = [{"name": "asker", "ask_user": True}]
    config = ClusterConfig(nodes=2, workers=2, nginx=False, env={
        "LLM_BASE_URL": fake_llm.base_url, "AGENTS_JSON": json.dumps(agents), "WORKER_CONCURRENCY": "1",
    })
    with LocalCluster(tmp_path_factory.mktemp("paused"), config) as cluster:
        yield cluster


def of_run(device: ChorusClient, run: str, name: str) -> list[dict[str, Any]]:
    return [e for e in device.events if e["run"] == run and e["event"] == name]


async def asked(device: ChorusClient, run: str) -> str:
    """The request id of the run's question, once the device saw it."""
    await device.wait_for(lambda: bool(of_run(device, run, "run.input_required")), 30)
    return str(of_run(device, run, "run.input_required")[0]["data"]["request"])


async def devices(cluster: LocalCluster, http: aiohttp.ClientSession, *names: str) -> list[ChorusClient]:
    token = cluster.token(unique("alice"))
    await get_agents(http, cluster, token)
    connected = []
    for index, name in enumerate(names):
        device = ChorusClient(f"ws://127.0.0.1:{cluster.node_ports[index % 2]}/ws", token, device=name)
        await device.connect()
        connected.append(device)
    return connected


async def running_on(cluster: LocalCluster, http: aiohttp.ClientSession) -> list[Proc]:
    """The workers holding a run now (each one's /readyz counts its runs)."""
    holders = []
    for worker in cluster.workers:
        if not worker.alive:
            continue
        try:
            async with http.get(f"http://127.0.0.1:{cluster.internal_ports[worker.name]}/readyz") as response:
                if (await response.json()).get("running"):
                    holders.append(worker)
        except aiohttp.ClientConnectorError:
            continue  # still starting: it holds nothing yet
    return holders


def restart_dead(cluster: LocalCluster) -> None:
    for worker in cluster.workers:
        if not worker.alive:
            worker.start()


async def test_a_paused_run_holds_no_worker(paused: LocalCluster, http: aiohttp.ClientSession) -> None:
    [phone] = await devices(paused, http, "phone")
    base = f"http://127.0.0.1:{paused.node_ports[0]}"
    try:
        # Two workers of one slot each, two runs waiting for their user: a third run still runs.
        first = await phone.send(ASK, agent="asker")
        second = await phone.send(ASK, agent="asker")
        requests = [await asked(phone, first["run"]), await asked(phone, second["run"])]
        plain = await phone.send("hello", agent="asker")
        end = await phone.wait_run_end(plain["run"], 30)
        assert end["event"] == "run.completed"
        status, view = await rest(http, base, phone.token, "GET", f"/v1/runs/{first['run']}")
        assert status == 200 and view["status"] == "paused"
        # The plain run's worker lets its slot go just after publishing the end: give it a moment.
        # The paused runs would hold theirs for good.
        assert await until(lambda: running_on(paused, http), lambda holders: holders == [], 10, poll_s=0.05) == []
        await phone.respond(first["run"], requests[0], "Paris")
        # Over HTTP too (runs over HTTP): the answer, repeated harmlessly; a second device's is refused.
        path = f"/v1/runs/{second['run']}/input"
        for _ in range(2):
            status, ack = await rest(http, base, phone.token, "POST", path, json={"request": requests[1], "text": "Rome"})
            assert status == 200 and ack["run"] == second["run"] and ack["request"] == requests[1], ack
        with pytest.raises(ChorusError) as refused:
            await phone.respond(second["run"], requests[1], "Oslo")
        assert refused.value.code == "conflict" and "http" in str(refused.value)
        status, body = await rest(http, base, phone.token, "POST", path, json={"request": "nope", "text": "x"})
        assert status == 409 and body["error"]["code"] == "conflict"
        for ack, city in ((first, "Paris"), (second, "Rome")):
            end = await phone.wait_run_end(ack["run"], 30)
            assert end["event"] == "run.completed" and f"Tool said: {city}." in end["data"]["text"]
        assert phone.gaps == [] and phone.duplicates == 0
    finally:
        await phone.close()


async def test_a_worker_killed_while_its_run_waits_loses_nothing_and_a_late_device_answers(
    paused: LocalCluster, http: aiohttp.ClientSession, fake_llm: FakeLLM
) -> None:
    [phone] = await devices(paused, http, "phone")
    laptop: ChorusClient | None = None
    base = f"http://127.0.0.1:{paused.node_ports[0]}"
    try:
        ack = await phone.send(ASK, agent="asker")
        run = ack["run"]
        request = await asked(phone, run)
        # The worker publishes its question first, then stores the pause (Postgres publishes
        # nothing of it): kill it only once the run waits.
        status = await until(lambda: rest(http, base, phone.token, "GET", f"/v1/runs/{run}"),
                             lambda answer: answer[1]["status"] == "paused", 10, poll_s=0.05)
        assert status[1]["status"] == "paused", status
        [started] = of_run(phone, run, "run.started")
        holder = next(w for w in paused.workers if w.name == started["data"]["worker"])
        holder.kill()  # SIGKILL while the run waits: no worker held it anyway

        # A device connecting now learns the question from its snapshot, and answers it.
        laptop = ChorusClient(f"ws://127.0.0.1:{paused.node_ports[1]}/ws", phone.token, device="laptop")
        await laptop.connect()
        await laptop.wait_for(lambda: any(r["run"] == run for f in laptop.frames if f["type"] == "snapshot"
                                          for r in f["runs"]), 10)
        [shown] = [r for f in laptop.frames if f["type"] == "snapshot" for r in f["runs"] if r["run"] == run]
        assert shown["status"] == "paused" and shown["input"] == {"request": request, "prompt": "Which city?"}
        assert shown["text"] == phone.shown[run] == "Calling ask_user. "
        assert laptop.client.store.runs[run].input is not None
        await laptop.respond(run, request, "Paris")

        for device in (phone, laptop):
            end = await device.wait_run_end(run, 30)
            assert end["event"] == "run.completed"
            assert end["data"]["text"] == device.shown[run] == "Calling ask_user. Tool said: Paris."
            assert len(of_run(device, run, "run.input_received")) == 1
            assert device.gaps == [] and device.duplicates == 0
        assert len(of_run(phone, run, "run.input_required")) == 1, "asked once"
        assert any(m.get("role") == "tool" and m.get("content") == "Paris" for m in fake_llm.requests[-1]["messages"])
        status, page = await rest(http, base, phone.token, "GET", f"/v1/conversations/{ack['conversation']}/messages")
        assert status == 200
        answers = [m for m in page["messages"] if m["role"] == "assistant"]
        assert [(m["run"], m["content"]) for m in answers] == [(run, "Calling ask_user. Tool said: Paris.")]
    finally:
        restart_dead(paused)
        await phone.close()
        if laptop is not None:
            await laptop.close()


async def test_a_worker_killed_after_the_answer_is_taken_over_from_the_question(
    paused: LocalCluster, http: aiohttp.ClientSession
) -> None:
    [phone, laptop] = await devices(paused, http, "phone", "laptop")
    try:
        ack = await phone.send("[[slow:0.4]] " + ASK, agent="asker")
        run = ack["run"]
        request = await asked(phone, run)
        await laptop.respond(run, request, "Lisbon")
        # The answer's model call streams slowly: kill the worker that resumed the run mid-way.
        await phone.wait_for(lambda: phone.shown.get(run, "").startswith("Calling ask_user. Tool"), 20)
        [holder] = await running_on(paused, http)
        holder.kill()
        for device in (phone, laptop):
            end = await device.wait_run_end(run, 40)
            assert end["event"] == "run.completed"
            # The other worker went on from the question: run.resumed set the text back to it.
            assert end["data"]["text"] == device.shown[run] == "Calling ask_user. Tool said: Lisbon."
            assert of_run(device, run, "run.resumed")
            assert device.gaps == [] and device.duplicates == 0
        assert len(of_run(phone, run, "run.input_required")) == 1, "asked once"
    finally:
        restart_dead(paused)
        await asyncio.gather(phone.close(), laptop.close())
