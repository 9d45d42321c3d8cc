"""The client's errors, drawn once:

    Exception
    └── ChorusError          an `error` frame in reply to a command, or a REST error (`code`, `status`)
        ├── ConnectionLost   the socket closed before the reply of a command that is not resent
        │                    (also a builtin ConnectionError)
        ├── CommandTimeout   no reply within the command's `timeout_s` (also a builtin TimeoutError)
        └── ClientClosed     the client was closed, or gave up (`code` says why: "closed",
                             "unauthorized", "gave_up"), with the command still pending

`code` is an `ErrorCode` value for errors the server reported, else one of the client's own:
"closed", "gave_up", "unauthorized", "disconnected", "timeout", "token", "reload", "bad_frame".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ChorusError(Exception):
    """`code`: why; `retry_after_ms`: the server's hint; `frame`: the error frame as received;
    `status`: the HTTP status of a REST error."""

    def __init__(self, code: str, message: str, *, retry_after_ms: int | None = None,
                 frame: Mapping[str, Any] | None = None, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.frame = dict(frame) if frame is not None else {}
        self.status = status

    @classmethod
    def from_frame(cls, frame: Mapping[str, Any]) -> ChorusError:
        """The error a command's `error` reply stands for."""
        return cls(str(frame.get("code")), str(frame.get("message")),
                   retry_after_ms=frame.get("retry_after_ms"), frame=frame)


class ConnectionLost(ChorusError, ConnectionError):
    def __init__(self, message: str) -> None:
        super().__init__("disconnected", message)


class CommandTimeout(ChorusError, TimeoutError):
    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)


class ClientClosed(ChorusError):
    """`close_code`: the WebSocket close code (or HTTP status) that made the client give up."""

    def __init__(self, message: str, code: str = "closed", close_code: int | None = None) -> None:
        super().__init__(code, message)
        self.close_code = close_code
