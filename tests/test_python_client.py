"""The Python client (clients/python, `chorus_client`): its pure parts table-tested, then the client
against a live cluster (two nodes, nginx, a worker on the fake LLM): two devices show identical
streams, a dropped connection resumes mid-answer exactly, a send is resent until acked and runs once,
the token is renewed in place (and after a 4001), presence follows the devices, a stale position
resyncs and reloads from REST. The CLI and the install into a fresh venv have files of their own.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from chorus_client import (
    Action,
    Backoff,
    ChorusClient,
    ChorusError,
    ClientEvent,
    Connected,
    Disconnected,
    ErrorReported,
    EventReceived,
    Overflowed,
    Position,
    Reconnects,
    Reloaded,
    Resynced,
    Run,
    RunChanged,
    SeqGate,
    Store,
    TokenReason,
    close_action,
    handshake_action,
    retryable,
)
from chorus_client.emitter import Emitter
from chorus_client.store import merge_order
from chorus_client.tokens import Tokens, jwt_expiry_s

from loadtest.cluster import LocalCluster
from protocol import Event, RunStatus
from tests.faultproxy import FaultProxy
from tests.support import node_ws, rest, unique

ANSWER_S = 30.0  # the bound on one answer's end, on every device
LONG = "[[tokens:60]] [[slow:0.04]] a long answer"


def words(n: int) -> str:
    return " ".join(f"word{i}" for i in range(1, n + 1))


# -- the pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(("last", "offers", "expected", "after"), [
    (None, [(5, None)], ["deliver"], 5),  # a new device takes the first seq it sees
    (4, [(5, None), (6, None)], ["deliver", "deliver"], 6),
    (4, [(4, None), (3, None)], ["duplicate", "duplicate"], 4),
    (4, [(6, None)], ["gap"], 4),  # never shown: the client reconnects from 4
    (4, [(8, 5), (9, None)], ["deliver", "deliver"], 9),  # a merged token frame covers 5..8
    (4, [(8, 3)], ["gap"], 4),  # overlaps what was seen: its joined text cannot be split
])
def test_the_seq_gate_delivers_each_seq_once_in_order(last: int | None, offers: list[tuple[int, int | None]],
                                                      expected: list[str], after: int) -> None:
    gate = SeqGate(last, "e1")
    assert [gate.offer(seq, first) for seq, first in offers] == expected
    assert gate.position == Position(after, "e1")


def test_the_seq_gate_starts_at_hello_and_moves_on_resync() -> None:
    gate = SeqGate()
    assert gate.position is None
    gate.hello(41, "e1")
    assert gate.position == Position(41, "e1")
    gate.hello(50, "e1")  # a reconnect's hello keeps the device's own position
    assert gate.position == Position(41, "e1")
    gate.reset(3, "e2")
    assert gate.position == Position(3, "e2")


@pytest.mark.parametrize(("code", "action"), [
    (1000, Action.STOP), (1007, Action.STOP), (1008, Action.STOP), (4001, Action.RENEW),
    (4029, Action.LATER), (1012, Action.NOW), (4008, Action.NOW), (1006, Action.BACKOFF),
    (None, Action.BACKOFF), (1009, Action.BACKOFF), (1011, Action.BACKOFF), (1013, Action.BACKOFF),
    (4000, Action.BACKOFF), (4999, Action.BACKOFF),
])
def test_close_codes_are_handled_as_the_protocol_says(code: int | None, action: Action) -> None:
    assert close_action(code) is action


def test_refused_handshakes_and_error_replies() -> None:
    assert [handshake_action(s) for s in (401, 400, 403, 429, 503, 500)] == [
        Action.RENEW, Action.STOP, Action.STOP, Action.BACKOFF, Action.BACKOFF, Action.BACKOFF]
    assert [c for c in ("unavailable", "internal", "rate_limited", "overloaded", "conflict", "not_found",
                        "bad_request", "too_large") if retryable(c)] == [
        "unavailable", "internal", "rate_limited", "overloaded"]


def test_the_reconnect_schedule_follows_the_close_codes() -> None:
    def after(schedule: Reconnects, code: int, **kw: Any) -> tuple[float | None, bool]:
        step = schedule.after(close_action(code), code, renewable=kw.pop("renewable", True), rand=lambda: 1.0, **kw)
        return step.delay_s, step.renew

    schedule = Reconnects(Backoff(base_s=0.05, max_s=2.0), too_many_devices_retry_s=30.0)
    assert after(schedule, 1012, drain_s=0.5) == (0.5, False)  # draining: when the node said
    assert after(schedule, 1006) == (pytest.approx(0.1), False)  # then backoff, doubling
    assert after(schedule, 1006, retry_after_s=3.0) == (3.0, False)
    assert after(schedule, 4029) == (pytest.approx(30.4), False)
    schedule.connected()
    assert after(schedule, 4008) == (0.0, False)  # at once after a hello
    assert after(schedule, 4001) == (0.0, True)  # a fresh token at once, then with backoff
    assert after(schedule, 4001) == (pytest.approx(0.2), True)  # the third attempt since the hello
    assert after(schedule, 4001) == (None, False)  # three refusals in a row: give up
    assert after(Reconnects(), 4001, renewable=False) == (None, False)  # a fixed token cannot be renewed
    assert after(Reconnects(), 1000) == (None, False)
    assert after(Reconnects(too_many_devices_retry_s=None), 4029) == (None, False)
    assert after(Reconnects(enabled=False), 1006) == (None, False)


def test_backoff_is_full_jitter_capped() -> None:
    backoff = Backoff(base_s=0.05, max_s=2.0)
    assert backoff.delay_s(0, lambda: 0.999) < 0.05
    assert backoff.delay_s(3, lambda: 1.0) == pytest.approx(0.4)
    assert backoff.delay_s(50, lambda: 1.0) == 2.0
    assert backoff.delay_s(50, lambda: 0.0) == 0.0


def jwt_with(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256'})}.{part(claims)}.signature"


async def test_tokens_are_cached_renewed_before_expiry_and_never_reused_after_a_refusal() -> None:
    now = [1000.0]
    asked: list[TokenReason] = []

    async def provider(reason: TokenReason) -> str:
        asked.append(reason)
        return jwt_with({"sub": "alice", "exp": now[0] + 300, "n": len(asked)})

    tokens = Tokens(provider, refresh_before_s=60, clock=lambda: now[0])
    first = await tokens.get("connect")
    assert await tokens.get("connect") == first and asked == ["connect"]  # cached while fresh
    assert jwt_expiry_s(first) == 1300 and tokens.refresh_in_s() == 240
    renewal = await tokens.fetch("expiring")  # not adopted until the server accepts it
    assert renewal != first and await tokens.get("connect") == first
    tokens.forget()  # refused: the provider is asked again
    assert await tokens.get("unauthorized") not in (first, renewal)
    now[0] += 290  # 10 s left: renew halfway through what is left
    assert tokens.refresh_in_s() == 5
    assert asked == ["connect", "expiring", "unauthorized"]
    fixed = Tokens("not-a-jwt")
    assert await fixed.get("unauthorized") == "not-a-jwt" and not fixed.renewable and fixed.refresh_in_s() is None


def event(seq: int, name: str, data: dict[str, Any], run: str | None = "r1", conversation: str = "c1",
          **extra: Any) -> dict[str, Any]:
    return {"type": "event", "seq": seq, "conversation": conversation, "run": run, "event": name, "data": data,
            "ts": 1_700_000_000_000 + seq, **extra}


def test_the_store_applies_snapshots_live_events_and_rest_pages_in_any_mix_once() -> None:
    store = Store()
    store.apply(event(10, Event.MESSAGE_CREATED, {"message": "m1", "role": "user", "text": "hi", "device": "phone",
                                                   "client_id": "k1"}))
    store.apply(event(11, Event.RUN_STARTED, {"message": "m1", "attempt": 1, "worker": "w"}))
    store.apply(event(12, Event.TOKEN, {"text": "Hel"}))
    store.apply_snapshot(13, [{"run": "r1", "conversation": "c1", "status": "running", "text": "Hello"}])
    store.apply(event(13, Event.TOKEN, {"text": "lo"}))  # already in the snapshot: skipped
    store.apply(event(16, Event.TOKEN, {"text": " wor"}, seq_from=14))  # a merged frame
    assert store.runs["r1"].text == "Hello wor" and store.runs["r1"].status == RunStatus.RUNNING
    store.apply(event(17, Event.RUN_RESUMED, {"text": "Hello world", "attempt": 1}))  # replaces
    store.apply(event(18, "run.unknown_to_this_client", {"x": 1}))  # ignored, as the protocol asks
    changes = store.apply(event(19, Event.RUN_COMPLETED, {"message": "m2", "text": "Hello world!"}))
    run = store.runs["r1"]
    assert (run.status, run.text, run.answer_message, run.seq) == (RunStatus.COMPLETED, "Hello world!", "m2", 19)
    assert [type(c).__name__ for c in changes] == ["RunChanged"]
    # The REST page of the same conversation, twice: nothing doubles.
    page = [{"id": "m1", "role": "user", "content": "hi", "device": "phone", "run": "r1", "seq": 10},
            {"id": "m2", "role": "assistant", "content": "Hello world!", "device": None, "run": "r1", "seq": None}]
    store.load_messages("c1", page)
    store.load_messages("c1", page)
    shown = [(m.role, m.text, m.id) for m in store.messages("c1")]
    assert shown == [("user", "hi", "m1"), ("assistant", "Hello world!", "m2")]
    assert store.messages("c1")[0].client_id == "k1" and store.conversations["c1"].loaded


def test_a_snapshot_of_a_paused_run_carries_its_question_so_a_late_device_can_answer() -> None:
    store = Store()
    store.apply_snapshot(20, [{"run": "r1", "conversation": "c1", "status": "paused", "text": "Found 3. ",
                               "input": {"request": "q1", "prompt": "Which?"},
                               "tools": [{"call": "k1", "name": "search", "arguments": {"q": "x"}, "done": True,
                                          "summary": "3 hits", "error": None}]}])
    run = store.runs["r1"]
    assert (run.status, run.text) == (RunStatus.PAUSED, "Found 3. ")
    assert run.input is not None and (run.input.request, run.input.prompt) == ("q1", "Which?")
    assert [(t.call, t.summary, t.done) for t in run.tools] == [("k1", "3 hits", True)]
    store.apply(event(21, Event.RUN_INPUT_RECEIVED, {"request": "q1", "text": "the second", "by": "phone"}))
    store.apply(event(22, Event.RUN_RESUMED, {"text": "Found 3. ", "attempt": 2}))
    store.apply(event(23, Event.TOKEN, {"text": "The second it is."}))
    run = store.runs["r1"]
    assert (run.status, run.input, run.text) == (RunStatus.RUNNING, None, "Found 3. The second it is.")


def test_a_run_in_flight_follows_a_new_epoch() -> None:
    """Redis lost the history: the new epoch counts seqs from 1 again, so the run's old seq (812)
    must not hold back the new epoch's snapshot and events."""
    store = Store()
    store.apply(event(811, Event.RUN_STARTED, {"message": "m1", "attempt": 1, "worker": "w"}))
    store.apply(event(812, Event.TOKEN, {"text": "Hel"}))
    store.new_epoch()
    store.apply_snapshot(3, [{"run": "r1", "conversation": "c1", "status": "running", "text": "Hello"}])
    store.apply(event(4, Event.TOKEN, {"text": " world"}))
    store.apply(event(5, Event.RUN_COMPLETED, {"message": "m2", "text": "Hello world"}))
    run = store.runs["r1"]
    assert (run.status, run.text, run.seq) == (RunStatus.COMPLETED, "Hello world", 5)


def test_a_restarted_run_shows_only_its_last_attempt_and_a_rolled_back_one_disappears() -> None:
    store = Store()
    store.apply(event(1, Event.MESSAGE_CREATED, {"message": "m1", "text": "q", "device": "d", "client_id": "k"}))
    for seq, name, data in [(2, Event.RUN_STARTED, {"message": "m1", "attempt": 1, "worker": "w1"}),
                            (3, Event.TOKEN, {"text": "first try"}),
                            (4, Event.RUN_STARTED, {"message": "m1", "attempt": 2, "worker": "w2"}),
                            (5, Event.TOKEN, {"text": "second"})]:
        store.apply(event(seq, name, data))
    assert (store.runs["r1"].text, store.runs["r1"].attempt) == ("second", 2)
    store.apply(event(6, Event.RUN_CANCELLED, {"message": None, "text": "", "rolled_back": True}))
    assert store.messages("c1") == [] and store.runs["r1"].rolled_back


def test_a_runs_custom_events_are_kept_in_order_once_and_begin_again_with_a_restart() -> None:
    store = Store()
    store.apply(event(1, Event.RUN_QUEUED, {"behind": None, "position": 1}))
    store.apply(event(2, Event.RUN_STARTED, {"message": "m1", "attempt": 1, "worker": "w1"}))
    values: list[tuple[int, Any]] = [(3, {"step": 1}), (4, "searching"), (4, "searching"), (5, None), (3, {"step": 1})]
    for seq, value in values:
        store.apply(event(seq, Event.RUN_CUSTOM, {"value": value}))  # seqs 4 and 3 again: already applied
    run = store.runs["r1"]
    assert (run.custom, run.status, run.text) == (({"step": 1}, "searching", None), RunStatus.RUNNING, "")
    store.apply(event(6, Event.RUN_STARTED, {"message": "m1", "attempt": 2, "worker": "w2"}))
    store.apply(event(7, Event.RUN_CUSTOM, {"value": [2]}))
    store.apply(event(8, Event.RUN_COMPLETED, {"message": "m2", "text": "done"}))
    assert store.runs["r1"].custom == ([2],) and store.runs["r1"].text == "done"


def test_presence_is_replaced_by_hello_and_applied_idempotently() -> None:
    store = Store()
    assert store.set_devices([{"device": "phone", "node": "a"}])
    assert store.apply_presence("laptop", True, "b") and store.devices == {"phone": "a", "laptop": "b"}
    assert store.apply_presence("laptop", True, "b") == []  # the same frame again: no change
    store.apply_presence("laptop", False, "b")
    assert store.apply_presence("laptop", False, "b") == [] and store.devices == {"phone": "a"}
    store.set_devices([{"device": "tablet", "node": "a"}])  # a hello's list replaces, never merges
    assert store.devices == {"tablet": "a"}


def test_rest_pages_merge_around_what_is_known() -> None:
    assert merge_order(["m3", "m4"], ["m1", "m2", "m3"]) == ["m1", "m2", "m3", "m4"]
    # Nothing shared: what was known came live, after the page.
    assert merge_order(["m6", "m7"], ["m2", "m3"]) == ["m2", "m3", "m6", "m7"]


async def test_a_subscriber_that_falls_behind_loses_the_oldest_events_and_is_told() -> None:
    emitter = Emitter()
    with emitter.subscribe((RunChanged,), maxsize=2) as runs:
        for n in range(5):
            emitter.emit(RunChanged(Run(f"r{n}", "c")))
            emitter.emit(ErrorReported(ChorusError("x", "not subscribed: never queued")))
        emitter.end()
        got = [event async for event in runs]
    assert got[0] == Overflowed(3)
    assert [e.run.id for e in got[1:] if isinstance(e, RunChanged)] == ["r3", "r4"]


# -- against a live cluster ------------------------------------------------------------------------


class Device:
    """A `ChorusClient` and what it told its subscribers, in order."""

    def __init__(self, client: ChorusClient) -> None:
        self.client = client
        self.events: list[dict[str, Any]] = []
        self.told: list[ClientEvent] = []
        client.on(EventReceived, lambda e: self.events.append(dict(e.frame)))
        client.on(ClientEvent, self.told.append)

    def texts(self, run: str) -> list[str]:
        """Every text the device showed for `run`, change by change."""
        return [e.run.text for e in self.told if isinstance(e, RunChanged) and e.run.id == run]

    def of(self, kind: type[ClientEvent]) -> list[Any]:
        return [e for e in self.told if isinstance(e, kind)]

    async def ended(self, run: str, timeout_s: float = ANSWER_S) -> Run:
        store = self.client.store
        await self.client.wait_for(lambda: run in store.runs and store.runs[run].ended, timeout_s)
        return store.runs[run]


def texts_only_grew(texts: list[str]) -> bool:
    return all(b.startswith(a) for a, b in itertools.pairwise(texts))


def comparable(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["seq"], e["event"], e["run"], e["conversation"], e["data"]) for e in events]


def gapless(device: Device, start: int) -> bool:
    seqs = [s for e in device.events for s in range(e.get("seq_from", e["seq"]), e["seq"] + 1)]
    stats = device.client.stats
    return seqs == list(range(start + 1, start + 1 + len(seqs))) and stats.gaps == stats.duplicates == 0


@pytest.fixture
async def closing() -> AsyncIterator[Callable[[ChorusClient], Device]]:
    """Makes devices, and closes them after the test."""
    made: list[ChorusClient] = []

    def device(client: ChorusClient) -> Device:
        made.append(client)
        return Device(client)

    yield device
    await asyncio.gather(*(c.close() for c in made))


@pytest.fixture
def node_proxy(cluster: LocalCluster) -> Iterator[FaultProxy]:
    """A TCP proxy in front of node 1, to cut a device's connection the way a network does."""
    with FaultProxy(upstream_port=cluster.node_ports[1]) as proxy:
        yield proxy


async def test_phone_and_laptop_show_the_same_answer_token_by_token(
    cluster: LocalCluster, closing: Callable[[ChorusClient], Device], http: aiohttp.ClientSession
) -> None:
    user = unique("alice")
    phone = closing(ChorusClient(node_ws(cluster, 0), lambda reason: cluster.token(user), device="phone"))
    laptop = closing(ChorusClient(node_ws(cluster, 1), lambda reason: cluster.token(user), device="laptop"))
    first = await phone.client.connect()
    start = first.seq
    assert (await laptop.client.connect()).node != first.node
    with laptop.client.subscribe(RunChanged) as changes:
        ack = await phone.client.send("[[tokens:30]] [[slow:0.02]] tell me", id=unique("turn"))
        assert ack.run is not None and ack.conversation is not None
        runs = [await phone.ended(ack.run), await laptop.ended(ack.run)]
        streamed = []
        while not streamed or not streamed[-1].ended:
            item = await asyncio.wait_for(changes.get(), 5)
            if isinstance(item, RunChanged) and item.run.id == ack.run:
                streamed.append(item.run)
    assert [r.text for r in runs] == [words(30)] * 2 and {r.status for r in runs} == {RunStatus.COMPLETED}
    # Token by token: the laptop's text grew through many states, each a prefix of the next.
    texts = [r.text for r in streamed if r.text]
    assert len(set(texts)) >= 5 and texts_only_grew(texts)
    assert gapless(phone, start) and gapless(laptop, start)
    assert comparable(phone.events) == comparable(laptop.events)
    status, page = await rest(http, cluster.http_url, cluster.token(user), "GET",
                              f"/v1/conversations/{ack.conversation}/messages")
    assert status == 200 and [m["content"] for m in page["messages"]] == ["[[tokens:30]] [[slow:0.02]] tell me",
                                                                           words(30)]
    for device in (phone, laptop):
        shown = [(m.role, m.text, m.device) for m in device.client.store.messages(ack.conversation)]
        assert shown == [("user", "[[tokens:30]] [[slow:0.02]] tell me", "phone"), ("assistant", words(30), None)]


async def test_a_dropped_connection_resumes_mid_answer_exactly(
    cluster: LocalCluster, closing: Callable[[ChorusClient], Device], node_proxy: FaultProxy
) -> None:
    user = unique("alice")
    phone = closing(ChorusClient(node_ws(cluster, 0), cluster.token(user), device="phone"))
    laptop = closing(ChorusClient(f"ws://127.0.0.1:{node_proxy.port}/ws", cluster.token(user), device="laptop"))
    start = (await phone.client.connect()).seq
    await laptop.client.connect()
    ack = await phone.client.send(LONG)
    assert ack.run is not None
    run = ack.run
    await laptop.client.wait_for(lambda: len(laptop.client.store.runs.get(run, Run(run, "")).text) > 20, 20)
    assert await asyncio.to_thread(node_proxy.reset) == 1  # RST: no close frame, like a network change
    await laptop.client.wait_for(lambda: laptop.client.stats.connects == 2, 10)
    assert not laptop.client.store.runs[run].ended, "the drop must land mid-answer"
    ended = await laptop.ended(run)
    await phone.ended(run)
    assert ended.text == words(60) == phone.client.store.runs[run].text
    assert [d.code for d in laptop.of(Disconnected)] == [1006]
    assert [c.resumed for c in laptop.of(Connected)] == [False, True]
    assert gapless(laptop, start) and comparable(laptop.events) == comparable(phone.events)
    assert texts_only_grew(laptop.texts(run))


async def test_a_reconnect_the_client_asks_for_resumes_mid_answer(
    cluster: LocalCluster, closing: Callable[[ChorusClient], Device]
) -> None:
    """The client closes with 4000 to resume (a gap, no hello in time, `reconnect()`); the node's
    reply close frame says 1000, which must not read as "closed for good"."""
    user = unique("alice")
    phone = closing(ChorusClient(node_ws(cluster, 0), cluster.token(user), device="phone"))
    start = (await phone.client.connect()).seq
    ack = await phone.client.send(LONG)
    assert ack.run is not None
    run = ack.run
    await phone.client.wait_for(lambda: len(phone.client.store.runs.get(run, Run(run, "")).text) > 20, 20)
    await phone.client.reconnect()
    await phone.client.wait_for(lambda: phone.client.stats.connects == 2, 10)
    ended = await phone.ended(run)
    assert ended.text == words(60)
    assert [d.code for d in phone.of(Disconnected)] == [4000]
    assert [c.resumed for c in phone.of(Connected)] == [False, True]
    assert gapless(phone, start)


async def test_a_send_lost_with_its_connection_is_resent_and_runs_once(
    cluster: LocalCluster, closing: Callable[[ChorusClient], Device], node_proxy: FaultProxy,
    http: aiohttp.ClientSession,
) -> None:
    user = unique("alice")
    laptop = closing(ChorusClient(f"ws://127.0.0.1:{node_proxy.port}/ws", cluster.token(user), device="laptop"))
    await laptop.client.connect()
    await asyncio.to_thread(node_proxy.blackhole)
    sending = asyncio.create_task(laptop.client.send("[[tokens:5]] are you there?", id=unique("once")))
    await asyncio.sleep(0.2)  # the send is held in the blackhole (no event can say it was written)
    assert not sending.done()
    await asyncio.to_thread(node_proxy.reset)
    await asyncio.to_thread(node_proxy.heal)
    ack = await asyncio.wait_for(sending, 20)
    assert ack.run is not None and laptop.client.stats.connects == 2
    assert (await laptop.ended(ack.run)).text == words(5)
    status, page = await rest(http, cluster.http_url, cluster.token(user), "GET",
                              f"/v1/conversations/{ack.conversation}/messages")
    assert status == 200 and [m["role"] for m in page["messages"]] == ["user", "assistant"]


async def test_the_token_is_renewed_in_place_before_it_expires(
    cluster: LocalCluster, closing: Callable[[ChorusClient], Device]
) -> None:
    user = unique("alice")
    asked: list[TokenReason] = []

    async def provider(reason: TokenReason) -> str:
        asked.append(reason)
        return cluster.token(user, ttl_s=4)

    phone = closing(ChorusClient(node_ws(cluster, 0), provider, device="phone"))
    await phone.client.connect()
    # Each 4 s token is renewed 2 s before it expires: three renewals outlive the first token.
    await phone.client.wait_for(lambda: asked.count("expiring") >= 3, 15)
    await phone.client.ping()
    assert asked[0] == "connect" and "unauthorized" not in asked
    assert phone.of(Disconnected) == [] and phone.client.stats.connects == 1


async def test_a_refused_renewal_ends_in_4001_and_a_fresh_token_resumes_the_stream(
    cluster: LocalCluster, closing: Callable[[ChorusClient], Device]
) -> None:
    user = unique("alice")
    asked: list[TokenReason] = []

    def provider(reason: TokenReason) -> str:  # a sync provider works too
        asked.append(reason)
        return {"connect": cluster.token(user, ttl_s=3), "expiring": "not-a-token",
                "unauthorized": cluster.token(user, ttl_s=3600)}[reason]

    phone = closing(ChorusClient(node_ws(cluster, 0), provider, device="phone"))
    start = (await phone.client.connect()).seq
    ack = await phone.client.send("[[tokens:80]] [[slow:0.05]] a long answer across the expiry")
    assert ack.run is not None
    ended = await phone.ended(ack.run)
    assert ended.text == words(80)
    assert [d.code for d in phone.of(Disconnected)] == [4001]
    assert "unauthorized" in asked and phone.client.stats.connects == 2
    assert any(e.error.code == "unauthorized" for e in phone.of(ErrorReported)), "the refused renewal is reported"
    assert gapless(phone, start)


async def test_presence_follows_the_users_devices(
    cluster: LocalCluster, closing: Callable[[ChorusClient], Device]
) -> None:
    user = unique("alice")
    phone = closing(ChorusClient(node_ws(cluster, 0), cluster.token(user), device="phone"))
    laptop = closing(ChorusClient(node_ws(cluster, 1), cluster.token(user), device="laptop")).client
    first = await phone.client.connect()
    assert {d.device for d in first.devices} == {"phone"}
    second = await laptop.connect()
    assert {(d.device, d.node) for d in second.devices} == {("phone", first.node), ("laptop", second.node)}
    both = {"phone": first.node, "laptop": second.node}
    await phone.client.wait_for(lambda: phone.client.store.devices == both, 5)
    assert await phone.client.load_presence() == both
    await laptop.close()
    # Offline once the laptop stayed away for the debounce (PRESENCE_DEBOUNCE_SECONDS, 5 s).
    await phone.client.wait_for(lambda: phone.client.store.devices == {"phone": first.node}, 15)


async def test_a_stale_position_resyncs_and_reloads_what_it_shows_from_rest(
    cluster: LocalCluster, closing: Callable[[ChorusClient], Device]
) -> None:
    user = unique("alice")
    phone = closing(ChorusClient(node_ws(cluster, 0), cluster.token(user), device="phone"))
    await phone.client.connect()
    ack = await phone.client.send("[[tokens:3]] before")
    assert ack.run is not None and ack.conversation is not None
    await phone.ended(ack.run)
    tablet = closing(ChorusClient(node_ws(cluster, 1), cluster.token(user), device="tablet",
                                  position=Position(5, "not-the-epoch")))
    hello = await tablet.client.connect()
    await tablet.client.wait_for(lambda: bool(tablet.of(Reloaded)), 10)
    [resync] = tablet.of(Resynced)
    assert (resync.reason, resync.epoch) == ("epoch_changed", hello.epoch)
    assert tablet.client.position == Position(resync.seq, hello.epoch)
    assert ack.conversation in tablet.client.store.conversations
    shown = [(m.role, m.text) for m in await tablet.client.load_messages(ack.conversation)]
    assert shown == [("user", "[[tokens:3]] before"), ("assistant", words(3))]
