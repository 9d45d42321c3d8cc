"""Bursts bigger than the Redis pool: commands wait for a connection, never fail as an outage.

The cluster's pool is deliberately small (REDIS_POOL_SIZE=16) against WORKER_CONCURRENCY=200 and
hundreds of simultaneous connects, so every command here has to queue for a connection. Before the
pool waited, the overflow raised `MaxConnectionsError`, a `redis.ConnectionError`, which was taken
for a Redis outage: runs were "left for a retry" and devices got 1013 instead of `hello`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest
from chorus_client.testing import RecordingClient as ChorusClient
from redis.asyncio import Redis

from common.redis_client import PoolExhausted, WaitingPool
from loadtest.cluster import ClusterConfig, LocalCluster
from loadtest.procs import RedisServer
from protocol import Event
from tests.fake_llm import FakeLLM
from tests.support import unique

POOL = 16


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLM) -> Iterator[LocalCluster]:
    config = ClusterConfig(nodes=1, workers=1, nginx=False, env={
        "LLM_BASE_URL": fake_llm.base_url, "WORKER_CONCURRENCY": "200", "REDIS_POOL_SIZE": str(POOL),
    })
    with LocalCluster(tmp_path_factory.mktemp("crowded"), config) as cluster:
        yield cluster


@pytest.mark.timeout(120)
async def test_500_devices_connecting_at_once_to_one_node_all_get_hello(crowded: LocalCluster) -> None:
    url = f"ws://127.0.0.1:{crowded.node_ports[0]}/ws"
    users = [unique("crowd") for _ in range(100)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        devices = [ChorusClient(url, crowded.token(users[i % 100]), device=f"d{i}", session=session,
                                auto_reconnect=False) for i in range(500)]
        try:
            hellos = await asyncio.gather(*(d.connect(timeout_s=60) for d in devices), return_exceptions=True)
            failed = [h for h in hellos if not isinstance(h, dict)]
            assert failed == [], f"{len(failed)} devices got no hello, e.g. {failed[:3]}"
            assert all(d.close_codes == [] for d in devices)
        finally:
            await asyncio.gather(*(d.close() for d in devices), return_exceptions=True)


@pytest.mark.timeout(180)
async def test_160_concurrent_runs_on_one_worker_all_finish_at_their_first_attempt(
    crowded: LocalCluster,
) -> None:
    url = f"ws://127.0.0.1:{crowded.node_ports[0]}/ws"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        devices = [ChorusClient(url, crowded.token(unique("busy")), device="phone", session=session)
                   for _ in range(20)]
        try:
            await asyncio.gather(*(d.connect() for d in devices))
            # 8 runs per user (USER_MAX_RUNS_IN_FLIGHT), each in a conversation of its own: all at once
            acks = await asyncio.gather(*(d.send(f"[[tokens:30]] [[slow:0.02]] question {n}")
                                          for d in devices for n in range(8)))
            by_device = [acks[i * 8:(i + 1) * 8] for i in range(20)]
            for device, mine in zip(devices, by_device, strict=True):
                for ack in mine:
                    end = await device.wait_run_end(ack["run"], 120)
                    assert end["event"] == Event.RUN_COMPLETED, end
                    starts = [e for e in device.events if e["run"] == ack["run"] and e["event"] == Event.RUN_STARTED]
                    assert [s["data"]["attempt"] for s in starts] == [1], "no run was retried"
        finally:
            await asyncio.gather(*(d.close() for d in devices), return_exceptions=True)
    log = crowded.workers[0].log_text()
    assert "left for a retry" not in log and "MaxConnectionsError" not in log


async def test_a_command_waits_for_a_pooled_connection_and_a_pool_too_small_says_so(
    redis_server: RedisServer,
) -> None:
    pool = WaitingPool.from_url(redis_server.url, max_connections=2, timeout=5)
    redis = Redis(connection_pool=pool)
    try:
        # 50 commands over 2 connections: they take turns, none fails
        assert await asyncio.gather(*(redis.ping() for _ in range(50))) == [True] * 50
        held = [await pool.get_connection() for _ in range(2)]
        pool.timeout = 0.2
        with pytest.raises(PoolExhausted, match="REDIS_POOL_SIZE"):
            await redis.ping()
        for connection in held:
            await pool.release(connection)
        assert await redis.ping()
    finally:
        await redis.aclose()
        await pool.disconnect()
