"""Reconnect storms (issue 3): a thousand sockets dropped at once all come back, in bounded time,
with nothing lost, doubled or logged as an error on the server.

One cluster of the module's own (two nodes behind nginx, one worker on the fake LLM), because the
storms kill nginx and a node, which the session cluster's other users must never see. The
thousand reference clients live in this test process (one shared aiohttp session), spread over
`USERS` users so each storm also fans events out to many devices per user.

Two storms, as a deployment meets them:
- nginx dies (SIGKILL) and comes back: every socket drops at the same instant and every client
  comes back through the new nginx, half to each node;
- a node dies (SIGKILL): its half of the sockets drop and come back through nginx, which benches
  the dead node after one refused connect, so they all land on the surviving node.
Events are published while the sockets are down (they must be replayed on resume), and a `send`
after each storm must reach every device of its user.
"""

from __future__ import annotations

import asyncio
import re
import resource
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from chorus_client.testing import RecordingClient as ChorusClient
from redis.asyncio import Redis

from common.keys import Keys
from fanout.redis_broker import RedisBroker
from loadtest.cluster import ClusterConfig, LocalCluster
from tests.fake_llm import FakeLLM
from tests.support import comparable_without_conversation, event_payload, unique

# 1000 sockets = USERS x DEVICES. Measured on the 2-core dev box: 1000 connect in ~1.5 s, all are
# back ~3 s after nginx dies and ~1 s after a node dies; the module takes ~15 s. 4000 (40 x 100)
# also pass (the nginx storm then takes ~14 s, bounded by this one process's CPU; module ~50 s).
USERS = 20
DEVICES = 50
RECONNECT_BOUND_S = 60.0  # generous on purpose: a loaded CI box is slower, not wrong
CONNECT_CONCURRENCY = 100  # under nginx's listen backlog (511), so no SYN is dropped at start
SERVER_ERROR = re.compile(r"Traceback|\b(ERROR|CRITICAL)\b")
# nginx logs every refused upstream connect as [error] (expected while a node is dead); only worse
# levels, e.g. "[alert] ... worker_connections are not enough", mean the storm hurt nginx itself.
NGINX_TROUBLE = re.compile(r"\[(alert|crit|emerg)\]")


def _raise_fd_limit() -> None:
    # Each socket costs this process one fd (and nginx two); the default soft limit is often 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65_536)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert soft >= USERS * DEVICES + 500, f"RLIMIT_NOFILE {soft} is too low for {USERS * DEVICES} sockets"


@pytest.fixture(scope="module")
def storm_cluster(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLM) -> Iterator[LocalCluster]:
    _raise_fd_limit()
    config = ClusterConfig(nodes=2, workers=1, nginx=True,
                           env={"LLM_BASE_URL": fake_llm.base_url, "LLM_API_KEY": "test-key"})
    with LocalCluster(tmp_path_factory.mktemp("storm"), config) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # limit=0: the default connector caps a session at 100 connections, and a WebSocket holds one.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as shared:
        yield shared


class ServerLogs:
    """The part of every node's, worker's and nginx's log written since `mark()`."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.offsets: dict[Path, int] = {}

    def _paths(self) -> list[Path]:
        paths = [proc.log_path for proc in [*self.cluster.nodes, *self.cluster.workers]]
        return [*paths, self.cluster.nginx.error_log] if self.cluster.nginx else paths

    def mark(self) -> None:
        self.offsets = {path: path.stat().st_size if path.exists() else 0 for path in self._paths()}

    def error_lines(self) -> list[str]:
        found = []
        for path in self._paths():
            if not path.exists():
                continue
            with path.open("rb") as log:
                log.seek(self.offsets.get(path, 0))
                text = log.read().decode(errors="replace")
            trouble = NGINX_TROUBLE if path.name == "error.log" else SERVER_ERROR
            found += [f"{path.name}: {line}" for line in text.splitlines() if trouble.search(line)]
        return found


async def connect_all(cluster: LocalCluster, session: aiohttp.ClientSession) -> dict[str, list[ChorusClient]]:
    users = {unique(f"storm{u}"): [] for u in range(USERS)}  # type: dict[str, list[ChorusClient]]
    slots = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(user: str, device: int) -> ChorusClient:
        client = ChorusClient(cluster.ws_url, cluster.token(user), device=f"d{device}", session=session)
        async with slots:
            await client.connect(timeout_s=20)
        return client

    for user, clients in users.items():
        clients.extend(await asyncio.gather(*(one(user, d) for d in range(DEVICES))))
    return users


async def close_all(users: dict[str, list[ChorusClient]]) -> None:
    await asyncio.gather(*(c.close() for clients in users.values() for c in clients), return_exceptions=True)


def watch_reconnects(clients: list[ChorusClient]) -> list[asyncio.Task[float]]:
    """One task per client, started before the drop: it returns the monotonic time at which the
    client holds a new socket with a fresh hello (or raises TimeoutError after the bound)."""

    async def back(client: ChorusClient, before: int) -> float:
        await client.wait_for(lambda: client.connects > before and client.hello is not None,
                              RECONNECT_BOUND_S)
        return time.monotonic()

    return [asyncio.create_task(back(c, c.connects)) for c in clients]


async def reconnect_times(tasks: list[asyncio.Task[float]], dropped_at: float, what: str) -> list[float]:
    results = await asyncio.gather(*tasks, return_exceptions=True)
    missing = [r for r in results if isinstance(r, BaseException)]
    assert not missing, f"{len(missing)} of {len(tasks)} sockets not back within {RECONNECT_BOUND_S}s"
    times = sorted(float(r) - dropped_at for r in results if isinstance(r, float))
    print(f"\n{what}: {len(times)} sockets back; p50 {statistics.median(times):.2f}s, "
          f"p99 {times[int(len(times) * 0.99) - 1]:.2f}s, last {times[-1]:.2f}s")
    return times


async def publish_while_away(cluster: LocalCluster, users: list[str]) -> None:
    """One event per user straight into the stream while its sockets are down: resume must replay it.

    On a loop of its own in a thread: this test's loop is busy with a thousand clients retrying,
    and a publish queued behind them would stretch the outage it is meant to happen within."""

    async def publish() -> None:
        redis = Redis.from_url(cluster.redis_url, decode_responses=True)
        try:
            stream = RedisBroker(redis, Keys())
            await asyncio.gather(*(
                stream.publish(user, event_payload("storm", None, "notice",
                                             {"text": "published while the sockets were down"}))
                for user in users
            ))
        finally:
            await redis.aclose()

    await asyncio.to_thread(asyncio.run, publish())


async def send_and_check_every_device(users: dict[str, list[ChorusClient]], starts: dict[str, int]) -> None:
    """A send from device 0 of each user; every device of the user gets the whole run, and every
    device's stream since its first hello is gapless, undoubled and identical to its siblings'."""
    acks = await asyncio.gather(*(clients[0].send("after the storm") for clients in users.values()))
    waits = [c.wait_run_end(ack["run"], 30) for ack, clients in zip(acks, users.values(), strict=True)
             for c in clients]
    ends = await asyncio.gather(*waits)
    assert {end["event"] for end in ends} == {"run.completed"}
    for (user, clients), ack in zip(users.items(), acks, strict=True):
        reference = comparable_without_conversation(clients[0].events)
        assert any(e["event"] == "notice" for e in clients[0].events), "the event published while away"
        assert clients[0].run_text(ack["run"]) == clients[0].run_end(ack["run"])["data"]["text"]  # type: ignore[index]
        for client in clients:
            assert client.gaps == [] and client.duplicates == 0, (user, client.device)
            assert client.seqs() == list(range(starts[user] + 1, starts[user] + 1 + len(client.events)))
            assert comparable_without_conversation(client.events) == reference, (user, client.device)


@pytest.mark.timeout(180)
async def test_a_thousand_sockets_cut_at_once_by_nginx_all_reconnect(
    storm_cluster: LocalCluster, session: aiohttp.ClientSession
) -> None:
    cluster = storm_cluster
    assert cluster.nginx is not None
    logs = ServerLogs(cluster)
    logs.mark()
    began = time.monotonic()
    users = await connect_all(cluster, session)
    print(f"\nconnected {USERS * DEVICES} sockets in {time.monotonic() - began:.1f}s")
    try:
        clients = [c for cs in users.values() for c in cs]
        nodes = {c.hello["node"] for c in clients if c.hello}
        assert len(nodes) == 2, "nginx must spread the sockets over both nodes"
        starts = {user: cs[0].hello["seq"] for user, cs in users.items() if cs[0].hello}

        watchers = watch_reconnects(clients)
        dropped_at = time.monotonic()
        await asyncio.to_thread(cluster.nginx.proc.kill)  # every socket drops in the same instant
        await publish_while_away(cluster, list(users))
        await asyncio.to_thread(cluster.nginx.start)
        times = await reconnect_times(watchers, dropped_at, "nginx SIGKILL + restart")
        assert times[-1] < RECONNECT_BOUND_S
        assert {c.hello["node"] for c in clients if c.hello} == nodes, "both nodes serve after the storm"

        await send_and_check_every_device(users, starts)
        assert logs.error_lines() == []
    finally:
        await close_all(users)


@pytest.mark.timeout(180)
async def test_a_node_killed_under_half_the_sockets_they_all_move_to_the_other(
    storm_cluster: LocalCluster, session: aiohttp.ClientSession
) -> None:
    cluster = storm_cluster
    logs = ServerLogs(cluster)
    logs.mark()
    users = await connect_all(cluster, session)
    try:
        clients = [c for cs in users.values() for c in cs]
        victims = [c for c in clients if c.hello and c.hello["node"] == "node-a"]
        assert USERS * DEVICES * 0.3 < len(victims) < USERS * DEVICES * 0.7, "least_conn spreads evenly"
        starts = {user: cs[0].hello["seq"] for user, cs in users.items() if cs[0].hello}

        watchers = watch_reconnects(victims)
        dropped_at = time.monotonic()
        await asyncio.to_thread(cluster.nodes[0].kill)
        await publish_while_away(cluster, list(users))
        times = await reconnect_times(watchers, dropped_at, f"node-a SIGKILL ({len(victims)} sockets)")
        assert times[-1] < RECONNECT_BOUND_S
        assert {c.hello["node"] for c in clients if c.hello} == {"node-b"}

        await send_and_check_every_device(users, starts)
        assert logs.error_lines() == []
    finally:
        await close_all(users)
        await asyncio.to_thread(cluster.start_node, 0)
