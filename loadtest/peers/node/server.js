// Node Socket.IO peer: socket.io with @socket.io/redis-adapter (node-redis clients), websocket only.
//   node server.js --port P --redis redis://127.0.0.1:6379/0 --secret S
// A device connects with the auth payload {user, token} (loadtest/peers/tokens.py: the first 32 hex
// digits of HMAC-SHA256(secret, user)) and joins room `user`. publisher.js emits to that room through
// @socket.io/redis-emitter; each server process receives it from Redis and delivers to its local members.
"use strict";
const crypto = require("crypto");
const http = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

function option(name) {
  const at = process.argv.indexOf(`--${name}`);
  if (at < 0 || at + 1 >= process.argv.length) throw new Error(`--${name} is required`);
  return process.argv[at + 1];
}

function valid(secret, user, token) {
  if (typeof user !== "string" || !user || typeof token !== "string") return false;
  const expected = crypto.createHmac("sha256", secret).update(user).digest("hex").slice(0, 32);
  return token.length === expected.length && crypto.timingSafeEqual(Buffer.from(token), Buffer.from(expected));
}

async function main() {
  const port = Number(option("port"));
  const secret = option("secret");
  const pub = createClient({ url: option("redis") });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  const server = http.createServer();
  const io = new Server(server, { transports: ["websocket"], adapter: createAdapter(pub, sub) });
  io.use((socket, next) => {
    const { user, token } = socket.handshake.auth || {};
    next(valid(secret, user, token) ? undefined : new Error("unauthorized"));
  });
  io.on("connection", (socket) => socket.join(socket.handshake.auth.user));
  server.listen({ port, host: "127.0.0.1", backlog: 4096 });
  for (const signal of ["SIGTERM", "SIGINT"]) process.on(signal, () => process.exit(0));
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
