"""Runs over HTTP (ws_node.http_runs): a send, a run's status, a cancel, and the run's events as
Server-Sent Events, through nginx to the session cluster, beside WebSocket devices of the user."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from chorus_client.testing import RecordingClient as ChorusClient

from loadtest.cluster import ClusterConfig, LocalCluster
from tests.fake_llm import FakeLLM
from tests.support import rest, unique

END = {"run.completed", "run.cancelled", "run.failed"}


class Sse:
    """One open event stream: its events as they are parsed (`id`, `event`, `data` decoded)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.events: list[dict[str, Any]] = []
        self.ended = False  # the server closed the stream

    async def read(self, count: int | None = None, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Read until `count` events in all (None: until the server ends the stream)."""

        async def loop() -> None:
            fields: dict[str, str] = {}
            while count is None or len(self.events) < count:
                raw = await self.response.content.readline()
                if not raw:
                    self.ended = True
                    return
                line = raw.decode().rstrip("\n")
                if line.startswith(":"):
                    continue  # a heartbeat comment
                if line:
                    name, _, value = line.partition(": ")
                    fields[name] = value
                elif fields:
                    self.events.append({"id": int(fields["id"]), "event": fields["event"],
                                        "data": json.loads(fields["data"])})
                    fields = {}

        await asyncio.wait_for(loop(), timeout_s)
        return self.events


async def open_events(http: aiohttp.ClientSession, cluster: LocalCluster, token: str, run: str,
                      last_event_id: int | None = None) -> Sse:
    headers = {"Authorization": f"Bearer {token}"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    response = await http.get(f"{cluster.http_url}/v1/runs/{run}/events", headers=headers,
                              timeout=aiohttp.ClientTimeout(total=None, sock_read=30))
    assert response.status == 200, await response.text()
    assert response.content_type == "text/event-stream"
    return Sse(response)


async def start(http: aiohttp.ClientSession, cluster: LocalCluster, token: str, text: str) -> dict[str, Any]:
    """A new conversation and a message posted to it over HTTP: the ack."""
    status, conversation = await rest(http, cluster.http_url, token, "POST", "/v1/conversations", json={})
    assert status == 201
    status, ack = await rest(http, cluster.http_url, token, "POST",
                             f"/v1/conversations/{conversation['id']}/messages",
                             json={"id": str(uuid.uuid4()), "text": text})
    assert status == 201, ack
    return ack


def tokens_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"]["data"]["text"] for e in events if e["event"] == "token")


async def test_a_message_posted_over_http_is_acked_once_and_streams_to_a_socket_device(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    user = unique("alice")
    token = cluster.token(user)
    phone = ChorusClient(cluster.ws_url, token, device="phone")
    await phone.connect()
    try:
        status, conversation = await rest(http, cluster.http_url, token, "POST", "/v1/conversations", json={})
        assert status == 201
        path = f"/v1/conversations/{conversation['id']}/messages"
        body = {"id": str(uuid.uuid4()), "text": "[[tokens:25]] hello over http"}
        status, ack = await rest(http, cluster.http_url, token, "POST", path, json=body)
        assert status == 201, ack
        assert ack["conversation"] == conversation["id"] and ack["id"] == body["id"]
        assert ack["run"].startswith("r_") and ack["message"].startswith("m_") and ack["seq"] > 0
        status, again = await rest(http, cluster.http_url, token, "POST", path, json=body)
        assert (status, again) == (200, ack)  # the same id: the same ack, nothing new

        end = await phone.wait_run_end(ack["run"], 30)
        assert end["event"] == "run.completed"
        assert phone.run_text(ack["run"]) == end["data"]["text"] and end["data"]["text"].count("word") == 25
        created = [e for e in phone.events if e["event"] == "message.created"]
        assert [(e["seq"], e["run"], e["data"]["device"]) for e in created] == [(ack["seq"], ack["run"], "http")]
        status, messages = await rest(http, cluster.http_url, token, "GET", path)
        assert status == 200
        assert [(m["role"], m["run"]) for m in messages["messages"]] == [("user", ack["run"]),
                                                                         ("assistant", ack["run"])]
        assert messages["messages"][1]["content"] == end["data"]["text"]

        # The send's own validation and codes, as REST errors.
        refused = [
            (path, {"text": "no id"}, 400, "bad_request"),
            (path, {"id": "x1", "text": "   "}, 400, "bad_request"),
            (path, {"id": "x2", "text": "a" * 9000}, 413, "too_large"),
            (path, {"id": "x3", "text": "hi", "double_texting": "shout"}, 400, "bad_request"),
            ("/v1/conversations/c_nope/messages", {"id": "x4", "text": "hi"}, 404, "not_found"),
        ]
        for where, frame, code, name in refused:
            status, error = await rest(http, cluster.http_url, token, "POST", where, json=frame)
            assert (status, error["error"]["code"]) == (code, name), (frame, error)
    finally:
        await phone.close()


async def test_the_event_stream_carries_the_whole_run_in_order_and_ends(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    user = unique("alice")
    token = cluster.token(user)
    ack = await start(http, cluster, token, "[[tokens:40]] [[slow:0.02]] stream it")
    live = await open_events(http, cluster, token, ack["run"])
    async with live.response:
        events = await live.read()
    assert live.ended
    seqs = [e["id"] for e in events]
    assert seqs == sorted(set(seqs)) and seqs == [e["data"]["seq"] for e in events]
    assert events[0]["event"] == "message.created" and events[0]["id"] == ack["seq"]
    assert events[-1]["event"] == "run.completed"
    assert all(e["data"]["run"] == ack["run"] for e in events)
    assert tokens_text(events) == events[-1]["data"]["data"]["text"]
    assert events[-1]["data"]["data"]["text"].count("word") == 40

    # Opened after the end, the stream replays the same events from history, and ends.
    replay = await open_events(http, cluster, token, ack["run"])
    async with replay.response:
        assert await replay.read() == events
    assert replay.ended


async def test_a_stream_of_an_ended_run_asked_again_from_its_end_is_204(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    """An EventSource reconnects by itself after the stream ended, with the end's id: 204 tells it
    to stop (a stream would only ever send heartbeats)."""
    token = cluster.token(unique("alice"))
    ack = await start(http, cluster, token, "[[tokens:5]] short")
    live = await open_events(http, cluster, token, ack["run"])
    async with live.response:
        events = await live.read()
    async with http.get(f"{cluster.http_url}/v1/runs/{ack['run']}/events",
                        headers={"Authorization": f"Bearer {token}", "Last-Event-ID": str(events[-1]["id"])}
                        ) as response:
        assert response.status == 204


@pytest.fixture(scope="module")
def tiny_queues(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLM) -> Iterator[LocalCluster]:
    """A node whose streams may queue 8 frames at most."""
    config = ClusterConfig(nodes=1, workers=1, nginx=False,
                           env={"LLM_BASE_URL": fake_llm.base_url, "SEND_QUEUE_MAX_FRAMES": "8"})
    with LocalCluster(tmp_path_factory.mktemp("tiny-queues"), config) as running:
        yield running


async def test_a_run_longer_than_the_queue_is_replayed_whole(
    tiny_queues: LocalCluster, http: aiohttp.ClientSession
) -> None:
    """History is replayed whatever its length (the queue bounds what waits for a slow client, not
    what was read from history): a long run's stream must not end before its first event."""
    token = tiny_queues.token(unique("alice"))
    ack = await start(http, tiny_queues, token, "[[tokens:40]] [[slow:0.02]] a long one")
    live = await open_events(http, tiny_queues, token, ack["run"])
    async with live.response:
        events = await live.read()
    assert events[-1]["event"] == "run.completed"
    replay = await open_events(http, tiny_queues, token, ack["run"])
    async with replay.response:
        replayed = await replay.read()
    assert len(replayed) > 8 and replayed == events


async def test_a_stream_resumed_with_last_event_id_misses_nothing_and_repeats_nothing(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    user = unique("alice")
    token = cluster.token(user)
    ack = await start(http, cluster, token, "[[tokens:60]] [[slow:0.03]] resume me")
    first = await open_events(http, cluster, token, ack["run"])
    async with first.response:
        head = await first.read(count=8)
    assert head[-1]["event"] not in END  # left mid-run
    resumed = await open_events(http, cluster, token, ack["run"], last_event_id=head[-1]["id"])
    async with resumed.response:
        tail = await resumed.read()
    assert resumed.ended and tail[-1]["event"] == "run.completed"
    assert tail[0]["id"] > head[-1]["id"]
    whole = await open_events(http, cluster, token, ack["run"])
    async with whole.response:
        everything = await whole.read()
    assert head + tail == everything  # no gap, no duplicate at the seam
    assert tokens_text(head + tail) == tail[-1]["data"]["data"]["text"]

    # A position the history cannot continue (ahead of the user's stream: another epoch's):
    # one resync with the run's status and text from Postgres; the run has ended, so that's all.
    lost = await open_events(http, cluster, token, ack["run"], last_event_id=10**9)
    async with lost.response:
        (resync,) = await lost.read()
    assert lost.ended
    assert resync["event"] == "resync" and resync["data"]["reason"] == "epoch_changed"
    assert (resync["data"]["status"], resync["data"]["text"]) == ("completed", tail[-1]["data"]["data"]["text"])


async def test_a_cancel_over_http_ends_the_run_on_the_stream_and_on_a_socket(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    user = unique("alice")
    token = cluster.token(user)
    laptop = ChorusClient(cluster.ws_url, token, device="laptop")
    await laptop.connect()
    try:
        ack = await start(http, cluster, token, "[[tokens:300]] [[slow:0.05]] stop me")
        stream = await open_events(http, cluster, token, ack["run"])
        async with stream.response:
            while sum(e["event"] == "token" for e in await stream.read(count=len(stream.events) + 1)) < 3:
                pass
            # A second message waits behind the first (enqueue): no worker has it, the node ends it.
            status, waiting = await rest(http, cluster.http_url, token, "POST",
                                         f"/v1/conversations/{ack['conversation']}/messages",
                                         json={"id": str(uuid.uuid4()), "text": "[[tokens:5]] and then"})
            assert status == 201
            status, body = await rest(http, cluster.http_url, token, "POST", f"/v1/runs/{waiting['run']}/cancel")
            assert (status, body["run"], body["status"]) == (200, waiting["run"], "cancelled")
            status, body = await rest(http, cluster.http_url, token, "POST", f"/v1/runs/{ack['run']}/cancel")
            # Running: acked at once (202), unless its worker already stored the end (200).
            assert (status, body["type"], body["run"]) in ((202, "ack", ack["run"]), (200, "ack", ack["run"]))
            assert body["status"] == ("running" if status == 202 else "cancelled")
            events = await stream.read()
        assert stream.ended and events[-1]["event"] == "run.cancelled"
        assert all(e["data"]["run"] == ack["run"] for e in events)  # not the other run's cancel
        end = await laptop.wait_run_end(ack["run"], 30)
        assert end["event"] == "run.cancelled" and end["seq"] == events[-1]["id"]
        assert end["data"]["text"] == events[-1]["data"]["data"]["text"]
        assert end["data"]["text"].count("word") < 300
        other = await laptop.wait_run_end(waiting["run"], 10)
        assert (other["event"], other["data"]["by"]) == ("run.cancelled", "http")
        status, body = await rest(http, cluster.http_url, token, "POST", f"/v1/runs/{ack['run']}/cancel")
        assert (status, body["error"]["code"]) == (409, "conflict")
    finally:
        await laptop.close()


async def test_another_users_run_is_not_found_and_no_token_is_401(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    alice = cluster.token(unique("alice"))
    ack = await start(http, cluster, alice, "[[tokens:5]] mine")
    bob = cluster.token(unique("bob"))
    run = ack["run"]
    calls = [("GET", f"/v1/runs/{run}"), ("GET", f"/v1/runs/{run}/events"), ("POST", f"/v1/runs/{run}/cancel"),
             ("POST", f"/v1/conversations/{ack['conversation']}/messages")]
    for method, path in calls:
        body = {"id": "b1", "text": "mine now"} if path.endswith("/messages") else None
        status, error = await rest(http, cluster.http_url, bob, method, path, json=body)
        assert (status, error["error"]["code"]) == (404, "not_found"), (method, path, error)
        async with http.request(method, f"{cluster.http_url}{path}", json=body) as response:
            assert response.status == 401, (method, path)
            assert (await response.json())["error"]["code"] == "unauthorized"
    status, error = await rest(http, cluster.http_url, alice, "GET", "/v1/runs/r_nope")
    assert (status, error["error"]["code"]) == (404, "not_found")
    status, view = await rest(http, cluster.http_url, alice, "GET", f"/v1/runs/{run}")
    assert status == 200 and view["run"] == run  # still alice's, untouched


async def test_a_runs_status_goes_from_running_to_completed(cluster: LocalCluster,
                                                            http: aiohttp.ClientSession) -> None:
    user = unique("alice")
    token = cluster.token(user)
    ack = await start(http, cluster, token, "[[tokens:40]] [[slow:0.03]] status please")
    stream = await open_events(http, cluster, token, ack["run"])
    async with stream.response:
        while not any(e["event"] == "run.started" for e in await stream.read(count=len(stream.events) + 1)):
            pass
        status, view = await rest(http, cluster.http_url, token, "GET", f"/v1/runs/{ack['run']}")
        assert status == 200
        assert (view["run"], view["conversation"], view["status"], view["text"]) == (
            ack["run"], ack["conversation"], "running", None)
        events = await stream.read()
    assert events[-1]["event"] == "run.completed"
    status, view = await rest(http, cluster.http_url, token, "GET", f"/v1/runs/{ack['run']}")
    assert status == 200
    assert (view["status"], view["attempts"], view["error"]) == ("completed", 1, None)
    assert view["text"] == events[-1]["data"]["data"]["text"] and view["answer_message"]


async def test_a_client_that_goes_away_is_detached_from_the_hub(cluster: LocalCluster,
                                                               http: aiohttp.ClientSession) -> None:
    """The node's hub holds the user's channel while the stream is open, and lets go of it once
    the client disconnects mid-run (no leaked subscriber)."""
    token = cluster.token(unique("alice"))
    node = f"http://127.0.0.1:{cluster.node_ports[0]}"
    metrics = f"http://127.0.0.1:{cluster.internal_ports[cluster.nodes[0].name]}/metrics"

    async def users_on_node() -> int:
        async with http.get(metrics) as response:  # counted at scrape time
            text = await response.text()
        (line,) = [x for x in text.splitlines() if x.startswith("chorus_subscribed_users ")]
        return int(float(line.split()[1]))

    async def until_users(expected: int) -> None:
        deadline = time.monotonic() + 10
        while (seen := await users_on_node()) != expected:
            assert time.monotonic() < deadline, f"{seen} users subscribed on the node, not {expected}"
            await asyncio.sleep(0.05)

    before = await users_on_node()
    ack = await start(http, cluster, token, "[[tokens:400]] [[slow:0.05]] long")
    response = await http.get(f"{node}/v1/runs/{ack['run']}/events", headers={"Authorization": f"Bearer {token}"})
    stream = Sse(response)
    await stream.read(count=2)
    await until_users(before + 1)
    response.close()  # the client goes away mid-run
    await until_users(before)
    status, _ = await rest(http, cluster.http_url, token, "POST", f"/v1/runs/{ack['run']}/cancel")
    assert status in (200, 202)
