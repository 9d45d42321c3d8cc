"""Table tests for the pure recovery rules (no network)."""

from __future__ import annotations

import pytest

from fanout.recovery import UNSEQUENCED, Gate, Offer, ResumePlan, Resync, frame_seq, plan_resume


@pytest.mark.parametrize(
    ("after", "client_epoch", "seq", "first_seq", "expected"),
    [
        (None, None, 7, 1, ResumePlan(start=7)),  # new device: live from now
        (None, "other", 7, 1, ResumePlan(start=7)),  # no position: epoch alone means nothing
        (7, "e1", 7, 1, ResumePlan(start=7)),  # up to date
        (3, "e1", 7, 1, ResumePlan(start=3, replay_after=3)),
        (3, None, 7, 4, ResumePlan(start=3, replay_after=3)),  # oldest kept is exactly after+1
        (3, "e1", 7, 5, ResumePlan(start=7, resync=Resync.HISTORY_TRIMMED)),
        (3, "e1", 7, 0, ResumePlan(start=7, resync=Resync.HISTORY_TRIMMED)),  # history expired
        (3, "e0", 7, 1, ResumePlan(start=7, resync=Resync.EPOCH_CHANGED)),
        (9, None, 7, 1, ResumePlan(start=7, resync=Resync.EPOCH_CHANGED)),  # ahead: sequence was reset
        (0, "e1", 0, 0, ResumePlan(start=0)),
    ],
)
def test_plan_resume(after: int | None, client_epoch: str | None, seq: int, first_seq: int,
                     expected: ResumePlan) -> None:
    plan = plan_resume(after=after, client_epoch=client_epoch, epoch="e1", seq=seq, first_seq=first_seq)
    assert plan == expected


def test_gate_lets_exactly_the_next_seq_through() -> None:
    gate = Gate(last=4)
    assert gate.offer(4) is Offer.DUPLICATE
    assert gate.offer(6) is Offer.GAP
    assert gate.last == 4
    assert gate.offer(5) is Offer.DELIVER
    assert gate.offer(6) is Offer.DELIVER
    assert gate.offer(5) is Offer.DUPLICATE
    assert gate.last == 6


def test_frame_seq_reads_the_leading_seq() -> None:
    assert frame_seq('{"seq":12345,"type":"event"}') == 12345
    with pytest.raises(ValueError):
        frame_seq('{"seq":12345}')


def test_a_frame_outside_the_stream_is_unsequenced() -> None:
    assert frame_seq('{"type":"presence","device":"d","online":true,"node":"n","seq":1}') == UNSEQUENCED
