"""nginx in front of two real nodes: what an operator does to the fleet must not cost a client events.

Real processes throughout (Redis, Postgres, two ``ws_node``, one ``agent_worker`` against the fake LLM,
nginx from ``nginx/local.conf.template``) and the reference client, which reconnects on its own with
its last seq and epoch. Each test connects devices of a fresh user through nginx (least_conn puts
them on both nodes), starts a long answer, does one operation mid-answer, and then asserts the
invariant: every device ends with the complete answer, gapless and without duplicates, identical to
a device whose socket was never touched.

    kill    SIGKILL a node: its devices reconnect once, through nginx, to the survivor.
    drain   SIGTERM a node: not-ready, reconnect frame, close 1012, exit within DRAIN_SECONDS.
    reload  SIGHUP nginx: the socket outlives the reload; the old worker cuts it only at
            worker_shutdown_timeout, and the device resumes from there.

The module runs its own cluster (it kills and drains nodes); every test restarts what it stopped.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import pytest
from chorus_client.testing import RecordingClient as ChorusClient

from loadtest.cluster import ClusterConfig, LocalCluster
from loadtest.procs import NGINX_TEMPLATE, NginxServer
from tests.fake_llm import FakeLLM
from tests.support import comparable, in_rotation, node_ws, tokens, unique

pytestmark = pytest.mark.timeout(90)

DRAIN_S = 2.0
# Exit budget after SIGTERM beyond DRAIN_SECONDS when every client answers the close (the node then
# skips its 5 s wait for stragglers): HTTP server shutdown and closing the Redis and Postgres pools,
# with room for a loaded 2-core CI machine. Measured: well under 1 s.
EXIT_MARGIN_S = 3.0
RECONNECT_S = 5.0  # a client's first reconnect attempt waits at most 50 ms; the rest is slack
TOKENS = 80
LONG_ANSWER = f"[[tokens:{TOKENS}]] [[slow:0.03]] tell me a long story"
SECOND_TOKENS = 200
NODE_IDS = ("node-a", "node-b")
VICTIM = 0  # the node index each test kills or drains
_SHUTDOWN = re.search(r"worker_shutdown_timeout (\d+)s;", NGINX_TEMPLATE.read_text())
assert _SHUTDOWN is not None, "nginx/local.conf.template must set worker_shutdown_timeout"
WORKER_SHUTDOWN_S = float(_SHUTDOWN[1])  # old nginx workers cut their sockets this long after a reload


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLM) -> Iterator[LocalCluster]:
    config = ClusterConfig(nodes=2, workers=1, nginx=True,
                           env={"LLM_BASE_URL": fake_llm.base_url, "DRAIN_SECONDS": str(DRAIN_S)})
    with LocalCluster(tmp_path_factory.mktemp("nginx-fleet"), config) as running:
        assert running.nginx is not None, "nginx must be installed for these tests"
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """conftest's `http`, with a 10 s bound on each request."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def cluster(fleet: LocalCluster, http: aiohttp.ClientSession) -> AsyncIterator[LocalCluster]:
    """The fleet with both nodes up and in nginx's rotation; afterwards, a killed node restarted."""
    async with in_rotation(fleet, http) as running:
        yield running


async def connect_spread(cluster: LocalCluster, token: str, count: int) -> dict[str, list[ChorusClient]]:
    """`count` devices through nginx, grouped by the node that serves them; both nodes must have some."""
    by_node: dict[str, list[ChorusClient]] = {name: [] for name in NODE_IDS}
    devices = [ChorusClient(cluster.ws_url, token, device=f"d{index}") for index in range(count)]
    try:
        for device in devices:
            hello = await device.connect()
            by_node[hello["node"]].append(device)
        counts = {name: len(on_node) for name, on_node in by_node.items()}
        assert all(counts.values()), f"least_conn should use both nodes: {counts}"
    except BaseException:
        await asyncio.gather(*(d.close() for d in devices))
        raise
    return by_node


def kinds(client: ChorusClient) -> list[str]:
    return [f["type"] for f in client.frames]


# Predicates for ChorusClient.wait_for (built by functions, so each binds its own client).
def streaming(client: ChorusClient, run: str) -> Callable[[], bool]:
    return lambda: tokens(client, run) >= 5


def connected_times(client: ChorusClient, count: int) -> Callable[[], bool]:
    return lambda: client.connects == count


def told_to_reconnect(client: ChorusClient) -> Callable[[], bool]:
    return lambda: "reconnect" in kinds(client)


def closed(client: ChorusClient) -> Callable[[], bool]:
    return lambda: bool(client.close_codes)


async def when(client: ChorusClient, predicate: Callable[[], bool], timeout_s: float) -> float:
    """The monotonic time at which `predicate` first held (the client notifies on every frame and close)."""
    await client.wait_for(predicate, timeout_s)
    return time.monotonic()


def assert_complete(client: ChorusClient, reference: ChorusClient, run: str, words: int = TOKENS) -> None:
    """The whole answer, every seq once and in order, exactly what the untouched device got."""
    assert client.gaps == [] and client.duplicates == 0, (client.device, client.gaps, client.duplicates)
    assert not [f for f in client.frames if f["type"] == "resync"], "resumed, never resynced"
    seqs = client.seqs()
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert client.run_text(run) == " ".join(f"word{i}" for i in range(1, words + 1))
    assert (client.run_end(run) or {}).get("event") == "run.completed"
    assert comparable(client.events) == comparable(reference.events)


def ws_statuses_since(nginx: NginxServer, offset: int) -> list[int]:
    """HTTP statuses nginx returned to clients for /ws since byte `offset` of its access log."""
    text = nginx.access_log.read_bytes()[offset:].decode(errors="replace")
    return [int(status) for status in re.findall(r'"GET /ws HTTP/1\.1" (\d{3}) ', text)]


async def test_killed_node_costs_its_devices_one_reconnect_and_no_events(cluster: LocalCluster) -> None:
    token = cluster.token(unique("kill"))
    by_node = await connect_spread(cluster, token, 4)
    movers, stayers = by_node[NODE_IDS[VICTIM]], by_node[NODE_IDS[1 - VICTIM]]
    everyone = movers + stayers
    try:
        run = (await stayers[0].send(LONG_ANSWER))["run"]
        for mover in movers:
            await mover.wait_for(streaming(mover, run), 20)
        cut_at = {mover.device: mover.last_seq for mover in movers}

        await asyncio.to_thread(cluster.nodes[VICTIM].kill)
        assert stayers[0].run_end(run) is None, "the kill must land mid-answer"
        for mover in movers:
            await mover.wait_for(connected_times(mover, 2), RECONNECT_S)
        for device in everyone:
            await device.wait_run_end(run, 30)

        for mover in movers:
            # One abnormal close (no close frame from a dead process), one reconnect, to the survivor.
            assert mover.close_codes == [1006], mover.close_codes
            assert mover.connects == 2
            assert (mover.hello or {})["node"] == NODE_IDS[1 - VICTIM]
            # Resumed after what it had: some of the answer came before the kill, the rest after.
            before = cut_at[mover.device]
            assert before is not None and any(e["seq"] > before for e in mover.events)
        for device in everyone:
            assert_complete(device, stayers[0], run)
        for stayer in stayers:
            assert stayer.connects == 1 and stayer.close_codes == []
    finally:
        await asyncio.gather(*(d.close() for d in everyone))


async def test_drained_node_hands_its_devices_over_and_exits_within_drain_seconds(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    assert cluster.nginx is not None
    token = cluster.token(unique("drain"))
    by_node = await connect_spread(cluster, token, 6)
    movers, stayers = by_node[NODE_IDS[VICTIM]], by_node[NODE_IDS[1 - VICTIM]]
    everyone = movers + stayers
    readyz = f"http://127.0.0.1:{cluster.node_ports[VICTIM]}/readyz"
    log_offset = cluster.nginx.access_log.stat().st_size
    try:
        async with http.get(readyz) as response:
            assert response.status == 200
        run = (await stayers[0].send(LONG_ANSWER))["run"]
        for mover in movers:
            await mover.wait_for(streaming(mover, run), 20)

        sigterm_at = time.monotonic()
        cluster.nodes[VICTIM].terminate()

        told = [asyncio.create_task(when(m, told_to_reconnect(m), DRAIN_S + 5)) for m in movers]
        await asyncio.wait(told, return_when=asyncio.FIRST_COMPLETED)
        # draining is set before the first reconnect frame goes out, and the node keeps serving
        # HTTP until the window is over: /readyz must say not-ready now.
        async with http.get(readyz) as response:
            body = await response.json()
            assert response.status == 503, body
            assert body["draining"] is True and body["ready"] is False
        told_at = await asyncio.gather(*told)

        exit_code = await asyncio.to_thread(cluster.nodes[VICTIM].wait, DRAIN_S + EXIT_MARGIN_S)
        exited_after_s = time.monotonic() - sigterm_at
        assert exit_code == 0
        assert exited_after_s <= DRAIN_S + EXIT_MARGIN_S
        # The node's last word on the drain: how many it sent on, none left, and its loop's stalls.
        drained = cluster.nodes[VICTIM].records("drained")[-1]
        assert drained["drained"] == len(movers) and drained["left"] == 0, drained
        assert drained["stall_ticks"] > 0 and drained["stalls_over_20ms"] <= drained["stall_ticks"]

        # Spread over the window, not all at once: len(movers) batches, DRAIN_S / batches apart.
        if len(movers) > 1:
            spread_s = max(told_at) - min(told_at)
            assert spread_s >= 0.5 * DRAIN_S * (len(movers) - 1) / len(movers), spread_s

        for device in everyone:
            await device.wait_run_end(run, 30)
        for mover in movers:
            order = kinds(mover)
            assert "hello" in order[order.index("reconnect"):], "reconnected after the reconnect frame"
            assert next(f for f in mover.frames if f["type"] == "reconnect") == {"type": "reconnect",
                                                                                "after_ms": 0}
            assert mover.close_codes == [1012], mover.close_codes
            assert mover.connects == 2
            assert (mover.hello or {})["node"] == NODE_IDS[1 - VICTIM]
        for device in everyone:
            assert_complete(device, stayers[0], run)
        for stayer in stayers:
            assert stayer.connects == 1 and stayer.close_codes == []
        # least_conn prefers the emptying node; nginx must pass over its 503s, never show one to a client.
        statuses = await asyncio.to_thread(ws_statuses_since, cluster.nginx, log_offset)
        assert 503 not in statuses, statuses
    finally:
        await asyncio.gather(*(d.close() for d in everyone))


async def test_nginx_reload_keeps_the_stream(cluster: LocalCluster) -> None:
    assert cluster.nginx is not None
    token = cluster.token(unique("reload"))
    by_node = await connect_spread(cluster, token, 2)
    devices = [*by_node[NODE_IDS[0]], *by_node[NODE_IDS[1]]]
    reference = ChorusClient(node_ws(cluster, 1), token, device="direct")  # never behind nginx
    try:
        await reference.connect()
        run = (await devices[0].send(LONG_ANSWER))["run"]
        for device in devices:
            await device.wait_for(streaming(device, run), 20)

        cuts = [asyncio.create_task(when(d, closed(d), WORKER_SHUTDOWN_S + 15)) for d in devices]
        reload_started = time.monotonic()
        await asyncio.to_thread(cluster.nginx.reload)
        assert reference.run_end(run) is None, "the reload must land mid-answer"

        # Invariant: every token, whatever happens to the socket.
        for device in [*devices, reference]:
            await device.wait_run_end(run, 30)
        for device in devices:
            assert_complete(device, reference, run)

        # A second, longer answer right away: at least 6 s of tokens, so it is still streaming when
        # the old nginx worker cuts the socket (at most worker_shutdown_timeout after the reload).
        second = (await reference.send(f"[[tokens:{SECOND_TOKENS}]] [[slow:0.03]] and another"))["run"]

        # Which way: the socket survives the reload itself (the old worker keeps serving it) and is
        # cut only when worker_shutdown_timeout expires; the device then reconnects to the new worker.
        for device, cut_at in zip(devices, await asyncio.gather(*cuts), strict=True):
            assert cut_at - reload_started >= WORKER_SHUTDOWN_S - 0.5, f"{device.device}: cut by the reload"
            assert device.close_codes == [1006]
            await device.wait_for(connected_times(device, 2), 10)

        # ... and resumes after the cut: the second answer arrives whole as well, its end over the
        # new connection.
        for device in [*devices, reference]:
            await device.wait_run_end(second, 30)
        for device in devices:
            assert_complete(device, reference, second, SECOND_TOKENS)
            order = kinds(device)
            rehello = order.index("hello", 1)
            assert any(f.get("run") == second for f in device.frames[rehello:])
        assert reference.connects == 1
    finally:
        await asyncio.gather(*(d.close() for d in [*devices, reference]))
