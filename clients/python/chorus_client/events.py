"""What a client tells its users, as frozen dataclasses: subscribe with `client.on(Kind, callback)`
or iterate `client.subscribe(Kind, ...)` (emitter.py). Every event is a `ClientEvent`.

Store changes (`RunChanged`, `MessageChanged`, `MessagesChanged`, `ConversationChanged`,
`PresenceChanged`) say what a UI redraws; the connection's own (`StateChanged`, `Connected`,
`Disconnected`, `Resynced`, `SnapshotApplied`, `Reloaded`, `SeqGap`, `ErrorReported`) say what
happened to the stream; `EventReceived` and `FrameReceived` hand out the wire frames themselves
(every event the seq gate accepted, and every frame at all) for tools and tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from chorus_client.errors import ChorusError
from chorus_client.models import Conversation, Message, Run
from protocol import Hello

Status = Literal["idle", "connecting", "connected", "reconnecting", "closed"]


@dataclass(frozen=True)
class ConnectionState:
    """`status`: "idle" (not started), "connecting" (the first connect), "connected" (a `hello`
    came), "reconnecting" (waiting to, or trying to, connect again), "closed" (`close()`d, or given
    up: `code` says why). `node` serves the device while connected; `resumed`: connected with a
    position (`after`/`epoch`), not as a new device; `attempt`: reconnect attempts since the last
    `hello`; `code`: the close code (or HTTP status) behind this state; `delay_s`: until the next
    attempt."""

    status: Status = "idle"
    node: str | None = None
    resumed: bool = False
    attempt: int = 0
    code: int | None = None
    delay_s: float | None = None


@dataclass(frozen=True)
class ClientEvent:
    """Base of every event a client emits."""


@dataclass(frozen=True)
class StateChanged(ClientEvent):
    state: ConnectionState


@dataclass(frozen=True)
class Connected(ClientEvent):
    """A `hello` arrived (first connect or any reconnect)."""

    hello: Hello
    resumed: bool


@dataclass(frozen=True)
class Disconnected(ClientEvent):
    """A socket that was open closed (`code` 1006: no close frame, the connection dropped)."""

    code: int
    reason: str


@dataclass(frozen=True)
class FrameReceived(ClientEvent):
    """Any frame from the server, as received (raw-frame access); emitted before it is applied."""

    frame: Mapping[str, Any]


@dataclass(frozen=True)
class EventReceived(ClientEvent):
    """An event frame the seq gate accepted: each seq once, in order (unknown event names too).
    A merged token frame covers `seq_from`..`seq`."""

    frame: Mapping[str, Any]

    @property
    def event(self) -> str:
        return str(self.frame["event"])

    @property
    def seq(self) -> int:
        return int(self.frame["seq"])

    @property
    def seq_from(self) -> int:
        return int(self.frame.get("seq_from", self.frame["seq"]))

    @property
    def run(self) -> str | None:
        return self.frame.get("run")

    @property
    def conversation(self) -> str:
        return str(self.frame["conversation"])

    @property
    def data(self) -> Mapping[str, Any]:
        return self.frame.get("data") or {}


@dataclass(frozen=True)
class SeqGap(ClientEvent):
    """An event that would leave a gap after `after` (never shown): the client reconnects from `after`."""

    after: int
    seq_from: int
    seq: int


@dataclass(frozen=True)
class Resynced(ClientEvent):
    """The device's position was unusable (`reason`: a `ResyncReason`); it is now at `seq` of
    `epoch`, a snapshot follows, and what it shows is reloaded from REST."""

    reason: str
    seq: int
    epoch: str


@dataclass(frozen=True)
class SnapshotApplied(ClientEvent):
    """The runs in flight as of `seq`, each with its text exact, were applied to the store."""

    seq: int
    epoch: str
    runs: tuple[str, ...]


@dataclass(frozen=True)
class Reloaded(ClientEvent):
    """After a resync: the conversation list and `conversations` loaded conversations came again from REST."""

    conversations: int


@dataclass(frozen=True)
class RunChanged(ClientEvent):
    run: Run


@dataclass(frozen=True)
class MessageChanged(ClientEvent):
    """A user message was added or changed."""

    message: Message


@dataclass(frozen=True)
class MessagesChanged(ClientEvent):
    """A conversation's list of messages changed (added, removed, reordered)."""

    conversation: str


@dataclass(frozen=True)
class ConversationChanged(ClientEvent):
    conversation: Conversation


@dataclass(frozen=True)
class PresenceChanged(ClientEvent):
    """The user's devices online now, device -> node (this one included)."""

    devices: Mapping[str, str]


@dataclass(frozen=True)
class ErrorReported(ClientEvent):
    """Something failed in the background: the token provider, a REST reload after a resync, an
    `error` frame no command waits for, giving up."""

    error: ChorusError


@dataclass(frozen=True)
class Overflowed(ClientEvent):
    """A subscription fell behind by more than its `maxsize`: its `dropped` oldest events are gone
    (the store still has the state they changed)."""

    dropped: int


# The store's changes: what `Store` methods return, for the client to emit.
Change = RunChanged | MessageChanged | MessagesChanged | ConversationChanged | PresenceChanged
