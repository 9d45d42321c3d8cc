"""Chorus on a Redis Cluster (`REDIS_CLUSTER=true`): three primaries with a replica each, Debian's
redis-server 7 (sharded Pub/Sub), started here on loopback ports.

The core invariants of tests/test_core.py run again, unchanged, against this cluster (the module's
`cluster` fixture overrides the session's): two devices on two nodes see one identical stream, a
device resumes on the other node mid-answer, a send repeated by id starts nothing new. Then a
primary is killed mid-answer: its replica takes over, and the answer still completes on both
devices with no gap and no duplicate (writes the dead primary had acknowledged but not replicated
show up as a new epoch, which devices resync from, never as a silent hole)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import psutil
import pytest
from chorus_client.testing import RecordingClient as ChorusClient
from redis import Redis
from redis.asyncio import RedisCluster

from common.keys import Keys
from common.redis_client import TRANSIENT, PoolExhausted, connect
from fanout.keys import StreamKeys
from fanout.redis_broker import RedisBroker
from loadtest.cluster import ClusterConfig, LocalCluster
from loadtest.procs import RedisClusterServer
from tests.fake_llm import FakeLLM
from tests.support import assert_answer_survived, node_ws, unique
from tests.test_core import (
    db,
    test_laptop_moves_to_the_other_node_mid_answer_and_continues_exactly,
    test_phone_and_laptop_on_two_nodes_see_one_identical_stream,
)
from ws_node.presence import Presences

__all__ = [  # collected here too, against the Redis Cluster (and `db`, the fixture one of them takes)
    "db",
    "test_laptop_moves_to_the_other_node_mid_answer_and_continues_exactly",
    "test_phone_and_laptop_on_two_nodes_see_one_identical_stream",
]


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    servers = RedisClusterServer(tmp_path_factory.mktemp("redis-cluster"), primaries=3, replicas=1)
    servers.start()
    yield servers
    servers.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLM,
            redis_cluster: RedisClusterServer) -> Iterator[LocalCluster]:
    config = ClusterConfig(nodes=2, workers=1, nginx=True, redis_url=redis_cluster.url, env={
        "REDIS_CLUSTER": "true", "LLM_BASE_URL": fake_llm.base_url, "LLM_API_KEY": "test-key"})
    with LocalCluster(tmp_path_factory.mktemp("on-cluster"), config) as running:
        yield running


async def primary_of(redis_cluster: RedisClusterServer, user: str) -> int:
    """The port of the primary holding `user`'s slot (its keys and its channel)."""
    client = RedisCluster.from_url(redis_cluster.url)
    try:
        await client.initialize()
        node = client.get_node_from_key(f"chorus:{{u:{user}}}:ch")
        assert node is not None
        return int(node.port)
    finally:
        await client.aclose()


async def users_on_every_primary(redis_cluster: RedisClusterServer, per_primary: int) -> list[str]:
    """Users of the test's own, `per_primary` of them on each primary: a test that must cross
    shards does not leave it to chance (six random users are all on one of three shards once in
    243 runs, and CI met it)."""
    users: list[str] = []
    counts: dict[int, int] = {}
    while len(users) < per_primary * len(redis_cluster.primaries()):
        user = unique(f"user{len(users)}")
        owner = await primary_of(redis_cluster, user)
        if counts.get(owner, 0) < per_primary:
            counts[owner] = counts.get(owner, 0) + 1
            users.append(user)
    return users


async def test_each_shard_has_a_canary_a_hub_hears(redis_cluster: RedisClusterServer) -> None:
    """The deaf-node check works per shard: one canary channel on each primary, each heard back
    through the sharded subscriber."""
    client = connect(redis_cluster.url, socket_timeout_s=5, pool_size=4, pool_wait_s=5, cluster=True)
    broker = RedisBroker(client, StreamKeys(unique("canary")))
    pubsub = broker.pubsub()
    try:
        await pubsub.ping()
        channels = broker.canary_channels("hub")
        owners = {client.get_node_from_key(channel).name for channel in channels}  # type: ignore[attr-defined,union-attr]
        assert len(channels) == len(owners) == len(redis_cluster.primaries()) == 3
        await pubsub.subscribe(*channels)
        for channel in channels:
            await broker.signal(channel, "1")
        heard: set[str] = set()
        async with asyncio.timeout(10):
            while heard != set(channels):
                message = await pubsub.get_message(timeout=1)
                if message is not None and message["type"] == "message":
                    heard.add(message["channel"])
    finally:
        await pubsub.aclose()
        await client.aclose()


async def test_users_are_spread_over_the_shards_and_each_gets_only_their_own(
    cluster: LocalCluster, redis_cluster: RedisClusterServer
) -> None:
    users = await users_on_every_primary(redis_cluster, 2)
    devices = [ChorusClient(node_ws(cluster, i % 2), cluster.token(user), device="phone")
               for i, user in enumerate(users)]
    await asyncio.gather(*(device.connect() for device in devices))
    try:
        acks = await asyncio.gather(*(device.send(f"hello from {i}") for i, device in enumerate(devices)))
        for device, ack in zip(devices, acks, strict=True):
            end = await device.wait_run_end(ack["run"], 30)
            assert end["event"] == "run.completed"
            assert {e["run"] for e in device.events if e["run"]} == {ack["run"]}, "only its own runs"
            assert device.gaps == [] and device.duplicates == 0
    finally:
        await asyncio.gather(*(device.close() for device in devices))


async def test_presence_is_refreshed_on_every_shard(redis_cluster: RedisClusterServer) -> None:
    """A node's periodic refresh extends its devices' presence on whichever shard holds each user:
    redis-py's cluster pipelines refuse scripts, and the refresh once failed there every time, so
    devices dropped offline after the entries' TTL."""
    client = connect(redis_cluster.url, socket_timeout_s=5, pool_size=4, pool_wait_s=5, cluster=True)
    keys = Keys(prefix=unique("presence"))
    presences = Presences(client, keys, lambda user: f"{keys.prefix}:{{u:{user}}}:ch", node="node-a",
                          debounce_s=1)
    users = [unique(f"user{i}") for i in range(40)]  # past one batch of script calls, on every shard
    sockets = [(user, device, f"s-{user}-{device}") for user in users for device in ("phone", "laptop")]

    async def expiries() -> dict[tuple[str, str], int]:
        found = {}
        for user in users:
            for device, entry in (await client.hgetall(keys.presence(user))).items():
                found[user, device] = int(entry.rsplit("|", 1)[1])
        return found

    try:
        owners = {redis_cluster.slot_owner(client.keyslot(keys.presence(user))) for user in users}  # type: ignore[attr-defined]
        assert len(owners) == 3
        for user, device, socket in sockets:
            await presences.join(user, device, socket)
        joined = await expiries()
        await asyncio.sleep(0.01)  # the refresh's clock is past the join's, in ms
        await presences.refresh(sockets)
        refreshed = await expiries()
        assert joined.keys() == refreshed.keys() == {(user, device) for user, device, _ in sockets}
        assert all(refreshed[key] > joined[key] for key in joined), "every entry was extended"
    finally:
        await presences.close()
        await client.aclose()


async def test_publishes_go_down_a_pipe_per_primary(redis_cluster: RedisClusterServer) -> None:
    """Once redis-py has read the slot map (the first round goes through its client), concurrent
    publishes reach each user's primary down one pipelining connection to that primary, where
    redis-py's pool would take a connection per publish in flight, and those of one loop turn go
    to a primary as one call of the script, whatever their slots; every stream counts on."""
    client = connect(redis_cluster.url, socket_timeout_s=5, pool_size=8, pool_wait_s=5, cluster=True)
    broker = RedisBroker(client, StreamKeys(unique("pipes")))
    users = await users_on_every_primary(redis_cluster, 4)
    primaries = redis_cluster.primaries()

    def clients() -> dict[int, list[dict[str, str]]]:
        """Per primary, CLIENT LIST."""
        found = {}
        for port in primaries:
            with Redis(port=port, decode_responses=True) as admin:
                found[port] = admin.client_list()
        return found

    try:
        earlier = {(port, entry["id"]) for port, entries in (await asyncio.to_thread(clients)).items()
                   for entry in entries}
        # With a producer, as Chorus's publishes have: redis-py's client, reading the slot map
        # afresh on a MOVED, drops connections other calls are waiting on, and retries them.
        rounds = [await asyncio.gather(*(broker.publish(user, '{"n":1}', producer="test", pseq=pseq)
                                         for user in users)) for pseq in (1, 2, 3)]
        assert [[result.seq for result in round_] for round_ in rounds] == [[1] * 12, [2] * 12, [3] * 12]
        ours = {f"127.0.0.1:{conn.laddr.port}" for conn in psutil.Process().net_connections("tcp")}
        scripted = {port: sum((port, entry["id"]) not in earlier and entry["addr"] in ours
                              and entry["cmd"] == "evalsha" for entry in entries)
                    for port, entries in (await asyncio.to_thread(clients)).items()}
        assert scripted == dict.fromkeys(primaries, 1), "one connection per primary ran the script"

        def script_calls() -> dict[int, int]:
            """Per primary, the publish script's calls since its stats were reset."""
            calls = {}
            for port in primaries:
                with Redis(port=port, decode_responses=True) as admin:
                    stats = admin.info("commandstats")
                calls[port] = sum(stats.get(f"cmdstat_{verb}", {}).get("calls", 0) for verb in ("evalsha", "eval"))
            return calls

        for port in primaries:
            with Redis(port=port) as admin:
                admin.config_resetstat()
        # A turn's publishes to users of every slot: one call of the script per primary.
        results = await asyncio.gather(*(broker.publish(user, '{"n":1}', producer="test", pseq=4) for user in users))
        assert [result.seq for result in results] == [4] * 12
        assert await asyncio.to_thread(script_calls) == dict.fromkeys(primaries, 1)
    finally:
        await broker.aclose()
        await client.aclose()


async def test_a_full_pool_makes_commands_wait_then_fail_as_exhausted(redis_cluster: RedisClusterServer) -> None:
    """As on plain Redis (`WaitingPool`): with every connection to a node busy, a command waits for
    one, and only after `pool_wait_s` fails, with `PoolExhausted`, never a `ConnectionError` that
    would be retried as Redis being away (redis-py's cluster client refused at once)."""
    key = unique("pool")
    patient = connect(redis_cluster.url, socket_timeout_s=5, pool_size=2, pool_wait_s=5, cluster=True)
    hasty = connect(redis_cluster.url, socket_timeout_s=5, pool_size=2, pool_wait_s=0.1, cluster=True)
    try:
        # Six 0.2 s BLPOPs through two connections: three rounds, all served.
        assert await asyncio.gather(*(patient.blpop([key], timeout=0.2) for _ in range(6))) == [None] * 6
        results = await asyncio.gather(*(hasty.blpop([key], timeout=1) for _ in range(4)),
                                       return_exceptions=True)
        assert results.count(None) == 2, results  # the two that got a connection waited out their BLPOP
        assert all(isinstance(r, PoolExhausted) for r in results if r is not None), results
    finally:
        await asyncio.gather(patient.aclose(), hasty.aclose())


async def test_a_primary_killed_under_load_raises_only_transient_errors(redis_cluster: RedisClusterServer) -> None:
    """Whatever a command meets while a primary dies and its replica takes over is an error Chorus
    retries as Redis being away (`TRANSIENT`): redis-py let through uvloop's bare RuntimeError on a
    connection the node reset, an AttributeError on one closed while it connected, and "cannot be
    connected" while it read the topology again; a worker once failed a run on the first."""
    client = connect(redis_cluster.url, socket_timeout_s=5, pool_size=4, pool_wait_s=5, cluster=True)
    keys = [f"hammer:{i}" for i in range(30)]  # on every primary, more than its 4 connections
    victim = redis_cluster.slot_owner(client.keyslot(keys[0]))  # type: ignore[attr-defined]
    unexpected: list[BaseException] = []
    last_transient: dict[str, BaseException] = {}
    flagged = False  # the others flagged the victim failed: keys[0] succeeds on its replica only
    served_again = asyncio.Event()

    async def hammer(key: str) -> None:
        while not served_again.is_set():
            try:
                await client.incr(key)
                if flagged and key == keys[0]:
                    served_again.set()
            except TRANSIENT as exc:
                last_transient[key] = exc
            except Exception as exc:
                unexpected.append(exc)
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(hammer(key)) for key in keys]
    try:
        await asyncio.sleep(0.2)  # every connection in use
        redis_cluster.kill(victim)
        await asyncio.to_thread(redis_cluster.wait_marked_failed, victim)
        flagged = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(served_again.wait(), 30)
        assert unexpected == [], [repr(exc) for exc in unexpected]
        assert served_again.is_set(), f"never served again; last: {last_transient.get(keys[0])}"
    finally:
        served_again.set()
        await asyncio.gather(*tasks)
        await client.aclose()
        redis_cluster.rejoin(victim)


async def test_a_primary_killed_mid_answer_leaves_no_hole(
    cluster: LocalCluster, redis_cluster: RedisClusterServer
) -> None:
    user = unique("alice")
    token = cluster.token(user)
    phone = ChorusClient(node_ws(cluster, 0), token, device="phone")
    laptop = ChorusClient(node_ws(cluster, 1), token, device="laptop")
    await phone.connect()
    await laptop.connect()
    victim = await primary_of(redis_cluster, user)
    try:
        ack = await phone.send("[[tokens:80]] [[slow:0.05]] a long answer please")
        run = ack["run"]
        await laptop.wait_for(lambda: sum(e["event"] == "token" for e in laptop.events) >= 5, 20)
        redis_cluster.kill(victim)  # its replica is promoted within a few seconds
        await assert_answer_survived((phone, laptop), run, " ".join(f"word{i}" for i in range(1, 81)))
        assert victim not in redis_cluster.primaries()
    finally:
        await asyncio.gather(phone.close(), laptop.close())
        redis_cluster.rejoin(victim)  # it comes back as a replica


async def test_a_user_resharded_mid_answer_follows_the_slot(
    cluster: LocalCluster, redis_cluster: RedisClusterServer
) -> None:
    """The user's slot (keys, history and channel) moves to another primary while an answer streams:
    the hubs are unsubscribed by the server, subscribe again on the new owner and fill what they
    missed from the moved history; the publishes follow the slot (ASK, TRYAGAIN retried)."""
    user = unique("alice")
    token = cluster.token(user)
    phone = ChorusClient(node_ws(cluster, 0), token, device="phone")
    laptop = ChorusClient(node_ws(cluster, 1), token, device="laptop")
    await phone.connect()
    await laptop.connect()
    client = connect(redis_cluster.url, socket_timeout_s=5, pool_size=4, pool_wait_s=5, cluster=True)
    try:
        slot = client.keyslot(f"chorus:{{u:{user}}}:ch")  # type: ignore[attr-defined]
        ack = await phone.send("[[tokens:80]] [[slow:0.05]] a long answer please")
        run = ack["run"]
        await laptop.wait_for(lambda: sum(e["event"] == "token" for e in laptop.events) >= 5, 20)
        owner = redis_cluster.slot_owner(slot)
        target = next(port for port in redis_cluster.primaries() if port != owner)
        await asyncio.to_thread(redis_cluster.move_slot, slot, target)
        assert redis_cluster.slot_owner(slot) == target
        await assert_answer_survived((phone, laptop), run, " ".join(f"word{i}" for i in range(1, 81)))
        again = await laptop.send("and after the move", conversation=ack["conversation"])
        for device in (phone, laptop):
            assert (await device.wait_run_end(again["run"], 30))["event"] == "run.completed"
    finally:
        await client.aclose()
        await asyncio.gather(phone.close(), laptop.close())
