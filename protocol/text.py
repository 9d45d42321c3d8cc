"""The text a device shows for a run: one reducer, used by the node's snapshots, the worker's
`run.resumed` and every client.

- `run.started` begins the text again (attempt > 1 is a restart after a worker died);
- `token` appends its text (a merged token frame carries the joined texts of the seqs it covers);
- `run.resumed` replaces the text with the whole answer so far;
- every other event leaves it as it is.

And the run's tool calls (`shown_tools`): `tool.started` adds one, `tool.completed` ends it,
`run.started` begins them again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protocol.vocabulary import Event


def shown_text(text: str, event: str, data: Mapping[str, Any]) -> str:
    """The run's text after one of its events, from the text before it."""
    if event == Event.TOKEN:
        return text + str(data["text"])
    if event == Event.RUN_STARTED:
        return ""
    if event == Event.RUN_RESUMED:
        return str(data["text"])
    return text


def shown_tools(tools: list[dict[str, Any]], event: str, data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The run's tool calls (``{call, name, arguments}``, plus ``summary`` and ``error`` once ended)
    after one of its events, from those before it; the list is not changed in place."""
    if event == Event.TOOL_STARTED:
        started = {"call": data["call"], "name": data["name"], "arguments": data.get("arguments") or {}}
        return [*tools, started]
    if event == Event.TOOL_COMPLETED:
        ended = {"summary": data.get("summary"), "error": data.get("error")}
        return [{**t, **ended} if t["call"] == data["call"] else t for t in tools]
    if event == Event.RUN_STARTED:
        return []
    return tools


def starts_text(event: str) -> bool:
    """Does this event alone make the run's text known (without what came before it)?"""
    return event in (Event.RUN_STARTED, Event.RUN_RESUMED)
