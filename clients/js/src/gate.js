// The seq gate: every event of a user carries the next number of that user's sequence, and a
// device shows each seq exactly once, in order. Pure (no I/O), so it is table-tested.
//
// A merged token frame (a device that fell behind, docs/protocol.md) covers `seq_from`..`seq`.
// The server never sends a duplicate or a gap on one connection; a client that reconnects on its
// own may overlap, so duplicates are dropped here. A gap (or a merged frame that overlaps what was
// seen, which cannot be split) is never shown: the client reconnects from `last` instead, and the
// server replays the missing events from its history.

/** @typedef {"deliver" | "duplicate" | "gap"} Offer */

export class SeqGate {
  /**
   * @param {number | null} [last] the last seq accepted (null: none yet)
   * @param {string | null} [epoch] the history's epoch `last` belongs to
   */
  constructor(last = null, epoch = null) {
    /** @type {number | null} */
    this.last = last;
    /** @type {string | null} */
    this.epoch = epoch;
  }

  /**
   * What to do with an event frame covering seqs `first`..`seq`; advances on "deliver".
   * @param {{ seq: number, seq_from?: number }} frame
   * @returns {Offer}
   */
  offer(frame) {
    const seq = frame.seq;
    const first = frame.seq_from ?? seq;
    if (this.last === null) {
      this.last = seq;
      return "deliver";
    }
    if (seq <= this.last) return "duplicate";
    if (first !== this.last + 1) return "gap";
    this.last = seq;
    return "deliver";
  }

  /**
   * A `hello`: a device without a position starts at the user's seq of now.
   * @param {{ seq: number, epoch: string }} hello
   */
  hello(hello) {
    if (this.last === null || this.epoch === null) {
      this.last = this.last ?? hello.seq;
      this.epoch = hello.epoch;
    }
  }

  /**
   * A `resync` (or `snapshot`): the position the server says the device is at now.
   * @param {{ seq: number, epoch: string }} position
   */
  reset(position) {
    this.last = position.seq;
    this.epoch = position.epoch;
  }

  /** The `after`/`epoch` to reconnect with, or null for a device that saw nothing yet. */
  position() {
    return this.last === null ? null : { after: this.last, epoch: this.epoch };
  }
}
