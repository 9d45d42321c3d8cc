"""The correctness oracle of a load run: what the devices of one person must agree on, per run.

Pure (no sockets, no clock, no gevent), so the Locust load (`loadtest/locustfile.py`) and any other
driver share it and tests/test_oracle.py can table-test it. Two parts:

    DeviceLog   one device's stream after the seq gate: the events it accepted, in order, and the
                faults a correct server never causes (a gap, a duplicate seq, a resync)
    judge       one run: no fault on any device; on every device exactly one end event, last; the
                devices' transcripts identical; the shown text equal to the end event's text and to
                the answer stored in Postgres (REST)

A fault is attributed to the next run judged after it happened (a device's stream is the user's,
not one run's), so a gap between two runs still fails a run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from protocol import END_EVENTS, Event, shown_text

Frame = Mapping[str, Any]

# Failure kinds: stable names, so a report can count them (details vary per run).
GAP = "gap"
DUPLICATE = "duplicate"
RESYNC = "resync"
END = "end"  # a device saw no end event, several, or events after it
DIVERGED = "diverged"  # two devices' transcripts differ
END_TEXT = "end text"  # the end event's text is not the text the devices show
STORED = "stored"  # the stored answer is missing or differs from the shown text
UNVERIFIED = "unverified"  # the driver could not fetch what the oracle needs (e.g. REST failed)


@dataclass(frozen=True)
class Failure:
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


@dataclass(frozen=True)
class Accepted:
    """An event a device accepted, with the driver's clock at its arrival (for latencies only)."""

    frame: Frame
    at: float


@dataclass
class DeviceLog:
    """One device's accepted stream. Feed it every `event` frame (`accept`) and every `resync`
    (`resync`); `position` sets where the stream starts (the first `hello`'s seq)."""

    name: str
    last_seq: int | None = None
    events: list[Accepted] = field(default_factory=list)
    faults: list[Failure] = field(default_factory=list)

    def position(self, seq: int) -> None:
        """Start at `seq` (a new device's first hello); a device that has a position keeps it."""
        if self.last_seq is None:
            self.last_seq = seq

    def accept(self, frame: Frame, at: float = 0.0) -> Accepted | None:
        """The seq gate: accept an event with the next seq; a duplicate is a fault and dropped, a
        gap is a fault and the event is kept (what followed it is still worth comparing). A merged
        token frame covers `seq_from`..`seq`."""
        seq = int(frame["seq"])
        first = int(frame.get("seq_from", seq))
        if self.last_seq is not None and first <= self.last_seq:
            self.faults.append(Failure(DUPLICATE, f"{self.name}: seq {first}..{seq} after {self.last_seq}"))
            return None
        if self.last_seq is not None and first != self.last_seq + 1:
            self.faults.append(Failure(GAP, f"{self.name}: seq {first} after {self.last_seq}"))
        self.last_seq = seq
        accepted = Accepted(frame, at)
        self.events.append(accepted)
        return accepted

    def resync(self, frame: Frame) -> None:
        """The server could not replay this device's stream: what it missed is unknown."""
        self.faults.append(Failure(RESYNC, f"{self.name}: {frame.get('reason')} at seq {frame.get('seq')}"))
        self.last_seq = int(frame["seq"])

    def of(self, run: str) -> list[Accepted]:
        """The accepted events of `run`, in order."""
        return [a for a in self.events if a.frame.get("run") == run]

    def ended(self, run: str) -> bool:
        return any(a.frame["event"] in END_EVENTS for a in self.of(run))

    def take_faults(self) -> list[Failure]:
        """The faults since the last call (each is reported once)."""
        faults, self.faults = self.faults, []
        return faults

    def clear(self) -> None:
        """Forget the accepted events (after a run was judged), keeping the position."""
        self.events.clear()


@dataclass(frozen=True)
class Verdict:
    run: str
    failures: tuple[Failure, ...]
    shown: str  # the run's text as the first device shows it

    @property
    def ok(self) -> bool:
        return not self.failures

    def kinds(self) -> str:
        """The failure kinds, sorted and joined: a stable label for counting failures."""
        return ", ".join(sorted({f.kind for f in self.failures}))


def transcript(events: Sequence[Frame]) -> list[tuple[int, int, str, str]]:
    """What devices must agree on: (first seq, last seq, event, data as JSON) per event, adjacent
    `token` events joined into one, so a device that got merged token frames (it fell behind)
    compares equal to one that got them one by one."""
    items: list[tuple[int, int, str, str]] = []
    pending: tuple[int, int, str] | None = None  # a token group: first, last, joined text
    for frame in events:
        seq, first = int(frame["seq"]), int(frame.get("seq_from", frame["seq"]))
        if frame["event"] == Event.TOKEN:
            text = str(frame["data"]["text"])
            if pending is not None and first == pending[1] + 1:
                pending = (pending[0], seq, pending[2] + text)
                continue
            if pending is not None:
                items.append(_token_item(pending))
            pending = (first, seq, text)
            continue
        if pending is not None:
            items.append(_token_item(pending))
            pending = None
        items.append((first, seq, str(frame["event"]), json.dumps(frame["data"], sort_keys=True)))
    if pending is not None:
        items.append(_token_item(pending))
    return items


def _token_item(group: tuple[int, int, str]) -> tuple[int, int, str, str]:
    return (group[0], group[1], Event.TOKEN, json.dumps({"text": group[2]}))


def shown(events: Sequence[Frame]) -> str:
    """The run's text as a device shows it: its events through `protocol.shown_text`."""
    text = ""
    for frame in events:
        text = shown_text(text, frame["event"], frame["data"])
    return text


def judge(
    run: str,
    devices: Mapping[str, Sequence[Frame]],
    *,
    stored: str | None,
    faults: Sequence[Failure] = (),
) -> Verdict:
    """Judge one run from each device's accepted events of it (`devices`: name -> events),
    the faults the devices' logs took since the last run judged, and the stored answer (the
    content of the run's assistant message over REST; None when there is none)."""
    failures = list(faults)
    for name, events in devices.items():
        ends = [f for f in events if f["event"] in END_EVENTS]
        if len(ends) != 1:
            failures.append(Failure(END, f"{name} saw {len(ends)} end events"))
        elif ends[0] is not events[-1]:
            failures.append(Failure(END, f"{name} saw {events[-1]['event']} after the end"))
    names = list(devices)
    if not names:
        return Verdict(run, (Failure(END, "no device"),), "")
    reference = transcript(devices[names[0]])
    for name in names[1:]:
        other = transcript(devices[name])
        if other != reference:
            where = _first_difference(reference, other)
            failures.append(Failure(DIVERGED, f"{names[0]} and {name}: {where}"))
    text = shown(devices[names[0]])
    end = next((f for f in devices[names[0]] if f["event"] in END_EVENTS), None)
    if end is not None and "text" in end["data"] and end["data"]["text"] != text:
        failures.append(Failure(END_TEXT, f"{end['event']} says {_diff(end['data']['text'], text)}"))
    completed = end is not None and end["event"] == Event.RUN_COMPLETED
    if stored is None and (completed or text):
        failures.append(Failure(STORED, f"no stored answer for a run that shows {len(text)} characters"))
    elif stored is not None and stored != text:
        failures.append(Failure(STORED, f"stored {_diff(stored, text)}"))
    return Verdict(run, tuple(failures), text)


def _first_difference(a: list[tuple[int, int, str, str]], b: list[tuple[int, int, str, str]]) -> str:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"item {index}: {_short(x)} vs {_short(y)}"
    return f"{len(a)} vs {len(b)} items"


def _diff(actual: str, expected: str) -> str:
    """`actual` against the shown `expected`: lengths and the first differing character."""
    at = next((i for i, (x, y) in enumerate(zip(actual, expected, strict=False)) if x != y),
              min(len(actual), len(expected)))
    return f"{len(actual)} characters, shown {len(expected)}, first difference at {at}"


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "DIVERGED", "DUPLICATE", "END", "END_TEXT", "GAP", "RESYNC", "STORED", "UNVERIFIED",
    "Accepted", "DeviceLog", "Failure", "Verdict", "judge", "shown", "transcript",
]
