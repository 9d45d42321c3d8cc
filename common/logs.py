"""Logs: one JSON object per line (`LOG_FORMAT=json`, the default), or plain text for people.

Every line says which process wrote it (`service`: `ws_node`/`agent_worker`, `instance`: its
`NODE_ID`) and, where known, whom it is about: `bind(user=..., device=...)` puts fields on the
current task and every task it starts (a socket's handler binds its user and device, a worker
its run), and the current trace's `trace_id`/`span_id` are added while a span is recording.
What is logged at info never carries a token, a secret or a message's text (tests/test_logs.py
greps a cluster's logs for them).
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any

import orjson
from opentelemetry import trace

_EMPTY: Mapping[str, Any] = MappingProxyType({})
# Never mutated: `bind` sets a new mapping, so a task's fields cannot leak into its parent's.
_fields: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar("chorus_log", default=_EMPTY)
# The LogRecord's own attributes; anything else on a record came as `extra=` and is logged too.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def bind(**fields: Any) -> None:
    """Add `fields` to every line logged from now on in this task and the tasks it starts."""
    _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v is not None}})


@contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """`bind` for a block."""
    token = _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _fields.reset(token)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str, instance: str) -> None:
        super().__init__()
        self.service = service
        self.instance = instance

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {
            "ts": f"{when}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "service": self.service,
            "instance": self.instance,
            **_fields.get(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            line["trace_id"], line["span_id"] = f"{span.trace_id:032x}", f"{span.span_id:016x}"
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """The human format, with the bound fields at the end of the line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _fields.get()
        return text + "".join(f" {k}={v}" for k, v in fields.items()) if fields else text


def configure(*, level: str, format: str, service: str, instance: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(service, instance) if format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
