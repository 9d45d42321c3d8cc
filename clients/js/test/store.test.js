import assert from "node:assert/strict";
import { test } from "node:test";

import { mergeOrder, Store } from "../src/store.js";

let ts = Date.parse("2030-01-01T00:00:00Z");
/** An event frame, as the server sends it. */
function ev(seq, event, data, { run = "r1", conversation = "c1", seq_from } = {}) {
  const frame = { seq, type: "event", conversation, run, event, data, ts: ts++ };
  if (seq_from !== undefined) frame.seq_from = seq_from;
  return frame;
}

const created = (seq, message = "m1", run = "r1") =>
  ev(seq, "message.created", { message, role: "user", text: "hi", device: "phone", client_id: `id-${message}` }, { run });

test("a run streams, ends, and its messages read in order", () => {
  const store = new Store();
  const runs = [];
  store.on("run", (run) => runs.push(run));
  for (const frame of [
    created(1),
    ev(2, "run.started", { message: "m1", attempt: 1, worker: "w1" }),
    ev(3, "token", { text: "Hello" }),
    ev(4, "token", { text: " world" }),
    ev(5, "run.completed", { message: "a1", text: "Hello world" }),
  ]) store.apply(frame);
  const run = store.run("r1");
  assert.equal(run.status, "completed");
  assert.equal(run.text, "Hello world");
  assert.equal(run.answerMessage, "a1");
  assert.deepEqual(store.messages("c1").map((m) => [m.role, m.id, m.text, m.status]),
                   [["user", "m1", "hi", null], ["assistant", "a1", "Hello world", "completed"]]);
  assert.ok(new Set(runs).size === runs.length, "every change is a new object");
  assert.equal(runs.at(-1), run);
});

test("applying an event twice changes nothing", () => {
  const store = new Store();
  const frames = [created(1), ev(2, "run.started", { message: "m1", attempt: 1, worker: "w" }), ev(3, "token", { text: "a" })];
  for (const frame of [...frames, ...frames]) store.apply(frame);
  assert.equal(store.run("r1").text, "a");
  assert.equal(store.messages("c1").length, 2);
});

test("a merged token frame adds its joined text once", () => {
  const store = new Store();
  store.apply(ev(2, "run.started", { message: "m1", attempt: 1, worker: "w" }));
  store.apply(ev(7, "token", { text: "one two three four five" }, { seq_from: 3 }));
  store.apply(ev(8, "token", { text: " six" }));
  assert.equal(store.run("r1").text, "one two three four five six");
  assert.equal(store.run("r1").seq, 8);
});

test("a restarted run shows only its latest attempt; run.resumed replaces the text", () => {
  const store = new Store();
  store.apply(ev(1, "run.started", { message: "m1", attempt: 1, worker: "w1" }));
  store.apply(ev(2, "token", { text: "first try" }));
  store.apply(ev(3, "run.started", { message: "m1", attempt: 2, worker: "w2" }));
  assert.equal(store.run("r1").text, "");
  assert.equal(store.run("r1").attempt, 2);
  store.apply(ev(4, "token", { text: "second" }));
  store.apply(ev(5, "run.resumed", { text: "second try, whole", attempt: 2 }));
  store.apply(ev(6, "token", { text: "!" }));
  assert.equal(store.run("r1").text, "second try, whole!");
});

test("a snapshot is exact as of its seq: events at or below it are skipped, later ones apply", () => {
  const store = new Store();
  store.applySnapshot({ type: "snapshot", seq: 10, epoch: "e", runs: [{ run: "r1", conversation: "c1", status: "running", text: "so far" }] });
  store.apply(ev(9, "token", { text: " (already in the snapshot)" }));
  store.apply(ev(11, "token", { text: " and more" }));
  assert.equal(store.run("r1").text, "so far and more");
  assert.equal(store.run("r1").status, "running");
  assert.deepEqual(store.messages("c1").map((m) => [m.role, m.text]), [["assistant", "so far and more"]]);
});

test("a snapshot of a paused run carries its question and tool calls, so a late device can answer", () => {
  const store = new Store();
  store.applySnapshot({ type: "snapshot", seq: 20, epoch: "e", runs: [{
    run: "r1", conversation: "c1", status: "paused", text: "Found 3. ", input: { request: "q1", prompt: "Which?" },
    tools: [{ call: "k1", name: "search", arguments: { q: "x" }, done: true, summary: "3 hits", error: null }] }] });
  const run = store.run("r1");
  assert.deepEqual([run.status, run.text, run.input], ["paused", "Found 3. ", { request: "q1", prompt: "Which?" }]);
  assert.deepEqual(run.tools, [{ call: "k1", name: "search", arguments: { q: "x" }, summary: "3 hits", error: null, done: true }]);
  store.apply(ev(21, "run.input_received", { request: "q1", text: "the second", by: "phone" }));
  store.apply(ev(22, "run.resumed", { text: "Found 3. ", attempt: 2 }));
  store.apply(ev(23, "token", { text: "The second it is." }));
  assert.deepEqual([store.run("r1").input, store.run("r1").text], [null, "Found 3. The second it is."]);
});

test("queue, tools and a question are tracked on the run", () => {
  const store = new Store();
  store.apply(ev(1, "run.queued", { behind: "r0", policy: "enqueue", message: "m1" }));
  assert.equal(store.run("r1").status, "waiting");
  store.apply(ev(2, "run.queued", { behind: null, position: 2 }));
  assert.deepEqual([store.run("r1").status, store.run("r1").position], ["queued", 2]);
  store.apply(ev(3, "run.started", { message: "m1", attempt: 1, worker: "w" }));
  store.apply(ev(4, "tool.started", { call: "k1", name: "add", arguments: { a: 1 } }));
  store.apply(ev(5, "tool.completed", { call: "k1", name: "add", summary: "2", error: null }));
  assert.deepEqual(store.run("r1").tools, [{ call: "k1", name: "add", arguments: { a: 1 }, summary: "2", error: null, done: true }]);
  store.apply(ev(6, "run.input_required", { request: "q1", prompt: "Which city?" }));
  assert.deepEqual(store.run("r1").input, { request: "q1", prompt: "Which city?" });
  assert.equal(store.run("r1").status, "paused");
  store.apply(ev(7, "run.input_received", { request: "q1", text: "Paris", by: "laptop" }));
  assert.equal(store.run("r1").input, null);
  assert.equal(store.run("r1").status, "running");
  store.apply(ev(8, "future.event", { anything: true }));
  store.apply(ev(9, "run.failed", { code: "llm_timeout", message: "slow model", text: "part", answer_message: "a1" }));
  const run = store.run("r1");
  assert.deepEqual([run.status, run.text, run.answerMessage, run.error], ["failed", "part", "a1", { code: "llm_timeout", message: "slow model" }]);
});

test("a run's custom events are kept in order, once, and begin again with a restart", () => {
  const store = new Store();
  store.apply(ev(1, "run.queued", { behind: null, position: 1 }));
  store.apply(ev(2, "run.started", { message: "m1", attempt: 1, worker: "w1" }));
  for (const [seq, value] of [[3, { step: 1 }], [4, "searching"], [4, "searching"], [5, null], [3, { step: 1 }]]) {
    store.apply(ev(seq, "run.custom", { value })); // seqs 4 and 3 again: already applied
  }
  const run = store.run("r1");
  assert.deepEqual([run.custom, run.status, run.text], [[{ step: 1 }, "searching", null], "running", ""]);
  store.apply(ev(6, "run.started", { message: "m1", attempt: 2, worker: "w2" }));
  store.apply(ev(7, "run.custom", { value: [2] }));
  store.apply(ev(8, "run.completed", { message: "m2", text: "done" }));
  assert.deepEqual([store.run("r1").custom, store.run("r1").text], [[[2]], "done"]);
  assert.deepEqual(run.custom, [{ step: 1 }, "searching", null], "a change replaces the run, never mutates it");
});

test("a rolled-back run disappears with the message that started it", () => {
  const store = new Store();
  store.apply(created(1));
  store.apply(ev(2, "run.started", { message: "m1", attempt: 1, worker: "w" }));
  store.apply(created(3, "m2", "r2"));
  store.apply(ev(4, "run.cancelled", { message: null, text: "", stopped_at: 2, rolled_back: true }));
  assert.deepEqual(store.messages("c1").map((m) => [m.role, m.id ?? m.run]), [["user", "m2"], ["assistant", "r2"]]);
  assert.equal(store.run("r1").rolledBack, true);
});

test("REST pages merge by id; an end event still tells how a stored answer ended", () => {
  const store = new Store();
  store.apply(created(5, "m3", "r3"));
  store.loadMessages("c1", [
    { id: "m1", role: "user", content: "q1", device: "d", run: "r1", seq: 1, tools: [] },
    { id: "a1", role: "assistant", content: "answer 1", device: null, run: "r1", seq: null, tools: [] },
    { id: "m2", role: "user", content: "q2", device: "d", run: "r2", seq: 3, tools: [] },
    { id: "a2", role: "assistant", content: "partial", device: null, run: "r2", seq: null,
      tools: [{ call: "k", name: "add", arguments: {}, summary: "3", error: null }] },
  ], { nextBefore: 4 });
  assert.deepEqual(store.messages("c1").map((m) => m.id ?? `run:${m.run}`), ["m1", "a1", "m2", "a2", "m3", "run:r3"]);
  assert.equal(store.run("r2").status, "completed");
  store.apply(ev(4, "token", { text: "late token" }, { run: "r2" }));
  assert.equal(store.run("r2").text, "partial", "a stored answer takes no token");
  store.apply(ev(6, "run.cancelled", { message: "a2", text: "partial", stopped_at: 3 }, { run: "r2" }));
  assert.equal(store.run("r2").status, "cancelled");
  // The same page again, and an older page: nothing doubles, older messages go first.
  store.loadMessages("c1", [{ id: "m1", role: "user", content: "q1", device: "d", run: "r1", seq: 1 }], { newest: true });
  store.loadMessages("c1", [{ id: "m0", role: "user", content: "q0", device: "d", run: null, seq: null }], { newest: false });
  assert.deepEqual(store.messages("c1").filter((m) => m.role === "user").map((m) => m.id), ["m0", "m1", "m2", "m3"]);
  assert.equal(store.conversations.get("c1").loaded, true);
});

test("mergeOrder keeps older ids before a page and live ones after it", () => {
  assert.deepEqual(mergeOrder(["a", "b", "c", "x"], ["b", "c", "d"]), ["a", "b", "c", "d", "x"]);
  assert.deepEqual(mergeOrder([], ["a"]), ["a"]);
  assert.deepEqual(mergeOrder(["z"], ["a", "b"]), ["a", "b", "z"]);
});

test("conversations come from events and REST, newest first", () => {
  const store = new Store();
  store.loadConversations([
    { id: "c1", title: "one", agent: "default", double_texting: "enqueue", created_at: "2025-01-01T00:00:00+00:00", updated_at: "2025-01-01T00:00:00+00:00" },
    { id: "c2", title: "two", agent: "default", double_texting: "enqueue", created_at: "2025-01-02T00:00:00+00:00", updated_at: "2025-01-02T00:00:00+00:00" },
  ]);
  assert.deepEqual(store.conversationList().map((c) => c.id), ["c2", "c1"]);
  store.apply(created(1));
  assert.equal(store.conversationList()[0].id, "c1", "a new message moves its conversation up");
  store.removeConversation("c1");
  assert.deepEqual(store.conversationList().map((c) => c.id), ["c2"]);
  assert.deepEqual(store.messages("c1"), []);
});

test("devices: a hello's list replaces them, presence frames update them idempotently", () => {
  const store = new Store();
  const seen = [];
  store.on("devices", (devices) => seen.push(devices.map((d) => `${d.device}@${d.node}`)));
  store.setDevices([{ device: "phone", node: "node-a" }, { device: "laptop", node: "node-b" }]);
  store.applyPresence({ type: "presence", device: "tablet", online: true, node: "node-a" });
  store.applyPresence({ type: "presence", device: "tablet", online: true, node: "node-a" }); // every socket gets it
  store.applyPresence({ type: "presence", device: "laptop", online: true, node: "node-a" }); // moved
  store.applyPresence({ type: "presence", device: "phone", online: false, node: "node-a" });
  store.applyPresence({ type: "presence", device: "phone", online: false, node: "node-a" });
  store.applyPresence({ type: "presence", device: "watch", online: false, node: "node-b" }); // never known
  assert.deepEqual(store.devices(), [{ device: "laptop", node: "node-a" }, { device: "tablet", node: "node-a" }]);
  store.setDevices([{ device: "tablet", node: "node-a" }, { device: "laptop", node: "node-a" }]); // same set
  store.setDevices([{ device: "desk", node: "node-b" }]);
  assert.deepEqual(seen, [
    ["phone@node-a", "laptop@node-b"],
    ["phone@node-a", "laptop@node-b", "tablet@node-a"],
    ["phone@node-a", "laptop@node-a", "tablet@node-a"],
    ["laptop@node-a", "tablet@node-a"],
    ["desk@node-b"],
  ]);
});
