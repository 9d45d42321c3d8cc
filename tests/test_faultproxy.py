"""The fault proxy itself, against a tiny echo server: each fault does what it says, and heals."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from loadtest.procs import free_port
from tests.faultproxy import FaultProxy, Mode


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65_536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


@pytest.fixture
def proxy(echo_port: int) -> Iterator[FaultProxy]:
    with FaultProxy(echo_port) as running:
        yield running


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes,
                    timeout_s: float = 5.0) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), timeout_s)


async def test_pass_forwards_both_ways_and_records_what_the_client_sent(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    assert await roundtrip(reader, writer, b"PING\r\n") == b"PING\r\n"
    big = bytes(range(256)) * 4096  # 1 MiB: several chunks, order kept
    assert await roundtrip(reader, writer, big) == big
    [info] = proxy.connections()
    assert info.sent_total == len(big) + 6 and info.received_total == info.sent_total
    assert info.sent.endswith(big[-1000:]) and not info.silenced
    writer.close()
    await proxy.wait_until(lambda conns: conns == [], 5, "close of the client's connection")


async def test_latency_delays_each_direction_and_heals(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    proxy.latency(150)
    assert proxy.mode is Mode.LATENCY
    started = time.monotonic()
    assert await roundtrip(reader, writer, b"slow") == b"slow"
    assert time.monotonic() - started >= 0.29  # 150 ms up, 150 ms down
    proxy.heal()
    started = time.monotonic()
    assert await roundtrip(reader, writer, b"fast") == b"fast"
    assert time.monotonic() - started < 0.25
    writer.close()


async def test_blackhole_holds_bytes_both_ways_until_healed_and_loses_none(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    assert await roundtrip(reader, writer, b"before") == b"before"
    proxy.blackhole()
    writer.write(b"held-1 ")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(1), 0.5)
    late_reader, late_writer = await connect(proxy)  # accepted, but reaches nothing
    late_writer.write(b"late")
    writer.write(b"held-2")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(late_reader.readexactly(1), 0.3)
    assert len(proxy.connections()) == 2
    proxy.heal()
    assert await asyncio.wait_for(reader.readexactly(13), 5) == b"held-1 held-2"
    assert await asyncio.wait_for(late_reader.readexactly(4), 5) == b"late"
    writer.close()
    late_writer.close()


async def test_silence_downstream_makes_only_the_matching_open_connection_deaf(proxy: FaultProxy) -> None:
    deaf_reader, deaf_writer = await connect(proxy)
    other_reader, other_writer = await connect(proxy)
    assert await roundtrip(deaf_reader, deaf_writer, b"SUBSCRIBE ch\r\n") == b"SUBSCRIBE ch\r\n"
    assert await roundtrip(other_reader, other_writer, b"GET k\r\n") == b"GET k\r\n"

    assert proxy.silence_downstream(lambda c: b"SUBSCRIBE" in c.sent) == 1
    deaf_writer.write(b"PING\r\n")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(deaf_reader.readexactly(1), 0.5)
    # upstream bytes still flow on the deaf connection: the server heard the PING
    await proxy.wait_until(lambda cs: any(c.silenced and c.sent.endswith(b"PING\r\n") for c in cs), 5,
                           "PING on the silenced connection")
    assert await roundtrip(other_reader, other_writer, b"still here") == b"still here"
    # a new connection sending the same thing is not silenced: the predicate matched once
    new_reader, new_writer = await connect(proxy)
    assert await roundtrip(new_reader, new_writer, b"SUBSCRIBE ch\r\n") == b"SUBSCRIBE ch\r\n"
    assert [c.silenced for c in proxy.connections()] == [True, False, False]
    for writer in (deaf_writer, other_writer, new_writer):
        writer.close()


async def test_reset_sends_rst_to_open_connections_and_new_ones_pass(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    assert await roundtrip(reader, writer, b"x") == b"x"
    assert proxy.reset() == 1
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(1), 5)
    reader, writer = await connect(proxy)
    assert await roundtrip(reader, writer, b"again") == b"again"
    writer.close()


async def test_refuse_resets_new_connections_only_until_healed(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    assert await roundtrip(reader, writer, b"a") == b"a"
    proxy.refuse()
    with pytest.raises(ConnectionResetError):  # at connect or at the first read, as the race goes
        refused_reader, _ = await connect(proxy)
        await asyncio.wait_for(refused_reader.read(1), 5)
    assert await roundtrip(reader, writer, b"b") == b"b"  # the open connection is untouched
    proxy.heal()
    reader2, writer2 = await connect(proxy)
    assert await roundtrip(reader2, writer2, b"c") == b"c"
    writer.close()
    writer2.close()


async def test_a_down_upstream_resets_the_client() -> None:
    with FaultProxy(free_port()) as proxy:  # nothing listens upstream
        with pytest.raises(ConnectionResetError):
            reader, _ = await connect(proxy)
            await asyncio.wait_for(reader.read(1), 5)
