"""Nothing lost, nothing doubled, through infrastructure faults (issue 3).

One rig per module: a Redis and a Postgres of its own, two `ws_node`s and one `agent_worker` as real
processes, every one of them reaching Redis and Postgres through a `FaultProxy` of its own kind
(one Redis proxy per node, so a single node can be made deaf). Devices are reference clients
connected to the nodes directly. Each test breaks something while an answer streams, heals it,
and checks the invariants:

  * per device: seqs in order with no gap and no duplicate (or an explicit `resync`);
  * the tokens a device saw concatenate to the stored assistant message (REST);
  * every acked send ends `run.completed`, `run.cancelled` or `run.failed`;
  * every device ends with the same transcript;
  * no process was restarted to recover.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from chorus_client.testing import ClientError
from chorus_client.testing import RecordingClient as ChorusClient

from loadtest.cluster import ClusterConfig, LocalCluster
from loadtest.procs import PostgresServer, RedisServer
from tests.fake_llm import FakeLLM
from tests.faultproxy import ConnectionInfo, FaultProxy
from tests.support import comparable_without_conversation, tokens, unique

# Where a failure below points: bugs these tests found before, named in their messages.
CATCH_UP_HINT = (
    "Look at ws_node/connection.py Connection._catch_up: after the hub's resume() it must retry a "
    "TRANSIENT error until the stream is live again (it once gave up on the first, and the device "
    "stayed parked for good) and close the socket (1011) on any other, so the device resumes."
)
RST_HINT = (
    "Under uvloop, redis-py's first command on a pooled connection that was reset raises a bare "
    "RuntimeError ('unable to perform operation on <TCPTransport closed=True ...>; the handler is "
    "closed'); common.redis_client must retry it once on a fresh connection (or, on a cluster, "
    "report it as a ConnectionError), else a node answers `internal`, or a worker fails the run."
)


@dataclass
class Rig:
    cluster: LocalCluster
    redis: RedisServer
    postgres: PostgresServer
    node_redis: list[FaultProxy]  # one per node: node i -> Redis
    node_pg: FaultProxy  # nodes -> Postgres
    worker_redis: FaultProxy
    worker_pg: FaultProxy

    @property
    def proxies(self) -> list[FaultProxy]:
        return [*self.node_redis, self.node_pg, self.worker_redis, self.worker_pg]

    @property
    def redis_proxies(self) -> list[FaultProxy]:
        return [*self.node_redis, self.worker_redis]

    @property
    def pg_proxies(self) -> list[FaultProxy]:
        return [self.node_pg, self.worker_pg]

    def ws(self, node: int) -> str:
        return f"ws://127.0.0.1:{self.cluster.node_ports[node]}/ws"

    def http(self, node: int, path: str) -> str:
        return f"http://127.0.0.1:{self.cluster.node_ports[node]}{path}"

    def pids(self) -> list[int]:
        procs = [*self.cluster.nodes, *self.cluster.workers]
        assert all(p.alive for p in procs), f"a process died: {procs}"
        return [p.pid for p in procs]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLM) -> Iterator[Rig]:
    workdir: Path = tmp_path_factory.mktemp("faults")
    redis_server, postgres = RedisServer(workdir), PostgresServer(workdir)
    proxies: list[FaultProxy] = []

    def proxy(port: int) -> FaultProxy:
        proxies.append(FaultProxy(port).start())
        return proxies[-1]

    try:
        node_redis = [proxy(redis_server.port), proxy(redis_server.port)]
        node_pg, worker_pg = proxy(postgres.port), proxy(postgres.port)
        worker_redis = proxy(redis_server.port)
        config = ClusterConfig(
            nodes=2, workers=1, nginx=False,
            redis_url=worker_redis.url("redis", "/0"),
            database_url=worker_pg.url("postgresql", "/chorus", user="postgres"),
            env={"LLM_BASE_URL": fake_llm.base_url, "LLM_API_KEY": "test-key"},
        )  # fmt: skip
        cluster = LocalCluster(workdir, config)
        for node, node_proxy in zip(cluster.nodes, node_redis, strict=True):
            node.env["REDIS_URL"] = node_proxy.url("redis", "/0")
            node.env["DATABASE_URL"] = node_pg.url("postgresql", "/chorus", user="postgres")
        redis_server.start()
        postgres.start()
        with cluster:
            yield Rig(cluster, redis_server, postgres, node_redis, node_pg, worker_redis, worker_pg)
    finally:
        postgres.stop()
        redis_server.stop()
        for running in proxies:
            running.stop()


@pytest.fixture(autouse=True)
async def healthy(rig: Rig, http: aiohttp.ClientSession) -> AsyncIterator[None]:
    """Each test starts, and leaves, with every path healed and both nodes ready."""
    await restore(rig, http)
    yield
    await restore(rig, http)


async def restore(rig: Rig, http: aiohttp.ClientSession) -> None:
    for proxy in rig.proxies:
        proxy.heal()
        proxy.reset(lambda c: c.silenced)  # a deaf connection is never trusted again
    if not rig.redis.proc.alive:
        await asyncio.to_thread(rig.redis.start)
    if not rig.postgres.proc.alive:
        await asyncio.to_thread(rig.postgres.start)
    for node in range(len(rig.cluster.nodes)):
        await wait_ready(rig, http, node, True, 30)


# Observation helpers


async def readyz(rig: Rig, http: aiohttp.ClientSession, node: int) -> tuple[int, dict[str, Any]]:
    async with http.get(rig.http(node, "/readyz"), timeout=aiohttp.ClientTimeout(total=10)) as response:
        return response.status, await response.json()


async def wait_ready(rig: Rig, http: aiohttp.ClientSession, node: int, ready: bool, timeout_s: float,
                     **checks: bool) -> dict[str, Any]:
    """Poll /readyz until it is 200 (`ready`) or 503, with `checks` (e.g. pubsub=False) in its body."""
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while True:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            status, body = await readyz(rig, http, node)
            if status == (200 if ready else 503) and all(body.get(k) == v for k, v in checks.items()):
                return body
        if time.monotonic() >= deadline:
            state = "ready" if ready else "not ready"
            raise AssertionError(f"node {node} not {state} {checks} within {timeout_s}s; /readyz said {body}")
        await asyncio.sleep(0.05)


async def time_until_not_ready(rig: Rig, http: aiohttp.ClientSession, node: int, timeout_s: float,
                               **checks: bool) -> float:
    """Seconds until /readyz first answers 503 with `checks`, counting probes that hang."""
    started = time.monotonic()
    await wait_ready(rig, http, node, False, timeout_s, **checks)
    return time.monotonic() - started


async def messages(rig: Rig, http: aiohttp.ClientSession, token: str, conversation: str,
                   node: int = 0) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"}
    url = rig.http(node, f"/v1/conversations/{conversation}/messages?limit=200")
    async with http.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    return body["messages"]  # type: ignore[no-any-return]


def saw(client: ChorusClient, kind: str) -> Callable[[], bool]:
    return lambda: any(f["type"] == kind for f in client.frames)


def words(n: int) -> str:
    return " ".join(f"word{i}" for i in range(1, n + 1))


async def wait_end(device: ChorusClient, run: str, timeout_s: float, hint: str = "") -> dict[str, Any]:
    """The run's end event on `device`, or an AssertionError saying where the device's stream stopped."""
    try:
        return await device.wait_run_end(run, timeout_s)
    except TimeoutError:
        last = device.events[-1] if device.events else None
        where = f"seq {last['seq']} ({last['event']})" if last else "no event"
        raise AssertionError(
            f"{device.device}: run {run} did not end within {timeout_s}s; its stream stopped at {where} "
            f"after {tokens(device, run)} tokens. {hint}"
        ) from None


def events_after(client: ChorusClient, frame: dict[str, Any]) -> list[dict[str, Any]]:
    """The event frames `client` received after `frame` (e.g. its resync)."""
    index = next(i for i, f in enumerate(client.frames) if f is frame)
    return [f for f in client.frames[index + 1 :] if f["type"] == "event"]


def assert_gapless(client: ChorusClient, start: int) -> None:
    assert client.gaps == [], f"{client.device} saw gaps {client.gaps}"
    assert client.duplicates == 0, f"{client.device} got {client.duplicates} duplicate events"
    assert client.seqs() == list(range(start + 1, start + 1 + len(client.events))), client.device


async def assert_run_stored(rig: Rig, http: aiohttp.ClientSession, token: str, ack: dict[str, Any],
                            devices: list[ChorusClient], answer: str) -> None:
    """The run ended completed on every device, its tokens are the answer, and the answer is stored
    exactly once as the run's assistant message."""
    run = ack["run"]
    stored = [m for m in await messages(rig, http, token, ack["conversation"]) if m["run"] == run]
    assert [m["role"] for m in stored] == ["user", "assistant"], stored
    assert stored[1]["content"] == answer
    for device in devices:
        end = device.run_end(run)
        assert end is not None and end["event"] == "run.completed", (device.device, end)
        assert end["data"]["message"] == stored[1]["id"]
        started = [e for e in device.events if e["run"] == run and e["event"] == "run.started"]
        assert len(started) == 1, f"{device.device}: the run was started {len(started)} times"
        assert device.run_text(run) == answer, f"{device.device}: streamed tokens differ from the answer"


async def open_devices(rig: Rig, user: str) -> tuple[str, ChorusClient, ChorusClient, int]:
    """A phone on node 0 and a laptop on node 1, both at the user's current seq."""
    token = rig.cluster.token(user)
    phone = ChorusClient(rig.ws(0), token, device="phone")
    laptop = ChorusClient(rig.ws(1), token, device="laptop")
    first, second = await phone.connect(), await laptop.connect()
    assert first["seq"] == second["seq"]
    return token, phone, laptop, first["seq"]


async def close_all(*clients: ChorusClient) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def redis_shutdown_save(server: RedisServer) -> None:
    """Stop Redis the way a graceful restart does: SHUTDOWN SAVE writes the dataset and exits in one
    step, so no write can land between the snapshot and the exit (as it can with SAVE + SIGTERM)."""
    with contextlib.suppress(redis.ConnectionError):
        redis.Redis(port=server.port, socket_timeout=30).shutdown(save=True)
    server.proc.wait(15)


# a. Redis restarted mid-answer, with its data


async def test_redis_restart_with_data_mid_answer_loses_and_doubles_nothing(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    pids = rig.pids()
    token, phone, laptop, start = await open_devices(rig, unique("alice"))
    try:
        ack = await phone.send("[[tokens:80]] [[slow:0.03]] a long answer")
        run = ack["run"]
        await laptop.wait_for(lambda: tokens(laptop, run) >= 5, 20)
        await asyncio.to_thread(redis_shutdown_save, rig.redis)
        assert laptop.run_end(run) is None, "Redis must go away mid-answer"
        for node in (0, 1):  # not ready while Redis is away; the worker holds its publishes meanwhile
            await wait_ready(rig, http, node, False, 10, redis=False, pubsub=False)
        await asyncio.to_thread(rig.redis.start)
        for device in (phone, laptop):
            await wait_end(device, run, 20, CATCH_UP_HINT)
        after = await laptop.send("[[tokens:5]] and after the restart", conversation=ack["conversation"])
        for device in (phone, laptop):
            await wait_end(device, after["run"], 20, CATCH_UP_HINT)

        await assert_run_stored(rig, http, token, ack, [phone, laptop], words(80))
        await assert_run_stored(rig, http, token, after, [phone, laptop], words(5))
        assert_gapless(phone, start)
        assert_gapless(laptop, start)
        assert comparable_without_conversation(phone.events) == comparable_without_conversation(laptop.events)
        assert not [f for f in phone.frames + laptop.frames if f["type"] == "resync"], "same epoch: no resync"
        assert phone.connects == laptop.connects == 1, "sockets survive a Redis restart"
        assert rig.pids() == pids
    finally:
        await close_all(phone, laptop)


# b. Redis restarted mid-answer, without its data


async def test_redis_restart_without_data_resyncs_devices_and_rest_has_the_whole_answer(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    pids = rig.pids()
    token, phone, laptop, _ = await open_devices(rig, unique("alice"))
    old_epoch = phone.epoch
    try:
        ack = await phone.send("[[tokens:100]] [[slow:0.03]] a long answer")
        run, conversation = ack["run"], ack["conversation"]
        await laptop.wait_for(lambda: tokens(laptop, run) >= 5, 20)
        await asyncio.to_thread(rig.redis.stop)
        assert laptop.run_end(run) is None, "Redis must go away mid-answer"
        for node in (0, 1):
            await wait_ready(rig, http, node, False, 10, redis=False, pubsub=False)
        await asyncio.to_thread(rig.redis.restart, keep_data=False)
        for node in (0, 1):
            await wait_ready(rig, http, node, True, 15)

        resyncs: dict[str, dict[str, Any]] = {}
        for device in (phone, laptop):
            try:
                await device.wait_for(saw(device, "resync"), 15)
            except TimeoutError:
                raise AssertionError(f"{device.device} got no resync within 15s. {CATCH_UP_HINT}") from None
            [resync] = [f for f in device.frames if f["type"] == "resync"]
            assert resync["reason"] == "epoch_changed", resync
            assert resync["epoch"] != old_epoch and device.epoch == resync["epoch"]
            resyncs[device.device or ""] = resync
        assert resyncs["phone"]["epoch"] == resyncs["laptop"]["epoch"]

        # The run goes on in the new epoch and ends; REST has the whole answer, stored once.
        deadline = time.monotonic() + 30
        while not [m for m in await messages(rig, http, token, conversation) if m["role"] == "assistant"]:
            assert time.monotonic() < deadline, "the run never stored its answer after Redis lost its data"
            await asyncio.sleep(0.2)
        stored = await messages(rig, http, token, conversation)
        assert [(m["role"], m["run"]) for m in stored] == [("user", run), ("assistant", run)]
        assert stored[1]["content"] == words(100)

        # Live again: a new turn reaches both devices, gapless after their resyncs, identically.
        after = await laptop.send("[[tokens:5]] after the loss", conversation=conversation)
        for device in (phone, laptop):
            await wait_end(device, after["run"], 20, CATCH_UP_HINT)
            resync = resyncs[device.device or ""]
            later = [e["seq"] for e in events_after(device, resync)]
            assert later == list(range(resync["seq"] + 1, resync["seq"] + 1 + len(later))), device.device
            assert device.duplicates == 0
            end = device.run_end(run)  # if the end came live (after the resync), it carries the answer
            assert end is None or end["data"]["text"] == words(100)
        floor = max(r["seq"] for r in resyncs.values())
        tails = [[e for e in events_after(d, resyncs[d.device or ""]) if e["seq"] > floor]
                 for d in (phone, laptop)]
        assert tails[0] and comparable_without_conversation(tails[0]) == comparable_without_conversation(tails[1])
        await assert_run_stored(rig, http, token, after, [phone, laptop], words(5))
        assert rig.pids() == pids
    finally:
        await close_all(phone, laptop)


# c. Network faults between the services and Redis/Postgres


async def test_latency_on_every_path_slows_things_but_breaks_nothing(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    for proxy in rig.proxies:
        proxy.latency(25)  # 50 ms round trips to Redis and Postgres, for nodes and worker alike
    token, phone, laptop, start = await open_devices(rig, unique("alice"))
    try:
        started = time.monotonic()
        ack = await phone.send("[[tokens:40]] [[slow:0.02]] over a slow network", timeout_s=20)
        # A send is a dozen round trips (Postgres transaction, publish, enqueue, seq): the delay is real.
        assert time.monotonic() - started >= 0.3
        for device in (phone, laptop):
            await wait_end(device, ack["run"], 30)
        await assert_run_stored(rig, http, token, ack, [phone, laptop], words(40))
        assert_gapless(phone, start)
        assert_gapless(laptop, start)
        assert comparable_without_conversation(phone.events) == comparable_without_conversation(laptop.events)
    finally:
        await close_all(phone, laptop)


async def test_redis_blackhole_fails_new_work_cleanly_and_heals_without_restarts(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    pids = rig.pids()
    token, phone, laptop, start = await open_devices(rig, unique("alice"))
    try:
        ack = await phone.send("[[tokens:80]] [[slow:0.03]] a long answer")
        run, conversation = ack["run"], ack["conversation"]
        await laptop.wait_for(lambda: tokens(laptop, run) >= 5, 20)
        for proxy in rig.redis_proxies:
            proxy.blackhole()
        blackholed_at = time.monotonic()
        assert laptop.run_end(run) is None, "the blackhole must begin mid-answer"
        await wait_ready(rig, http, 0, False, 6, redis=False)

        # A device connecting now is told to come back later (1013), within the node's Redis timeouts.
        url = f"{rig.ws(0)}?access_token={token}&device=tablet"
        async with http.ws_connect(url) as ws:
            closing = await ws.receive(timeout=15)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), closing
            assert ws.close_code == 1013, (ws.close_code, closing)
        assert time.monotonic() - blackholed_at < 12

        # A send now cannot be acked (it needs Redis to publish and queue); it must not be lost either.
        during = asyncio.create_task(
            laptop.send("[[tokens:5]] sent into the blackhole", conversation=conversation, id="bh-1",
                        timeout_s=40))
        done, _ = await asyncio.wait({during}, timeout=1.0)
        assert not done, f"acked while Redis was unreachable: {during.result()}"
        for proxy in rig.redis_proxies:
            proxy.heal()
        second = await during  # the node's publish retries carry it through once Redis is reachable
        for device in (phone, laptop):
            await wait_end(device, run, 30, CATCH_UP_HINT)
            await wait_end(device, second["run"], 30, CATCH_UP_HINT)
        await assert_run_stored(rig, http, token, ack, [phone, laptop], words(80))
        await assert_run_stored(rig, http, token, second, [phone, laptop], words(5))
        assert_gapless(phone, start)
        assert_gapless(laptop, start)
        assert comparable_without_conversation(phone.events) == comparable_without_conversation(laptop.events)
        for node in (0, 1):
            await wait_ready(rig, http, node, True, 15)
        assert rig.pids() == pids
    finally:
        await close_all(phone, laptop)


async def test_postgres_blackhole_gives_unavailable_in_bounded_time_then_heals(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    pids = rig.pids()
    token, phone, laptop, start = await open_devices(rig, unique("alice"))
    try:
        # Long enough to stream through the whole blackhole (~11 s) and end after it.
        ack = await phone.send("[[tokens:250]] [[slow:0.06]] a very long answer")
        run, conversation = ack["run"], ack["conversation"]
        await laptop.wait_for(lambda: tokens(laptop, run) >= 3, 20)
        for proxy in rig.pg_proxies:
            proxy.blackhole()
        probe = asyncio.create_task(time_until_not_ready(rig, http, 1, 20, postgres=False))

        # Tokens keep reaching the devices: streaming needs Redis only.
        seen = tokens(laptop, run)
        await laptop.wait_for(lambda: tokens(laptop, run) >= seen + 10, 10)

        # A send fails with `unavailable` once the store's command timeout (10 s) runs out: no hang, no ack.
        started = time.monotonic()
        with pytest.raises(ClientError) as refused:
            await laptop.send("[[tokens:5]] while postgres is unreachable", conversation=conversation,
                              id="pg-bh-1", timeout_s=25)
        assert refused.value.code == "unavailable", refused.value.frame
        assert time.monotonic() - started < 15
        for proxy in rig.pg_proxies:
            proxy.heal()

        # The client retries with the same id: acked once, answered once.
        second = await laptop.send("[[tokens:5]] while postgres is unreachable", conversation=conversation,
                                   id="pg-bh-1", timeout_s=20)
        for device in (phone, laptop):
            await wait_end(device, run, 30)
            await wait_end(device, second["run"], 30)
        await assert_run_stored(rig, http, token, ack, [phone, laptop], words(250))
        await assert_run_stored(rig, http, token, second, [phone, laptop], words(5))
        stored = await messages(rig, http, token, conversation)
        assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"], stored
        assert_gapless(phone, start)
        assert_gapless(laptop, start)
        assert comparable_without_conversation(phone.events) == comparable_without_conversation(laptop.events)
        assert rig.pids() == pids
        not_ready_after_s = await probe
        assert not_ready_after_s < 5, (
            f"/readyz took {not_ready_after_s:.1f}s to report postgres: false (budget: 2 s per check). "
            "ws_node/app.py readyz awaits asyncio.wait_for(store.ping(), 2), and cancelling an asyncpg "
            "query on a dead path blocks until the store's 10 s command timeout."
        )
    finally:
        await close_all(phone, laptop)


# d. Postgres unavailable


async def test_postgres_down_mid_answer_streams_on_sends_fail_cleanly_and_all_recovers(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    pids = rig.pids()
    token, phone, laptop, start = await open_devices(rig, unique("alice"))
    try:
        ack = await phone.send("[[tokens:160]] [[slow:0.05]] a long answer")
        run, conversation = ack["run"], ack["conversation"]
        await laptop.wait_for(lambda: tokens(laptop, run) >= 3, 20)
        await asyncio.to_thread(rig.postgres.stop)
        for node in (0, 1):
            await wait_ready(rig, http, node, False, 6, postgres=False)

        seen = tokens(phone, run)
        await phone.wait_for(lambda: tokens(phone, run) >= seen + 10, 10)  # the stream flows on

        started = time.monotonic()
        with pytest.raises(ClientError) as refused:
            await laptop.send("[[tokens:5]] while postgres is down", conversation=conversation,
                              id="pg-down-1", timeout_s=15)
        assert refused.value.code == "unavailable", refused.value.frame
        assert time.monotonic() - started < 5, "a refused connection should fail fast"
        assert phone.run_end(run) is None, "the run should still be streaming (else this test is too slow)"

        await asyncio.to_thread(rig.postgres.start)
        for node in (0, 1):
            await wait_ready(rig, http, node, True, 15)
        second = await laptop.send("[[tokens:5]] while postgres is down", conversation=conversation,
                                   id="pg-down-1")
        for device in (phone, laptop):
            await wait_end(device, run, 30)
            await wait_end(device, second["run"], 30)
        await assert_run_stored(rig, http, token, ack, [phone, laptop], words(160))
        await assert_run_stored(rig, http, token, second, [phone, laptop], words(5))
        stored = await messages(rig, http, token, conversation)
        assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"], stored
        assert_gapless(phone, start)
        assert_gapless(laptop, start)
        assert comparable_without_conversation(phone.events) == comparable_without_conversation(laptop.events)
        assert rig.pids() == pids
    finally:
        await close_all(phone, laptop)


async def test_run_finishing_while_postgres_is_down_ends_once_when_it_returns(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    pids = rig.pids()
    token, phone, laptop, start = await open_devices(rig, unique("alice"))
    try:
        ack = await phone.send("[[tokens:30]] [[slow:0.03]] a short answer")
        run = ack["run"]
        await laptop.wait_for(lambda: tokens(laptop, run) >= 3, 20)
        await asyncio.to_thread(rig.postgres.stop)
        # The model finishes while Postgres is down: every token reaches the devices...
        await laptop.wait_for(lambda: laptop.run_text(run) == words(30), 15)
        outage_s = 2.0  # ...and Postgres stays away a little longer: this sleep is the fault's length
        await asyncio.sleep(outage_s)
        assert laptop.run_end(run) is None, "a run's end is stored before it is published"
        await asyncio.to_thread(rig.postgres.start)

        hint = (
            "RunExecution._end (agent_worker/worker.py) should retry storing the end while Postgres is "
            "away (STORE_RETRY_SECONDS) and publish it once Postgres is back."
        )
        for device in (phone, laptop):
            await wait_end(device, run, 20, hint)
        await assert_run_stored(rig, http, token, ack, [phone, laptop], words(30))
        assert_gapless(phone, start)
        assert_gapless(laptop, start)
        assert comparable_without_conversation(phone.events) == comparable_without_conversation(laptop.events)
        assert rig.pids() == pids
    finally:
        await close_all(phone, laptop)


# e. A deaf node: its Pub/Sub connection looks fine but delivers nothing


def subscriber(conn: ConnectionInfo) -> bool:
    return b"SUBSCRIBE" in conn.sent


async def test_deaf_node_notices_resubscribes_and_its_devices_miss_nothing(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    pids = rig.pids()
    token, phone, laptop, start = await open_devices(rig, unique("alice"))
    deaf = rig.node_redis[0]
    try:
        ack = await phone.send("[[tokens:200]] [[slow:0.04]] a long answer", timeout_s=20)
        run = ack["run"]
        await phone.wait_for(lambda: tokens(phone, run) >= 3, 20)
        [old] = [c.id for c in deaf.connections() if subscriber(c)]
        assert deaf.silence_downstream(subscriber) == 1
        silenced_at = time.monotonic()

        body = await wait_ready(rig, http, 0, False, 8, pubsub=False)
        assert body["redis"] is True, body  # Redis itself answers: only the subscription is deaf
        noticed_s = time.monotonic() - silenced_at
        # The node dropped the deaf connection and subscribed on a new one.
        await deaf.wait_until(lambda cs: old not in {c.id for c in cs} and any(subscriber(c) for c in cs),
                              10, "new Pub/Sub connection replacing the deaf one")
        await wait_ready(rig, http, 0, True, 10)
        for device in (phone, laptop):
            await wait_end(device, run, 30)
        await assert_run_stored(rig, http, token, ack, [phone, laptop], words(200))
        assert_gapless(phone, start)
        assert_gapless(laptop, start)
        assert comparable_without_conversation(phone.events) == comparable_without_conversation(laptop.events)
        assert phone.connects == 1, "the device was served through the outage, not reconnected"
        assert noticed_s < 7, f"the deaf connection was noticed only after {noticed_s:.1f}s"
        assert rig.pids() == pids
    finally:
        await close_all(phone, laptop)


# c (last: its RSTs leave dead pooled connections behind in every process)


async def test_reset_connections_all_reconnect_and_the_stream_stays_exact(
    rig: Rig, http: aiohttp.ClientSession
) -> None:
    pids = rig.pids()
    token, phone, laptop, start = await open_devices(rig, unique("alice"))
    try:
        ack = await phone.send("[[tokens:80]] [[slow:0.03]] a long answer")
        run = ack["run"]
        await laptop.wait_for(lambda: tokens(laptop, run) >= 5, 20)
        reset = {proxy.port: proxy.reset() for proxy in rig.proxies}
        assert all(reset.values()), f"every path had open connections to reset: {reset}"

        # Right after the RSTs, new work goes through: pools notice dead connections and reconnect.
        try:
            second = await laptop.send("[[tokens:5]] right after the resets", conversation=ack["conversation"])
        except ClientError as exc:
            raise AssertionError(f"a send right after the resets was refused ({exc}). {RST_HINT}") from None
        for device in (phone, laptop):
            await wait_end(device, run, 20, f"{CATCH_UP_HINT} {RST_HINT}")
            await wait_end(device, second["run"], 20, f"{CATCH_UP_HINT} {RST_HINT}")
        for proxy in rig.node_redis:  # each node's Pub/Sub is back on a new connection
            await proxy.wait_until(lambda cs: any(b"SUBSCRIBE" in c.sent for c in cs), 10, "resubscribe")
        end = phone.run_end(run)
        assert end is not None and end["event"] == "run.completed", f"{end}. {RST_HINT}"
        await assert_run_stored(rig, http, token, ack, [phone, laptop], words(80))
        await assert_run_stored(rig, http, token, second, [phone, laptop], words(5))
        assert_gapless(phone, start)
        assert_gapless(laptop, start)
        assert comparable_without_conversation(phone.events) == comparable_without_conversation(laptop.events)
        assert rig.pids() == pids
    finally:
        await close_all(phone, laptop)
