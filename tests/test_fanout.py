"""The fan-out core against a real Redis: sequencing, dedupe, fences, epochs, history, the hub."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from common.keys import Keys
from fanout.broker import Fenced, Lost, PublishResult
from fanout.hub import Hub
from fanout.memory_broker import MemoryBroker
from fanout.recovery import frame_seq
from fanout.redis_broker import RedisBroker
from fanout.resp_pubsub import DISPATCH_PER_TURN, RespPubSub
from loadtest.procs import RedisServer
from protocol.events import RunCancelled, Token, event_body
from tests.support import WAIT_S, Recorder


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


def token(n: object = "") -> str:
    """A token event's payload, as a publisher hands it to the broker."""
    return event_body("c", "r", Token(text=str(n)), 0)


async def publish(stream: RedisBroker, user: str, n: int, **kw: object) -> int:
    result = await stream.publish(user, token(n), **kw)  # type: ignore[arg-type]
    return result.seq


async def test_concurrent_publishers_get_contiguous_seqs(redis_server: RedisServer, keys: Keys) -> None:
    clients = [Redis.from_url(redis_server.url, decode_responses=True) for _ in range(4)]
    streams = [RedisBroker(c, keys) for c in clients]
    listener = Redis.from_url(redis_server.url, decode_responses=True)
    pubsub = listener.pubsub()
    await pubsub.subscribe(keys.channel("u"))
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    try:
        seqs = await asyncio.gather(*(publish(streams[i % 4], "u", i) for i in range(400)))
        assert sorted(seqs) == list(range(1, 401))
        received = []
        while len(received) < 400:
            message = await asyncio.wait_for(pubsub.get_message(timeout=1), 5)
            if message and message["type"] == "message":
                received.append(frame_seq(message["data"]))
        assert received == list(range(1, 401)), "Pub/Sub order must be seq order"
        frames = await streams[0].read_after("u", 0, upto=400)
        assert frames is not None
        assert [frame_seq(f) for f in frames] == list(range(1, 401))
        event = orjson.loads(frames[0])
        assert set(event) == {"seq", "type", "conversation", "run", "event", "data", "ts"}
    finally:
        await pubsub.aclose()
        for client in [*clients, listener]:
            await client.aclose()


async def test_producer_dedupe_makes_a_retry_harmless(redis: Redis, keys: Keys) -> None:
    stream = RedisBroker(redis, keys)
    first = await stream.publish("u", token(), producer="p", pseq=1)
    again = await stream.publish("u", token(), producer="p", pseq=1)
    assert (first.seq, first.duplicate) == (1, False)
    assert (again.seq, again.duplicate) == (1, True)
    nxt = await stream.publish("u", token(), producer="p", pseq=2)
    assert nxt.seq == 2
    assert (await stream.position("u")).seq == 2


async def test_the_publishes_of_a_loop_turn_go_to_redis_as_few_calls(fresh_redis: RedisServer,
                                                                      keys: Keys) -> None:
    client = Redis.from_url(fresh_redis.url, decode_responses=True)
    stream = RedisBroker(client, keys)
    try:
        await stream.publish("warm", token())  # the pipe's connection, and the script loaded
        await client.config_resetstat()
        users = [f"u{n % 50}" for n in range(300)]
        results = await asyncio.gather(*(stream.publish(user, token(n)) for n, user in enumerate(users)))
        seqs: dict[str, list[int]] = {}
        for user, result in zip(users, results, strict=True):
            seqs.setdefault(user, []).append(result.seq)
        assert all(got == list(range(1, 7)) for got in seqs.values()), seqs  # in the order asked
        assert (await stream.read_after("u7", 0, upto=6)) is not None
        # 300 publishes asked in one loop turn: three calls of the script (128 a call at most).
        stats = await client.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 3, stats
        # A Redis that lost its scripts (restarted, SCRIPT FLUSH) is sent the script's text.
        await client.script_flush()
        again = await asyncio.gather(*(stream.publish("u0", token(n)) for n in range(3)))
        assert [r.seq for r in again] == [7, 8, 9]
    finally:
        await stream.aclose()
        await client.aclose()


async def test_one_publishs_redis_error_stays_with_it_in_a_shared_call(redis: Redis, keys: Keys) -> None:
    stream = RedisBroker(redis, keys)
    await redis.set(keys.meta("broken"), "not a hash")  # the script's first HGET on it fails
    results = await asyncio.gather(*(stream.publish(user, token()) for user in ("a", "broken", "b")),
                                   return_exceptions=True)
    assert isinstance(results[1], ResponseError) and "WRONGTYPE" in str(results[1]), results
    assert [r.seq for r in (results[0], results[2]) if isinstance(r, PublishResult)] == [1, 1], results
    # A producer's repeat in the same call is still a duplicate of its first.
    first, repeat = await asyncio.gather(*(stream.publish("a", token(), producer="p", pseq=1) for _ in range(2)))
    assert (first.seq, first.duplicate, repeat.seq, repeat.duplicate) == (2, False, 2, True)


async def test_fence_refuses_a_cancelled_runs_events(redis: Redis, keys: Keys) -> None:
    stream = RedisBroker(redis, keys)
    await publish(stream, "u", 1, fence="r")
    await stream.fence("u", "r")
    with pytest.raises(Fenced):
        await publish(stream, "u", 2, fence="r")
    end = await stream.publish("u", event_body("c", "r", RunCancelled(message=None, text=""), 0),
                               fence="r", pass_fence=True)
    assert end.seq == 2
    assert await stream.is_fenced("u", "r")
    assert not await stream.is_fenced("u", "other")


async def test_lost_history_gets_a_new_epoch(redis: Redis, keys: Keys) -> None:
    stream = RedisBroker(redis, keys)
    before = await stream.position("u")
    await publish(stream, "u", 1)
    await publish(stream, "u", 2)
    await redis.delete(keys.meta("u"))  # what a Redis restart without data, or expiry, does
    seq = await publish(stream, "u", 3)
    after = await stream.position("u")
    assert seq == 1
    assert after.epoch != before.epoch
    frames = await stream.read_after("u", 0, upto=1)
    assert frames is not None and len(frames) == 1, "the old epoch's history must be gone"


async def test_trimmed_history_is_reported_not_replayed_with_a_hole(redis: Redis, keys: Keys) -> None:
    stream = RedisBroker(redis, keys, history_max=10)
    for n in range(600):
        await publish(stream, "u", n)
    position = await stream.position("u")
    assert position.seq == 600
    assert position.first_seq > 1
    assert await stream.read_after("u", 0, upto=600) is None
    tail = await stream.read_after("u", 590, upto=600)
    assert tail is not None and [frame_seq(f) for f in tail] == list(range(591, 601))


async def unsubscribed(redis: Redis, channel: str, timeout_s: float = 5) -> bool:
    """The broker dropped `channel`'s last subscriber. Eventually: the hub sends UNSUBSCRIBE and
    does not wait for Redis to confirm it, so another connection may ask before Redis read it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while await numsub(redis, channel) != 0:
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def numsub(redis: Redis, channel: str) -> int:
    return int(dict(await redis.pubsub_numsub(channel))[channel])


async def test_hub_subscribes_on_first_socket_and_unsubscribes_after_last(redis: Redis, keys: Keys) -> None:
    hub = Hub(RedisBroker(redis, keys))
    await hub.start()
    try:
        await hub.wait_connected(5)
        a, b = Recorder("u"), Recorder("u")
        await hub.attach(a)
        await hub.attach(b)
        assert await numsub(redis, keys.channel("u")) == 1
        seq = await publish(RedisBroker(redis, keys), "u", 1)
        await a.wait(lambda: a.frames)
        await b.wait(lambda: b.frames)
        assert a.frames[0][0] == b.frames[0][0] == seq
        await hub.detach(a)
        assert await numsub(redis, keys.channel("u")) == 1
        await hub.detach(b)
        assert await unsubscribed(redis, keys.channel("u"))
    finally:
        await hub.close()


async def test_hub_attach_detach_race_never_loses_a_subscription(redis: Redis, keys: Keys) -> None:
    """encode/broadcaster's bug: two first subscribers racing; here every interleaving must end
    with the broker subscription matching whether anyone is attached."""
    hub = Hub(RedisBroker(redis, keys))
    await hub.start()
    try:
        await hub.wait_connected(5)
        for _ in range(30):
            subs = [Recorder("u") for _ in range(4)]
            await asyncio.gather(*(hub.attach(s) for s in subs), hub.detach(subs[0]), hub.detach(subs[1]))
            expected = 1  # subs[2] and subs[3] stay attached
            assert await numsub(redis, keys.channel("u")) == expected
            await asyncio.gather(*(hub.detach(s) for s in subs))
            assert await unsubscribed(redis, keys.channel("u"))
    finally:
        await hub.close()


async def test_hub_resubscribes_and_resumes_after_redis_restart(fresh_redis: RedisServer, keys: Keys) -> None:
    redis = Redis.from_url(fresh_redis.url, decode_responses=True)
    hub = Hub(RedisBroker(redis, keys))
    await hub.start()
    try:
        await hub.wait_connected(5)
        sub = Recorder("u")
        await hub.attach(sub)
        await asyncio.to_thread(fresh_redis.restart, keep_data=True)
        await sub.wait(lambda: sub.resumes >= 1, timeout_s=15)
        assert hub.connected
        seq = await publish(RedisBroker(redis, keys), "u", 1)
        await sub.wait(lambda: any(s == seq for s, _ in sub.frames))
    finally:
        await hub.close()
        await redis.aclose()


async def test_hub_recovers_when_redis_kills_its_subscription(redis: Redis, keys: Keys) -> None:
    """CLIENT KILL of the hub's Pub/Sub connection (what a Redis failover or a proxy does): the hub
    reconnects, resubscribes, tells its subscribers to catch up, and is healthy again. The deaf
    case (TCP alive, nothing delivered) is tests/test_faults.py's, through a fault proxy."""
    hub = Hub(RedisBroker(redis, keys), canary_interval_s=0.1, canary_timeout_s=0.5)
    await hub.start()
    try:
        await hub.wait_connected(5)
        sub = Recorder("u")
        await hub.attach(sub)
        await sub.wait(lambda: hub.healthy)
        clients = await redis.client_list(_type="pubsub")
        assert len(clients) == 1
        pubsub_id = clients[0]["id"]
        await redis.execute_command("CLIENT", "KILL", "ID", pubsub_id)
        await sub.wait(lambda: sub.resumes >= 1, timeout_s=10)
        await hub.wait_connected(5)
        seq = await publish(RedisBroker(redis, keys), "u", 1)
        await sub.wait(lambda: any(s == seq for s, _ in sub.frames))
        assert hub.healthy or await _eventually(lambda: hub.healthy)
    finally:
        await hub.close()


async def _eventually(predicate: object, timeout_s: float = 5) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.05)
    return False


async def test_lost_acknowledged_writes_start_a_new_epoch(redis: Redis, keys: Keys) -> None:
    """Redis restarted from an older snapshot: a producer's next number arrives after a hole.
    Reusing the rolled-back seqs under the same epoch would make devices drop them silently."""
    stream = RedisBroker(redis, keys)
    first = await stream.publish("u", token(), producer="p", pseq=1)
    await stream.publish("u", token(), producer="p", pseq=2)
    # roll the user's keys back to just after the first publish, as a stale snapshot would
    await redis.hset(keys.producers("u"), "p", f"1:{first.seq}")
    await redis.hset(keys.meta("u"), "seq", first.seq)
    await redis.xdel(keys.history("u"), f"{first.seq + 1}-0")
    third = await stream.publish("u", token(), producer="p", pseq=3)
    assert third.epoch != first.epoch
    assert (await stream.position("u")).epoch == third.epoch
    frames = await stream.read_after("u", third.seq - 1, upto=third.seq)
    assert frames is not None and len(frames) == 1, "the old life's history is gone"
    # an ordinary next publish keeps the new epoch
    fourth = await stream.publish("u", token(), producer="p", pseq=4)
    assert fourth.epoch == third.epoch and fourth.seq == third.seq + 1


async def test_a_publish_that_follows_a_lost_one_is_refused(redis: Redis, keys: Keys) -> None:
    """A run's end follows its worker's last token (`follows`): when the stream no longer holds
    that token (Redis lost it), the end is refused (`Lost`) and nothing is published; the same in
    the in-memory broker."""
    memory = MemoryBroker()
    for stream in (RedisBroker(redis, keys), memory):
        first = await stream.publish("u", token(), producer="p", pseq=1)
        await stream.publish("u", token(), producer="p", pseq=2)
        end = await stream.publish("u", token(), producer="end", pseq=1, follows=("p", 2))
        assert end.seq == first.seq + 2 and not end.duplicate
        if stream is memory:  # roll back to just after the first publish, as a stale snapshot would
            memory._stream("u").producers["p"] = (1, first.seq)
        else:
            await redis.hset(keys.producers("u"), "p", f"1:{first.seq}")
        with pytest.raises(Lost):
            await stream.publish("u", token(), producer="end2", pseq=1, follows=("p", 2))
        assert (await stream.position("u")).seq == end.seq, "nothing was published"
        again = await stream.publish("u", token(), producer="end", pseq=1, follows=("p", 2))
        assert again.duplicate and again.seq == end.seq, "a retry of a published end is its duplicate"


async def test_after_an_empty_restart_a_producer_joins_the_epoch_a_reader_started(redis: Redis, keys: Keys) -> None:
    """Redis came back empty mid-answer; a node's catch-up started a new epoch before the worker's
    next publish, whose numbering has a hole. That hole was already answered by the new epoch: a
    second one would leave the devices that resynced first on an epoch nobody writes to."""
    stream = RedisBroker(redis, keys)
    first = await stream.publish("u", token(), producer="p", pseq=1)
    await stream.publish("u", token(), producer="p", pseq=2, producer_epoch=first.epoch)
    await redis.delete(keys.meta("u"), keys.history("u"), keys.producers("u"))  # an empty restart
    reader = await stream.position("u")  # a node catching up: the new epoch starts here
    assert reader.epoch != first.epoch
    third = await stream.publish("u", token(), producer="p", pseq=3, producer_epoch=first.epoch)
    assert (third.epoch, third.seq) == (reader.epoch, reader.seq + 1)
    # the same hole within the producer's own epoch is still lost writes: a new epoch
    fifth = await stream.publish("u", token(), producer="p", pseq=5, producer_epoch=third.epoch)
    assert fifth.epoch != third.epoch


async def test_the_lean_pubsub_reads_every_message_in_order_and_reports_a_lost_connection(
    redis: Redis, redis_server: RedisServer
) -> None:
    pubsub = RespPubSub.from_url(redis_server.url)
    await pubsub.ping()
    await pubsub.subscribe("lean")
    assert await pubsub.get_message(timeout=5) == {"type": "subscribe", "channel": "lean", "data": 1}
    for n in range(500):  # many per read: hiredis parses them all at once
        await redis.publish("lean", f"m{n}")
    got = [await pubsub.get_message(timeout=5) for _ in range(500)]
    assert [m["data"] for m in got if m] == [f"m{n}" for n in range(500)]
    assert await pubsub.get_message(timeout=0.05) is None
    await pubsub.unsubscribe("lean")
    assert (await pubsub.get_message(timeout=5) or {})["type"] == "unsubscribe"
    await pubsub.aclose()
    with pytest.raises(ConnectionError):
        await pubsub.get_message(timeout=1)


async def test_a_burst_is_handed_on_a_bounded_number_a_turn_in_order(
    redis: Redis, redis_server: RedisServer
) -> None:
    """One read can hold thousands of messages; the hub gets at most `DISPATCH_PER_TURN` of them
    in one turn of the loop (reading pauses meanwhile), every one, in order."""
    pubsub = RespPubSub.from_url(redis_server.url)
    turn, turns = 0, []
    handled: list[object] = []
    done, after = asyncio.Event(), asyncio.Event()
    count = 3000
    loop = asyncio.get_running_loop()

    def next_turn() -> None:  # runs once in every turn of the loop
        nonlocal turn
        turn += 1
        if not done.is_set():
            loop.call_soon(next_turn)

    def handle(message: dict[str, object]) -> None:
        handled.append(message["data"])
        turns.append(turn)
        if len(handled) == count + 1:
            done.set()
        if message["data"] == "after":
            after.set()

    await pubsub.ping()
    pubsub.dispatch(handle)
    await pubsub.subscribe("burst")
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(count):
            pipe.publish("burst", f"m{n}")
        next_turn()
        await pipe.execute()
    await asyncio.wait_for(done.wait(), WAIT_S)
    assert handled == [1, *(f"m{n}" for n in range(count))]
    per_turn = collections.Counter(turns)
    assert max(per_turn.values()) == DISPATCH_PER_TURN, "reads held more than a turn's worth"
    await redis.publish("burst", "after")  # reading went on after the burst
    await asyncio.wait_for(after.wait(), WAIT_S)
    await pubsub.aclose()


async def test_what_a_burst_left_unread_is_dropped_when_the_connection_is_lost(
    redis: Redis, redis_server: RedisServer
) -> None:
    """A connection lost while a burst waits for its next turn hands on nothing more: the hub's
    catch-up brings it from history after reconnecting, in order, where late messages of the old
    connection would come after newer ones."""
    pubsub = RespPubSub.from_url(redis_server.url)
    handled: list[tuple[object, bool]] = []  # each message, and whether the loss was known then

    def handle(message: dict[str, object]) -> None:
        handled.append((message["data"], pubsub.lost is not None))
        if message["data"] == "m0":
            assert pubsub._transport is not None
            pubsub._transport.abort()  # lost while this read is being handed on

    await pubsub.ping()
    pubsub.dispatch(handle)
    await pubsub.subscribe("lost-burst")
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(2000):
            pipe.publish("lost-burst", f"m{n}")
        await pipe.execute()

    async def read_until_lost() -> None:
        while True:
            await pubsub.get_message(timeout=5)

    with pytest.raises(ConnectionError):
        await asyncio.wait_for(read_until_lost(), WAIT_S)
    for _ in range(3):  # turns in which a burst's rest would be handed on
        await asyncio.sleep(0)
    assert ("m0", False) in handled
    assert not [data for data, lost in handled if lost], "handed on after the loss"
    assert len(handled) <= DISPATCH_PER_TURN + 1, "at most the read being handed on when it was lost"
    await pubsub.aclose()


async def test_the_lean_pubsub_dispatches_as_it_reads_and_a_failing_handler_ends_the_connection(
    redis: Redis, redis_server: RedisServer
) -> None:
    """With `dispatch`, messages go to the handler as they are read, with no `get_message` call;
    the reader only waits, and learns of an error in the handler as a lost connection, so the hub
    connects again (as when its own loop raised)."""
    pubsub = RespPubSub.from_url(redis_server.url)
    handled: list[object] = []
    done = asyncio.Event()

    def handle(message: dict[str, object]) -> None:
        handled.append(message["data"])
        if message["data"] == "boom":
            raise ValueError("a bad message")
        if len(handled) == 301:  # the subscription's confirmation and 300 messages
            done.set()

    await pubsub.ping()
    pubsub.dispatch(handle)
    await pubsub.subscribe("dispatched")
    for n in range(300):
        await redis.publish("dispatched", f"m{n}")
    await asyncio.wait_for(done.wait(), 5)
    assert handled == [1, *(f"m{n}" for n in range(300))]
    assert await pubsub.get_message(timeout=0.05) is None  # nothing was queued for the reader
    await redis.publish("dispatched", "boom")

    async def read_until_lost() -> None:
        while True:
            await pubsub.get_message(timeout=5)

    with pytest.raises(ConnectionError):
        await asyncio.wait_for(read_until_lost(), WAIT_S)
    assert handled[-1] == "boom"
    await pubsub.aclose()


async def test_the_lean_pubsub_authenticates_and_refuses_a_wrong_password(fresh_redis: RedisServer) -> None:
    admin = Redis.from_url(fresh_redis.url, decode_responses=True)
    await admin.config_set("requirepass", "s3cret")
    await admin.aclose()
    host_port = fresh_redis.url.split("://", 1)[1]
    good = RespPubSub.from_url(f"redis://:s3cret@{host_port}")
    assert await good.ping() == "PONG"
    await good.aclose()
    with pytest.raises(ConnectionError, match="AUTH"):
        await RespPubSub.from_url(f"redis://:wrong@{host_port}").ping()


def test_the_lean_pubsub_runs_on_uvloop_as_the_nodes_do(redis_server: RedisServer) -> None:
    """uvloop's transports are not asyncio's classes (an isinstance check once kept every node from
    connecting, while these tests, on asyncio's loop, passed)."""
    import uvloop

    async def roundtrip() -> list[object]:
        pubsub, client = RespPubSub.from_url(redis_server.url), Redis.from_url(redis_server.url)
        try:
            await pubsub.ping()
            await pubsub.subscribe("uv")
            await client.publish("uv", "hello")
            return [(await pubsub.get_message(timeout=5) or {}).get("data") for _ in range(2)]
        finally:
            await pubsub.aclose()
            await client.aclose()

    assert uvloop.run(roundtrip()) == [1, "hello"]
