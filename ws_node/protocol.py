"""Wire protocol v1: every frame type, parsed and encoded in one stdlib-only module.

Client frames are parsed into frozen dataclasses or rejected with `ProtocolError` (which becomes an
`error` frame; the socket lives on). Server frames are built by the functions below, except event
frames, which the publish script writes once and every node forwards untouched (see fanout.stream).
See docs/protocol.md.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1
MAX_ID_CHARS = 128


class CloseCode(enum.IntEnum):
    """WebSocket close codes. 4xxx are Chorus's own; the client reconnects after each of these
    except `UNAUTHORIZED` (get a new token first), `TOO_MANY_DEVICES`, `INVALID_TEXT` and `POLICY`."""

    NORMAL = 1000
    GOING_AWAY = 1001
    INVALID_TEXT = 1007  # a text frame that is not UTF-8 (aiohttp fails the socket, as RFC 6455 says)
    POLICY = 1008
    TOO_BIG = 1009  # a frame above MAX_FRAME_BYTES (aiohttp)
    INTERNAL = 1011
    SERVICE_RESTART = 1012  # the node is draining: reconnect (elsewhere) with after/epoch
    TRY_AGAIN_LATER = 1013  # the node cannot serve right now (Redis unreachable): reconnect later
    UNAUTHORIZED = 4001  # token expired, invalid, or no auth frame in time: get a new token, reconnect
    SLOW_CONSUMER = 4008  # the socket's outgoing queue overflowed: reconnect with after/epoch
    TOO_MANY_DEVICES = 4029  # the user has USER_MAX_DEVICES other devices online: do not retry at once


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    CONFLICT = "conflict"
    RATE_LIMITED = "rate_limited"
    TOO_LARGE = "too_large"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A command that cannot be served; becomes one `error` frame with the command's id."""

    def __init__(
        self, code: ErrorCode, message: str, id: str | None = None, *, retry_after_ms: int | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True)
class Send:
    id: str | None
    text: str
    conversation: str | None = None
    agent: str | None = None
    double_texting: str | None = None  # overrides the conversation's policy for this message


@dataclass(frozen=True)
class Cancel:
    id: str | None
    run: str


@dataclass(frozen=True)
class Ping:
    id: str | None


@dataclass(frozen=True)
class Auth:
    """A fresh token: the first frame of a socket opened with ``?auth=frame``, or a renewal."""

    id: str | None
    token: str = field(repr=False)


@dataclass(frozen=True)
class Respond:
    """The user's answer to a run's question (`run.input_required`, human in the loop)."""

    id: str | None
    run: str
    request: str
    text: str


Command = Send | Cancel | Ping | Auth | Respond


def parse_command(raw: str | bytes, *, max_text_chars: int) -> Command:
    """Parse one client text frame. Raises `ProtocolError` naming what is wrong."""
    if isinstance(raw, bytes):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "binary frames are not supported; send JSON text")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame must be a JSON object")
    id_ = obj.get("id")
    if id_ is not None and not (isinstance(id_, str) and 0 < len(id_) <= MAX_ID_CHARS and storable(id_)):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"id must be a string of 1-{MAX_ID_CHARS} characters")
    kind = obj.get("type")
    if kind == "send":
        text = _field(obj, "text", str, id_)
        if not text.strip():
            raise ProtocolError(ErrorCode.BAD_REQUEST, "text must not be empty", id_)
        if len(text) > max_text_chars:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"text is longer than {max_text_chars} characters", id_)
        return Send(
            id=id_,
            text=text,
            conversation=_field(obj, "conversation", str, id_, required=False),
            agent=_field(obj, "agent", str, id_, required=False),
            double_texting=_policy(obj, id_),
        )
    if kind == "cancel":
        return Cancel(id=id_, run=_field(obj, "run", str, id_))
    if kind == "ping":
        return Ping(id=id_)
    if kind == "auth":
        return Auth(id=id_, token=_field(obj, "token", str, id_))
    if kind == "respond":
        text = _field(obj, "text", str, id_)
        if len(text) > max_text_chars:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"text is longer than {max_text_chars} characters", id_)
        return Respond(id=id_, run=_field(obj, "run", str, id_), request=_field(obj, "request", str, id_),
                       text=text)
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "type must be a string", id_)
    raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown type {kind[:40]!r}", id_)


def _field(obj: dict[str, Any], name: str, kind: type, id_: str | None, *, required: bool = True) -> Any:
    value = obj.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or (kind is str and not value and required):
        article = "a non-empty string" if kind is str else kind.__name__
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} must be {article}", id_)
    if isinstance(value, str) and len(value) > MAX_ID_CHARS * 64:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"{name} is too long", id_)
    if isinstance(value, str) and not storable(value):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} must be UTF-8 text without NUL characters", id_)
    return value


def storable(value: str) -> bool:
    """Can `value` be stored and sent on? Postgres text refuses NUL, and a JSON escape such as
    "\\ud800" decodes to a lone surrogate that no UTF-8 encoder (asyncpg, orjson, the socket) takes."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _encode(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def hello(*, node: str, user: str, device: str, epoch: str, seq: int, heartbeat_s: int) -> str:
    return _encode({"type": "hello", "node": node, "user": user, "device": device, "epoch": epoch,
                    "seq": seq, "heartbeat": heartbeat_s, "protocol": PROTOCOL_VERSION})


def ack(id_: str | None, **fields: Any) -> str:
    return _encode({"type": "ack", "id": id_, **fields})


def error(code: ErrorCode, message: str, id_: str | None = None, *, retry_after_ms: int | None = None) -> str:
    frame: dict[str, Any] = {"type": "error", "id": id_, "code": str(code), "message": message}
    if retry_after_ms is not None:
        frame["retry_after_ms"] = retry_after_ms
    return _encode(frame)


def pong(id_: str | None) -> str:
    return _encode({"type": "pong", "id": id_})


def resync(reason: str, *, seq: int, epoch: str) -> str:
    return _encode({"type": "resync", "reason": reason, "seq": seq, "epoch": epoch})


def reconnect(*, after_ms: int) -> str:
    return _encode({"type": "reconnect", "after_ms": after_ms})


def snapshot(*, seq: int, epoch: str, runs: list[dict[str, Any]]) -> str:
    """The user's runs in flight, each run's text exact as of `seq` (see fanout.snapshot)."""
    return _encode({"type": "snapshot", "seq": seq, "epoch": epoch, "runs": runs})


DOUBLE_TEXTING = ("enqueue", "reject", "interrupt", "rollback")


def _policy(obj: dict[str, Any], id_: str | None) -> str | None:
    value = obj.get("double_texting")
    if value is not None and value not in DOUBLE_TEXTING:
        choices = ", ".join(DOUBLE_TEXTING)
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"double_texting must be one of {choices}", id_)
    return value
