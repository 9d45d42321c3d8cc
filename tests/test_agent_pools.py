"""Agent pools: runs of an agent go only to the workers serving it (`WORKER_AGENTS`), a version's
share of runs follows its `weight` (a canary), and an agent with no live worker is refused at send
time (`agent_unavailable`) and shown unavailable by GET /v1/agents.

Pure routing and configuration first; then the Redis queue's pools; then a cluster whose two
workers serve different agents."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Iterator

import aiohttp
import pytest
from chorus_client import ChorusError
from chorus_client.testing import RecordingClient as ChorusClient
from redis.asyncio import Redis

from agent_worker.agents import AgentRegistry, agents_from_env
from common.config import SettingError
from common.keys import Keys
from fanout.redis_broker import RedisBroker
from loadtest.cluster import ClusterConfig, LocalCluster
from loadtest.procs import RedisServer
from persistence.store import Store
from runs.agents import AgentDirectory, AgentUnavailable, Route, UnknownAgent, choose, parse_pool, pool_of
from runs.lifecycle import Runs
from runs.queue import Job, MemoryRunQueue, RedisRunQueue
from tests.fake_llm import FakeLLM
from tests.support import rest, unique

VERSIONED = [{"name": "researcher", "description": "Looks things up"},
             {"name": "writer", "version": "1"}, {"name": "writer", "version": "2", "weight": 1}]


# -- routing, pure --------------------------------------------------------------------------


def test_a_version_gets_its_weights_share_of_runs() -> None:
    routes = [Route("writer", "writer@1", "1", 9.0, True), Route("writer", "writer@2", "2", 1.0, True),
              Route("other", "other", None, 1.0, True)]
    rng = random.Random(7)
    drawn = Counter(choose(routes, "writer", rng=rng).pool for _ in range(10_000))
    assert set(drawn) == {"writer@1", "writer@2"}
    assert 0.08 < drawn["writer@2"] / 10_000 < 0.12


def test_only_live_versions_with_a_weight_take_runs() -> None:
    canary_down = [Route("w", "w@1", "1", 1.0, True), Route("w", "w@2", "2", 50.0, False)]
    assert {choose(canary_down, "w").pool for _ in range(50)} == {"w@1"}
    drained = [Route("w", "w@1", "1", 0.0, True), Route("w", "w@2", "2", 1.0, True)]
    assert {choose(drained, "w").pool for _ in range(50)} == {"w@2"}
    with pytest.raises(AgentUnavailable, match="no worker is serving agent 'w'"):
        choose([Route("w", "w@1", "1", 1.0, False), Route("w", "w@2", "2", 0.0, True)], "w")
    with pytest.raises(UnknownAgent, match=r"unknown agent 'x' \(known: w\)"):
        choose(drained, "x")


@pytest.mark.parametrize(("name", "version", "pool"), [("a", None, "a"), ("a", "2", "a@2"), ("a.b-c", "v1.2", "a.b-c@v1.2")])
def test_a_pool_names_an_agent_and_its_version(name: str, version: str | None, pool: str) -> None:
    assert pool_of(name, version) == pool
    assert parse_pool(pool) == (name, version)


# -- configuration ----------------------------------------------------------------------------


def test_versions_of_one_agent_are_pools_a_worker_may_serve_apart() -> None:
    registry = AgentRegistry(agents_from_env({"AGENTS_JSON": json.dumps(VERSIONED)}))
    assert registry.pools() == ["default", "researcher", "writer@1", "writer@2"]
    assert registry.names() == ["default", "researcher", "writer"]
    assert registry.serving([]) == registry.pools()
    assert registry.serving(["writer"]) == ["writer@1", "writer@2"]
    assert registry.serving(["writer@2", "default"]) == ["writer@2", "default"]
    assert registry.spec("writer@2").weight == 1.0 and registry.spec("writer@2").version == "2"
    with pytest.raises(ValueError, match="'editor' is no agent"):
        registry.serving(["editor"])


@pytest.mark.parametrize(("entries", "error"), [
    ([{"name": "w", "version": "1"}, {"name": "w", "version": "1"}], "two agents are 'w@1'"),
    ([{"name": "w", "version": "bad version"}], "version must match"),
    ([{"name": "w", "weight": -1}], "weight must be a number"),
    ([{"name": "w", "weight": True}], "weight must be a number"),
])
def test_a_bad_version_or_weight_names_the_variable(entries: list[dict[str, object]], error: str) -> None:
    with pytest.raises(SettingError, match=error) as raised:
        agents_from_env({"AGENTS_JSON": json.dumps(entries)})
    assert "AGENTS_JSON" in str(raised.value)


def test_worker_agents_must_name_configured_agents() -> None:
    from agent_worker.__main__ import Agents
    from agent_worker.settings import WorkerSettings

    env = {"AGENTS_JSON": json.dumps(VERSIONED), "REDIS_URL": "redis://x", "DATABASE_URL": "postgresql://x"}
    settings = WorkerSettings.from_env({**env, "WORKER_AGENTS": "writer, researcher"})
    assert Agents.from_env(env, settings).pools == ("writer@1", "writer@2", "researcher")
    with pytest.raises(SettingError, match="WORKER_AGENTS: 'typo' is no agent"):
        Agents.from_env(env, WorkerSettings.from_env({**env, "WORKER_AGENTS": "typo"}))


# -- the queue's pools ------------------------------------------------------------------------


async def test_a_worker_takes_only_the_jobs_of_its_pools(redis_server: RedisServer, keys: Keys) -> None:
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        writers, researchers = RedisRunQueue(redis, keys, ["writer@1", "writer@2"]), RedisRunQueue(
            redis, keys, ["researcher"])
        await writers.create()
        await researchers.create()
        for run, pool in (("r1", "researcher"), ("w1", "writer@1"), ("w2", "writer@2"), ("w3", "writer@1")):
            await writers.enqueue(Job(run=run, user="u", conversation="c", pool=pool))
        assert (await researchers.backlog()).depth == 1 and (await writers.backlog()).depth == 3
        # COUNT is per stream: a read of 2 over two pools brings 3; the third waits for the next take.
        first = await writers.take("w", count=2, block_ms=100)
        second = await writers.take("w", count=2, block_ms=100)
        assert sorted(d.job.run for d in first + second) == ["w1", "w2", "w3"] and len(first) == 2
        taken = await researchers.take("r", count=5, block_ms=100)
        assert [(d.job.run, d.job.pool) for d in taken] == [("r1", "researcher")]
        assert await writers.holding(["r1", "w1", "nope"], ["writer@1", "researcher"]) == {"r1", "w1"}
        for delivery in first + second:
            await writers.ack(delivery)
        assert await writers.holding(["w1", "w2", "w3"], ["writer@1", "writer@2"]) == set()
        assert await writers.reclaim("w", idle_ms=0, count=5) == []
        assert [d.job.run for d in await researchers.reclaim("r2", idle_ms=0, count=5)] == ["r1"]
    finally:
        await redis.aclose()


async def test_the_memory_queue_keeps_pools_apart() -> None:
    queue = MemoryRunQueue(pools=("a",))
    await queue.enqueue(Job(run="r1", user="u", conversation="c", pool="b"))
    await queue.enqueue(Job(run="r2", user="u", conversation="c", pool="a"))
    assert [d.job.run for d in await queue.take("w", count=5, block_ms=10)] == ["r2"]
    assert await queue.take("w", count=5, block_ms=10) == []
    assert (await queue.backlog(["b"])).depth == 1


# -- a cluster whose workers serve different agents --------------------------------------------


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLM) -> Iterator[LocalCluster]:
    config = ClusterConfig(nodes=1, workers=0, nginx=False,
                           env={"LLM_BASE_URL": fake_llm.base_url, "AGENTS_JSON": json.dumps(VERSIONED)})
    with LocalCluster(tmp_path_factory.mktemp("pools"), config) as cluster:
        cluster.start_worker({"WORKER_AGENTS": "default,writer"})  # worker-1
        cluster.start_worker({"WORKER_AGENTS": "researcher"})  # worker-2
        yield cluster


async def wait_agents(http: aiohttp.ClientSession, cluster: LocalCluster, token: str,
                      available: dict[str, bool]) -> list[dict[str, object]]:
    """GET /v1/agents until each agent named in `available` is (un)available as given (bounded)."""
    for _ in range(300):
        status, body = await rest(http, f"http://127.0.0.1:{cluster.node_ports[0]}", token, "GET", "/v1/agents")
        if status == 200:
            shown = {a["name"]: a["available"] for a in body["agents"]}
            if all(shown.get(name) == want for name, want in available.items()):
                return list(body["agents"])
        await asyncio.sleep(0.1)
    raise TimeoutError(f"agents never became {available}")


def started_by(device: ChorusClient, run: str) -> str:
    [started] = [e for e in device.events if e["run"] == run and e["event"] == "run.started"]
    return str(started["data"]["worker"])


async def test_runs_go_to_the_workers_serving_their_agent(pools: LocalCluster, http: aiohttp.ClientSession) -> None:
    token = pools.token(unique("alice"))
    agents = await wait_agents(http, pools, token, {"default": True, "researcher": True, "writer": True})
    writer = next(a for a in agents if a["name"] == "writer")
    assert sorted((v["version"], v["weight"], v["live"]) for v in writer["versions"]) == [  # type: ignore[union-attr]
        ("1", 1.0, True), ("2", 1.0, True)]
    device = ChorusClient(f"ws://127.0.0.1:{pools.node_ports[0]}/ws", token, device="phone")
    await device.connect()
    try:
        for agent, worker in (("researcher", "worker-2"), ("default", "worker-1"), ("writer", "worker-1")):
            ack = await device.send(f"hello {agent}", agent=agent)
            end = await device.wait_run_end(ack["run"], 30)
            assert end["event"] == "run.completed", end
            assert started_by(device, ack["run"]) == worker, agent
            # a later message of the conversation goes to the conversation's agent's pool too
            again = await device.send("and again", conversation=ack["conversation"])
            assert (await device.wait_run_end(again["run"], 30))["event"] == "run.completed"
            assert started_by(device, again["run"]) == worker, agent
    finally:
        await device.close()


async def test_a_canarys_share_of_runs_is_recorded_on_each_run(
    pools: LocalCluster, http: aiohttp.ClientSession
) -> None:
    token = pools.token(unique("alice"))
    await wait_agents(http, pools, token, {"writer": True})
    device = ChorusClient(f"ws://127.0.0.1:{pools.node_ports[0]}/ws", token, device="phone")
    await device.connect()
    base = f"http://127.0.0.1:{pools.node_ports[0]}"
    try:
        versions = []
        for batch in range(4):  # 5 at a time: a user has at most 8 runs in flight
            acks = [await device.send(f"draft {batch}.{i}", agent="writer") for i in range(5)]
            for ack in acks:
                assert (await device.wait_run_end(ack["run"], 60))["event"] == "run.completed"
                status, run = await rest(http, base, token, "GET", f"/v1/runs/{ack['run']}")
                assert status == 200 and run["agent"] == "writer"
                versions.append(run["agent_version"])
        # Weights 1:1 over 20 runs: both versions served some (all on one: p = 2e-6).
        assert set(versions) == {"1", "2"}, versions
    finally:
        await device.close()


async def test_an_agent_with_no_live_worker_is_refused_at_send_time(
    pools: LocalCluster, http: aiohttp.ClientSession
) -> None:
    token = pools.token(unique("alice"))
    base = f"http://127.0.0.1:{pools.node_ports[0]}"
    await wait_agents(http, pools, token, {"researcher": True})
    device = ChorusClient(f"ws://127.0.0.1:{pools.node_ports[0]}/ws", token, device="phone")
    await device.connect()
    researcher = next(w for w in pools.workers if w.name == "worker-2")
    try:
        ack = await device.send("before", agent="researcher", id="send-before")
        assert (await device.wait_run_end(ack["run"], 30))["event"] == "run.completed"
        researcher.stop()  # a graceful stop removes its heartbeat at once
        agents = await wait_agents(http, pools, token, {"researcher": False, "default": True})
        assert next(a for a in agents if a["name"] == "researcher")["versions"] == [
            {"version": None, "weight": 1.0, "live": False}]

        with pytest.raises(ChorusError) as refused:
            await device.send("anyone there?", agent="researcher")
        assert refused.value.code == "agent_unavailable" and refused.value.retry_after_ms
        with pytest.raises(ChorusError) as refused_again:  # the conversation's agent, not the frame's
            await device.send("hello again", conversation=ack["conversation"])
        assert refused_again.value.code == "agent_unavailable"
        # A resend of a send already stored still gets its ack (nothing new is queued).
        resent = await device.send("before", agent="researcher", id="send-before")
        assert resent["run"] == ack["run"] and resent["seq"] == ack["seq"]
        status, body = await rest(http, base, token, "POST", f"/v1/conversations/{ack['conversation']}/messages",
                                  json={"id": unique("s"), "text": "over HTTP"})
        assert status == 503 and body["error"]["code"] == "agent_unavailable", body
        # Nothing was stored for the refused sends.
        status, listed = await rest(http, base, token, "GET", f"/v1/conversations/{ack['conversation']}/messages")
        assert [m["content"] for m in listed["messages"] if m["role"] == "user"] == ["before"]

        # Other agents are not affected, and the agent is back with its worker.
        other = await device.send("still fine")
        assert (await device.wait_run_end(other["run"], 30))["event"] == "run.completed"
        researcher.start()
        await wait_agents(http, pools, token, {"researcher": True})
        back = await device.send("back?", conversation=ack["conversation"])
        assert (await device.wait_run_end(back["run"], 30))["event"] == "run.completed"
    finally:
        if not researcher.alive:
            researcher.start()
        await device.close()


async def test_a_conversation_whose_agent_no_worker_advertises_any_more_is_unavailable(
    pools: LocalCluster,
) -> None:
    """All of an agent's workers gone longer than the directory keeps entries: its conversations'
    sends are `agent_unavailable` (it was an agent; it may come back), not an unknown agent."""
    store = await Store.connect(pools.database_url)
    redis = Redis.from_url(pools.redis_url, decode_responses=True)
    try:
        keys = Keys()
        runs = Runs(store, RedisBroker(redis, keys), RedisRunQueue(redis, keys), agents=AgentDirectory(redis, keys))
        user = unique("alice")
        gone = await store.create_conversation(user, title="old", agent="retired")
        with pytest.raises(AgentUnavailable, match="retired"):
            await runs.accept_send(user, "phone", client_id=unique("s"), text="hi", conversation=gone.id, agent=None,
                                   policy=None)
        with pytest.raises(UnknownAgent):  # a new conversation naming it: unknown
            await runs.accept_send(user, "phone", client_id=unique("s"), text="hi", conversation=None,
                                   agent="retired", policy=None)
    finally:
        await redis.aclose()
        await store.close()
