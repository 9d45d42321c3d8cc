"""Merging a slow device's queued tokens (pure)."""

from __future__ import annotations

import json

from fanout.recovery import frame_seq
from ws_node.merge import compact


def token(seq: int, run: str, text: str) -> str:
    return json.dumps({"seq": seq, "type": "event", "conversation": "c", "run": run, "event": "token",
                       "data": {"text": text}, "ts": seq}, separators=(",", ":"))


def other(seq: int) -> str:
    return json.dumps({"seq": seq, "type": "event", "conversation": "c", "run": "r1", "event": "run.started",
                       "data": {}, "ts": seq}, separators=(",", ":"))


def test_adjacent_tokens_of_one_run_become_one_frame() -> None:
    frames = [other(1), token(2, "r1", "Hel"), token(3, "r1", "lo"), token(4, "r1", " you"), '{"type":"pong","id":"x"}']
    merged = compact(frames)
    assert merged[0] == frames[0] and merged[2] == frames[4]
    event = json.loads(merged[1])
    assert (event["seq_from"], event["seq"], event["data"]["text"], event["ts"]) == (2, 4, "Hello you", 4)
    assert frame_seq(merged[1]) == 4


def test_other_runs_other_events_and_the_size_cap_stop_a_merge() -> None:
    frames = [token(1, "r1", "a"), token(2, "r2", "b"), token(3, "r2", "c"), other(4), token(5, "r2", "d")]
    merged = [json.loads(f) for f in compact(frames)]
    assert [(e.get("seq_from"), e["seq"]) for e in merged] == [(1, 1), (2, 3), (None, 4), (5, 5)]
    capped = compact([token(1, "r1", "x" * 10), token(2, "r1", "y" * 10)], max_chars=15)
    assert len(capped) == 2


def test_merging_merged_frames_keeps_the_first_seq() -> None:
    once = compact([token(1, "r1", "a"), token(2, "r1", "b")])
    twice = compact([*once, token(3, "r1", "c")])
    event = json.loads(twice[0])
    assert (event["seq_from"], event["seq"], event["data"]["text"]) == (1, 3, "abc")
