"""Merging queued token frames for a device that fell behind (a slow phone on a bad network).

Before a socket whose queue is full is closed (4008), adjacent `token` events of the same run in
its queue are merged into one frame covering seqs `seq_from`..`seq`, with their texts joined:
the device gets the same text and the same final position in fewer frames, and only a queue full
of other events (or of merged tokens already at `max_chars`) still closes it. Pure.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from protocol.vocabulary import Event

_TOKEN_MARK = f'"event":"{Event.TOKEN}"'  # a cheap test before parsing the frame


def _token(frame: str) -> dict[str, Any] | None:
    if not frame.startswith('{"seq":') or _TOKEN_MARK not in frame:
        return None
    event: dict[str, Any] = orjson.loads(frame)
    return event if event.get("event") == Event.TOKEN else None


def compact(frames: Iterable[str], *, max_chars: int = 32_768) -> list[str]:
    """`frames` with runs of adjacent token events of one run merged (order kept)."""
    out: list[str] = []
    pending: dict[str, Any] | None = None  # the token event being merged into

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            out.append(orjson.dumps(pending).decode())
            pending = None

    for frame in frames:
        event = _token(frame)
        if event is None:
            flush()
            out.append(frame)
            continue
        if (pending is not None and pending["run"] == event["run"] and pending["seq"] + 1 == event["seq"]
                and len(pending["data"]["text"]) + len(event["data"]["text"]) <= max_chars):
            pending["data"]["text"] += event["data"]["text"]
            pending["seq"], pending["ts"] = event["seq"], event["ts"]
            continue
        flush()
        # seq first, so fanout.recovery.frame_seq still reads it; seq_from = the first seq covered
        pending = {"seq": event["seq"], "seq_from": event.get("seq_from", event["seq"]), **event}
    flush()
    return out
