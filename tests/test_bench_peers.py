"""The S1/S2 benchmark's own parts that need no peer install: the minimal Engine.IO/Socket.IO
client's parsing, the raw probe's WebSocket handshake and framing (against a real aiohttp client
and a real Redis), and S2's figure arithmetic."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import struct
from collections.abc import AsyncIterator

import aiohttp
import pytest
from redis.asyncio import Redis

from loadtest.peers import raw_probe, tokens
from loadtest.procs import RedisServer, free_port
from loadtest.scenarios import eio
from loadtest.scenarios.s1 import memory_figures, stall_figures
from loadtest.scenarios.s2 import step_figures

# -- the minimal Socket.IO client ------------------------------------------------------------------


def test_engine_io_open_ping_and_close() -> None:
    opened = eio.parse('0{"sid":"abc","upgrades":[],"pingInterval":25000,"pingTimeout":20000}')
    assert opened.kind == "open" and opened.data["sid"] == "abc" and opened.data["pingInterval"] == 25000
    assert eio.parse("2").kind == "ping"
    assert eio.parse("1").kind == "close"
    assert eio.parse("6").kind == "other"


def test_socket_io_connect_and_its_answers() -> None:
    assert eio.connect({"user": "u1", "token": "t"}) == '40{"user":"u1","token":"t"}'
    assert eio.connect() == "40"
    assert eio.connect({"a": "b"}, namespace="/chat") == '40/chat,{"a":"b"}'
    connected = eio.parse('40{"sid":"xyz"}')
    assert connected.kind == "connected" and connected.data == {"sid": "xyz"} and connected.namespace == "/"
    refused = eio.parse('44{"message":"unauthorized"}')
    assert refused.kind == "connect_error" and refused.data["message"] == "unauthorized"
    assert eio.parse("41").kind == "close"


def test_socket_io_events_with_namespace_and_ack_id() -> None:
    plain = eio.parse('42["ev",{"n":1,"t":2.5}]')
    assert (plain.kind, plain.name, plain.data, plain.namespace) == ("event", "ev", [{"n": 1, "t": 2.5}], "/")
    both = eio.parse('42/chat,17["ev","x",3]')
    assert (both.kind, both.name, both.data, both.namespace) == ("event", "ev", ["x", 3], "/chat")
    assert eio.event_payload('42["ev",{"n":7}]') == {"n": 7}
    assert eio.event_payload('42["ev"]') is None
    assert eio.event_payload("2") is None and eio.event_payload('40{"sid":"a"}') is None


# -- the raw probe: pure framing -------------------------------------------------------------------


def test_accept_key_is_the_rfc_6455_example() -> None:
    assert raw_probe.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_server_frames_use_the_three_length_forms() -> None:
    assert raw_probe.frame(b"hi") == b"\x81\x02hi"
    medium = raw_probe.frame(b"x" * 300)
    assert medium[:4] == b"\x81\x7e" + struct.pack("!H", 300) and len(medium) == 304
    large = raw_probe.frame(b"x" * 70_000)
    assert large[:10] == b"\x81\x7f" + struct.pack("!Q", 70_000) and len(large) == 70_010
    assert raw_probe.frame(b"\x03\xe8", 0x8) == b"\x88\x02\x03\xe8"


def test_client_frames_are_unmasked_and_kept_until_complete() -> None:
    mask, body = b"\x01\x02\x03\x04", b"ping!"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(body))
    wire = bytearray(b"\x89" + bytes([0x80 | len(body)]) + mask + masked)
    partial = bytearray(wire[:5])
    assert raw_probe.client_frames(partial) == [] and partial == wire[:5]
    assert raw_probe.client_frames(wire) == [(0x9, b"ping!")] and wire == bytearray()


# -- the raw probe against a real aiohttp client and a real Redis ----------------------------------


@pytest.fixture
async def probe(redis_server: RedisServer) -> AsyncIterator[tuple[int, str]]:
    port, secret = free_port(), "test-secret"
    ready = asyncio.Event()
    task = asyncio.create_task(raw_probe.serve("127.0.0.1", port, redis_server.url, secret, ready))
    await asyncio.wait_for(ready.wait(), 10)
    yield port, secret
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _publish_until_heard(redis: Redis, channel: str, payload: str) -> None:
    """PUBLISH until a subscriber hears it: the probe's SUBSCRIBE races the first publish."""
    for _ in range(100):
        if await redis.publish(channel, payload):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"nobody subscribed {channel}")


async def test_raw_probe_delivers_a_published_event(probe: tuple[int, str], redis_server: RedisServer,
                                                    http: aiohttp.ClientSession) -> None:
    port, secret = probe
    user = f"u{os.getpid()}"
    url = f"ws://127.0.0.1:{port}/ws?user={user}&token={tokens.token(secret, user)}"
    redis = Redis.from_url(redis_server.url)
    try:
        async with http.ws_connect(url, heartbeat=None, max_msg_size=0) as ws:
            await _publish_until_heard(redis, f"probe:{user}", '{"n":1}')
            first = await ws.receive(timeout=5)
            assert (first.type, first.data) == (aiohttp.WSMsgType.TEXT, '{"n":1}')
            big = "y" * 70_000  # the 64-bit length form, through a real client's parser
            assert await redis.publish(f"probe:{user}", big) == 1
            second = await ws.receive(timeout=5)
            assert second.data == big
            await ws.ping(b"hello")  # the probe must answer control frames, not choke on them
            await ws.close()
            assert ws.close_code == 1000
    finally:
        await redis.aclose()


async def test_raw_probe_refuses_a_bad_token(probe: tuple[int, str], http: aiohttp.ClientSession) -> None:
    port, _ = probe
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(f"ws://127.0.0.1:{port}/ws?user=u1&token=nope")
    assert refused.value.status == 401


# -- figures ---------------------------------------------------------------------------------------


def test_s2_step_figures_count_each_device_apart() -> None:
    # Events 10, 11, 12 published: 10 reached both devices, 11 device A twice (a duplicate, and B
    # missing), 12 nobody; 2 * 5 is event 5 of an earlier step arriving late.
    keys = [20, 21, 22, 22, 10]
    figures = step_figures(rate=1.5, publish_span_s=2.0, published=3, first_n=10, keys=keys,
                           latency_ms=[5.0, 1.0, 2.0, 3.0, 4.0], misrouted=0, started_at=100.0, last_at=101.5,
                           cpu={"servers": 0.0003, "redis": 0.00006, "loadgens": 0.0009, "publisher": 0.0003})
    assert figures["expected"] == 6 and figures["delivered"] == 3 and figures["missing"] == 3
    assert figures["duplicates"] == 1 and figures["stale"] == 1
    assert figures["publish_rate"] == 1.5  # published / the publisher's span
    assert figures["deliveries_per_s"] == pytest.approx(3 / 1.5)
    assert figures["p50_ms"] == 3.0 and figures["max_ms"] == 5.0
    assert figures["server_us_per_delivery"] == pytest.approx(100.0)
    assert figures["redis_us_per_delivery"] == pytest.approx(20.0)
    assert figures["loadgen_us_per_delivery"] == pytest.approx(300.0)
    assert figures["publisher_us_per_event"] == pytest.approx(100.0)


def test_s2_step_figures_with_nothing_delivered() -> None:
    figures = step_figures(rate=10, publish_span_s=1.0, published=10, first_n=0, keys=[], latency_ms=[], misrouted=0,
                           started_at=5.0, last_at=0.0, cpu=dict.fromkeys(("servers", "redis", "loadgens",
                                                                            "publisher"), 0.5))
    assert figures["missing"] == 20 and figures["deliveries_per_s"] == 0.0 and figures["p99_ms"] == 0.0


def test_s1_memory_per_socket() -> None:
    figures = memory_figures(4000, rss_before=100 * 2**20, rss_after=100 * 2**20 + 64_000_000,
                             redis_before=10, redis_after=4_000_010)
    assert figures["kb_per_socket"] == pytest.approx(16.0)
    assert figures["redis_kb_per_socket"] == pytest.approx(1.0)
    assert figures["rss_before_mb"] == pytest.approx(100.0)


def test_s1_pauses_while_idle() -> None:
    before = {0.01: 90.0, 0.02: 95.0, 0.05: 100.0, 0.1: 100.0, math.inf: 100.0}
    # 40 more ticks: 30 under 10 ms, 8 between 20 and 50 ms, 2 between 50 and 100 ms.
    after = {0.01: 120.0, 0.02: 125.0, 0.05: 133.0, 0.1: 140.0, math.inf: 140.0}
    assert stall_figures("stalls", before, after) == {"stalls_count": 40, "stalls_over_20ms": 10,
                                                      "stalls_worst_le_s": 0.1}
    quiet = {0.01: 130.0, 0.02: 135.0, 0.05: 140.0, 0.1: 140.0, math.inf: 140.0}
    assert stall_figures("gc", before, quiet)["gc_over_20ms"] == 0
    assert stall_figures("gc", before, quiet)["gc_worst_le_s"] == 0.01  # the pauses before count no more
