import assert from "node:assert/strict";
import { test } from "node:test";

import { SeqGate } from "../src/gate.js";

test("the gate lets exactly the next seq through", () => {
  const gate = new SeqGate(4, "e1");
  assert.equal(gate.offer({ seq: 4 }), "duplicate");
  assert.equal(gate.offer({ seq: 3 }), "duplicate");
  assert.equal(gate.offer({ seq: 6 }), "gap");
  assert.equal(gate.last, 4, "a gap does not move the gate");
  assert.equal(gate.offer({ seq: 5 }), "deliver");
  assert.equal(gate.offer({ seq: 6 }), "deliver");
  assert.equal(gate.offer({ seq: 5 }), "duplicate");
  assert.equal(gate.last, 6);
});

test("a merged token frame covers seq_from..seq", () => {
  const gate = new SeqGate(10, "e1");
  assert.equal(gate.offer({ seq_from: 11, seq: 15 }), "deliver");
  assert.equal(gate.last, 15);
  assert.equal(gate.offer({ seq_from: 12, seq: 15 }), "duplicate");
  assert.equal(gate.offer({ seq_from: 14, seq: 18 }), "gap", "overlaps what was shown: cannot be split");
  assert.equal(gate.offer({ seq_from: 17, seq: 18 }), "gap");
  assert.equal(gate.offer({ seq_from: 16, seq: 18 }), "deliver");
});

test("hello positions a new device; resync and snapshot move it", () => {
  const gate = new SeqGate();
  assert.equal(gate.position(), null);
  gate.hello({ seq: 41, epoch: "e1" });
  assert.deepEqual(gate.position(), { after: 41, epoch: "e1" });
  gate.hello({ seq: 99, epoch: "e2" });
  assert.deepEqual(gate.position(), { after: 41, epoch: "e1" }, "a resuming device keeps its own position");
  assert.equal(gate.offer({ seq: 42 }), "deliver");
  gate.reset({ seq: 7, epoch: "e2" });
  assert.deepEqual(gate.position(), { after: 7, epoch: "e2" });
  assert.equal(gate.offer({ seq: 8 }), "deliver");
});
