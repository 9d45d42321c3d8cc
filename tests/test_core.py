"""The headline: one agent answer streamed to every device of a user, across nodes (issue 2).

Real processes throughout: Redis, Postgres, two `ws_node` processes, one `agent_worker` running
ChatOpenAI against the fake OpenAI-compatible server, nginx; real WebSocket clients.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest
from chorus_client.testing import ClientError
from chorus_client.testing import RecordingClient as ChorusClient

from loadtest.cluster import LocalCluster
from tests.fake_llm import FakeLLM
from tests.support import comparable, node_ws, rest, unique


@pytest.fixture
async def db(cluster: LocalCluster) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(cluster.database_url)
    yield conn
    await conn.close()


def assert_gapless(client: ChorusClient, start: int) -> None:
    assert client.gaps == [], f"{client.device} saw gaps {client.gaps}"
    assert client.duplicates == 0
    assert client.seqs() == list(range(start + 1, start + 1 + len(client.events)))


async def test_phone_and_laptop_on_two_nodes_see_one_identical_stream(
    cluster: LocalCluster, fake_llm: FakeLLM, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    user = unique("alice")
    token = cluster.token(user)
    phone = ChorusClient(node_ws(cluster, 0), token, device="phone")
    laptop = ChorusClient(node_ws(cluster, 1), token, device="laptop")
    hello_phone, hello_laptop = await phone.connect(), await laptop.connect()
    assert hello_phone["node"] != hello_laptop["node"]
    assert hello_phone["epoch"] == hello_laptop["epoch"]
    assert (hello_phone["protocol"], hello_phone["heartbeat"]) == (1, 25)
    try:
        conversation = None
        acks = []
        turns = ["What is Chorus?", "How does a device resume?", "Thanks, one more: why Lua?"]
        for index, text in enumerate(turns):
            device = phone if index % 2 == 0 else laptop  # both devices type
            ack = await device.send(text, conversation=conversation, id=f"turn-{index}")
            conversation = ack["conversation"]
            acks.append(ack)
            for client in (phone, laptop):
                end = await client.wait_run_end(ack["run"], 30)
                assert end["event"] == "run.completed", end

        # (1) every event, in seq order, no gap, no duplicate; both devices identical
        assert_gapless(phone, hello_phone["seq"])
        assert_gapless(laptop, hello_laptop["seq"])
        assert comparable(phone.events) == comparable(laptop.events)
        created = [e for e in phone.events if e["event"] == "message.created"]
        assert [e["data"]["text"] for e in created] == turns
        assert [e["data"]["device"] for e in created] == ["phone", "laptop", "phone"]
        assert [e["seq"] for e in created] == [a["seq"] for a in acks]

        # (2) tokens concatenate to run.completed's text, which is the stored assistant message
        status, page = await rest(http, cluster.http_url, token, "GET", f"/v1/conversations/{conversation}/messages")
        assert status == 200
        stored = page["messages"]
        assert [m["role"] for m in stored] == ["user", "assistant"] * 3
        for index, ack in enumerate(acks):
            end = phone.run_end(ack["run"])
            assert end is not None
            streamed = phone.run_text(ack["run"])
            assert streamed == end["data"]["text"] == stored[2 * index + 1]["content"]
            assert stored[2 * index + 1]["id"] == end["data"]["message"]
            assert sum(1 for e in phone.events if e["run"] == ack["run"] and e["event"] == "token") >= 1
        # the model really was ChatOpenAI against the fake server, and got the whole history
        last_request = fake_llm.requests[-1]
        roles = [m["role"] for m in last_request["messages"]]
        assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
        assert stored[-1]["content"] == fake_llm.answer_for(last_request["messages"])

        # (3) every acked send is in Postgres and its run ended
        rows = await db.fetch("SELECT id, status, message_id FROM runs WHERE user_id = $1", user)
        assert {r["id"] for r in rows} == {a["run"] for a in acks}
        assert {r["status"] for r in rows} == {"completed"}

        # (4) the same id again, from the other device and node: same ack, no new run
        again = await laptop.send(turns[0], conversation=conversation, id="turn-0")
        assert again == {**acks[0], "id": "turn-0"}
        assert await db.fetchval("SELECT count(*) FROM runs WHERE user_id = $1", user) == 3
        pong = await phone.ping()
        assert pong["type"] == "pong"
        assert not [e for e in phone.events if e["seq"] > phone.events[-1]["seq"]]
    finally:
        await phone.close()
        await laptop.close()


async def test_laptop_moves_to_the_other_node_mid_answer_and_continues_exactly(cluster: LocalCluster) -> None:
    token = cluster.token(unique("alice"))
    phone = ChorusClient(node_ws(cluster, 0), token, device="phone")
    laptop = ChorusClient(node_ws(cluster, 1), token, device="laptop")
    first_phone = await phone.connect()
    first_laptop = await laptop.connect()
    start = first_laptop["seq"]
    try:
        ack = await phone.send("[[tokens:60]] [[slow:0.03]] tell me a long story")
        run = ack["run"]
        await laptop.wait_for(lambda: sum(e["event"] == "token" for e in laptop.events) >= 3, 20)
        await laptop.drop()
        cut_at = laptop.last_seq
        laptop.url = node_ws(cluster, 0)
        hello = await laptop.connect()
        assert first_laptop["node"] != hello["node"] == first_phone["node"], "moved to the phone's node"
        await phone.wait_run_end(run, 30)
        await laptop.wait_run_end(run, 30)
        assert cut_at is not None and phone.run_end(run) is not None
        assert laptop.connects == 2
        assert_gapless(laptop, start)
        assert comparable(laptop.events) == comparable(phone.events)
        assert laptop.run_text(run) == " ".join(f"word{i}" for i in range(1, 61))
    finally:
        await phone.close()
        await laptop.close()


async def test_device_connecting_later_catches_up_from_any_position(cluster: LocalCluster) -> None:
    token = cluster.token(unique("alice"))
    phone = ChorusClient(cluster.ws_url, token, device="phone")
    await phone.connect()
    try:
        ack = await phone.send("hello")
        await phone.wait_run_end(ack["run"])
        # A device that last saw seq 0, and one that saw the first two events
        for after in (0, 2):
            late = ChorusClient(node_ws(cluster, 1), token, device=f"late-{after}")
            late.last_seq, late.epoch = after, phone.epoch
            await late.connect()
            await late.wait_run_end(ack["run"])
            assert comparable(late.events) == comparable(phone.events)[after:]
            assert_gapless(late, after)
            await late.close()
        # A new device without a position starts live from the user's latest seq
        fresh = ChorusClient(node_ws(cluster, 1), token, device="fresh")
        hello = await fresh.connect()
        assert hello["seq"] == phone.last_seq
        assert fresh.events == []
        await fresh.close()
    finally:
        await phone.close()


async def test_stale_epoch_gets_resync_not_a_wrong_replay(cluster: LocalCluster) -> None:
    token = cluster.token(unique("alice"))
    device = ChorusClient(cluster.ws_url, token, device="tablet")
    device.last_seq, device.epoch = 5, "not-the-epoch"
    try:
        await device.connect()
        await device.wait_for(lambda: any(f["type"] == "resync" for f in device.frames), 5)
        resync = next(f for f in device.frames if f["type"] == "resync")
        assert resync["reason"] == "epoch_changed"
        assert resync["epoch"] == (device.hello or {})["epoch"]
        ack = await device.send("after the resync")
        await device.wait_run_end(ack["run"])
        assert_gapless(device, resync["seq"])
    finally:
        await device.close()


async def test_sockets_through_nginx_spread_over_both_nodes_and_agree(cluster: LocalCluster) -> None:
    assert cluster.nginx is not None, "nginx must run in front of the nodes"
    token = cluster.token(unique("alice"))
    devices = [ChorusClient(cluster.ws_url, token, device=f"d{i}") for i in range(6)]
    hellos = [await d.connect() for d in devices]
    try:
        assert len({h["node"] for h in hellos}) == 2, "least_conn should use both nodes"
        ack = await devices[0].send("to all of you")
        for d in devices:
            await d.wait_run_end(ack["run"])
        reference = comparable(devices[0].events)
        for d in devices:
            assert comparable(d.events) == reference
            assert d.gaps == [] and d.duplicates == 0
    finally:
        await asyncio.gather(*(d.close() for d in devices))


async def test_users_never_see_or_touch_each_other(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    alice_token, bob_token = cluster.token(unique("alice")), cluster.token(unique("bob"))
    alice = ChorusClient(node_ws(cluster, 0), alice_token, device="phone")
    bob = ChorusClient(node_ws(cluster, 0), bob_token, device="phone")  # same node, same device name
    await alice.connect()
    await bob.connect()
    try:
        ack = await alice.send("[[tokens:40]] [[slow:0.02]] private")
        conversation, run = ack["conversation"], ack["run"]
        with pytest.raises(ClientError) as info:
            await bob.cancel(run)
        assert info.value.code == "not_found"
        with pytest.raises(ClientError) as info:
            await bob.send("let me in", conversation=conversation)
        assert info.value.code == "not_found"
        await alice.wait_run_end(run)
        assert alice.run_end(run)["event"] == "run.completed"  # type: ignore[index]
        for method, path in [("GET", f"/v1/conversations/{conversation}"),
                             ("GET", f"/v1/conversations/{conversation}/messages"),
                             ("DELETE", f"/v1/conversations/{conversation}")]:
            status, body = await rest(http, cluster.http_url, bob_token, method, path)
            assert status == 404, (method, path, body)
        status, listing = await rest(http, cluster.http_url, bob_token, "GET", "/v1/conversations")
        assert status == 200 and listing["conversations"] == []
        await bob.ping()
        assert bob.events == [], "bob received alice's events"
        status, _ = await rest(http, cluster.http_url, alice_token, "GET", f"/v1/conversations/{conversation}")
        assert status == 200
    finally:
        await alice.close()
        await bob.close()


async def test_a_new_device_attaches_to_every_answer_in_progress(cluster: LocalCluster) -> None:
    """A device without a position learns the runs in flight, in every conversation, with the
    text so far exact as of the snapshot's seq, then follows their live tokens."""
    token = cluster.token(unique("alice"))
    phone = ChorusClient(node_ws(cluster, 0), token, device="phone")
    await phone.connect()
    try:
        slow = "[[tokens:80]] [[slow:0.04]]"
        first = await phone.send(f"{slow} first conversation")
        second = await phone.send(f"{slow} second conversation")
        for ack in (first, second):
            await phone.wait_for(lambda a=ack: phone.run_text(a["run"]).count("word") >= 5, 20)
        laptop = ChorusClient(node_ws(cluster, 1), token, device="laptop")
        hello = await laptop.connect()
        await laptop.wait_for(lambda: any(f["type"] == "snapshot" for f in laptop.frames), 5)
        snap = next(f for f in laptop.frames if f["type"] == "snapshot")
        assert snap["seq"] == hello["seq"] and snap["epoch"] == hello["epoch"]
        assert {r["run"] for r in snap["runs"]} == {first["run"], second["run"]}
        for ack in (first, second):
            await phone.wait_run_end(ack["run"])
            await laptop.wait_run_end(ack["run"])
            shown = next(r["text"] for r in snap["runs"] if r["run"] == ack["run"])
            # what the phone had at the snapshot's seq is exactly the snapshot's text
            at_snapshot = "".join(e["data"]["text"] for e in phone.events
                                  if e["run"] == ack["run"] and e["event"] == "token" and e["seq"] <= snap["seq"])
            assert shown == at_snapshot and shown
            after = "".join(e["data"]["text"] for e in laptop.events if e["run"] == ack["run"] and e["event"] == "token")
            assert shown + after == laptop.run_text(ack["run"]) == phone.run_end(ack["run"])["data"]["text"]  # type: ignore[index]
        assert laptop.gaps == [] and laptop.duplicates == 0
        await laptop.close()
    finally:
        await phone.close()
