import assert from "node:assert/strict";
import { test } from "node:test";

import { shownText, startsText } from "../src/text.js";

// The same cases as protocol/text.py's behaviour (tests/test_js_sdk.py also runs both side by side).
const CASES = [
  ["", "token", { text: "Hel" }, "Hel"],
  ["Hel", "token", { text: "lo" }, "Hello"],
  ["Hello", "token", { text: "" }, "Hello"],
  ["Hello", "run.started", { message: "m", attempt: 2, worker: "w" }, ""],
  ["partial", "run.resumed", { text: "the whole answer", attempt: 1 }, "the whole answer"],
  ["kept", "tool.started", { call: "c", name: "add", arguments: {} }, "kept"],
  ["kept", "run.completed", { message: "m", text: "other" }, "kept"],
  ["kept", "some.future.event", { text: "ignored" }, "kept"],
  ["", "token", { text: "é😀" }, "é😀"],
];

test("shownText reduces a run's text as protocol/text.py does", () => {
  for (const [before, event, data, expected] of CASES) {
    assert.equal(shownText(before, event, data), expected, `${event} after ${JSON.stringify(before)}`);
  }
});

test("startsText names the events that make the text known alone", () => {
  assert.deepEqual(["run.started", "run.resumed", "token", "run.completed"].map(startsText), [true, true, false, false]);
});
