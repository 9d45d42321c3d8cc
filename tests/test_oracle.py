"""The load oracle (loadtest/oracle.py) as a pure function: tables of device streams, each judged.

Every case builds what each device accepted through `DeviceLog` (the seq gate the Locust devices
use), then `judge`s one run. The failing cases are the point: an oracle that passes everything
proves nothing.
"""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.oracle import (
    DIVERGED,
    DUPLICATE,
    END,
    END_TEXT,
    GAP,
    RESYNC,
    STORED,
    DeviceLog,
    judge,
    shown,
    transcript,
)
from protocol import Event

RUN = "r_1"


def ev(seq: int, event: str, data: dict[str, Any] | None = None, *, run: str = RUN,
       seq_from: int | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "event", "seq": seq, "conversation": "c_1", "run": run,
                             "event": event, "data": data or {}, "ts": 0}
    if seq_from is not None:
        frame["seq_from"] = seq_from
    return frame


def tok(seq: int, text: str, *, seq_from: int | None = None) -> dict[str, Any]:
    return ev(seq, Event.TOKEN, {"text": text}, seq_from=seq_from)


def completed(seq: int, text: str) -> dict[str, Any]:
    return ev(seq, Event.RUN_COMPLETED, {"message": "m_2", "text": text})


# A whole run as the server publishes it (the user's stream starts after seq 10).
RUN_EVENTS = [
    ev(11, Event.MESSAGE_CREATED, {"message": "m_1", "text": "hi"}),
    ev(12, Event.RUN_STARTED, {"message": "m_1", "attempt": 1}),
    tok(13, "Hel"),
    tok(14, "lo"),
    tok(15, "!"),
    completed(16, "Hello!"),
]
MERGED = [*RUN_EVENTS[:2], tok(14, "Hello", seq_from=13), *RUN_EVENTS[4:]]  # a device that fell behind
RESTARTED = [  # the worker died after "Hel"; attempt 2 answers again
    *RUN_EVENTS[:3],
    ev(14, Event.RUN_STARTED, {"message": "m_1", "attempt": 2}),
    tok(15, "Hello!"),
    completed(16, "Hello!"),
]
OTHER_RUN = ev(14, Event.MESSAGE_CREATED, {"message": "m_9", "text": "x"}, run="r_9")


def log_of(name: str, frames: list[dict[str, Any]], *, start: int = 10,
           resync: dict[str, Any] | None = None) -> DeviceLog:
    device = DeviceLog(name)
    device.position(start)
    for frame in frames:
        device.accept(frame)
    if resync is not None:
        device.resync(resync)
    return device


def verdict_kinds(d0: DeviceLog, d1: DeviceLog, stored: str | None) -> set[str]:
    faults = [*d0.take_faults(), *d1.take_faults()]
    verdict = judge(RUN, {"d0": [a.frame for a in d0.of(RUN)], "d1": [a.frame for a in d1.of(RUN)]},
                    stored=stored, faults=faults)
    assert verdict.ok == (not verdict.failures)
    return {f.kind for f in verdict.failures}


CASES: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]], str | None, set[str]]] = [
    # name, device 0's frames, device 1's frames, stored answer, the failure kinds expected
    ("identical devices, answer stored", RUN_EVENTS, RUN_EVENTS, "Hello!", set()),
    ("one device got merged tokens", RUN_EVENTS, MERGED, "Hello!", set()),
    ("a restarted run shows its last attempt", RESTARTED, RESTARTED, "Hello!", set()),
    ("another run's events in between are not this run's",
     [*RUN_EVENTS[:3], OTHER_RUN, *[{**f, "seq": f["seq"] + 1} for f in RUN_EVENTS[3:]]],
     [*RUN_EVENTS[:3], OTHER_RUN, *[{**f, "seq": f["seq"] + 1} for f in RUN_EVENTS[3:]]], "Hello!", set()),
    ("gap: device 1 missed seq 14", RUN_EVENTS, [*RUN_EVENTS[:3], *RUN_EVENTS[4:]], "Hello!", {GAP, DIVERGED}),
    ("duplicate: device 0 got seq 14 twice", [*RUN_EVENTS[:4], RUN_EVENTS[3], *RUN_EVENTS[4:]], RUN_EVENTS,
     "Hello!", {DUPLICATE}),
    ("duplicate: a merged frame of seqs already accepted",
     [*RUN_EVENTS[:5], tok(15, "lo!", seq_from=14), RUN_EVENTS[5]], RUN_EVENTS, "Hello!", {DUPLICATE}),
    ("diverging devices: same seqs, different text", RUN_EVENTS,
     [*RUN_EVENTS[:3], tok(14, "LO"), *RUN_EVENTS[4:]], "Hello!", {DIVERGED}),
    ("diverging devices: different data on a non-token event", RUN_EVENTS,
     [ev(11, Event.MESSAGE_CREATED, {"message": "m_1", "text": "bye"}), *RUN_EVENTS[1:]], "Hello!", {DIVERGED}),
    ("stored answer differs", RUN_EVENTS, RUN_EVENTS, "Hello?", {STORED}),
    ("no stored answer for a completed run", RUN_EVENTS, RUN_EVENTS, None, {STORED}),
    ("end event's text is not what the tokens show",
     [*RUN_EVENTS[:5], completed(16, "Hello")], [*RUN_EVENTS[:5], completed(16, "Hello")], "Hello!", {END_TEXT}),
    ("device 1 never saw the end", RUN_EVENTS, RUN_EVENTS[:5], "Hello!", {END, DIVERGED}),
    ("an event after the end", [*RUN_EVENTS, tok(17, "?")], [*RUN_EVENTS, tok(17, "?")], "Hello!?",
     {END, END_TEXT}),
]


@pytest.mark.parametrize(("d0", "d1", "stored", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_judge(d0: list[dict[str, Any]], d1: list[dict[str, Any]], stored: str | None, expected: set[str]) -> None:
    assert verdict_kinds(log_of("d0", d0), log_of("d1", d1), stored) == expected


def test_resync_fails_the_run() -> None:
    resynced = log_of("d1", RUN_EVENTS, resync={"type": "resync", "reason": "history_trimmed", "seq": 16,
                                                "epoch": "e2"})
    assert verdict_kinds(log_of("d0", RUN_EVENTS), resynced, "Hello!") == {RESYNC}


def test_a_fault_is_reported_once_and_clear_keeps_the_position() -> None:
    device = log_of("d0", [RUN_EVENTS[0], RUN_EVENTS[2]])  # 11, then 13: a gap
    assert [f.kind for f in device.take_faults()] == [GAP]
    assert device.take_faults() == []
    device.clear()
    assert device.events == [] and device.last_seq == 13
    device.accept(tok(14, "x"))
    assert device.take_faults() == []


def test_position_is_set_once() -> None:
    device = DeviceLog("d0")
    device.position(10)
    device.position(3)  # a reconnect's hello does not move a device that has a position
    assert device.last_seq == 10


@pytest.mark.parametrize(("frames", "items"), [
    ([tok(13, "a"), tok(14, "b")], [(13, 14, "token", '{"text": "ab"}')]),
    ([tok(14, "ab", seq_from=13)], [(13, 14, "token", '{"text": "ab"}')]),
    ([tok(13, "a"), ev(14, Event.TOOL_STARTED, {"call": "1"}), tok(15, "b")],
     [(13, 13, "token", '{"text": "a"}'), (14, 14, "tool.started", '{"call": "1"}'), (15, 15, "token", '{"text": "b"}')]),
    ([tok(13, "a"), tok(15, "b")], [(13, 13, "token", '{"text": "a"}'), (15, 15, "token", '{"text": "b"}')]),
])
def test_transcript_joins_adjacent_tokens_only(frames: list[dict[str, Any]], items: list[tuple[Any, ...]]) -> None:
    assert transcript(frames) == items


def test_shown_text_is_the_protocol_reduction() -> None:
    resumed = [*RUN_EVENTS[:3], ev(14, Event.RUN_RESUMED, {"text": "Hello", "attempt": 1}), tok(15, "!")]
    assert (shown(RUN_EVENTS), shown(RESTARTED), shown(resumed)) == ("Hello!", "Hello!", "Hello!")
