"""Table tests for snapshots of runs in flight (pure, no network)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from persistence.records import Question, RunInFlight
from runs.snapshot import build as build_runs
from runs.snapshot import scan_after


def build(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """The snapshot's runs as dicts, without `input` and `tools` while they are empty."""
    return [{k: v for k, v in asdict(run).items() if v or k not in ("input", "tools")}
            for run in build_runs(*args, **kwargs)]


def token(seq: int, run: str, text: str) -> dict[str, Any]:
    return {"seq": seq, "run": run, "event": "token", "data": {"text": text}}


def started(seq: int, run: str, attempt: int) -> dict[str, Any]:
    return {"seq": seq, "run": run, "event": "run.started", "data": {"attempt": attempt}}


def running(run: str, partial: str = "", partial_seq: int | None = None, epoch: str | None = "e") -> RunInFlight:
    return RunInFlight(run=run, conversation="c", status="running", partial=partial, partial_seq=partial_seq,
                       partial_epoch=epoch)


def test_checkpoint_plus_tail_is_exact() -> None:
    runs = [running("r1", "Hello ", 10)]
    assert scan_after(runs, epoch="e", seq=14, first_seq=5) == 10
    events = [token(11, "r1", "wor"), token(12, "other", "x"), token(13, "r1", "ld")]
    snap = build(runs, events, epoch="e", seq=14, first_seq=5, scanned_after=10)
    assert snap == [{"run": "r1", "conversation": "c", "status": "running", "text": "Hello world"}]


def test_tokens_at_or_before_the_checkpoint_are_not_counted_twice() -> None:
    runs = [running("r1", "ab", 12), running("r2", "x", 10)]
    after = scan_after(runs, epoch="e", seq=14, first_seq=1)
    assert after == 10
    events = [token(11, "r2", "y"), token(12, "r1", "b"), token(13, "r1", "c")]
    snap = build(runs, events, epoch="e", seq=14, first_seq=1, scanned_after=after)
    assert [s["text"] for s in snap] == ["abc", "xy"]


def test_a_run_without_checkpoint_is_read_from_its_start_or_left_out() -> None:
    runs = [running("r1"), running("r2")]
    after = scan_after(runs, epoch="e", seq=50, first_seq=20)
    assert after == 19
    events = [started(30, "r1", 1), token(31, "r1", "hi")]  # r2 started before the window
    snap = build(runs, events, epoch="e", seq=50, first_seq=20, scanned_after=after)
    assert snap == [{"run": "r1", "conversation": "c", "status": "running", "text": "hi"}]


def test_a_restarted_run_shows_only_its_latest_attempt() -> None:
    runs = [running("r1", "old text", 5)]
    events = [token(6, "r1", " more"), started(7, "r1", 2), token(8, "r1", "new")]
    snap = build(runs, events, epoch="e", seq=8, first_seq=1, scanned_after=5)
    assert snap[0]["text"] == "new"


def test_run_resumed_replaces_the_text_so_far() -> None:
    runs = [running("r1", "stale", 3, epoch="old")]  # the checkpoint is from a lost history
    resumed = {"seq": 5, "run": "r1", "event": "run.resumed", "data": {"text": "Hello wor"}}
    snap = build(runs, [resumed, token(6, "r1", "ld")], epoch="e", seq=6, first_seq=4, scanned_after=3)
    assert snap[0]["text"] == "Hello world"


def test_a_checkpoint_from_another_epoch_or_trimmed_away_is_not_used() -> None:
    stale_epoch = [running("r1", "abc", 10, epoch="old")]
    assert scan_after(stale_epoch, epoch="e", seq=3, first_seq=1) == 0
    assert build(stale_epoch, [], epoch="e", seq=3, first_seq=1, scanned_after=0) == []
    trimmed = [running("r1", "abc", 10)]
    assert scan_after(trimmed, epoch="e", seq=500, first_seq=400) == 399
    assert build(trimmed, [], epoch="e", seq=500, first_seq=400, scanned_after=399) == []


def test_queued_runs_and_an_exact_checkpoint_need_no_history() -> None:
    queued = RunInFlight(run="q", conversation="c", status="queued", partial="", partial_seq=None,
                         partial_epoch=None)
    assert scan_after([queued], epoch="e", seq=9, first_seq=1) is None
    assert build([queued], [], epoch="e", seq=9, first_seq=1, scanned_after=None)[0]["text"] == ""
    at_seq = [running("r1", "done so far", 9)]
    assert build(at_seq, [], epoch="e", seq=9, first_seq=0, scanned_after=None)[0]["text"] == "done so far"


def tool(seq: int, run: str, event: str, **data: Any) -> dict[str, Any]:
    return {"seq": seq, "run": run, "event": event, "data": data}


def test_a_paused_run_comes_with_its_question_and_tool_calls() -> None:
    asked = [{"call": "c1", "name": "search", "arguments": {"q": "x"}, "summary": "3 hits", "error": None},
             {"call": "c2", "name": "ask_user", "arguments": {"question": "Which?"}}]
    paused = RunInFlight(run="r1", conversation="c", status="paused", partial="Found 3. ", partial_seq=20,
                         partial_epoch="e", tools=tuple(asked), question=Question("q1", "Which?", "cp"))
    [snap] = build([paused], [], epoch="e", seq=20, first_seq=5, scanned_after=20)
    assert snap["status"] == "paused" and snap["text"] == "Found 3. "
    assert snap["input"] == {"request": "q1", "prompt": "Which?"}
    assert snap["tools"] == (
        {"call": "c1", "name": "search", "arguments": {"q": "x"}, "done": True, "summary": "3 hits", "error": None},
        {"call": "c2", "name": "ask_user", "arguments": {"question": "Which?"}, "done": False, "summary": None,
         "error": None})


def test_tool_calls_after_the_checkpoint_come_from_the_history() -> None:
    runs = [running("r1", "Hi ", 10)]
    events = [tool(11, "r1", "tool.started", call="c1", name="search", arguments={"q": "x"}),
              tool(12, "r1", "tool.started", call="c2", name="fetch", arguments={}),
              tool(13, "r1", "tool.completed", call="c1", name="search", summary=None, error="timed out")]
    [snap] = build(runs, events, epoch="e", seq=13, first_seq=5, scanned_after=10)
    assert [(t["call"], t["done"], t["error"]) for t in snap["tools"]] == [("c1", True, "timed out"),
                                                                          ("c2", False, None)]
    assert "input" not in snap, "a running run waits on no question"


def test_a_run_queued_again_after_its_answer_shows_what_it_said() -> None:
    resumed = RunInFlight(run="r1", conversation="c", status="queued", partial="Found 3. ", partial_seq=20,
                          partial_epoch="e", question=Question("q1", "Which?"))
    events = [tool(21, "r1", "run.input_received", request="q1", text="the second", by="phone")]
    assert scan_after([resumed], epoch="e", seq=21, first_seq=5) == 20
    [snap] = build([resumed], events, epoch="e", seq=21, first_seq=5, scanned_after=20)
    assert (snap["status"], snap["text"]) == ("queued", "Found 3. ") and "input" not in snap
