"""A node's edges: bad frames, authentication, REST, health, settings, and a slow consumer."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from chorus_client.testing import RecordingClient as ChorusClient
from redis.asyncio import Redis

from common.keys import Keys
from fanout.redis_broker import RedisBroker
from loadtest.cluster import LocalCluster
from tests.support import RawSocket, event_payload, extra_node, send_frame, unique


def node_url(cluster: LocalCluster, path: str, index: int = 0) -> str:
    return f"http://127.0.0.1:{cluster.node_ports[index]}{path}"


async def test_bad_frames_get_error_frames_and_the_socket_lives_on(cluster: LocalCluster,
                                                                   http: aiohttp.ClientSession) -> None:
    token = cluster.token(unique("alice"))
    async with http.ws_connect(node_url(cluster, f"/ws?access_token={token}")) as ws:
        hello = await ws.receive_json(timeout=5)
        assert hello["type"] == "hello"
        snapshot = await ws.receive_json(timeout=5)  # a new device learns the runs in flight: none
        assert snapshot == {"type": "snapshot", "seq": hello["seq"], "epoch": hello["epoch"], "runs": []}
        cases: list[tuple[str | bytes, str]] = [
            ("this is not json", "bad_request"),
            ("[1, 2, 3]", "bad_request"),
            ('{"type": "launch_missiles", "id": "x1"}', "bad_request"),
            ('{"type": "send", "id": "x2"}', "bad_request"),
            ('{"type": "send", "id": "x3", "text": 42}', "bad_request"),
            ('{"type": "send", "id": "x4", "text": "' + "a" * 9000 + '"}', "too_large"),
            ('{"type": "cancel", "id": "x5", "run": "r_does_not_exist"}', "not_found"),
            ('{"type": "send", "id": "x6", "text": "hi", "conversation": "c_nope"}', "not_found"),
            (b"\x00\x01binary", "bad_request"),
            ("\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"), "bad_request"),
        ]
        for frame, code in cases:
            await send_frame(ws, frame)
            reply = await ws.receive_json(timeout=5)
            assert reply["type"] == "error", (frame, reply)
            assert reply["code"] == code, (frame, reply)
            assert reply["message"]
        await ws.send_json({"type": "ping", "id": "still-alive"})
        assert await ws.receive_json(timeout=5) == {"type": "pong", "id": "still-alive"}

        # A frame above the size limit ends the socket with 1009, as documented.
        await ws.send_str("x" * 70_000)
        closing = await ws.receive(timeout=5)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        assert ws.close_code == 1009


@pytest.mark.parametrize(
    "claims",
    [
        None,  # no token at all
        {"sub": "x", "exp": time.time() - 10},  # expired
        {"sub": "x"},  # no exp
        {"exp": time.time() + 60},  # no sub
        "wrong-secret",
    ],
)
async def test_bad_tokens_are_refused_with_401_before_the_upgrade(
    cluster: LocalCluster, http: aiohttp.ClientSession, claims: Any
) -> None:
    if claims is None:
        url = node_url(cluster, "/ws")
    elif claims == "wrong-secret":
        token = jwt.encode({"sub": "x", "exp": time.time() + 60}, "another-secret-of-32-characters!!", "HS256")
        url = node_url(cluster, f"/ws?access_token={token}")
    else:
        url = node_url(cluster, f"/ws?access_token={jwt.encode(claims, cluster.config.jwt_secret, 'HS256')}")
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(url)
    assert info.value.status == 401


async def test_token_in_the_authorization_header(cluster: LocalCluster, http: aiohttp.ClientSession) -> None:
    user = unique("alice")
    headers = {"Authorization": f"Bearer {cluster.token(user)}"}
    async with http.ws_connect(node_url(cluster, "/ws?device=hdr"), headers=headers) as ws:
        hello = await ws.receive_json(timeout=5)
        assert (hello["user"], hello["device"]) == (user, "hdr")


async def test_rest_conversations_and_paginated_messages(cluster: LocalCluster,
                                                         http: aiohttp.ClientSession) -> None:
    token = cluster.token(unique("alice"))
    auth = {"Authorization": f"Bearer {token}"}
    base = cluster.http_url

    async with http.get(f"{base}/v1/conversations") as response:
        assert response.status == 401
    async with http.post(f"{base}/v1/conversations", headers=auth, json={"title": "Trip"}) as response:
        assert response.status == 201
        created = await response.json()
    assert created["title"] == "Trip" and created["agent"] == "default"
    async with http.post(f"{base}/v1/conversations", headers=auth, data=b"{nope") as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "bad_request"

    device = ChorusClient(cluster.ws_url, token, device="phone")
    await device.connect()
    try:
        for text in ("one", "two"):
            ack = await device.send(text, conversation=created["id"])
            await device.wait_run_end(ack["run"])
    finally:
        await device.close()

    async with http.get(f"{base}/v1/conversations/{created['id']}/messages?limit=3", headers=auth) as response:
        page = await response.json()
    assert [m["role"] for m in page["messages"]] == ["assistant", "user", "assistant"]  # newest last
    assert page["next_before"] is not None
    async with http.get(f"{base}/v1/conversations/{created['id']}/messages?limit=3&before={page['next_before']}",
                        headers=auth) as response:
        older = await response.json()
    assert [m["content"] for m in older["messages"]] == ["one"]
    assert older["next_before"] is None
    async with http.get(f"{base}/v1/conversations/{created['id']}/messages?limit=0", headers=auth) as response:
        assert response.status == 400

    async with http.get(f"{base}/v1/conversations", headers=auth) as response:
        listing = await response.json()
    assert [c["id"] for c in listing["conversations"]] == [created["id"]]
    async with http.get(f"{base}/v1/conversations/{created['id']}", headers=auth) as response:
        assert (await response.json())["id"] == created["id"]
    async with http.delete(f"{base}/v1/conversations/{created['id']}", headers=auth) as response:
        assert response.status == 204
    async with http.get(f"{base}/v1/conversations/{created['id']}/messages", headers=auth) as response:
        assert response.status == 404


async def test_health_and_readiness(cluster: LocalCluster, http: aiohttp.ClientSession) -> None:
    async with http.get(node_url(cluster, "/healthz")) as response:
        assert response.status == 200
    async with http.get(node_url(cluster, "/readyz", 1)) as response:
        body = await response.json()
    assert response.status == 200
    assert body == {"ready": True, "node": "node-b", "draining": False, "pubsub": True, "redis": True,
                    "postgres": True}


@pytest.mark.parametrize(
    ("module", "env", "name"),
    [
        ("ws_node", {"AUTH_JWT_SECRET": ""}, "AUTH_JWT_SECRET"),
        ("ws_node", {"AUTH_JWT_SECRET": "short"}, "AUTH_JWT_SECRET"),
        ("ws_node", {"PORT": "eighty"}, "PORT"),
        ("ws_node", {"REDIS_URL": "http://localhost"}, "REDIS_URL"),
        ("ws_node", {"DATABASE_URL": ""}, "DATABASE_URL"),
        ("agent_worker", {"REDIS_URL": ""}, "REDIS_URL"),
        ("agent_worker", {"LLM_BASE_URL": "localhost:8000"}, "LLM_BASE_URL"),
        ("agent_worker", {"WORKER_CONCURRENCY": "0"}, "WORKER_CONCURRENCY"),
    ],
)
def test_a_bad_setting_stops_the_process_naming_the_variable(module: str, env: dict[str, str], name: str) -> None:
    base = {"REDIS_URL": "redis://127.0.0.1:1/0", "DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
            "AUTH_JWT_SECRET": "s" * 32, "PATH": os.environ["PATH"]}
    done = subprocess.run([sys.executable, "-m", module], env={**base, **env}, capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 2
    assert name in done.stderr


@pytest.fixture
def small_queue_node(cluster: LocalCluster, tmp_path: Path) -> Iterator[int]:
    """A node whose sockets may queue only 64 frames."""
    yield from extra_node(cluster, tmp_path, "slow-node", SEND_QUEUE_MAX_FRAMES="64",
                          MERGED_TOKEN_MAX_CHARS="262144")


async def test_a_catch_up_that_cannot_go_on_closes_the_socket_to_resume(cluster: LocalCluster,
                                                                          http: aiohttp.ClientSession) -> None:
    """A gap the node cannot fill, for an error that retrying will not mend (here the user's
    stream key holds the wrong type), closes the socket with 1011 so the device reconnects and
    resumes; it once ended the catch-up silently, and the device's stream stayed parked for good."""
    redis = Redis.from_url(cluster.redis_url, decode_responses=True)
    user, keys = unique("alice"), Keys()
    try:
        async with http.ws_connect(f"ws://127.0.0.1:{cluster.node_ports[0]}/ws"
                                   f"?access_token={cluster.token(user)}&device=phone") as ws:
            hello = await ws.receive_json(timeout=10)
            assert hello["type"] == "hello"
            assert (await ws.receive_json(timeout=10))["type"] == "snapshot"
            await redis.delete(keys.meta(user))
            await redis.set(keys.meta(user), "not a hash")
            # Two ahead of the device: a gap, which the node fills from the (broken) stream.
            await redis.publish(keys.channel(user), f'{{"seq":{hello["seq"] + 2},"event":"note"}}')
            closed = await ws.receive(timeout=10)
            assert (closed.type, closed.data) == (aiohttp.WSMsgType.CLOSE, 1011), closed
    finally:
        await redis.delete(keys.meta(user))
        await redis.aclose()


async def test_slow_consumer_is_closed_with_4008_and_others_keep_up(cluster: LocalCluster,
                                                                    small_queue_node: int) -> None:
    """A client that stops reading fills its bounded queue and is closed with 4008 (reconnect with
    `after`); a healthy device of the same user on the same node gets every event meanwhile."""
    port = small_queue_node
    redis = Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        user = unique("alice")
        token = cluster.token(user)
        slow = await asyncio.to_thread(RawSocket, port, f"/ws?access_token={token}&device=slow", receive_buffer=4096)
        healthy = ChorusClient(f"ws://127.0.0.1:{port}/ws", token, device="healthy", auto_reconnect=False)
        start = (await healthy.connect())["seq"]
        stream = RedisBroker(redis, Keys())
        padding = "x" * 2000
        for n in range(3000):  # not tokens: nothing to merge
            await stream.publish(user, event_payload("c", "r", "note", {"text": padding, "n": n}))
        await healthy.wait_for(lambda: len(healthy.seqs()) == 3000, 30)
        assert healthy.gaps == [] and healthy.seqs()[0] == start + 1
        texts, code = await asyncio.to_thread(slow.frames_until_close)
        assert code == 4008
        assert texts < 3000, "the slow socket must have been cut off, not served everything"
        await healthy.close()
    finally:
        await redis.aclose()


async def test_a_slow_devices_queued_tokens_are_merged_instead_of_closing_it(
    cluster: LocalCluster, small_queue_node: int
) -> None:
    """The queued events are tokens of one run: they are merged into fewer frames covering
    seq_from..seq, and the device that stopped reading gets every seq and all the text, unclosed."""
    port = small_queue_node
    redis = Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        user = unique("alice")
        slow = await asyncio.to_thread(RawSocket, port, f"/ws?access_token={cluster.token(user)}&device=slow",
                                       receive_buffer=4096)
        for expected in ("hello", "snapshot"):  # the device is live once it has these
            _, payload = await asyncio.to_thread(slow.frame)
            assert json.loads(payload)["type"] == expected
        stream = RedisBroker(redis, Keys())
        # ~4.5 MB: more than the kernel's socket buffers hold, so the node's queue fills
        texts = [f"token-{n:04d}-" + "y" * 1500 for n in range(3000)]
        for text in texts:
            last = await stream.publish(user, event_payload("c", "r", "token", {"text": text}))
        events = await asyncio.to_thread(slow.events_until, last.seq)
        covered = [s for e in events for s in range(e.get("seq_from", e["seq"]), e["seq"] + 1)]
        assert covered == list(range(last.seq - 2999, last.seq + 1)), "every seq exactly once, in order"
        assert "".join(e["data"]["text"] for e in events) == "".join(texts)
        assert len(events) < 3000 and any(e.get("seq_from", e["seq"]) < e["seq"] for e in events)
    finally:
        await redis.aclose()
