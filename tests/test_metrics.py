"""Metrics (`/metrics` on each process's INTERNAL_PORT): the lean counters as pure units, then what
a real cluster reports for a real conversation, and the documentation of every metric."""

from __future__ import annotations

import asyncio
import gc
import re
import sys
import time
import weakref
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import pytest
from chorus_client.testing import RecordingClient as ChorusClient
from prometheus_client.parser import text_string_to_metric_families

from common.collector import Collector
from common.metrics import Histogram, LoopLag
from loadtest.cluster import LocalCluster
from loadtest.procs import wait_http_ok
from protocol import Event
from tests.support import unique
from ws_node.metrics import NodeStats

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
DOCS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value, 0 when absent (a labelled counter appears with its first event)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(http: aiohttp.ClientSession, port: int) -> Samples:
    # The cluster is up once its nodes are ready; a worker may still be starting.
    await asyncio.to_thread(wait_http_ok, f"http://127.0.0.1:{port}/healthz", 60)
    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(await response.text())


def grew(before: Samples, after: Samples, name: str, by: float = 1, **labels: str) -> bool:
    return value(after, name, **labels) - value(before, name, **labels) >= by


# -- pure ------------------------------------------------------------------------------------


def test_a_histogram_exposes_cumulative_buckets_its_count_and_sum() -> None:
    histogram = Histogram((0.01, 0.1, 1.0))
    for observed in (0.005, 0.01, 0.05, 0.5, 5.0):
        histogram.observe(observed)
    family = histogram.family("x_seconds", "x")
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "x_seconds_bucket"}
    assert buckets == {"0.01": 2, "0.1": 3, "1.0": 4, "+Inf": 5}  # le is inclusive
    totals = {s.name: s.value for s in family.samples if s.name != "x_seconds_bucket"}
    assert totals == {"x_seconds_count": 5, "x_seconds_sum": pytest.approx(5.565)}


def test_delivery_lag_is_read_from_the_events_ts_and_anything_else_is_ignored() -> None:
    stats = NodeStats()
    now_ms = int(time.time() * 1000)
    stats.published(f'{{"seq":3,"type":"event","event":"token","data":{{"text":"hi"}},"ts":{now_ms - 250}}}')
    assert stats.delivery_lag.count == 1
    assert 0.2 < stats.delivery_lag.sum < 5
    for other in ("1", '{"seq":1,"ts":"soon"}', '{"seq":1}'):
        stats.published(other)
    assert stats.delivery_lag.count == 1


def test_only_chorus_close_codes_become_labels() -> None:
    stats = NodeStats()
    for code in (1000, 4008, 4321, None, 1006):
        stats.closed(code)
    assert stats.closes == {("1000",): 1, ("4008",): 1, ("1006",): 1, ("other",): 2}


async def test_the_loop_lag_timer_measures_a_stall() -> None:
    lag = LoopLag(interval_s=0.01)
    lag.start()
    await asyncio.sleep(0.05)  # a few ticks on time
    mark = lag.mark()
    time.sleep(0.08)  # noqa: ASYNC251 - the stall under test: nothing else may run meanwhile
    await asyncio.sleep(0.03)
    await lag.close()
    assert 0.06 <= lag.max_s < 1.0
    assert lag.histogram.count >= 5
    late = {s.labels["le"]: s.value for s in lag.histogram.family("x", "x").samples if s.name == "x_bucket"}
    assert late["0.05"] < late["0.1"], "one tick was 50-100 ms late"
    # What a drain logs: the ticks since a mark, the stall among them. The thread slept through
    # it, as it would waiting for a CPU: none of it is the loop's own work.
    stalls = lag.stalls_since(mark)
    assert (stalls.over, stalls.worst_le_s) == (1, 0.1)
    assert stalls.busy_over == 0 and stalls.busy_worst_le_s <= 0.005
    assert 1 <= stalls.ticks < lag.histogram.count
    assert lag.stalls_since(lag.mark()) == (0, 0, 0.0, 0, 0.0)


async def test_a_stall_the_loop_works_through_counts_as_its_own() -> None:
    lag = LoopLag(interval_s=0.01)
    lag.start()
    await asyncio.sleep(0.03)
    mark = lag.mark()
    spin_until = time.thread_time() + 0.08
    while time.thread_time() < spin_until:  # the loop's own work: its thread's CPU
        pass
    await asyncio.sleep(0.03)
    await lag.close()
    stalls = lag.stalls_since(mark)
    assert (stalls.over, stalls.worst_le_s) == (1, 0.1)
    assert (stalls.busy_over, stalls.busy_worst_le_s) == (1, 0.1)


async def test_garbage_collector_passes_are_timed() -> None:
    lag = LoopLag(interval_s=0.01)
    lag.start()
    # Enough cyclic garbage that a full pass over it is measurable.
    for _ in range(200_000):
        node: list[object] = []
        node.append(node)
    gc.collect()
    await lag.close()
    timed = lag.gc_pauses.count
    assert timed >= 1 and lag.gc_max_s > 0
    gc.collect()
    assert lag.gc_pauses.count == timed, "no longer timed after close"
    families = {f.name: f for f in lag.families()}
    assert {"chorus_gc_pause_seconds", "chorus_gc_pause_max_seconds"} <= set(families)


async def test_the_collector_keeps_held_objects_out_of_its_passes_and_reclaims_closed_ones_in_bulk() -> None:
    """Sockets held through a step are frozen (no pass walks them); frozen cyclic garbage (a
    closed socket's objects refer to one another) stays until the sockets closed since the last
    full pass reach half of those held, and one full pass then reclaims all of it."""

    class Socket:
        def __init__(self) -> None:
            self.me = self  # a cycle, as aiohttp's transport, protocol and request make

    held = [Socket() for _ in range(100)]
    counts = {"closed": 0}
    collector = Collector(every_s=60, held=lambda: len(held), closed=lambda: counts["closed"], closed_min=10,
                          settle_steps=1)

    def close(n: int) -> list[weakref.ref[Socket]]:
        gone = [weakref.ref(s) for s in held[:n]]
        del held[:n]
        counts["closed"] += n
        return gone

    try:
        collector.start()  # freezes what there is
        first = close(20)  # 20 closed, 80 held: under half
        collector.step()
        assert all(ref() is not None for ref in first) and collector.reclaims == 0, "frozen garbage waits"
        second = close(20)  # 40 closed, 60 held: past half, one full pass
        collector.step()
        assert collector.reclaims == 1
        assert all(ref() is None for ref in first + second), "every closed one reclaimed"
        collector.step()
        assert collector.reclaims == 1, "none closed since"
    finally:
        await collector.close()
        gc.unfreeze()


async def test_sockets_freed_by_their_reference_counts_need_no_full_pass() -> None:
    """Sockets that close without leaving cycles take their memory with them: memory per socket
    held stays where it was, and however many close, no full pass (each would stall a node of
    15,000 sockets about a second, for nothing); nor while what they held is still being released.
    Sockets that leave cycles behind get one, once memory has stayed up `settle_steps` steps."""

    class Socket:
        def __init__(self) -> None:
            self.buffers = [float(i) for i in range(200_000)]  # most of the process's memory

    held = [Socket() for _ in range(40)]
    counts = {"closed": 0}
    collector = Collector(every_s=60, held=lambda: len(held), closed=lambda: counts["closed"], closed_min=10,
                          settle_steps=3)
    try:
        collector.start()
        for _ in range(3):  # 20 of 40 closed, then 10 of 20, then 5 of 15: past half each time
            gone = len(held) // 2
            del held[:gone]
            counts["closed"] += gone
            collector.step()
        for _ in range(3):  # memory settled where the sockets left it
            collector.step()
        assert collector.reclaims == 0
        held.extend(Socket() for _ in range(35))  # 40 held
        collector.step()
        lingering = held[:20]  # closed, no longer counted as held, memory released over 4 steps
        del held[:20]
        counts["closed"] += 20
        for _ in range(4):
            collector.step()
            del lingering[:5]
        collector.step()
        assert collector.reclaims == 0, "memory left behind but falling: sockets still closing"
        held.extend(Socket() for _ in range(20))
        for socket in held:
            socket.me = socket  # type: ignore[attr-defined]  # a cycle: closing leaves it behind
        collector.step()  # 40 held, frozen now, cycles and all
        gone_refs = [weakref.ref(s) for s in held[:20]]
        del held[:20], socket
        counts["closed"] += 20
        collector.step()
        collector.step()
        assert collector.reclaims == 0, "memory left behind may be sockets still closing: it waits"
        collector.step()
        assert collector.reclaims == 1, "closed sockets left their memory: one full pass"
        assert all(ref() is None for ref in gone_refs)
    finally:
        await collector.close()
        gc.unfreeze()


async def test_the_collector_makes_a_full_pass_when_memory_per_socket_grows_and_restores_the_thresholds() -> None:
    """Garbage that is not a closed socket's (here cycles already in the oldest generation, which
    the steps leave alone) is reclaimed once memory per socket held reaches `growth` times what the
    last full pass left; Python's own full passes are off while the collector steps, and back on
    after it closes."""

    class Node:
        def __init__(self) -> None:
            self.me = self

    thresholds = gc.get_threshold()
    collector = Collector(every_s=60, held=lambda: 100, closed=lambda: 0, closed_min=10, growth=1.5,
                          settle_steps=1)
    try:
        collector.start()
        assert gc.get_threshold()[:2] == thresholds[:2] and gc.get_threshold()[2] > 1_000_000
        collector.step()
        assert collector.reclaims == 0, "nothing grew"
        junk: list[Node] = []
        target = sys.getallocatedblocks() * 1.6
        while sys.getallocatedblocks() < target:
            junk.extend(Node() for _ in range(10_000))
        gc.collect(1)  # the junk survives into the oldest generation, as a node's garbage does
        gone = [weakref.ref(n) for n in junk[::1000]]
        del junk
        assert all(ref() is not None for ref in gone), "cycles wait for a full pass"
        collector.step()
        assert collector.reclaims == 1
        assert all(ref() is None for ref in gone), "the full pass reclaimed them"
        collector.step()
        assert collector.reclaims == 1, "memory back where the full pass left it"
    finally:
        await collector.close()
        gc.unfreeze()
    assert gc.get_threshold() == thresholds


# -- a real cluster ----------------------------------------------------------------------------


@pytest.mark.timeout(90)
async def test_a_conversation_on_two_nodes_shows_in_every_processs_metrics(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    ports = cluster.internal_ports
    node_a, node_b, worker = ports["node-a"], ports["node-b"], ports["worker-1"]
    before = {port: await scrape(http, port) for port in (node_a, node_b, worker)}
    user = unique("metrics")
    phone = ChorusClient(cluster.node_ws_urls[0], cluster.token(user), device="phone")
    laptop = ChorusClient(cluster.node_ws_urls[1], cluster.token(user), device="laptop")
    await phone.connect()
    await laptop.connect()
    try:
        ack = await phone.send("[[tokens:20]] hello metrics")
        end = await laptop.wait_run_end(ack["run"], 30)
        assert end["event"] == Event.RUN_COMPLETED
        await phone.wait_run_end(ack["run"], 30)
        url = f"{cluster.node_ws_urls[0]}?access_token={cluster.token(user)}&device=raw"
        async with http.ws_connect(url) as raw:
            assert (await raw.receive_json(timeout=10))["type"] == "hello"
            await raw.send_str("{not json")  # an invalid command: answered with an error, and counted
            while (frame := await raw.receive_json(timeout=10))["type"] != "error":
                pass
            assert frame["code"] == "bad_request"
        during = {port: await scrape(http, port) for port in (node_a, node_b)}
    finally:
        await phone.close()
        await laptop.close()

    for port in (node_a, node_b):
        b, d = before[port], during[port]
        assert value(d, "chorus_ws_connections") >= 1
        assert grew(b, d, "chorus_ws_connects_total")
        assert grew(b, d, "chorus_subscribed_users", by=0) and value(d, "chorus_subscribed_users") >= 1
        assert grew(b, d, "chorus_events_delivered_total", by=3)  # message, run.started, tokens, end
        assert grew(b, d, "chorus_frames_sent_bytes_total", by=100)
        assert grew(b, d, "chorus_delivery_lag_seconds_count", by=3)
        assert grew(b, d, "chorus_resumes_total", outcome="new")
        assert value(d, "chorus_event_loop_lag_seconds_count") > 0
        assert value(d, "process_resident_memory_bytes") > 0
    assert grew(before[node_a], during[node_a], "chorus_commands_total", type="send", result="ok")
    assert grew(before[node_a], during[node_a], "chorus_commands_total", type="invalid", result="bad_request")

    async def closes_counted() -> bool:
        now = {port: await scrape(http, port) for port in (node_a, node_b)}
        return all(grew(before[port], now[port], "chorus_ws_closes_total", code="1000") for port in now)

    # A node counts a close when the socket's handler returns, which nothing tells this test of.
    deadline = time.monotonic() + 10
    while not await closes_counted():
        assert time.monotonic() < deadline, "closes not counted"
        await asyncio.sleep(0.1)

    w_before, w_after = before[worker], await scrape(http, worker)
    assert grew(w_before, w_after, "chorus_runs_total", agent="default", outcome="completed")
    assert grew(w_before, w_after, "chorus_tokens_streamed_total", by=20)
    assert grew(w_before, w_after, "chorus_run_first_token_seconds_count")
    assert grew(w_before, w_after, "chorus_send_first_token_seconds_count")
    assert grew(w_before, w_after, "chorus_run_queue_wait_seconds_count")
    assert grew(w_before, w_after, "chorus_run_duration_seconds_count")
    assert grew(w_before, w_after, "chorus_llm_requests_total", model="gpt-4o-mini", result="ok")
    assert value(w_after, "chorus_worker_slots") >= 1
    assert value(w_after, "chorus_llm_circuit_open", endpoint=f"{cluster.config.env['LLM_BASE_URL']}#gpt-4o-mini") == 0


def exported(samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float]) -> set[str]:
    names = {name for name, _ in samples if name.startswith("chorus_")}
    return {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in names}


async def test_every_metric_is_documented_and_every_documented_metric_exists(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    section = DOCS.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = {re.sub(r"_total$", "", name) for name in re.findall(r"^\| `(chorus_[a-z_]+)`", section, re.M)}
    node = await scrape(http, cluster.internal_ports["node-a"])
    worker = await scrape(http, cluster.internal_ports["worker-1"])
    code = exported(node) | exported(worker)
    assert code - documented == set(), "exported but not in docs/operations.md, Metrics"
    # Labelled counters appear with their first event: a fresh cluster may not have them yet.
    may_be_absent = {"chorus_ws_closes", "chorus_rate_limited", "chorus_commands", "chorus_resumes",
                     "chorus_runs", "chorus_llm_requests", "chorus_llm_circuit_open"}
    assert documented - code - may_be_absent == set(), "documented but not exported"
