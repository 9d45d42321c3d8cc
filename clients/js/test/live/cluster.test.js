// The SDK against a real local Chorus cluster (Redis, Postgres, two nodes, a worker, nginx),
// started by tests/test_js_sdk.py, which passes:
//
//   CHORUS_WS_URL       nginx's WebSocket URL          CHORUS_NODE_URLS  each node's, comma-separated
//   CHORUS_JWT_SECRET   the cluster's HS256 secret     CHORUS_CONTROL_URL  POST /kill {"node": "node-a"}, POST /restart
//
// The invariants are the Python tests': two devices see identical streams; a reconnect mid-answer
// resumes exactly (no gap, no duplicate); a node killed mid-answer costs its devices nothing; a send
// resent with the same id is acked once and starts one run. The node-killing test runs last. The answers come from the fake LLM,
// steered by directives in the message ("[[tokens:N]] [[slow:S]]": N words, one every S seconds).
//
//   node --experimental-websocket --test test/live/   (Node 20; the flag is not needed from Node 22)

import assert from "node:assert/strict";
import { createHmac, randomUUID } from "node:crypto";
import { after, test } from "node:test";

import { ChorusClient, END_EVENTS, shownText } from "../../src/index.js";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run these tests through tests/test_js_sdk.py`);
  return value;
};
const WS_URL = env("CHORUS_WS_URL");
const NODE_URLS = env("CHORUS_NODE_URLS").split(",");
const SECRET = env("CHORUS_JWT_SECRET");
const CONTROL_URL = env("CHORUS_CONTROL_URL");
const WAIT_MS = 30_000;

// A failed test may leave a socket or timer behind; the process must still end (with the
// runner's exit code) instead of hanging the pytest run that drives it.
after(() => setTimeout(() => process.exit(), 2_000).unref());

/** An HS256 JWT for `user`, as the cluster's own `token()` mints. */
function mint(user, ttlS = 3600) {
  const part = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part({ sub: user, exp: Math.floor(Date.now() / 1000) + ttlS })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

const words = (n) => Array.from({ length: n }, (_, i) => `word${i + 1}`).join(" ");

/** A device: a ChorusClient and every event it accepted, in order. */
class Device {
  constructor(name, token, url) {
    this.name = name;
    this.events = [];
    this.closes = [];
    this.client = new ChorusClient({ url, token: () => token, device: name });
    this.client.on("event", (frame) => this.events.push(frame));
    this.client.on("close", ({ code }) => this.closes.push(code));
  }

  /** Resolves once `predicate()` holds, checked after every event and state change. */
  until(predicate, what, timeoutMs = WAIT_MS) {
    if (predicate()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const offs = [];
      const done = (error) => {
        clearTimeout(timer);
        offs.forEach((off) => off());
        error ? reject(error) : resolve();
      };
      const check = () => predicate() && done();
      const timer = setTimeout(() => done(new Error(`${this.name}: no ${what} within ${timeoutMs} ms`)), timeoutMs);
      offs.push(this.client.on("event", check), this.client.on("state", check));
    });
  }

  tokens(run) {
    return this.events.filter((e) => e.run === run && e.event === "token").length;
  }

  ended(run) {
    return this.events.some((e) => e.run === run && END_EVENTS.has(e.event));
  }

  /** Every seq accepted, a merged frame counted for each seq it covers. */
  seqs() {
    return this.events.flatMap((e) => Array.from({ length: e.seq - (e.seq_from ?? e.seq) + 1 }, (_, i) => (e.seq_from ?? e.seq) + i));
  }

  /** The run's text reduced from this device's events alone (protocol/text.py), not the store's. */
  reduced(run) {
    return this.events.filter((e) => e.run === run).reduce((text, e) => shownText(text, e.event, e.data), "");
  }

  comparable() {
    return this.events.map((e) => [e.seq, e.event, e.run, e.conversation, e.data]);
  }

  /** The whole answer, every seq once and in order from `start`, as the store shows it too. */
  assertComplete(run, tokens, start) {
    const seqs = this.seqs();
    assert.deepEqual(seqs, Array.from({ length: seqs.length }, (_, i) => start + 1 + i), `${this.name}: gapless from ${start}`);
    assert.equal(this.client.stats.gaps, 0, `${this.name}: gaps`);
    assert.equal(this.reduced(run), words(tokens), `${this.name}: the tokens add up to the answer`);
    const shown = this.client.store.run(run);
    assert.equal(shown?.status, "completed");
    assert.equal(shown?.text, words(tokens));
  }
}

async function withDevices(devices, body) {
  try {
    await Promise.all(devices.map((d) => d.client.connect()));
    await body();
  } finally {
    devices.forEach((d) => d.client.close());
  }
}

test("two devices on two nodes see identical streams", { timeout: 60_000 }, async () => {
  const token = mint(`js-two-${randomUUID().slice(0, 8)}`);
  const phone = new Device("phone", token, NODE_URLS[0]);
  const laptop = new Device("laptop", token, NODE_URLS[1]);
  await withDevices([phone, laptop], async () => {
    assert.notEqual(phone.client.hello.node, laptop.client.hello.node);
    const start = laptop.client.hello.seq;
    const ack = await phone.client.send(`[[tokens:30]] [[slow:0.01]] tell me a story`);
    await phone.until(() => phone.ended(ack.run), "end");
    await laptop.until(() => laptop.ended(ack.run), "end");
    phone.assertComplete(ack.run, 30, start);
    laptop.assertComplete(ack.run, 30, start);
    assert.deepEqual(laptop.comparable(), phone.comparable());
    const [user, answer] = laptop.client.store.messages(ack.conversation);
    assert.deepEqual([user.role, user.id, user.device], ["user", ack.message, "phone"]);
    assert.deepEqual([answer.role, answer.status, answer.text], ["assistant", "completed", words(30)]);
  });
});

test("a reconnect mid-answer, to the other node, resumes exactly", { timeout: 60_000 }, async () => {
  const token = mint(`js-resume-${randomUUID().slice(0, 8)}`);
  let target = 1;
  const phone = new Device("phone", token, NODE_URLS[0]);
  const laptop = new Device("laptop", token, () => NODE_URLS[target]);
  await withDevices([phone, laptop], async () => {
    const start = laptop.client.hello.seq;
    const ack = await phone.client.send(`[[tokens:60]] [[slow:0.03]] tell me a long story`);
    await laptop.until(() => laptop.tokens(ack.run) >= 5, "5 tokens");
    assert.ok(!phone.ended(ack.run), "the reconnect must land mid-answer");
    target = 0;
    laptop.client.reconnect();
    await laptop.until(() => laptop.client.stats.connects === 2 && laptop.client.state.status === "connected", "reconnect");
    assert.equal(laptop.client.state.resumed, true);
    assert.equal(laptop.client.hello.node, phone.client.hello.node, "moved to the phone's node");
    await laptop.until(() => laptop.ended(ack.run), "end");
    await phone.until(() => phone.ended(ack.run), "end");
    assert.equal(laptop.client.stats.resyncs, 0, "resumed, never resynced");
    laptop.assertComplete(ack.run, 60, start);
    assert.deepEqual(laptop.comparable(), phone.comparable());
  });
});

test("a send resent with the same id is acked once and starts one run", { timeout: 60_000 }, async () => {
  const token = mint(`js-resend-${randomUUID().slice(0, 8)}`);
  const phone = new Device("phone", token, NODE_URLS[0]);
  const laptop = new Device("laptop", token, NODE_URLS[1]);
  await withDevices([phone, laptop], async () => {
    const id = randomUUID();
    // Sent, then the socket is dropped at once: the frame may or may not have reached the node;
    // the client sends it again with the same id after its next hello.
    const first = phone.client.send("[[tokens:5]] hello", { id });
    phone.client.reconnect();
    const ack = await first;
    assert.equal(ack.id, id);
    // The same id again, from the other device on the other node: the same ack, no second run.
    const again = await laptop.client.send("[[tokens:5]] hello", { id });
    assert.deepEqual({ ...again }, { ...ack });
    await laptop.until(() => laptop.ended(ack.run), "end");
    const created = laptop.events.filter((e) => e.event === "message.created" && e.data.client_id === id);
    assert.equal(created.length, 1, "one message for the id");
    assert.equal(new Set(laptop.events.filter((e) => e.event === "run.started").map((e) => e.run)).size, 1, "one run");
    assert.equal(laptop.client.store.run(ack.run).text, words(5));
  });
});

test("a node killed mid-answer: its device reconnects through nginx and loses nothing", { timeout: 90_000 }, async () => {
  const token = mint(`js-kill-${randomUUID().slice(0, 8)}`);
  const mover = new Device("mover", token, WS_URL);
  await withDevices([mover], async () => {
    const victim = mover.client.hello.node;
    const survivorUrl = NODE_URLS[victim === "node-a" ? 1 : 0];
    const stayer = new Device("stayer", token, survivorUrl);
    await withDevices([stayer], async () => {
      assert.notEqual(stayer.client.hello.node, victim);
      const start = mover.client.hello.seq;
      const ack = await stayer.client.send(`[[tokens:80]] [[slow:0.03]] tell me a long story`);
      await mover.until(() => mover.tokens(ack.run) >= 5, "5 tokens");
      const response = await fetch(`${CONTROL_URL}/kill`, {
        method: "POST", body: JSON.stringify({ node: victim }), signal: AbortSignal.timeout(20_000),
      });
      assert.equal(response.status, 200, await response.text());
      assert.ok(!stayer.ended(ack.run), "the kill must land mid-answer");
      await mover.until(() => mover.client.stats.connects === 2 && mover.client.state.status === "connected", "reconnect", 15_000);
      assert.notEqual(mover.client.hello.node, victim);
      await mover.until(() => mover.ended(ack.run), "end");
      await stayer.until(() => stayer.ended(ack.run), "end");
      assert.deepEqual(mover.closes, [1006], "one abnormal close, no close frame from a dead process");
      mover.assertComplete(ack.run, 80, start);
      assert.deepEqual(mover.comparable(), stayer.comparable());
    });
  });
  // Back as it was for whatever runs next (tests/test_js_sdk.py restarts it too if this fails).
  await fetch(`${CONTROL_URL}/restart`, { method: "POST", signal: AbortSignal.timeout(60_000) });
});
