"""Chorus on a Redis primary found through Sentinels (`REDIS_SENTINELS`, `REDIS_SENTINEL_MASTER`):
one primary, one replica and three Sentinels of Debian's redis-server, started here. Two devices
on two nodes follow an answer while the primary is SIGKILLed mid-answer: the Sentinels promote the
replica, the nodes' hubs and the worker follow it, and the answer completes on both devices, shown
once, with any lost acknowledged write surfacing as a resync, never as a silent hole."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from chorus_client.testing import RecordingClient as ChorusClient

from loadtest.cluster import ClusterConfig, LocalCluster
from loadtest.procs import RedisSentinelServers
from tests.fake_llm import FakeLLM
from tests.support import assert_answer_survived, node_ws, unique


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinelServers]:
    servers = RedisSentinelServers(tmp_path_factory.mktemp("redis-sentinel"))
    servers.start()
    yield servers
    servers.stop()


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLM,
            sentinels: RedisSentinelServers) -> Iterator[LocalCluster]:
    config = ClusterConfig(nodes=2, workers=1, nginx=False, redis_url=sentinels.url, env={
        "REDIS_SENTINELS": sentinels.sentinels, "REDIS_SENTINEL_MASTER": sentinels.master,
        "LLM_BASE_URL": fake_llm.base_url})
    with LocalCluster(tmp_path_factory.mktemp("on-sentinel"), config) as running:
        yield running


async def test_an_answer_survives_a_sentinel_failover(watched: LocalCluster, sentinels: RedisSentinelServers) -> None:
    token = watched.token(unique("alice"))
    phone = ChorusClient(node_ws(watched, 0), token, device="phone")
    laptop = ChorusClient(node_ws(watched, 1), token, device="laptop")
    await phone.connect()
    await laptop.connect()
    old = sentinels.primary_port()
    try:
        ack = await phone.send("[[tokens:80]] [[slow:0.05]] a long answer please")
        run = ack["run"]
        await laptop.wait_for(lambda: sum(e["event"] == "token" for e in laptop.events) >= 5, 20)
        sentinels.kill(old)
        await assert_answer_survived((phone, laptop), run, " ".join(f"word{i}" for i in range(1, 81)))
        assert sentinels.primary_port() != old, "the replica was promoted"
        # Both nodes serve on the new primary: a new answer reaches both devices.
        again = await laptop.send("and again", conversation=ack["conversation"])
        for device in (phone, laptop):
            assert (await device.wait_run_end(again["run"], 30))["event"] == "run.completed"
    finally:
        await asyncio.gather(phone.close(), laptop.close())
        sentinels.start_node(old)  # the Sentinels make it a replica of the new primary
