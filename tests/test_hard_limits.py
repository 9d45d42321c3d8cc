"""Hard limits (issue: devices per user and runs in flight per user overshot under concurrent
attempts; REST had no rate limit).

Pure rules first (which run slots are stale), then the Lua steps against real Redis (the device
limit in presence.lua, the run slots of `runs.admission` under `Runs` with Postgres as the truth),
then node processes of this module's own with small limits: concurrent connects and sends admit
exactly the limit, and REST answers 429 with `Retry-After` past its bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from chorus_client.testing import ClientError
from chorus_client.testing import RecordingClient as ChorusClient
from redis.asyncio import Redis

from common.keys import Keys
from fanout.memory_broker import MemoryBroker
from loadtest.cluster import LocalCluster
from loadtest.procs import REPO_ROOT, Proc, RedisServer, free_port, wait_http_ok
from persistence.store import NotFound, Store
from runs import admission
from runs.lifecycle import Runs, TooManyRuns
from runs.queue import RedisRunQueue
from tests.support import rest, unique
from ws_node.presence import CLOSED, Presences

DEVICES, RUNS = 3, 2  # the limits of this module's nodes
REST_BURST = 5
LONG = "[[tokens:400]] [[slow:0.05]] a long answer"  # a run that stays in flight (20 s) until cancelled


# ---------------------------------------------------------------------------------------------
# Pure rules


@pytest.mark.parametrize(
    ("entries", "statuses", "expected"),
    [
        ({}, {}, []),
        ({"run:r1": "5"}, {"r1": "running"}, []),  # in flight: kept
        ({"run:r1": "5", "run:r2": "5", "run:r3": "5"}, {"r1": "completed", "r2": "cancelled", "r3": "failed"},
         ["run:r1", "run:r2", "run:r3"]),  # ended, whichever way
        ({"run:r1": "5"}, {}, ["run:r1"]),  # gone (its conversation deleted, rolled back)
        ({"run:r1": "5", "run:r2": "5"}, {"r1": "waiting", "r2": "paused"}, []),  # not ended either
        ({"send:a": "100000"}, {}, []),  # a send being stored now
        ({"send:a": str(100_000 - admission.PENDING_GRACE_MS)}, {}, []),  # exactly at the grace
        ({"send:a": str(100_000 - admission.PENDING_GRACE_MS - 1)}, {}, ["send:a"]),  # its sender died
        ({"send:a": "junk", "other": "1"}, {}, ["other", "send:a"]),  # unreadable: dropped
        ({"send:run:r1": "100000"}, {"r1": "completed"}, []),  # a client id that looks like a run
    ],
)
def test_stale_run_slots(entries: dict[str, str], statuses: dict[str, str], expected: list[str]) -> None:
    assert admission.stale(entries, statuses, now_ms=100_000) == expected


# ---------------------------------------------------------------------------------------------
# The device limit in presence.lua


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


def presences(redis: Redis, keys: Keys, node: str) -> Presences:
    return Presences(redis, keys, lambda user: f"{keys.prefix}:chan:{user}", node=node, debounce_s=0.1)


async def test_concurrent_joins_admit_exactly_the_limit(redis: Redis, keys: Keys) -> None:
    a, b = presences(redis, keys, "node-a"), presences(redis, keys, "node-b")
    joins = [(a if n % 2 else b).join("alice", f"d{n}", f"s{n}", max_devices=DEVICES) for n in range(DEVICES + 7)]
    results = await asyncio.gather(*joins)
    admitted = [r for r in results if r is not None]
    assert len(admitted) == DEVICES
    assert len(await redis.hgetall(keys.presence("alice"))) == DEVICES  # the refused left nothing behind
    # Another user has limits of their own.
    assert await a.join("bob", "d0", "s0", max_devices=DEVICES) is not None


async def test_a_counted_device_always_gets_in_again(redis: Redis, keys: Keys) -> None:
    node = presences(redis, keys, "node-a")
    for n in range(DEVICES):
        assert await node.join("alice", f"d{n}", f"s{n}", max_devices=DEVICES) is not None
    assert await node.join("alice", "extra", "sx", max_devices=DEVICES) is None
    # A second socket of a device already in, and the device reconnecting (to another node too).
    assert await node.join("alice", "d0", "s0-second", max_devices=DEVICES) is not None
    assert await presences(redis, keys, "node-b").join("alice", "d1", "s9", max_devices=DEVICES) is not None
    # No limit: anyone.
    assert await node.join("alice", "extra", "sx", max_devices=0) is not None


async def test_closed_and_expired_devices_do_not_count(redis: Redis, keys: Keys) -> None:
    node = presences(redis, keys, "node-a")
    for n in range(DEVICES):
        assert await node.join("alice", f"d{n}", f"s{n}", max_devices=DEVICES) is not None
    await node.closed("alice", "d0", "s0")  # within its debounce: online, but no socket open
    assert await node.join("alice", "new", "s-new", max_devices=DEVICES) is not None
    assert await node.join("alice", "newer", "s-newer", max_devices=DEVICES) is None
    # An entry of a node that died, past its expiry.
    expired = int(time.time() * 1000) - 1
    await redis.hset(keys.presence("alice"), "d1", f"dead-node|s1|{expired}")
    assert await node.join("alice", "newer", "s-newer", max_devices=DEVICES) is not None
    await node.close()
    assert CLOSED == "-"  # the mark presence.lua's count skips


# ---------------------------------------------------------------------------------------------
# Run slots: Runs against real Postgres (the truth) and Redis (the slots)


@pytest.fixture
async def store(cluster: LocalCluster) -> AsyncIterator[Store]:
    store = await Store.connect(cluster.database_url, max_size=20)
    yield store
    await store.close()


@pytest.fixture
async def runs(store: Store, redis: Redis, keys: Keys) -> Runs:
    queue = RedisRunQueue(redis, keys, ["default"])
    await queue.create()
    return Runs(store, MemoryBroker(), queue, store_retry_s=5, max_in_flight=RUNS)


async def send(runs: Runs, user: str, client_id: str, conversation: str | None = None) -> str:
    record, _ = await runs.accept_send(user, "phone", client_id=client_id, text="hi", conversation=conversation,
                                       agent=None, policy=None)
    return record.run


async def slots(redis: Redis, keys: Keys, user: str) -> set[str]:
    return {str(name) for name in await redis.hkeys(keys.run_slots(user))}


async def test_concurrent_sends_admit_exactly_the_limit(runs: Runs, redis: Redis, keys: Keys) -> None:
    user = unique("alice")
    results = await asyncio.gather(*(send(runs, user, f"c{n}") for n in range(RUNS + 8)), return_exceptions=True)
    started = [r for r in results if isinstance(r, str)]
    assert len(started) == RUNS
    assert all(isinstance(r, TooManyRuns) for r in results if not isinstance(r, str)), results
    assert await slots(redis, keys, user) == {f"run:{run}" for run in started}
    # A run's end frees its slot, wherever it ends (here: cancelled while queued, through Runs.end).
    await runs.cancel(user, started[0], by="phone")
    assert await slots(redis, keys, user) == {f"run:{started[1]}"}
    assert await send(runs, user, "after-cancel")


async def test_a_lost_release_is_reconciled_against_postgres(runs: Runs, store: Store, redis: Redis,
                                                              keys: Keys) -> None:
    user = unique("alice")
    first, second = await send(runs, user, "c1"), await send(runs, user, "c2")
    with pytest.raises(TooManyRuns):
        await send(runs, user, "c3")
    # The run ends in Postgres, but its release never happens (its process died in between).
    assert await store.cancel_queued_run(user, first) is not None
    third = await send(runs, user, "c3")
    assert await slots(redis, keys, user) == {f"run:{second}", f"run:{third}"}
    # A reservation left by a send whose process died is dropped once stale; a fresh one is not.
    await runs.cancel(user, third, by="phone")
    stale_ms = int(time.time() * 1000) - admission.PENDING_GRACE_MS - 5_000
    await redis.hset(keys.run_slots(user), "send:died", stale_ms)
    await redis.hset(keys.run_slots(user), "send:in-progress", int(time.time() * 1000))
    with pytest.raises(TooManyRuns):
        await send(runs, user, "c4")
    assert "send:died" not in await slots(redis, keys, user)
    await redis.hdel(keys.run_slots(user), "send:in-progress")
    assert await send(runs, user, "c4")


async def test_a_retry_of_a_stored_send_is_never_refused(runs: Runs, redis: Redis, keys: Keys) -> None:
    user = unique("alice")
    first = await send(runs, user, "c1")
    await send(runs, user, "c2")
    assert await send(runs, user, "c1") == first  # at the limit: the same run again, nothing new
    assert len(await slots(redis, keys, user)) == RUNS
    # A retry of a send whose run has ended takes no slot either.
    await runs.cancel(user, first, by="phone")
    assert await send(runs, user, "c1") == first
    assert len(await slots(redis, keys, user)) == RUNS - 1


async def test_a_send_that_fails_gives_its_slot_back(runs: Runs, redis: Redis, keys: Keys) -> None:
    user = unique("alice")
    await send(runs, user, "c1")
    with pytest.raises(NotFound):
        await send(runs, user, "c2", conversation="c_nobody_has_this")
    assert len(await slots(redis, keys, user)) == 1
    assert await send(runs, user, "c3")


# ---------------------------------------------------------------------------------------------
# Nodes of this module's own, with small limits


def start_node(cluster: LocalCluster, workdir: Path, name: str, env: dict[str, str]) -> tuple[Proc, int]:
    port = free_port()
    node = Proc(name, [sys.executable, "-m", "ws_node"], workdir=workdir, env={
        "REDIS_URL": cluster.redis_url, "DATABASE_URL": cluster.database_url, "PORT": str(port),
        "NODE_ID": name, "HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT),
        "AUTH_JWT_SECRET": cluster.config.jwt_secret, "CHORUS_DEV": "1", "USER_MAX_DEVICES": str(DEVICES),
        "USER_MAX_RUNS_IN_FLIGHT": str(RUNS), "USER_REST_PER_SECOND": "0.5", "USER_REST_BURST": str(REST_BURST),
        **env,
    })
    node.start()
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/readyz", 30, proc=node)
    except BaseException:
        node.stop()
        raise
    return node, port


@pytest.fixture(scope="module")
def limited(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    """Two nodes sharing the cluster's Redis and Postgres (and its worker): their ports."""
    nodes = [start_node(cluster, tmp_path_factory.mktemp(name), name, {}) for name in ("limited-a", "limited-b")]
    yield [port for _, port in nodes]
    for proc, _ in nodes:
        proc.stop()


async def test_concurrent_connects_across_nodes_admit_exactly_the_limit(
    cluster: LocalCluster, limited: list[int], http: aiohttp.ClientSession
) -> None:
    token = cluster.token(unique("alice"))
    urls = [f"ws://127.0.0.1:{limited[n % 2]}/ws?access_token={token}&device=d{n}" for n in range(DEVICES + 7)]
    # Every socket stays open until all have their answer: the hellos are devices online together.
    results: list[str | int | None] = []
    async with contextlib.AsyncExitStack() as stack:
        async def connect(url: str) -> None:
            ws = await stack.enter_async_context(http.ws_connect(url))
            async with asyncio.timeout(10):
                msg = await ws.receive()
            results.append(msg.json()["type"] if msg.type is aiohttp.WSMsgType.TEXT else ws.close_code)

        await asyncio.gather(*(connect(url) for url in urls))
        assert sorted(results, key=str) == sorted(["hello"] * DEVICES + [4029] * 7, key=str)


async def test_concurrent_sends_over_sockets_admit_exactly_the_limit(cluster: LocalCluster,
                                                                      limited: list[int]) -> None:
    token = cluster.token(unique("alice"))
    phone = ChorusClient(f"ws://127.0.0.1:{limited[0]}/ws", token, device="phone", auto_reconnect=False)
    laptop = ChorusClient(f"ws://127.0.0.1:{limited[1]}/ws", token, device="laptop", auto_reconnect=False)
    await phone.connect()
    await laptop.connect()
    try:
        sends = [(phone if n % 2 else laptop).send(LONG, id=f"s{n}") for n in range(RUNS + 6)]
        results = await asyncio.gather(*sends, return_exceptions=True)
        acks = [r for r in results if isinstance(r, dict)]
        refused = [r for r in results if isinstance(r, ClientError)]
        assert len(acks) == RUNS and len(refused) == 6, results
        assert {r.code for r in refused} == {"rate_limited"}
        for ack in acks:
            await phone.cancel(ack["run"])
        for ack in acks:
            assert (await phone.wait_run_end(ack["run"]))["event"] == "run.cancelled"
        assert (await phone.send("a short one", id="after"))["type"] == "ack"  # the slots were freed
    finally:
        await phone.close()
        await laptop.close()


async def test_rest_is_rate_limited_per_user(cluster: LocalCluster, limited: list[int],
                                             http: aiohttp.ClientSession) -> None:
    token, base = cluster.token(unique("alice")), [f"http://127.0.0.1:{port}" for port in limited]
    # The bucket is the user's across nodes: the burst is spent on both, then 429.
    statuses = [(await rest(http, base[n % 2], token, "GET", "/v1/conversations"))[0] for n in range(REST_BURST)]
    assert statuses == [200] * REST_BURST
    async with http.get(f"{base[1]}/v1/runs/r_none", headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 429
        assert 1 <= int(response.headers["Retry-After"]) <= 2  # a token every 2 s
        assert (await response.json())["error"]["code"] == "rate_limited"
    # Another user is not affected; without a valid token nothing is counted (401 as before).
    assert (await rest(http, base[0], cluster.token(unique("bob")), "GET", "/v1/presence"))[0] == 200
    assert (await rest(http, base[0], "not-a-token", "GET", "/v1/presence"))[0] == 401


async def test_the_rest_limit_fails_open_when_redis_is_away(cluster: LocalCluster, fresh_redis: RedisServer,
                                                            tmp_path: Path, http: aiohttp.ClientSession) -> None:
    proc, port = await asyncio.to_thread(start_node, cluster, tmp_path, "redisless-rest",
                                         {"REDIS_URL": fresh_redis.url})
    try:
        await asyncio.to_thread(fresh_redis.stop)
        token = cluster.token(unique("alice"))
        for _ in range(REST_BURST + 2):  # past the burst: nothing counts, Postgres answers
            status, _ = await rest(http, f"http://127.0.0.1:{port}", token, "GET", "/v1/conversations")
            assert status == 200
    finally:
        await asyncio.to_thread(proc.stop)
