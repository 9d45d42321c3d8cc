"""Pure recovery logic: where a (re)connecting device resumes, and per-device seq gating.

No I/O here, so every rule is a table test (tests/test_recovery.py). The shape follows
centrifuge's `internal/recovery`: the decision is made from four numbers, never from timing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# The reasons a position is unusable are part of the wire protocol (the `resync` frame).
from protocol.vocabulary import ResyncReason as Resync

SEQ_PREFIX = '{"seq":'
# The seq of a frame sent on a user's channel but not part of the stream (seqs start at 1).
UNSEQUENCED = 0


def frame_seq(frame: str) -> int:
    """The seq of a published event frame (the publish script always writes it first); 0 for a
    frame published outside the stream (`UNSEQUENCED`: presence), which no gate may hold back."""
    if not frame.startswith(SEQ_PREFIX):
        return UNSEQUENCED
    return int(frame[len(SEQ_PREFIX) : frame.index(",", len(SEQ_PREFIX))])


@dataclass(frozen=True)
class ResumePlan:
    """`replay_after`: replay history after this seq (None = nothing to replay);
    `resync`: the device's position is unusable and it must reload over REST;
    `start`: the seq the device is at once the plan is carried out."""

    start: int
    replay_after: int | None = None
    resync: Resync | None = None


def plan_resume(
    *, after: int | None, client_epoch: str | None, epoch: str, seq: int, first_seq: int
) -> ResumePlan:
    """Decide how a device at (`after`, `client_epoch`) resumes a history at (`epoch`, `seq`)
    whose oldest retained entry is `first_seq` (0 when the history is empty)."""
    if after is None:
        return ResumePlan(start=seq)
    if (client_epoch is not None and client_epoch != epoch) or after > seq:
        # A device ahead of the sequence saw a sequence that was since lost.
        return ResumePlan(start=seq, resync=Resync.EPOCH_CHANGED)
    if after == seq:
        return ResumePlan(start=seq)
    if first_seq == 0 or first_seq > after + 1:
        return ResumePlan(start=seq, resync=Resync.HISTORY_TRIMMED)
    return ResumePlan(start=after, replay_after=after)


class Offer(enum.Enum):
    DELIVER = "deliver"
    DUPLICATE = "duplicate"
    GAP = "gap"


@dataclass
class Gate:
    """A device's position: lets through exactly the next seq, drops what it already has, and
    reports a gap (a missed Pub/Sub message) so the caller can fill it from history."""

    last: int

    def offer(self, seq: int) -> Offer:
        if seq <= self.last:
            return Offer.DUPLICATE
        if seq != self.last + 1:
            return Offer.GAP
        self.last = seq
        return Offer.DELIVER
