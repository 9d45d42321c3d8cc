"""The seq gate: every event of a user carries the next number of the user's sequence, and a
device shows each seq exactly once, in order. Pure (no I/O), so it is table-tested.

A merged token frame (a device that fell behind, docs/protocol.md) covers `seq_from`..`seq`. The
server never sends a duplicate or a gap on one connection; a client that reconnects on its own may
overlap, so duplicates are dropped here. A gap (or a merged frame that overlaps what was seen, whose
joined text cannot be split) is never shown: the client reconnects from `last` instead, and the
server replays the missing events from its history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Offer = Literal["deliver", "duplicate", "gap"]


@dataclass(frozen=True)
class Position:
    """Where a device is in its user's stream: the `after`/`epoch` it reconnects with. Save it to
    resume after a restart of the app."""

    after: int
    epoch: str | None


class SeqGate:
    """`last`: the last seq accepted (None: none yet); `epoch`: the history `last` belongs to."""

    def __init__(self, last: int | None = None, epoch: str | None = None) -> None:
        self.last = last
        self.epoch = epoch

    def offer(self, seq: int, seq_from: int | None = None) -> Offer:
        """What to do with an event frame covering `seq_from`..`seq`; advances on "deliver"."""
        first = seq if seq_from is None else seq_from
        if self.last is None:
            self.last = seq
            return "deliver"
        if seq <= self.last:
            return "duplicate"
        if first != self.last + 1:
            return "gap"
        self.last = seq
        return "deliver"

    def hello(self, seq: int, epoch: str) -> None:
        """A `hello`: a device without a position starts at the user's seq of now."""
        if self.last is None or self.epoch is None:
            self.last = seq if self.last is None else self.last
            self.epoch = epoch

    def reset(self, seq: int, epoch: str) -> None:
        """A `resync` (or a first `snapshot`): the position the server says the device is at now."""
        self.last, self.epoch = seq, epoch

    @property
    def position(self) -> Position | None:
        return None if self.last is None else Position(self.last, self.epoch)
