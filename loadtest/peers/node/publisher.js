// The Node Socket.IO peer's publisher: @socket.io/redis-emitter, the documented way for a process
// that is not a Socket.IO server to emit to rooms. Same pacing and event as loadtest/peers/publisher.py.
//   node publisher.js --redis URL --rate 5000 --duration-s 8 --users 2000 --first-n 0 --payload-bytes 150
// Prints one JSON line: {"published", "first_n", "started_at", "span_s", "cpu_s"}.
"use strict";
const { performance } = require("perf_hooks");
const { Emitter } = require("@socket.io/redis-emitter");
const { createClient } = require("redis");

function option(name) {
  const at = process.argv.indexOf(`--${name}`);
  if (at < 0 || at + 1 >= process.argv.length) throw new Error(`--${name} is required`);
  return process.argv[at + 1];
}

const wallS = () => (performance.timeOrigin + performance.now()) / 1000;

function event(user, n, bytes) {
  const bare = { u: user, n, t: wallS(), p: "" };
  bare.p = "x".repeat(Math.max(0, bytes - JSON.stringify(bare).length));
  return bare;
}

async function main() {
  const rate = Number(option("rate"));
  const durationS = Number(option("duration-s"));
  const users = Number(option("users"));
  const firstN = Number(option("first-n"));
  const bytes = Number(option("payload-bytes"));
  const client = createClient({ url: option("redis") });
  await client.connect();
  const emitter = new Emitter(client);
  const total = Math.round(rate * durationS);
  const cpuBefore = process.cpuUsage();
  const startedAt = wallS();
  const start = performance.now();
  let sent = 0;
  await new Promise((resolve) => {
    const tick = () => {
      const due = Math.min(total, Math.floor(((performance.now() - start) / 1000) * rate));
      for (; sent < due; sent++) {
        const user = `u${Math.floor(Math.random() * users)}`;
        emitter.to(user).emit("ev", event(user, firstN + sent, bytes));
      }
      if (sent >= total) resolve();
      else setTimeout(tick, 1);
    };
    tick();
  });
  await client.quit(); // resolves once every queued PUBLISH has been answered
  const spanS = wallS() - startedAt;
  const cpu = process.cpuUsage(cpuBefore);
  console.log(JSON.stringify({ published: sent, first_n: firstN, started_at: startedAt, span_s: spanS,
                               cpu_s: (cpu.user + cpu.system) / 1e6 }));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
