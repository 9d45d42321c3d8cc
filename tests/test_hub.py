"""The hub and the broker contract against `MemoryBroker`: no Redis, no network."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from fanout.broker import Fenced
from fanout.hub import Hub
from fanout.memory_broker import MemoryBroker
from fanout.recovery import frame_seq
from tests.support import Recorder

WAIT_S = 5.0


@pytest.fixture
async def broker_hub() -> AsyncIterator[tuple[MemoryBroker, Hub]]:
    broker = MemoryBroker()
    hub = Hub(broker, canary_interval_s=0.05, canary_timeout_s=1.0)
    await hub.start()
    await hub.wait_connected(WAIT_S)
    yield broker, hub
    await hub.close()


async def test_frames_reach_every_local_socket_of_the_user_and_no_other(
    broker_hub: tuple[MemoryBroker, Hub],
) -> None:
    broker, hub = broker_hub
    phone, laptop, other = Recorder("alice"), Recorder("alice"), Recorder("bob")
    for sub in (phone, laptop, other):
        await hub.attach(sub)
    assert hub.users == 2
    result = await broker.publish("alice", '{"text":"hi"}')
    await phone.wait(lambda: phone.frames)
    await laptop.wait(lambda: laptop.frames)
    assert phone.frames == laptop.frames == [(result.seq, f'{{"seq":{result.seq},"text":"hi"}}')]
    assert other.frames == []


async def test_the_last_socket_of_a_user_unsubscribes_their_channel(broker_hub: tuple[MemoryBroker, Hub]) -> None:
    broker, hub = broker_hub
    first, second = Recorder("alice"), Recorder("alice")
    await hub.attach(first)
    await hub.attach(second)
    await hub.detach(first)
    assert hub.users == 1
    await hub.detach(second)
    assert hub.users == 0
    await broker.publish("alice", '{"text":"nobody"}')
    await asyncio.sleep(0.05)
    assert first.frames == second.frames == []


async def test_after_the_broker_connection_drops_every_channel_is_resubscribed_and_resumed(
    broker_hub: tuple[MemoryBroker, Hub],
) -> None:
    broker, hub = broker_hub
    phone = Recorder("alice")
    await hub.attach(phone)
    broker.drop_connections()
    await phone.wait(lambda: phone.resumes == 1)  # told to catch up from history
    await hub.wait_connected(WAIT_S)
    result = await broker.publish("alice", '{"text":"again"}')
    await phone.wait(lambda: phone.frames)
    assert phone.frames[0][0] == result.seq
    assert hub.healthy


async def test_the_memory_broker_keeps_the_stream_contract() -> None:
    broker = MemoryBroker(history_max=3)
    first = await broker.publish("u", '{"n":1}', producer="p", pseq=1)
    again = await broker.publish("u", '{"n":1}', producer="p", pseq=1)
    assert (first.seq, again.seq, again.duplicate) == (1, 1, True)
    for n in range(2, 6):
        await broker.publish("u", f'{{"n":{n}}}')
    position = await broker.position("u")
    assert (position.seq, position.first_seq, position.epoch) == (5, 3, first.epoch)
    assert await broker.read_after("u", 0, upto=5) is None, "trimmed: no replay with a hole"
    tail = await broker.read_after("u", 3, upto=5)
    assert tail is not None and [frame_seq(f) for f in tail] == [4, 5]
    await broker.fence("u", "r")
    with pytest.raises(Fenced):
        await broker.publish("u", '{"n":6}', fence="r")
    assert (await broker.publish("u", '{"end":true}', fence="r", pass_fence=True)).seq == 6
