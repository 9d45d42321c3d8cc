"""The protocol's vocabulary: every name a frame, event, status, policy or code can carry.

These enums are the only place Chorus spells them. They are `StrEnum`/`IntEnum`, so a member
compares equal to its wire value and encodes as it (``Event.TOKEN == "token"``). Postgres keeps
its own CHECK constraints on statuses and policies; tests/test_vocabulary.py checks those against
the enums here.
"""

from __future__ import annotations

import enum

PROTOCOL_VERSION = 1


class FrameType(enum.StrEnum):
    """The `type` of every frame, in both directions."""

    # client -> server
    SEND = "send"
    CANCEL = "cancel"
    RESPOND = "respond"
    PING = "ping"
    AUTH = "auth"
    # server -> client
    HELLO = "hello"
    EVENT = "event"
    ACK = "ack"
    ERROR = "error"
    PONG = "pong"
    RESYNC = "resync"
    SNAPSHOT = "snapshot"
    RECONNECT = "reconnect"
    PRESENCE = "presence"


class Event(enum.StrEnum):
    """The `event` of an event frame (docs/protocol.md, the events table)."""

    MESSAGE_CREATED = "message.created"
    RUN_QUEUED = "run.queued"
    RUN_STARTED = "run.started"
    TOKEN = "token"
    RUN_RESUMED = "run.resumed"
    TOOL_STARTED = "tool.started"
    TOOL_COMPLETED = "tool.completed"
    RUN_CUSTOM = "run.custom"
    RUN_INPUT_REQUIRED = "run.input_required"
    RUN_INPUT_RECEIVED = "run.input_received"
    RUN_COMPLETED = "run.completed"
    RUN_CANCELLED = "run.cancelled"
    RUN_FAILED = "run.failed"


class RunStatus(enum.StrEnum):
    """A run's status as stored (and shown in snapshots). `waiting`: behind another run of its
    conversation; `queued`: on the run queue; `running`: a worker holds it; `paused`: it asked
    its user a question and waits for the answer, holding no worker."""

    WAITING = "waiting"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"


ENDED = frozenset({RunStatus.COMPLETED, RunStatus.CANCELLED, RunStatus.FAILED})
IN_FLIGHT = frozenset({RunStatus.WAITING, RunStatus.QUEUED, RunStatus.RUNNING})

# The one event that ends a run, by the status it ends in.
END_EVENT = {
    RunStatus.COMPLETED: Event.RUN_COMPLETED,
    RunStatus.CANCELLED: Event.RUN_CANCELLED,
    RunStatus.FAILED: Event.RUN_FAILED,
}
END_EVENTS = frozenset(END_EVENT.values())


class DoubleTexting(enum.StrEnum):
    """What a message sent while a run of its conversation is in flight does."""

    ENQUEUE = "enqueue"
    REJECT = "reject"
    INTERRUPT = "interrupt"
    ROLLBACK = "rollback"


class Role(enum.StrEnum):
    USER = "user"
    ASSISTANT = "assistant"


class ErrorCode(enum.StrEnum):
    """The `code` of an `error` frame (and of REST errors)."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    CONFLICT = "conflict"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"  # the run queue is past its operator-set depth or age: retry later
    AGENT_UNAVAILABLE = "agent_unavailable"  # no live worker serves the agent: retry later
    TOO_LARGE = "too_large"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class ResyncReason(enum.StrEnum):
    """Why a device's position was unusable (the `reason` of a `resync` frame)."""

    HISTORY_TRIMMED = "history_trimmed"
    EPOCH_CHANGED = "epoch_changed"


class CloseCode(enum.IntEnum):
    """WebSocket close codes. 4xxx are Chorus's own; the client reconnects after each of these
    except `UNAUTHORIZED` (get a new token first), `TOO_MANY_DEVICES`, `INVALID_TEXT` and `POLICY`."""

    NORMAL = 1000
    GOING_AWAY = 1001
    ABNORMAL = 1006  # no close frame at all (the connection dropped); never sent, only seen
    INVALID_TEXT = 1007  # a text frame that is not UTF-8 (aiohttp fails the socket, as RFC 6455 says)
    POLICY = 1008
    TOO_BIG = 1009  # a frame above MAX_FRAME_BYTES (aiohttp)
    INTERNAL = 1011
    SERVICE_RESTART = 1012  # the node is draining: reconnect (elsewhere) with after/epoch
    TRY_AGAIN_LATER = 1013  # the node cannot serve right now (Redis unreachable): reconnect later
    UNAUTHORIZED = 4001  # token expired, invalid, or no auth frame in time: get a new token, reconnect
    SLOW_CONSUMER = 4008  # the socket's outgoing queue overflowed: reconnect with after/epoch
    TOO_MANY_DEVICES = 4029  # the user has USER_MAX_DEVICES other devices online: do not retry at once


# Close codes after which a client reconnects at once (with backoff), keeping its position.
RECONNECT_CODES = frozenset({
    CloseCode.GOING_AWAY, CloseCode.ABNORMAL, CloseCode.INTERNAL, CloseCode.SERVICE_RESTART,
    CloseCode.TRY_AGAIN_LATER, CloseCode.SLOW_CONSUMER,
})
