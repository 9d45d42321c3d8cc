// @chorus/client: the Chorus JavaScript SDK (browsers, Node 20+, React Native; no dependencies).
//
//   import { ChorusClient } from "@chorus/client";
//   const chorus = new ChorusClient({ url: "wss://chat.example.com/ws", token: () => fetchToken() });
//   chorus.on("run", (run) => render(run));
//   await chorus.connect();
//   const ack = await chorus.send("Hello");
//
// See README.md for the guarantees and the whole API, docs/protocol.md for the wire protocol.

export { ChorusClient, jwtExpiryMs, restBase } from "./client.js";
export { Store, ENDED, END_EVENTS, mergeOrder } from "./store.js";
export { SeqGate } from "./gate.js";
export { shownText, startsText } from "./text.js";
export { backoffMs } from "./backoff.js";
export { closeAction, retryable, CLIENT_RESET } from "./policy.js";
export { RestClient } from "./rest.js";
export { Emitter } from "./emitter.js";
export { ChorusError, ConnectionError, ClosedError } from "./errors.js";
export { CloseCode, DoubleTexting, ErrorCode, Event, FrameType, ResyncReason, Role, RunStatus } from "./vocabulary.js";

/** @typedef {import("./client.js").ClientOptions} ClientOptions */
/** @typedef {import("./client.js").ClientEvents} ClientEvents */
/** @typedef {import("./client.js").ConnectionState} ConnectionState */
/** @typedef {import("./client.js").TokenProvider} TokenProvider */
/** @typedef {import("./client.js").TokenReason} TokenReason */
/** @typedef {import("./client.js").SocketLike} SocketLike */
/** @typedef {import("./store.js").Run} Run */
/** @typedef {import("./store.js").Message} Message */
/** @typedef {import("./store.js").Conversation} Conversation */
/** @typedef {import("./store.js").ToolCall} ToolCall */
/** @typedef {import("./protocol.js").ServerFrame} ServerFrame */
/** @typedef {import("./protocol.js").ClientCommand} ClientCommand */
/** @typedef {import("./protocol.js").EventFrame} EventFrame */
/** @typedef {import("./protocol.js").EventFrameMap} EventFrameMap */
/** @typedef {import("./protocol.js").Hello} Hello */
/** @typedef {import("./protocol.js").Ack} Ack */
/** @typedef {import("./protocol.js").Snapshot} Snapshot */
/** @typedef {import("./protocol.js").Resync} Resync */
/** @typedef {import("./protocol.js").Presence} Presence */
/** @typedef {import("./protocol.js").DeviceOnline} DeviceOnline */
