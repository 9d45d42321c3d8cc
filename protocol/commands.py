"""Client -> server commands: frozen dataclasses, and `parse_command` for one text frame.

A frame that is not a valid command is rejected with `ProtocolError`, which the node turns into
one `error` frame (the socket lives on). See docs/protocol.md, "Client -> server commands".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from protocol.vocabulary import DoubleTexting, ErrorCode, FrameType

MAX_ID_CHARS = 128


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
    double_texting: DoubleTexting | None = None  # overrides the conversation's policy for this message


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
    if kind == FrameType.SEND:
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
    if kind == FrameType.CANCEL:
        return Cancel(id=id_, run=_field(obj, "run", str, id_))
    if kind == FrameType.PING:
        return Ping(id=id_)
    if kind == FrameType.AUTH:
        return Auth(id=id_, token=_field(obj, "token", str, id_))
    if kind == FrameType.RESPOND:
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


def _policy(obj: dict[str, Any], id_: str | None) -> DoubleTexting | None:
    value = obj.get("double_texting")
    if value is None:
        return None
    if value not in DoubleTexting.__members__.values():
        choices = ", ".join(DoubleTexting)
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"double_texting must be one of {choices}", id_)
    return DoubleTexting(value)
