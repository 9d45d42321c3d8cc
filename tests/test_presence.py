"""Presence: the user's online devices in `hello`, `presence` frames to the user's other devices when
one comes or goes (debounced), and `GET /v1/presence`; only the user's own devices, ever."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from loadtest.cluster import LocalCluster
from tests.support import PRESENCE_DEBOUNCE_S, node_ws, rest, unique

FRAME_TIMEOUT_S = 5
# Longer than the debounce, plus the time a close takes to reach the node and its script to run.
QUIET_S = PRESENCE_DEBOUNCE_S * 2 + 1

pytestmark = pytest.mark.asyncio


@contextlib.asynccontextmanager
async def device(http: aiohttp.ClientSession, cluster: LocalCluster, token: str, name: str,
                 node: int) -> AsyncIterator[tuple[aiohttp.ClientWebSocketResponse, dict[str, Any]]]:
    """A socket of device `name` on node `node`, and its hello."""
    async with http.ws_connect(f"{node_ws(cluster, node)}?access_token={token}&device={name}") as ws:
        hello = await ws.receive_json(timeout=FRAME_TIMEOUT_S)
        assert hello["type"] == "hello"
        yield ws, hello


async def next_presence(ws: aiohttp.ClientWebSocketResponse, timeout_s: float = FRAME_TIMEOUT_S) -> dict[str, Any]:
    """The next `presence` frame, skipping the others (the snapshot after hello)."""
    async with asyncio.timeout(timeout_s):
        while True:
            frame = await ws.receive_json()
            if frame["type"] == "presence":
                assert "seq" not in frame  # outside the stream
                assert frame["device"] != "phone"  # never about the device itself
                return frame


def listed(devices: list[dict[str, str]]) -> set[tuple[str, str]]:
    return {(d["device"], d["node"]) for d in devices}


async def test_devices_see_each_other_come_and_go(cluster: LocalCluster, http: aiohttp.ClientSession) -> None:
    alice, bob = unique("alice"), unique("bob")
    token = cluster.token(alice)
    async with device(http, cluster, token, "phone", 0) as (phone, hello):
        assert listed(hello["devices"]) == {("phone", "node-a")}
        async with device(http, cluster, token, "laptop", 1) as (_, laptop_hello):
            assert listed(laptop_hello["devices"]) == {("phone", "node-a"), ("laptop", "node-b")}
            assert await next_presence(phone) == {"type": "presence", "device": "laptop", "online": True,
                                                  "node": "node-b"}
            status, body = await rest(http, cluster.http_url, token, "GET", "/v1/presence")
            assert status == 200 and listed(body["devices"]) == {("phone", "node-a"), ("laptop", "node-b")}

            # Another user's devices are never shown to alice, nor hers to him.
            async with device(http, cluster, cluster.token(bob), "phone", 1) as (_, bob_hello):
                assert listed(bob_hello["devices"]) == {("phone", "node-b")}
                status, body = await rest(http, cluster.http_url, cluster.token(bob), "GET", "/v1/presence")
                assert status == 200 and listed(body["devices"]) == {("phone", "node-b")}
        assert await next_presence(phone) == {"type": "presence", "device": "laptop", "online": False,
                                              "node": "node-b"}
        status, body = await rest(http, cluster.http_url, token, "GET", "/v1/presence")
        assert listed(body["devices"]) == {("phone", "node-a")}


async def test_a_quick_reconnect_is_not_an_offline_online_pair(cluster: LocalCluster,
                                                               http: aiohttp.ClientSession) -> None:
    token = cluster.token(unique("alice"))
    async with device(http, cluster, token, "phone", 0) as (phone, _):
        async with device(http, cluster, token, "laptop", 0):
            assert (await next_presence(phone))["online"] is True
        # The laptop is back within the debounce, on the other node this time.
        async with device(http, cluster, token, "laptop", 1) as (_, hello):
            assert listed(hello["devices"]) == {("phone", "node-a"), ("laptop", "node-b")}
            with pytest.raises(TimeoutError):
                frame = await next_presence(phone, timeout_s=QUIET_S)
                pytest.fail(f"the phone was told {frame}")
            status, body = await rest(http, cluster.http_url, token, "GET", "/v1/presence")
            assert status == 200 and listed(body["devices"]) == {("phone", "node-a"), ("laptop", "node-b")}
        # The old socket's delayed offline did not take the new socket's entry away; this close does.
        assert await next_presence(phone) == {"type": "presence", "device": "laptop", "online": False,
                                              "node": "node-b"}


async def test_presence_needs_a_token(cluster: LocalCluster, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{cluster.http_url}/v1/presence") as response:
        assert response.status == 401
