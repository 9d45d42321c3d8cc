// ChorusClient: one device of one user. It keeps one WebSocket open (reconnecting with jittered
// backoff and its `after`/`epoch`), passes every event through the seq gate into the store, resends
// each command with the same id until it is answered, renews its token in place, and reloads from
// REST when told to `resync`. The contract it implements is docs/protocol.md; each rule is cited
// where it is applied.

import { backoffMs } from "./backoff.js";
import { Emitter } from "./emitter.js";
import { ChorusError, ClosedError, ConnectionError } from "./errors.js";
import { SeqGate } from "./gate.js";
import { closeAction, CLIENT_RESET, retryable } from "./policy.js";
import { RestClient } from "./rest.js";
import { Store } from "./store.js";
import { FrameType } from "./vocabulary.js";

/** @typedef {import("./protocol.js").Hello} Hello */
/** @typedef {import("./protocol.js").Ack} Ack */
/** @typedef {import("./protocol.js").Pong} Pong */
/** @typedef {import("./protocol.js").Error} ErrorFrame */
/** @typedef {import("./protocol.js").Resync} Resync */
/** @typedef {import("./protocol.js").Snapshot} Snapshot */
/** @typedef {import("./protocol.js").Presence} Presence */
/** @typedef {import("./protocol.js").EventFrame} EventFrame */
/** @typedef {import("./protocol.js").ServerFrame} ServerFrame */
/** @typedef {import("./protocol.js").ClientCommand} ClientCommand */
/** @typedef {import("./protocol.js").Send} SendCommand */
/** @typedef {import("./protocol.js").DoubleTexting} DoubleTexting */
/** @typedef {import("./store.js").StoreEvents} StoreEvents */

/**
 * Why the token provider is called: the first connect (or a reconnect after the cached token
 * came close to expiry), a renewal before expiry (sent in place as an `auth` frame), or a 4001.
 * @typedef {"connect" | "expiring" | "unauthorized"} TokenReason
 */

/** @typedef {(reason: TokenReason) => string | Promise<string>} TokenProvider */

/**
 * The minimal WebSocket this client uses: the WHATWG one (browsers, Node 22+, Node 20 with
 * --experimental-websocket, React Native), or any object with the same members.
 * @typedef {object} SocketLike
 * @property {(data: string) => void} send
 * @property {(code?: number, reason?: string) => void} close
 * @property {((event: any) => void) | null} onopen
 * @property {((event: { data: any }) => void) | null} onmessage
 * @property {((event: { code: number, reason: string }) => void) | null} onclose
 * @property {((event: any) => void) | null} onerror
 */

/** @typedef {new (url: string) => SocketLike} SocketConstructor */

/**
 * @typedef {object} ClientOptions
 * @property {string | (() => string)} url the WebSocket URL ("wss://host/ws"), or a function choosing one per attempt
 * @property {string | TokenProvider} token a JWT, or a function returning one (called again before expiry and after a 4001)
 * @property {string} [restUrl] REST base URL; default: `url`'s origin over http(s)
 * @property {string} [device] this device's id; default: the one the server assigns in the first `hello`
 * @property {"frame" | "query"} [auth] send the token as the first frame (default: never in a URL, so never in a log) or as `access_token`
 * @property {{ after: number, epoch: string | null } | null} [position] resume from a saved position
 * @property {SocketConstructor} [WebSocket] default: globalThis.WebSocket
 * @property {typeof fetch} [fetch] default: globalThis.fetch
 * @property {{ baseMs?: number, maxMs?: number }} [backoff] reconnect backoff (50 ms, 2 s)
 * @property {() => number} [random] for the jitter (Math.random)
 * @property {number} [connectTimeoutMs] a socket with no `hello` this long is dropped (10 s)
 * @property {number} [refreshBeforeMs] renew the token this long before it expires (60 s, at most half its life left)
 * @property {number | null} [pingIntervalMs] ping when nothing came for this long; null: the server's heartbeat; 0: never
 * @property {number} [pingTimeoutMs] a ping not answered this long means a dead socket (10 s)
 * @property {number | null} [tooManyDevicesRetryMs] after a 4029, retry after this long (30 s); null: give up
 * @property {number} [maxUnauthorized] 4001 closes in a row (no hello between) before giving up (3)
 * @property {number} [maxFrameBytes] commands larger than this are refused before sending (64 KiB, the server's MAX_FRAME_BYTES)
 * @property {boolean} [reloadOnResync] reload conversations and loaded messages from REST after a `resync` (true)
 * @property {boolean} [watchEnvironment] reconnect at once when the page becomes visible or the network comes back (true)
 * @property {Store} [store] a store of your own (e.g. shared with a UI layer)
 */

/**
 * - "idle": not started; "connecting": the first connect; "connected": a `hello` came;
 * - "reconnecting": waiting to (or trying to) connect again; "closed": `close()`d, or given up (`code` says why).
 * @typedef {object} ConnectionState
 * @property {"idle" | "connecting" | "connected" | "reconnecting" | "closed"} status
 * @property {string | null} node the node serving this device (connected)
 * @property {boolean} resumed connected with a position (after/epoch), not as a new device
 * @property {number} attempt reconnect attempts since the last `hello`
 * @property {number | null} code the close code that caused this state
 * @property {number | null} delayMs how long until the next attempt (reconnecting)
 */

/**
 * @typedef {StoreEvents & {
 *   state: ConnectionState,
 *   hello: Hello,
 *   event: EventFrame,
 *   resync: Resync,
 *   snapshot: Snapshot,
 *   presence: Presence,
 *   ack: Ack,
 *   error: ChorusError,
 *   close: { code: number, reason: string },
 *   reloaded: { conversations: number },
 * }} ClientEvents
 */

/**
 * @typedef {object} Pending a command waiting for its reply
 * @property {string} id
 * @property {ClientCommand & { id: string }} frame
 * @property {string} text the frame as sent
 * @property {boolean} resend sent again (same id) after a reconnect or a retryable error
 * @property {number} sentOn the socket generation it was last sent on (0: not sent on this one)
 * @property {number} attempts retryable errors so far
 * @property {(reply: any) => void} resolve
 * @property {(error: Error) => void} reject
 * @property {Promise<any>} promise
 * @property {ReturnType<typeof setTimeout> | null} timer
 */

const STORE_EVENTS = new Set(["run", "message", "messages", "conversation", "devices"]);
const MAX_FRAME_BYTES = 64 * 1024;

export class ChorusClient {
  /** @param {ClientOptions} options */
  constructor(options) {
    this.options = options;
    this.store = options.store ?? new Store();
    /** @type {string | null} */
    this.device = options.device ?? null;
    /** @type {Hello | null} the last `hello` */
    this.hello = null;
    this.stats = { connects: 0, duplicates: 0, gaps: 0, resyncs: 0 };
    const WebSocketImpl = options.WebSocket ?? /** @type {SocketConstructor | undefined} */ (globalThis.WebSocket);
    if (!WebSocketImpl) throw new TypeError("no WebSocket: pass one as the `WebSocket` option (Node 20: --experimental-websocket)");
    this._WebSocket = WebSocketImpl;
    this.rest = new RestClient({
      baseUrl: options.restUrl ?? restBase(typeof options.url === "string" ? options.url : options.url()),
      token: (fresh) => this._tokenFor(fresh ? "unauthorized" : "connect"),
      fetch: options.fetch,
    });
    /** @type {Emitter<Omit<ClientEvents, keyof StoreEvents>>} */
    this._emitter = new Emitter();
    this._gate = new SeqGate(options.position?.after ?? null, options.position?.epoch ?? null);
    /** @type {ConnectionState} */
    this._state = { status: "idle", node: null, resumed: false, attempt: 0, code: null, delayMs: null };
    /** @type {Map<string, Pending>} */
    this._pending = new Map();
    this._gen = 0; // the current socket's generation; frames and closes of older sockets are ignored
    /** @type {SocketLike | null} */
    this._ws = null;
    this._connected = false;
    this._stopped = true;
    this._attempt = 0;
    this._unauthorizedInARow = 0;
    /** @type {TokenReason} */
    this._tokenReason = "connect";
    /** @type {{ value: string, expiresMs: number | null } | null} */
    this._token = null;
    /** @type {number | null} */
    this._reconnectAfterMs = null;
    this._lastFrameAt = 0;
    this._ids = 0;
    /** @type {Record<string, ReturnType<typeof setTimeout> | null>} */
    this._timers = { reconnect: null, hello: null, refresh: null };
    /** @type {ReturnType<typeof setInterval> | null} */
    this._liveness = null;
    /** @type {Array<{ resolve: (hello: Hello) => void, reject: (error: Error) => void }>} */
    this._waiters = [];
    /** @type {Array<() => void>} */
    this._unwatch = [];
  }

  // Reading

  /** @returns {ConnectionState} */
  get state() {
    return this._state;
  }

  /** Where this device is in its user's stream: save it to resume after a restart. */
  get position() {
    return this._gate.position();
  }

  /**
   * Subscribe to an event (see ClientEvents); returns the function that unsubscribes.
   * @template {keyof ClientEvents} K
   * @param {K} name
   * @param {(payload: ClientEvents[K]) => void} listener
   * @returns {() => void}
   */
  on(name, listener) {
    const target = /** @type {Emitter<any>} */ (STORE_EVENTS.has(name) ? this.store : this._emitter);
    return target.on(name, listener);
  }

  // Connecting

  /**
   * Start (or restart after `close()`) and resolve with the first `hello`. The client then stays
   * connected on its own; it rejects only when the client is closed or gives up first.
   * @returns {Promise<Hello>}
   */
  connect() {
    if (this._connected && this.hello) return Promise.resolve(this.hello);
    const promise = new Promise((resolve, reject) => this._waiters.push({ resolve, reject }));
    if (this._stopped) {
      this._stopped = false;
      this._watchEnvironment();
      this._open();
    }
    return /** @type {Promise<Hello>} */ (promise);
  }

  /** Close for good: no reconnect; pending commands are rejected with ClosedError. */
  close() {
    this._stop(new ClosedError("the client was closed"), CloseCodeNormal);
    this._setState({ status: "closed", node: null, code: null, delayMs: null });
  }

  /**
   * The page became visible or the network came back (called on its own in browsers; call it from
   * React Native's AppState/NetInfo): reconnect now if waiting, else check the socket with a ping.
   */
  wake() {
    if (this._stopped) return;
    if (this._timers.reconnect !== null) {
      this._clearTimer("reconnect");
      this._open();
    } else if (this._connected) {
      const gen = this._gen;
      this.ping({ timeoutMs: this.options.pingTimeoutMs ?? 10_000 }).catch((error) => {
        if (error.code === "timeout") this._abandon(gen, "no pong after wake");
      });
    }
  }

  /** Drop the socket and connect again from the current position (resume with after/epoch). */
  reconnect() {
    if (this._stopped) return;
    if (this._ws) this._abandon(this._gen, "reconnect requested");
    else this.wake();
  }

  // Commands

  /**
   * Send a message; resolves with its ack once stored. The `id` (fresh UUID by default) is the
   * idempotency key: the send is sent again with it after every reconnect and after a retryable
   * error until it is acked, and the server starts one run whatever the number of copies.
   * @param {string} text
   * @param {{ conversation?: string, id?: string, agent?: string, doubleTexting?: DoubleTexting, timeoutMs?: number }} [options]
   * @returns {Promise<Ack>}
   */
  send(text, { conversation, id, agent, doubleTexting, timeoutMs } = {}) {
    /** @type {SendCommand & { id: string }} */
    const frame = { type: FrameType.SEND, id: id ?? this._newId(), text };
    if (conversation) frame.conversation = conversation;
    if (agent) frame.agent = agent;
    if (doubleTexting) frame.double_texting = doubleTexting;
    return this._submit(frame, { resend: true, timeoutMs });
  }

  /**
   * Stop a run, from any device. Resent after a reconnect; a run that ended meanwhile is `conflict`.
   * @param {string} run
   * @param {{ id?: string, timeoutMs?: number }} [options]
   * @returns {Promise<Ack>}
   */
  cancel(run, { id, timeoutMs } = {}) {
    return this._submit({ type: FrameType.CANCEL, id: id ?? this._newId(), run }, { resend: true, timeoutMs });
  }

  /**
   * Answer a run's question (`run.input_required`); the first answer from any device wins, a later
   * one gets `conflict`.
   * @param {string} run
   * @param {string} request
   * @param {string} text
   * @param {{ id?: string, timeoutMs?: number }} [options]
   * @returns {Promise<Ack>}
   */
  respond(run, request, text, { id, timeoutMs } = {}) {
    return this._submit({ type: FrameType.RESPOND, id: id ?? this._newId(), run, request, text },
                        { resend: true, timeoutMs });
  }

  /**
   * A round trip; rejects with `disconnected` if the socket closes first, `timeout` after `timeoutMs`.
   * @param {{ timeoutMs?: number }} [options]
   * @returns {Promise<Pong>}
   */
  ping({ timeoutMs = 10_000 } = {}) {
    return this._submit({ type: FrameType.PING, id: this._newId() }, { resend: false, timeoutMs });
  }

  // REST, into the store

  /** Load the conversation list (newest page) into the store. */
  async loadConversations() {
    const { conversations } = await this.rest.listConversations();
    this.store.loadConversations(conversations);
    return this.store.conversationList();
  }

  /**
   * Load a conversation's newest messages (or, with `older`, the page before those loaded).
   * @param {string} conversation
   * @param {{ older?: boolean, limit?: number }} [options]
   */
  async loadMessages(conversation, { older = false, limit } = {}) {
    const known = this.store.conversations.get(conversation);
    const before = older ? known?.nextBefore ?? undefined : undefined;
    if (older && before === undefined) return this.store.messages(conversation);
    const page = await this.rest.listMessages(conversation, { limit, before });
    this.store.loadMessages(conversation, page.messages, { nextBefore: page.next_before, newest: !older });
    return this.store.messages(conversation);
  }

  /**
   * Create a conversation over REST (a `send` without `conversation` also creates one).
   * @param {{ title?: string, agent?: string, double_texting?: DoubleTexting }} [fields]
   */
  async createConversation(fields = {}) {
    const created = await this.rest.createConversation(fields);
    this.store.loadConversations([created]);
    return created;
  }

  /** @param {string} conversation */
  async deleteConversation(conversation) {
    await this.rest.deleteConversation(conversation);
    this.store.removeConversation(conversation);
  }

  // The socket

  async _open() {
    this._clearTimer("reconnect");
    const gen = ++this._gen;
    this._connected = false;
    this._setState({ status: this.stats.connects ? "reconnecting" : "connecting", node: null, delayMs: null });
    let token;
    try {
      token = await this._tokenFor(this._tokenReason);
    } catch (error) {
      if (gen !== this._gen || this._stopped) return;
      this._emitter.emit("error", asChorusError(error, "token"));
      this._schedule(backoffMs(this._attempt, this._backoff()));
      return;
    }
    if (gen !== this._gen || this._stopped) return;
    /** @type {SocketLike} */
    let ws;
    try {
      ws = new this._WebSocket(this._socketUrl(token));
    } catch (error) {
      this._emitter.emit("error", asChorusError(error, "connect"));
      this._schedule(backoffMs(this._attempt, this._backoff()));
      return;
    }
    this._ws = ws;
    this._lastFrameAt = Date.now();
    ws.onopen = () => {
      if (gen === this._gen && this._frameAuth()) ws.send(JSON.stringify({ type: FrameType.AUTH, id: `auth-${gen}`, token }));
    };
    ws.onmessage = (event) => this._onMessage(gen, event.data);
    ws.onclose = (event) => this._onClose(gen, event.code, event.reason);
    ws.onerror = () => {}; // a close event follows with the code
    this._timers.hello = setTimeout(() => this._abandon(gen, "no hello in time"), this.options.connectTimeoutMs ?? 10_000);
  }

  /** @param {string} token */
  _socketUrl(token) {
    const url = typeof this.options.url === "string" ? this.options.url : this.options.url();
    /** @type {Array<[string, string]>} */
    const params = [];
    if (this.device) params.push(["device", this.device]);
    const position = this._gate.position();
    if (position) {
      params.push(["after", String(position.after)]);
      if (position.epoch) params.push(["epoch", position.epoch]);
    }
    params.push(this._frameAuth() ? ["auth", "frame"] : ["access_token", token]);
    const query = params.map(([k, v]) => `${k}=${encodeURIComponent(v)}`).join("&");
    return `${url}${url.includes("?") ? "&" : "?"}${query}`;
  }

  _frameAuth() {
    return (this.options.auth ?? "frame") === "frame";
  }

  /**
   * @param {number} gen
   * @param {unknown} raw
   */
  _onMessage(gen, raw) {
    if (gen !== this._gen) return;
    this._lastFrameAt = Date.now();
    /** @type {ServerFrame} */
    let frame;
    try {
      frame = JSON.parse(String(raw));
    } catch {
      this._emitter.emit("error", new ChorusError("bad_frame", "a frame that is not JSON"));
      return;
    }
    switch (frame.type) {
      case FrameType.HELLO:
        return this._onHello(frame);
      case FrameType.EVENT:
        return this._onEvent(gen, frame);
      case FrameType.ACK:
      case FrameType.PONG:
      case FrameType.ERROR:
        return this._onReply(frame);
      case FrameType.RESYNC:
        return this._onResync(frame);
      case FrameType.SNAPSHOT:
        if (this._gate.last === null) this._gate.reset(frame);
        this.store.applySnapshot(frame);
        this._emitter.emit("snapshot", frame);
        return;
      case FrameType.RECONNECT:
        // The node drains: it closes with 1012 right after; reconnect after `after_ms`.
        this._reconnectAfterMs = frame.after_ms;
        return;
      case FrameType.PRESENCE:
        // Not sequenced (no seq, never in history): it must not pass the seq gate, whose position
        // it would corrupt. The store applies it idempotently: every socket of the user gets it.
        this.store.applyPresence(frame);
        this._emitter.emit("presence", frame);
        return;
      default:
        return; // unknown frames are ignored (a newer server)
    }
  }

  /** @param {Hello} hello */
  _onHello(hello) {
    this._clearTimer("hello");
    const resumed = this._gate.position() !== null;
    this._gate.hello(hello);
    this.hello = hello;
    this.device = hello.device; // the same device id on every reconnect (presence, device limit)
    this._connected = true;
    this._attempt = 0;
    this._unauthorizedInARow = 0;
    this._tokenReason = "connect";
    this._reconnectAfterMs = null;
    this.stats.connects += 1;
    // The devices online as of this hello replace the list: presence frames sent while this device
    // was away never reached it. (A server older than presence sends none: the list stays empty.)
    this.store.setDevices(hello.devices ?? []);
    this._setState({ status: "connected", node: hello.node, resumed, attempt: 0, code: null, delayMs: null });
    this._emitter.emit("hello", hello);
    this._scheduleRefresh();
    this._startLiveness(hello.heartbeat);
    for (const pending of this._pending.values()) if (pending.sentOn !== this._gen) this._transmit(pending);
    for (const waiter of this._waiters.splice(0)) waiter.resolve(hello);
  }

  /**
   * @param {number} gen
   * @param {EventFrame} frame
   */
  _onEvent(gen, frame) {
    const offer = this._gate.offer(frame);
    if (offer === "duplicate") {
      this.stats.duplicates += 1;
    } else if (offer === "gap") {
      // Never shown: start again from the last seq shown; the server replays the rest from history.
      this.stats.gaps += 1;
      this._abandon(gen, `gap after seq ${this._gate.last}`);
    } else {
      this.store.apply(frame);
      this._emitter.emit("event", frame);
    }
  }

  /** @param {Resync} frame */
  _onResync(frame) {
    // The position was unusable (history trimmed, or a new epoch): the device is now at `seq`, a
    // snapshot follows, and what it shows is reloaded from REST, which is complete.
    this._gate.reset(frame);
    this.stats.resyncs += 1;
    this._emitter.emit("resync", frame);
    if (this.options.reloadOnResync ?? true) {
      this._reload().catch((error) => this._emitter.emit("error", asChorusError(error, "reload")));
    }
  }

  async _reload() {
    const loaded = [...this.store.conversations.values()].filter((c) => c.loaded).map((c) => c.id);
    await this.loadConversations();
    for (const id of loaded) {
      try {
        await this.loadMessages(id);
      } catch (error) {
        if (!(error instanceof ChorusError && error.status === 404)) throw error;
        this.store.removeConversation(id); // deleted meanwhile (maybe from another device)
      }
    }
    this._emitter.emit("reloaded", { conversations: loaded.length });
  }

  /** @param {Ack | Pong | ErrorFrame} frame */
  _onReply(frame) {
    const id = frame.id;
    if (frame.type === FrameType.ACK && frame.expires_at !== undefined && id?.startsWith("auth-")) {
      this._setTokenExpiry(frame.expires_at); // the first-frame auth's ack (renewals are pending)
      return;
    }
    const pending = id == null ? undefined : this._pending.get(id);
    if (!pending) {
      if (frame.type === FrameType.ERROR) this._emitter.emit("error", errorOf(frame));
      return;
    }
    if (frame.type !== FrameType.ERROR) {
      this._settle(pending);
      if (frame.type === FrameType.ACK) this._emitter.emit("ack", frame);
      pending.resolve(frame);
      return;
    }
    if (pending.resend && retryable(frame.code)) {
      // Nothing was acked: the same id again, after the server's hint or our backoff.
      pending.attempts += 1;
      pending.sentOn = -1;
      const delay = frame.retry_after_ms ?? backoffMs(pending.attempts, this._backoff());
      setTimeout(() => {
        if (this._pending.get(pending.id) === pending && this._connected && pending.sentOn === -1) this._transmit(pending);
      }, delay);
      return;
    }
    this._settle(pending);
    pending.reject(errorOf(frame));
  }

  /**
   * @param {number} gen
   * @param {number} code
   * @param {string} reason
   */
  _onClose(gen, code, reason) {
    if (gen !== this._gen) return;
    this._detach();
    this._emitter.emit("close", { code, reason });
    for (const pending of [...this._pending.values()]) {
      if (pending.resend) continue; // sent again after the next hello
      this._settle(pending);
      pending.reject(new ConnectionError(`socket closed (${code}) before the reply`));
    }
    if (this._stopped) return;
    const action = closeAction(code);
    if (action === "stop") {
      this._giveUp(code, `closed with ${code}${reason ? `: ${reason}` : ""}`);
    } else if (action === "renew") {
      this._token = null; // never reuse it: the provider is asked for a fresh one
      this._tokenReason = "unauthorized";
      this._unauthorizedInARow += 1;
      if (this._unauthorizedInARow >= (this.options.maxUnauthorized ?? 3)) {
        this._giveUp(code, "the token provider's tokens are refused (4001)");
      } else {
        this._schedule(this._unauthorizedInARow === 1 ? 0 : backoffMs(this._attempt, this._backoff()), code);
      }
    } else if (action === "later") {
      const wait = this.options.tooManyDevicesRetryMs === undefined ? 30_000 : this.options.tooManyDevicesRetryMs;
      if (wait === null) this._giveUp(code, "too many devices online (4029)");
      else this._schedule(wait + backoffMs(this._attempt, this._backoff()), code);
    } else if (action === "now" && this._attempt === 0) {
      this._schedule(this._reconnectAfterMs ?? 0, code);
    } else {
      this._schedule(backoffMs(this._attempt, this._backoff()), code);
    }
  }

  /**
   * Stop using the current socket at once (without waiting for a close handshake on a dead network)
   * and reconnect from the position.
   * @param {number} gen
   * @param {string} why
   */
  _abandon(gen, why) {
    if (gen !== this._gen || !this._ws) return;
    const ws = this._ws;
    try {
      ws.close(CLIENT_RESET, why.slice(0, 120));
    } catch {
      // already closing
    }
    this._onClose(gen, CLIENT_RESET, why);
  }

  /** Forget the current socket: its late frames and close are ignored from now on. */
  _detach() {
    const ws = this._ws;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      ws.onerror = () => {};
    }
    this._ws = null;
    this._connected = false;
    this._gen += 1;
    this._clearTimer("hello");
    this._clearTimer("refresh");
    if (this._liveness !== null) clearInterval(this._liveness);
    this._liveness = null;
  }

  /**
   * @param {number} delayMs
   * @param {number | null} [code]
   */
  _schedule(delayMs, code = null) {
    this._clearTimer("reconnect");
    this._attempt += 1;
    this._setState({ status: "reconnecting", node: null, attempt: this._attempt, code, delayMs });
    this._timers.reconnect = setTimeout(() => {
      this._timers.reconnect = null;
      this._open();
    }, delayMs);
  }

  /**
   * @param {number} code
   * @param {string} why
   */
  _giveUp(code, why) {
    const error = new ClosedError(why, code === 4001 ? "unauthorized" : "gave_up");
    this._stop(error, null);
    this._emitter.emit("error", error);
    this._setState({ status: "closed", node: null, code, delayMs: null });
  }

  /**
   * @param {Error} error what pending commands and connect() waiters are rejected with
   * @param {number | null} closeCode close the socket with it (null: it is closed already)
   */
  _stop(error, closeCode) {
    this._stopped = true;
    const ws = this._ws;
    this._detach();
    if (ws && closeCode !== null) {
      try {
        ws.close(closeCode);
      } catch {
        // already closed
      }
    }
    this._clearTimer("reconnect");
    for (const pending of [...this._pending.values()]) {
      this._settle(pending);
      pending.reject(error);
    }
    for (const waiter of this._waiters.splice(0)) waiter.reject(error);
    for (const unwatch of this._unwatch.splice(0)) unwatch();
  }

  // Commands: one pending entry per id until its one reply

  /**
   * @param {ClientCommand & { id: string }} frame
   * @param {{ resend: boolean, timeoutMs?: number }} options
   * @returns {Promise<any>}
   */
  _submit(frame, { resend, timeoutMs }) {
    const known = this._pending.get(frame.id);
    if (known) return known.promise; // the same id again: one command, one reply
    const text = JSON.stringify(frame);
    if (utf8Length(text) > (this.options.maxFrameBytes ?? MAX_FRAME_BYTES)) {
      return Promise.reject(new ChorusError("too_large", "the command is larger than the server's frame limit"));
    }
    if (this._stopped && this.stats.connects > 0) {
      return Promise.reject(new ClosedError("the client is closed"));
    }
    /** @type {Pending} */
    const pending = /** @type {any} */ ({ id: frame.id, frame, text, resend, sentOn: 0, attempts: 0, timer: null });
    pending.promise = new Promise((resolve, reject) => {
      pending.resolve = resolve;
      pending.reject = reject;
    });
    this._pending.set(frame.id, pending);
    if (timeoutMs !== undefined) {
      pending.timer = setTimeout(() => {
        this._settle(pending);
        pending.reject(new ChorusError("timeout", `no reply to ${frame.type} ${frame.id} in ${timeoutMs} ms`));
      }, timeoutMs);
    }
    if (this._connected) this._transmit(pending);
    return pending.promise;
  }

  /** @param {Pending} pending */
  _transmit(pending) {
    if (!this._ws) return;
    try {
      this._ws.send(pending.text);
      pending.sentOn = this._gen;
    } catch {
      // the socket is closing: its close sends the command again after the next hello
    }
  }

  /** @param {Pending} pending */
  _settle(pending) {
    if (pending.timer !== null) clearTimeout(pending.timer);
    this._pending.delete(pending.id);
  }

  _newId() {
    this._ids += 1;
    const uuid = globalThis.crypto?.randomUUID?.();
    return uuid ?? `c${Date.now().toString(36)}-${this._ids}-${Math.random().toString(36).slice(2, 12)}`;
  }

  // Tokens

  /**
   * The token to use now: the cached one while it is not close to expiry, else the provider's.
   * @param {TokenReason} reason
   * @returns {Promise<string>}
   */
  async _tokenFor(reason) {
    const option = this.options.token;
    if (typeof option === "string") return option;
    const margin = this.options.refreshBeforeMs ?? 60_000;
    const cached = this._token;
    if (reason === "connect" && cached && (cached.expiresMs === null || cached.expiresMs - Date.now() > margin / 2)) {
      return cached.value;
    }
    const value = await option(reason);
    if (typeof value !== "string" || !value) throw new ChorusError("token", "the token provider returned no token");
    this._token = { value, expiresMs: jwtExpiryMs(value) };
    return value;
  }

  /** @param {number} expiresAtS */
  _setTokenExpiry(expiresAtS) {
    if (this._token) this._token.expiresMs = expiresAtS * 1000;
    this._scheduleRefresh();
  }

  /** Renew the token in place (an `auth` frame) before the server closes the socket with 4001. */
  _scheduleRefresh() {
    this._clearTimer("refresh");
    const expiresMs = this._token?.expiresMs;
    if (typeof this.options.token === "string" || !expiresMs || !this._connected) return;
    const left = expiresMs - Date.now();
    const margin = Math.min(this.options.refreshBeforeMs ?? 60_000, left / 2);
    const gen = this._gen;
    this._timers.refresh = setTimeout(() => {
      this._timers.refresh = null;
      this._renew(gen);
    }, Math.max(1_000, left - margin));
  }

  /** @param {number} gen */
  async _renew(gen) {
    try {
      const token = await this._tokenFor("expiring");
      if (gen !== this._gen || !this._connected) return;
      /** @type {Ack} */
      const ack = await this._submit({ type: FrameType.AUTH, id: this._newId(), token }, { resend: false, timeoutMs: 10_000 });
      if (ack.expires_at !== undefined) this._setTokenExpiry(ack.expires_at);
    } catch (error) {
      if (gen !== this._gen) return;
      this._emitter.emit("error", asChorusError(error, "token"));
      // The old token stays in force: try again while there is time; a 4001 close handles the rest.
      const left = (this._token?.expiresMs ?? 0) - Date.now();
      if (left > 2_000) this._timers.refresh = setTimeout(() => this._renew(gen), Math.min(left / 2, 30_000));
    }
  }

  // Liveness and environment

  /** @param {number} heartbeatS the server's ping interval */
  _startLiveness(heartbeatS) {
    const configured = this.options.pingIntervalMs;
    const every = configured === undefined || configured === null ? heartbeatS * 1000 : configured;
    if (!every) return;
    const gen = this._gen;
    // The server's WebSocket pings are invisible to browser JavaScript: a socket that went dead
    // silently (a phone's network changed) is found by a ping of our own when nothing came.
    this._liveness = setInterval(() => {
      if (Date.now() - this._lastFrameAt < every) return;
      this.ping({ timeoutMs: this.options.pingTimeoutMs ?? 10_000 }).catch((error) => {
        if (error.code === "timeout") this._abandon(gen, "no pong");
      });
    }, every);
  }

  _watchEnvironment() {
    if (this.options.watchEnvironment === false || this._unwatch.length) return;
    const doc = /** @type {any} */ (globalThis).document;
    const win = /** @type {any} */ (globalThis).window;
    if (doc && typeof doc.addEventListener === "function") {
      const visible = () => {
        if (doc.visibilityState === "visible") this.wake();
      };
      doc.addEventListener("visibilitychange", visible);
      this._unwatch.push(() => doc.removeEventListener("visibilitychange", visible));
    }
    if (win && typeof win.addEventListener === "function") {
      const online = () => this.wake();
      win.addEventListener("online", online);
      this._unwatch.push(() => win.removeEventListener("online", online));
    }
  }

  // Small things

  /** @param {Partial<ConnectionState>} change */
  _setState(change) {
    this._state = { ...this._state, ...change };
    this._emitter.emit("state", this._state);
  }

  /** @param {string} name */
  _clearTimer(name) {
    const timer = this._timers[name];
    if (timer !== null && timer !== undefined) clearTimeout(timer);
    this._timers[name] = null;
  }

  _backoff() {
    return { ...this.options.backoff, random: this.options.random };
  }
}

const CloseCodeNormal = 1000;

/** @param {ErrorFrame} frame */
function errorOf(frame) {
  return new ChorusError(frame.code, frame.message, { retryAfterMs: frame.retry_after_ms ?? null, frame });
}

/**
 * @param {unknown} error
 * @param {string} code
 */
function asChorusError(error, code) {
  if (error instanceof ChorusError) return error;
  return new ChorusError(code, error instanceof Error ? error.message : String(error));
}

/**
 * The REST origin of a WebSocket URL: ws(s)://host/ws -> http(s)://host.
 * @param {string} url
 */
export function restBase(url) {
  const match = /^(ws|wss|http|https):\/\/([^/?#]+)/i.exec(url);
  if (!match) throw new TypeError(`not a WebSocket URL: ${url}`);
  const scheme = match[1].toLowerCase();
  return `${scheme === "wss" || scheme === "https" ? "https" : "http"}://${match[2]}`;
}

/**
 * A JWT's `exp` in milliseconds (not verified: only to know when to renew), or null.
 * @param {string} token
 */
export function jwtExpiryMs(token) {
  const part = token.split(".")[1];
  if (!part) return null;
  try {
    const exp = JSON.parse(base64UrlDecode(part)).exp;
    return typeof exp === "number" ? exp * 1000 : null;
  } catch {
    return null;
  }
}

/** @param {string} text base64url (no atob in every React Native) */
function base64UrlDecode(text) {
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  /** @type {number[]} */
  const bytes = [];
  let buffer = 0;
  let bits = 0;
  for (const char of text.replace(/=+$/, "").replace(/\+/g, "-").replace(/\//g, "_")) {
    const value = alphabet.indexOf(char);
    if (value < 0) throw new Error("not base64url");
    buffer = (buffer << 6) | value;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      bytes.push((buffer >> bits) & 0xff);
    }
  }
  return decodeURIComponent(bytes.map((b) => `%${b.toString(16).padStart(2, "0")}`).join(""));
}

/** @param {string} text */
function utf8Length(text) {
  let length = 0;
  for (const char of text) {
    const code = /** @type {number} */ (char.codePointAt(0));
    length += code < 0x80 ? 1 : code < 0x800 ? 2 : code < 0x10000 ? 3 : 4;
  }
  return length;
}
