"""Server -> client frames: frozen dataclasses, and `encode` for all of them but `event`.

Event frames are written once by the publisher (`protocol.events.event_body`, with the seq put in
front by the stream) and forwarded untouched by every node; `EventFrame` is how a client reads
one. Members that are None are left out of `ack` (it carries what its command produced) and of
`error` (`retry_after_ms`). See docs/protocol.md, "Server -> client frames".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from protocol.vocabulary import PROTOCOL_VERSION, ErrorCode, Event, FrameType, ResyncReason, RunStatus


@dataclass(frozen=True)
class Frame:
    type: ClassVar[FrameType]
    # Members left out while None.
    optional: ClassVar[tuple[str, ...]] = ()


@dataclass(frozen=True)
class DeviceOnline:
    """One of the user's devices online now, and the node it is connected to."""

    device: str
    node: str


@dataclass(frozen=True)
class Hello(Frame):
    """`devices`: the user's devices online now, this one included (replaces a client's list)."""

    type = FrameType.HELLO
    node: str
    user: str
    device: str
    epoch: str
    seq: int
    heartbeat: int
    protocol: int = PROTOCOL_VERSION
    devices: tuple[DeviceOnline, ...] = field(default=())


@dataclass(frozen=True)
class Ack(Frame):
    """The one reply to a command that succeeded."""

    type = FrameType.ACK
    optional = ("conversation", "message", "run", "seq", "request", "expires_at")
    id: str | None
    conversation: str | None = None
    message: str | None = None
    run: str | None = None
    seq: int | None = None
    request: str | None = None
    expires_at: int | None = None


@dataclass(frozen=True)
class Error(Frame):
    type = FrameType.ERROR
    optional = ("retry_after_ms",)
    code: ErrorCode
    message: str
    id: str | None = None
    retry_after_ms: int | None = None


@dataclass(frozen=True)
class Pong(Frame):
    type = FrameType.PONG
    id: str | None


@dataclass(frozen=True)
class Resync(Frame):
    type = FrameType.RESYNC
    reason: ResyncReason
    seq: int
    epoch: str


@dataclass(frozen=True)
class Reconnect(Frame):
    type = FrameType.RECONNECT
    after_ms: int


@dataclass(frozen=True)
class PendingInput:
    """The question a paused run asked (its `run.input_required`), for `respond`."""

    request: str
    prompt: str


@dataclass(frozen=True)
class ToolCallState:
    """One tool call of a run so far: started (`done` false) or ended (`summary`, or `error`)."""

    call: str
    name: str
    arguments: dict[str, Any]
    done: bool
    summary: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class RunSnapshot:
    """One run in flight as every device shows it at the snapshot's seq: its text, its tool calls
    so far and, while it is `paused`, the question it waits on (so a device that just connected
    can answer it)."""

    run: str
    conversation: str
    status: RunStatus
    text: str
    input: PendingInput | None = None
    tools: tuple[ToolCallState, ...] = ()


@dataclass(frozen=True)
class Snapshot(Frame):
    """The user's runs in flight, each run's text exact as of `seq` (see runs.snapshot)."""

    type = FrameType.SNAPSHOT
    seq: int
    epoch: str
    runs: tuple[RunSnapshot, ...] = field(default=())


@dataclass(frozen=True)
class Presence(Frame):
    """One of the user's devices came online, or went offline (its last socket closed and it did
    not come back within the node's debounce). Not sequenced: no seq, never in history."""

    type = FrameType.PRESENCE
    device: str
    online: bool
    node: str


@dataclass(frozen=True)
class EventFrame(Frame):
    """An event as a client reads it. `seq_from` is set on merged token frames, which cover
    seqs `seq_from`..`seq` (a device that fell behind)."""

    type = FrameType.EVENT
    optional = ("seq_from",)
    seq: int
    conversation: str
    run: str | None
    event: Event
    data: dict[str, Any]
    ts: int
    seq_from: int | None = None

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> EventFrame:
        return cls(seq=obj["seq"], conversation=obj["conversation"], run=obj["run"],
                   event=Event(obj["event"]), data=obj["data"], ts=obj["ts"], seq_from=obj.get("seq_from"))


ServerFrame = Hello | Ack | Error | Pong | Resync | Reconnect | Snapshot | Presence | EventFrame


def to_json(frame: Frame) -> dict[str, Any]:
    """`frame` as the JSON object sent on the wire (`type` first)."""
    obj: dict[str, Any] = {"type": frame.type}
    for f in dataclasses.fields(frame):
        value = getattr(frame, f.name)
        if value is None and f.name in frame.optional:
            continue
        if isinstance(value, tuple):  # Snapshot.runs, Hello.devices
            value = [dataclasses.asdict(v) for v in value]
        obj[f.name] = value
    return obj


def encode(frame: Frame) -> str:
    return json.dumps(to_json(frame), separators=(",", ":"), ensure_ascii=False)
