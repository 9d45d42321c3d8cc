"""Double-texting: what a message sent while a run is in flight does, per conversation policy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from chorus_client.testing import ClientError
from chorus_client.testing import RecordingClient as ChorusClient

from loadtest.cluster import LocalCluster
from tests.support import unique

SLOW = "[[tokens:120]] [[slow:0.03]]"


@pytest.fixture
async def devices(cluster: LocalCluster) -> AsyncIterator[tuple[ChorusClient, ChorusClient]]:
    token = cluster.token(unique("alice"))
    phone = ChorusClient(f"ws://127.0.0.1:{cluster.node_ports[0]}/ws", token, device="phone")
    laptop = ChorusClient(f"ws://127.0.0.1:{cluster.node_ports[1]}/ws", token, device="laptop")
    await phone.connect()
    await laptop.connect()
    yield phone, laptop
    await phone.close()
    await laptop.close()


async def messages(cluster: LocalCluster, token: str, conversation: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(
        f"{cluster.http_url}/v1/conversations/{conversation}/messages",
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        body: dict[str, Any] = await response.json()
        return list(body["messages"])


def events_of(device: ChorusClient, run: str, name: str) -> list[dict[str, Any]]:
    return [e for e in device.events if e["run"] == run and e["event"] == name]


async def started_streaming(device: ChorusClient, run: str) -> None:
    await device.wait_for(lambda: device.run_text(run).count("word") >= 3, 20)


async def test_enqueue_runs_the_second_message_after_the_first(
    cluster: LocalCluster, devices: tuple[ChorusClient, ChorusClient]
) -> None:
    phone, laptop = devices
    first = await phone.send(f"{SLOW} first")
    await started_streaming(phone, first["run"])
    second = await laptop.send("[[tokens:5]] second", conversation=first["conversation"])
    for device in (phone, laptop):
        await device.wait_for(lambda d=device: bool(events_of(d, second["run"], "run.queued")), 5)
        queued = events_of(device, second["run"], "run.queued")
        assert queued[0]["data"]["behind"] == first["run"] and queued[0]["data"]["policy"] == "enqueue"
        await device.wait_run_end(second["run"], 30)
        first_end = device.run_end(first["run"])
        second_start = events_of(device, second["run"], "run.started")[0]
        assert first_end is not None and first_end["event"] == "run.completed"
        assert first_end["seq"] < second_start["seq"], "the second run starts after the first ends"
    stored = await messages(cluster, phone.token, first["conversation"])
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[3]["content"] == "word1 word2 word3 word4 word5"


async def test_reject_refuses_a_message_while_a_run_is_in_flight(
    cluster: LocalCluster, devices: tuple[ChorusClient, ChorusClient]
) -> None:
    phone, laptop = devices
    first = await phone.send(f"{SLOW} first", double_texting="reject")
    await started_streaming(laptop, first["run"])
    with pytest.raises(ClientError) as info:
        await laptop.send("too soon", conversation=first["conversation"])
    assert info.value.code == "conflict"
    assert first["run"] in str(info.value)
    await phone.wait_run_end(first["run"], 30)
    after = await laptop.send("[[tokens:3]] now it is fine", conversation=first["conversation"])
    assert (await laptop.wait_run_end(after["run"], 30))["event"] == "run.completed"
    stored = await messages(cluster, phone.token, first["conversation"])
    assert "too soon" not in [m["content"] for m in stored]


async def test_interrupt_cancels_the_current_run_keeps_its_partial_and_starts_the_new_one(
    cluster: LocalCluster, devices: tuple[ChorusClient, ChorusClient]
) -> None:
    phone, laptop = devices
    first = await phone.send(f"{SLOW} first")
    await started_streaming(phone, first["run"])
    second = await laptop.send("[[tokens:4]] actually, stop", conversation=first["conversation"],
                               double_texting="interrupt")
    for device in (phone, laptop):
        end = await device.wait_run_end(first["run"], 20)
        assert end["event"] == "run.cancelled"
        assert 0 < device.run_text(first["run"]).count("word") < 120
        assert (await device.wait_run_end(second["run"], 30))["event"] == "run.completed"
    partial = phone.run_text(first["run"])
    stored = await messages(cluster, phone.token, first["conversation"])
    assert [(m["role"], m["content"]) for m in stored] == [
        ("user", f"{SLOW} first"), ("assistant", partial),
        ("user", "[[tokens:4]] actually, stop"), ("assistant", "word1 word2 word3 word4"),
    ]


async def test_rollback_discards_the_current_run_and_its_message(
    cluster: LocalCluster, devices: tuple[ChorusClient, ChorusClient], fake_llm: Any
) -> None:
    phone, laptop = devices
    base = await phone.send("[[tokens:2]] context")
    await phone.wait_run_end(base["run"], 20)
    first = await phone.send(f"{SLOW} a question I regret", conversation=base["conversation"])
    await started_streaming(phone, first["run"])
    second = await laptop.send("[[tokens:3]] instead this", conversation=base["conversation"],
                               double_texting="rollback")
    for device in (phone, laptop):
        end = await device.wait_run_end(first["run"], 20)
        assert end["event"] == "run.cancelled" and end["data"]["rolled_back"] is True
        assert (await device.wait_run_end(second["run"], 30))["event"] == "run.completed"
    stored = await messages(cluster, phone.token, base["conversation"])
    assert [m["content"] for m in stored] == ["[[tokens:2]] context", "word1 word2",
                                              "[[tokens:3]] instead this", "word1 word2 word3"]
    # and the model never saw the rolled-back message
    last = fake_llm.requests[-1]["messages"]
    assert all("regret" not in str(m.get("content")) for m in last)
    db = await asyncpg.connect(cluster.database_url)
    try:
        assert await db.fetchval("SELECT status FROM runs WHERE id = $1", first["run"]) == "cancelled"
    finally:
        await db.close()
