"""Snapshots of the runs in flight: the answer so far of each, exact as of one seq.

A device that connects without a position, or whose position was lost (`resync`), gets one
`snapshot` frame right after `hello`/`resync`: for every run of the user still in flight, the text
(and tool calls) every other device shows at seq S, then live events from S+1; a paused run comes
with the question it waits on, so the device can answer it. The text is the worker's last
checkpoint in Postgres (`partial`, reflecting `partial_seq`) plus the run's events in the history
after it; a run whose text cannot be made exact from what is kept is left out rather than shown
wrong. Pure: the node reads Postgres and Redis and hands the results in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from persistence.records import RunInFlight
from protocol.frames import PendingInput, RunSnapshot, ToolCallState
from protocol.text import shown_text, shown_tools, starts_text
from protocol.vocabulary import RunStatus

# How far back to read the history for runs that have no usable checkpoint.
SCAN_WITHOUT_CHECKPOINT = 2_000


def _checkpoint(run: RunInFlight, epoch: str, first_seq: int) -> int | None:
    """The seq the run's checkpoint reflects, if it is usable against this history."""
    if run.partial_seq is None or run.partial_epoch != epoch or run.partial_seq < first_seq - 1:
        return None
    return run.partial_seq


def _begun(run: RunInFlight) -> bool:
    """Has the run said anything? Running or paused; or queued again after its question's answer."""
    return run.status != RunStatus.QUEUED or run.partial_seq is not None


def scan_after(runs: Sequence[RunInFlight], *, epoch: str, seq: int, first_seq: int) -> int | None:
    """The seq after which the history must be read to build the snapshot (None: nothing to read)."""
    if not runs or seq == 0 or first_seq == 0:
        return None
    bases = [_checkpoint(r, epoch, first_seq) for r in runs if _begun(r)]
    if not bases:
        return None
    if any(b is None for b in bases):
        return max(first_seq, seq - SCAN_WITHOUT_CHECKPOINT) - 1
    return min(b for b in bases if b is not None)


def build(
    runs: Sequence[RunInFlight], events: Sequence[dict[str, Any]], *, epoch: str, seq: int, first_seq: int,
    scanned_after: int | None,
) -> list[RunSnapshot]:
    """The snapshot's runs as of `seq`, from `events` (the history after `scanned_after`)."""
    result = []
    for run in runs:
        if not _begun(run):
            result.append(RunSnapshot(run.run, run.conversation, RunStatus.QUEUED, ""))
            continue
        base = _checkpoint(run, epoch, first_seq)
        text = run.partial if base is not None else ""
        tools = list(run.tools) if base is not None else []
        started = base is not None
        if scanned_after is None or (base is not None and base < scanned_after):
            if base != seq:
                continue  # the checkpoint is not at seq and no history was read for it
        for event in events:
            if event["run"] != run.run or (base is not None and event["seq"] <= base):
                continue
            text = shown_text(text, event["event"], event["data"])
            tools = shown_tools(tools, event["event"], event["data"])
            started = started or starts_text(event["event"])
        if started:
            question = run.question if run.status == RunStatus.PAUSED else None
            pending = PendingInput(question.request, question.prompt) if question else None
            result.append(RunSnapshot(run.run, run.conversation, RunStatus(run.status), text, pending,
                                      tuple(_tool(t) for t in tools)))
    return result


def _tool(call: dict[str, Any]) -> ToolCallState:
    done = "summary" in call or "error" in call
    return ToolCallState(call=call["call"], name=call["name"], arguments=call.get("arguments") or {},
                         done=done, summary=call.get("summary"), error=call.get("error"))
