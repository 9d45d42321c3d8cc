"""Event payloads: the `data` of each event frame, one frozen dataclass per `Event`.

A producer builds one of these and `runs` publishes it (`event_body` below gives its frame minus
the seq, which the stream assigns). Optional members that are None (or False) are left out of
`data`, as docs/protocol.md's events table shows them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from protocol.vocabulary import DoubleTexting, Event, FrameType, Role


@dataclass(frozen=True)
class EventData:
    """Base of every payload; `event` names the event it is the data of."""

    event: ClassVar[Event]
    # Members left out of `data` while None/False (the rest are always present, null or not).
    optional: ClassVar[tuple[str, ...]] = ()

    def to_data(self) -> dict[str, Any]:
        data = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.optional and (value is None or value is False):
                continue
            if dataclasses.is_dataclass(value) and not isinstance(value, type):  # TokenUsage
                value = dataclasses.asdict(value)
            data[f.name] = value
        return data


@dataclass(frozen=True)
class MessageCreated(EventData):
    event = Event.MESSAGE_CREATED
    message: str
    text: str
    device: str
    client_id: str
    role: Role = Role.USER


@dataclass(frozen=True)
class RunQueued(EventData):
    """The run waits: behind run `behind` of its conversation (double-texting, with the `policy`
    and the `message` that started it), or for a free worker, `position` 1 being next (sent again
    as the position changes)."""

    event = Event.RUN_QUEUED
    optional = ("policy", "message", "position")
    behind: str | None
    policy: DoubleTexting | None = None
    message: str | None = None
    position: int | None = None


@dataclass(frozen=True)
class RunStarted(EventData):
    event = Event.RUN_STARTED
    message: str
    attempt: int
    worker: str


@dataclass(frozen=True)
class Token(EventData):
    event = Event.TOKEN
    text: str


@dataclass(frozen=True)
class RunResumed(EventData):
    """The whole answer so far, re-sent after the run's events landed in a new epoch."""

    event = Event.RUN_RESUMED
    text: str
    attempt: int


@dataclass(frozen=True)
class ToolStarted(EventData):
    event = Event.TOOL_STARTED
    call: str
    name: str
    arguments: Any


@dataclass(frozen=True)
class ToolCompleted(EventData):
    event = Event.TOOL_COMPLETED
    call: str
    name: str
    summary: str | None
    error: str | None


# A `run.custom`'s `value` encodes to at most this many bytes of compact UTF-8 JSON, its arrays and
# objects nest at most MAX_CUSTOM_DEPTH deep and its integers fit in 64 bits: a graph cannot flood
# devices with one event, and every encoder on the way (orjson in `runs`, JavaScript) takes it.
MAX_CUSTOM_BYTES = 16 * 1024
MAX_CUSTOM_DEPTH = 32
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class RunCustom(EventData):
    """Something the agent's graph wrote to its custom stream (LangGraph `get_stream_writer()`),
    in order with the run's tokens and tool calls. `value` is any JSON value (at most 16 KiB
    encoded); Chorus gives it no meaning."""

    event = Event.RUN_CUSTOM
    value: Any


def custom_value(payload: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """`payload` as the `value` of a `run.custom`: its JSON form (what `json.loads` gives back:
    dicts, lists, strings, numbers, booleans, None). `default` converts what `json` cannot encode
    by itself, as `json.dumps`'s `default` does.

    Raises:
        ValueError: `payload` has no JSON form (a type nothing converts, NaN or infinity, a lone
            surrogate, a key that is not a string or number), or is over a limit above.
    """
    try:
        text = json.dumps(payload, default=default, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":"))
        size = len(text.encode("utf-8"))
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise ValueError(f"no JSON form ({exc})") from None
    if size > MAX_CUSTOM_BYTES:
        raise ValueError(f"{size} bytes of JSON, over the {MAX_CUSTOM_BYTES} allowed")
    value = json.loads(text)
    _check_nesting(value, 0)
    return value


def _check_nesting(value: Any, depth: int) -> None:
    if isinstance(value, dict | list):
        if depth == MAX_CUSTOM_DEPTH:
            raise ValueError(f"nested deeper than {MAX_CUSTOM_DEPTH}")
        for item in value.values() if isinstance(value, dict) else value:
            _check_nesting(item, depth + 1)
    elif isinstance(value, int) and not isinstance(value, bool) and not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"an integer beyond 64 bits ({value})")


@dataclass(frozen=True)
class RunInputRequired(EventData):
    event = Event.RUN_INPUT_REQUIRED
    request: str
    prompt: str


@dataclass(frozen=True)
class RunInputReceived(EventData):
    event = Event.RUN_INPUT_RECEIVED
    request: str
    text: str
    by: str


@dataclass(frozen=True)
class TokenUsage:
    """The tokens a run's model calls counted, as the provider reported them (`usage` of its
    streamed responses; absent where the endpoint does not report usage)."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class RunCompleted(EventData):
    event = Event.RUN_COMPLETED
    optional = ("rolled_back", "by", "usage")
    message: str | None
    text: str
    rolled_back: bool = False
    by: str | None = None
    usage: TokenUsage | None = None


@dataclass(frozen=True)
class RunCancelled(EventData):
    """`stopped_at`: the seq of the run's last event (from its worker); `by`: the device that
    cancelled a run no worker had taken; `rolled_back`: a `rollback` discarded it."""

    event = Event.RUN_CANCELLED
    optional = ("stopped_at", "rolled_back", "by")
    message: str | None
    text: str
    stopped_at: int | None = None
    rolled_back: bool = False
    by: str | None = None


@dataclass(frozen=True)
class RunFailed(EventData):
    """`message` is the readable reason, as in every error; the partial answer (if any was
    stored) is `answer_message`."""

    event = Event.RUN_FAILED
    optional = ("rolled_back", "by")
    code: str
    message: str
    text: str
    answer_message: str | None
    rolled_back: bool = False
    by: str | None = None


EVENT_DATA: dict[Event, type[EventData]] = {
    cls.event: cls
    for cls in (MessageCreated, RunQueued, RunStarted, Token, RunResumed, ToolStarted, ToolCompleted,
                RunCustom, RunInputRequired, RunInputReceived, RunCompleted, RunCancelled, RunFailed)
}


def event_body(
    conversation: str, run: str | None, data: EventData, ts_ms: int,
    *, dumps: Callable[[dict[str, Any]], str] | None = None,
) -> str:
    """An event frame without its seq: a JSON object that the stream opens with ``"seq":N``.
    Encoded once per publish; every node forwards the published text untouched. `dumps` may be
    a faster encoder of the same compact JSON (`runs` passes orjson's; this package keeps to the
    standard library)."""
    frame = {"type": FrameType.EVENT, "conversation": conversation, "run": run, "event": data.event,
             "data": data.to_data(), "ts": ts_ms}
    if dumps is not None:
        return dumps(frame)
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False)
