// The client against a fake WebSocket (the I/O seam): auth, the seq gate, reconnect with
// after/epoch, resend with the same id, token renewal, close codes, resync reload.
import assert from "node:assert/strict";
import { test } from "node:test";

import { ChorusClient } from "../src/index.js";

class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closed = null;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeSocket.all.push(this);
  }
  send(text) {
    if (this.closed) throw new Error("closed");
    this.sent.push(JSON.parse(text));
  }
  close(code = 1000, reason = "") {
    this.closed = { code, reason };
  }
  // The server's side
  open() {
    this.onopen?.({});
  }
  receive(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  serverClose(code, reason = "") {
    this.closed = { code, reason };
    this.onclose?.({ code, reason });
  }
  params() {
    return Object.fromEntries(new URL(this.url).searchParams);
  }
}

function jwt(payload) {
  const part = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  return `${part({ alg: "HS256" })}.${part(payload)}.sig`;
}

async function until(predicate, timeoutMs = 2000) {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${predicate}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

function client(options = {}) {
  FakeSocket.all = [];
  return new ChorusClient({
    url: "ws://chorus.test/ws", token: "t0", WebSocket: FakeSocket, random: () => 0, watchEnvironment: false,
    pingIntervalMs: 0, fetch: async () => { throw new Error("no REST here"); }, ...options,
  });
}

const hello = (seq, extra = {}) => ({ type: "hello", node: "node-a", user: "u", device: "phone", epoch: "e1", seq, heartbeat: 25, protocol: 1, ...extra });
const token = (seq, text, extra = {}) => ({ seq, type: "event", conversation: "c1", run: "r1", event: "token", data: { text }, ts: 1, ...extra });

/** Connect and answer with hello; returns the socket. */
async function connected(chorus, seq = 10) {
  const connecting = chorus.connect();
  await until(() => FakeSocket.all.length === 1);
  const ws = FakeSocket.all[0];
  ws.open();
  ws.receive(hello(seq));
  await connecting;
  return ws;
}

test("the token goes in the first frame, never in the URL", async () => {
  const chorus = client({ device: "phone" });
  const connecting = chorus.connect();
  await until(() => FakeSocket.all.length === 1);
  const ws = FakeSocket.all[0];
  assert.deepEqual(ws.params(), { device: "phone", auth: "frame" });
  ws.open();
  assert.deepEqual(ws.sent, [{ type: "auth", id: ws.sent[0].id, token: "t0" }]);
  ws.receive({ type: "ack", id: ws.sent[0].id, expires_at: 2_000_000_000 });
  ws.receive(hello(10));
  const first = await connecting;
  assert.equal(first.node, "node-a");
  assert.deepEqual(chorus.state.status, "connected");
  chorus.close();
  assert.equal(ws.closed.code, 1000);
});

test("duplicates are dropped, a gap is never shown: the client resumes from its last seq", async () => {
  const chorus = client();
  const seen = [];
  chorus.on("event", (frame) => seen.push(frame.seq));
  const ws = await connected(chorus, 10);
  ws.receive({ seq: 11, type: "event", conversation: "c1", run: "r1", event: "run.started", data: { message: "m", attempt: 1, worker: "w" }, ts: 1 });
  ws.receive(token(12, "a"));
  ws.receive(token(12, "a"));
  ws.receive(token(15, "bcd", { seq_from: 13 }));
  ws.receive(token(17, "f")); // 16 is missing
  assert.deepEqual(seen, [11, 12, 15]);
  assert.equal(chorus.stats.duplicates, 1);
  assert.equal(chorus.stats.gaps, 1);
  assert.equal(ws.closed.code, 4000);
  await until(() => FakeSocket.all.length === 2);
  const again = FakeSocket.all[1];
  assert.deepEqual(again.params(), { device: "phone", after: "15", epoch: "e1", auth: "frame" });
  again.open();
  again.receive(hello(17));
  again.receive(token(16, "e"));
  again.receive(token(17, "f"));
  ws.receive(token(18, "from the abandoned socket"));
  assert.deepEqual(seen, [11, 12, 15, 16, 17]);
  assert.equal(chorus.store.run("r1").text, "abcdef");
  assert.equal(chorus.state.resumed, true);
  chorus.close();
});

test("a send is resent with the same id after a reconnect and resolves once", async () => {
  const chorus = client();
  const ws = await connected(chorus);
  const acked = chorus.send("hello", { conversation: "c1" });
  const sent = ws.sent.find((f) => f.type === "send");
  assert.deepEqual(sent, { type: "send", id: sent.id, text: "hello", conversation: "c1" });
  ws.serverClose(1006);
  await until(() => FakeSocket.all.length === 2);
  const again = FakeSocket.all[1];
  again.open();
  again.receive(hello(11));
  const resent = again.sent.find((f) => f.type === "send");
  assert.deepEqual(resent, sent);
  assert.equal(chorus.send("hello", { id: sent.id }), acked, "the same id is the same command");
  again.receive({ type: "ack", id: sent.id, conversation: "c1", message: "m1", run: "r1", seq: 11 });
  again.receive({ type: "ack", id: sent.id, conversation: "c1", message: "m1", run: "r1", seq: 11 });
  assert.equal((await acked).run, "r1");
  chorus.close();
});

test("retryable errors resend the same id after retry_after_ms; others reject", async () => {
  const chorus = client();
  const ws = await connected(chorus);
  const acked = chorus.send("hello");
  const id = ws.sent.at(-1).id;
  ws.receive({ type: "error", id, code: "rate_limited", message: "slow down", retry_after_ms: 5 });
  await until(() => ws.sent.filter((f) => f.id === id).length === 2);
  ws.receive({ type: "error", id, code: "unavailable", message: "redis down" });
  await until(() => ws.sent.filter((f) => f.id === id).length === 3);
  ws.receive({ type: "ack", id, conversation: "c", message: "m", run: "r", seq: 3 });
  assert.equal((await acked).id, id);
  const refused = chorus.cancel("r9");
  ws.receive({ type: "error", id: ws.sent.at(-1).id, code: "conflict", message: "already ended" });
  await assert.rejects(refused, (error) => error.code === "conflict");
  await assert.rejects(chorus.send("x".repeat(70_000)), (error) => error.code === "too_large");
  chorus.close();
});

test("a ping is not resent: it fails with the socket", async () => {
  const chorus = client();
  const ws = await connected(chorus);
  const pong = chorus.ping();
  ws.serverClose(1011);
  await assert.rejects(pong, (error) => error.code === "disconnected");
  chorus.close();
});

test("a 4001 close asks the provider for a fresh token, then reconnects", async () => {
  const reasons = [];
  const chorus = client({ token: (reason) => { reasons.push(reason); return `tok-${reasons.length}`; } });
  const ws = await connected(chorus);
  ws.serverClose(4001, "token expired");
  await until(() => FakeSocket.all.length === 2);
  FakeSocket.all[1].open();
  assert.deepEqual(reasons, ["connect", "unauthorized"]);
  assert.equal(FakeSocket.all[1].sent[0].token, "tok-2");
  chorus.close();
});

test("repeated 4001 closes give up; 1000 stops; 4029 waits long", async () => {
  const chorus = client({ maxUnauthorized: 2 });
  const errors = [];
  chorus.on("error", (error) => errors.push(error.code));
  const ws = await connected(chorus);
  ws.serverClose(4001);
  await until(() => FakeSocket.all.length === 2);
  FakeSocket.all[1].serverClose(4001);
  assert.equal(chorus.state.status, "closed");
  assert.deepEqual(errors, ["unauthorized"]);

  const normal = client();
  const pending = normal.send("queued");
  const ws2 = await connected(normal);
  ws2.serverClose(1000);
  await assert.rejects(pending, (error) => error.name === "ClosedError");
  assert.equal(normal.state.status, "closed");

  const crowded = client({ tooManyDevicesRetryMs: 60_000 });
  const ws3 = await connected(crowded);
  ws3.serverClose(4029);
  assert.equal(crowded.state.status, "reconnecting");
  assert.ok(crowded.state.delayMs >= 60_000);
  crowded.close();
  assert.equal(FakeSocket.all.length, 1);
});

test("a draining node's reconnect frame and 1012: reconnect at once with the position", async () => {
  const chorus = client({ random: () => 0.99 });
  const ws = await connected(chorus, 5);
  ws.receive({ type: "reconnect", after_ms: 0 });
  ws.serverClose(1012);
  assert.equal(chorus.state.delayMs, 0);
  await until(() => FakeSocket.all.length === 2);
  assert.equal(FakeSocket.all[1].params().after, "5");
  chorus.close();
});

test("the token is renewed in place with an auth frame before it expires", async () => {
  let n = 0;
  const chorus = client({
    token: () => jwt({ sub: "u", exp: Math.floor(Date.now() / 1000) + 3, n: ++n }),
    refreshBeforeMs: 2000,
  });
  const connecting = chorus.connect();
  await until(() => FakeSocket.all.length === 1);
  const ws = FakeSocket.all[0];
  ws.open();
  const exp = Math.floor(Date.now() / 1000) + 3;
  ws.receive({ type: "ack", id: ws.sent[0].id, expires_at: exp });
  ws.receive(hello(1));
  await connecting;
  await until(() => ws.sent.length === 2, 4000);
  const renewal = ws.sent[1];
  assert.equal(renewal.type, "auth");
  assert.notEqual(renewal.token, ws.sent[0].token);
  ws.receive({ type: "ack", id: renewal.id, expires_at: exp + 3600 });
  assert.equal(FakeSocket.all.length, 1, "renewed on the same socket");
  chorus.close();
});

test("resync moves the position, applies the snapshot and reloads loaded conversations from REST", async () => {
  const calls = [];
  const fetch = async (url) => {
    calls.push(url);
    const body = url.endsWith("/v1/conversations")
      ? { conversations: [{ id: "c1", title: "t", agent: "default", double_texting: "enqueue", created_at: "2030-01-01T00:00:00Z", updated_at: "2030-01-01T00:00:00Z" }], next_before: null }
      : { messages: [{ id: "m1", role: "user", content: "q", device: "d", run: "r1", seq: 3, created_at: "2030-01-01T00:00:00Z", tools: [] }], next_before: null };
    return new Response(JSON.stringify(body), { status: 200, headers: { "Content-Type": "application/json" } });
  };
  const chorus = client({ fetch, position: { after: 50, epoch: "old" } });
  chorus.store.loadMessages("c1", []);
  const reloaded = new Promise((resolve) => chorus.on("reloaded", resolve));
  const ws = await connected(chorus, 7);
  assert.deepEqual([ws.params().after, ws.params().epoch], ["50", "old"]);
  ws.receive({ type: "resync", reason: "epoch_changed", seq: 7, epoch: "e2" });
  ws.receive({ type: "snapshot", seq: 7, epoch: "e2", runs: [{ run: "r1", conversation: "c1", status: "running", text: "so far" }] });
  ws.receive(token(8, ", more"));
  await reloaded;
  assert.deepEqual(calls, ["http://chorus.test/v1/conversations", "http://chorus.test/v1/conversations/c1/messages"]);
  assert.deepEqual(chorus.position, { after: 8, epoch: "e2" });
  assert.deepEqual(chorus.store.messages("c1").map((m) => [m.role, m.text]), [["user", "q"], ["assistant", "so far, more"]]);
  chorus.close();
});

test("no hello in time: the socket is dropped and another tried", async () => {
  const chorus = client({ connectTimeoutMs: 20 });
  chorus.connect().catch(() => {});
  await until(() => FakeSocket.all.length === 2);
  assert.equal(FakeSocket.all[0].closed.code, 4000);
  chorus.close();
});

test("presence frames bypass the seq gate; every hello replaces the devices", async () => {
  const chorus = client();
  const lists = [];
  chorus.on("devices", (devices) => lists.push(devices.map((d) => d.device)));
  const connecting = chorus.connect();
  await until(() => FakeSocket.all.length === 1);
  const ws = FakeSocket.all[0];
  ws.open();
  ws.receive(hello(10, { devices: [{ device: "phone", node: "node-a" }] }));
  await connecting;
  ws.receive(token(11, "a"));
  ws.receive({ type: "presence", device: "laptop", online: true, node: "node-b" }); // no seq
  ws.receive(token(12, "b"));
  assert.deepEqual(chorus.store.devices(), [{ device: "phone", node: "node-a" }, { device: "laptop", node: "node-b" }]);
  assert.deepEqual([chorus.stats.gaps, chorus.stats.duplicates, chorus.position.after], [0, 0, 12]);
  assert.equal(chorus.store.run("r1").text, "ab");
  assert.equal(ws.closed, null, "a presence frame is not a gap");

  // Away: the laptop left meanwhile and no frame said so; the next hello's list is the truth.
  ws.serverClose(1006);
  await until(() => FakeSocket.all.length === 2);
  const again = FakeSocket.all[1];
  again.open();
  again.receive(hello(12, { devices: [{ device: "phone", node: "node-b" }] }));
  assert.deepEqual(chorus.store.devices(), [{ device: "phone", node: "node-b" }]);
  assert.deepEqual(lists, [["phone"], ["phone", "laptop"], ["phone"]]);
  chorus.close();
});
