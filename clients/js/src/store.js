// What a device shows: conversations, their messages, runs with their streaming text and status, and
// the user's devices online now. Pure (no I/O): the client feeds it the frames its seq gate accepted,
// `snapshot` frames, REST pages and presence (`hello.devices`, `presence` frames), in any mix, and it
// applies each idempotently.
//
// Why it is idempotent: every run remembers the last seq applied to it (`seq`). A snapshot is
// exact as of its seq, so an event at or below a run's seq is already in the run and is skipped;
// messages are keyed by id. So a resync (REST reload + snapshot) racing live events, or a REST page
// loaded twice, never doubles text or messages.
//
// Objects handed out are never mutated: a change replaces the run (or message, or conversation)
// with a new object, so UI frameworks can compare by identity.

import { Emitter } from "./emitter.js";
import { shownText } from "./text.js";
import { Event, Role, RunStatus } from "./vocabulary.js";

/** @typedef {import("./protocol.js").EventFrame} EventFrame */
/** @typedef {import("./protocol.js").Snapshot} Snapshot */
/** @typedef {import("./protocol.js").RunStatus} RunStatusName */
/** @typedef {import("./protocol.js").Role} RoleName */
/** @typedef {import("./protocol.js").DoubleTexting} DoubleTextingName */
/** @typedef {import("./protocol.js").DeviceOnline} DeviceOnline */
/** @typedef {import("./protocol.js").Presence} Presence */

/**
 * A tool call of a run, as `tool.started` / `tool.completed` (or REST's `tools`) describe it.
 * @typedef {object} ToolCall
 * @property {string} call
 * @property {string} name
 * @property {unknown} arguments
 * @property {string | null} summary
 * @property {string | null} error
 * @property {boolean} done
 */

/**
 * One run (one answer of the agent).
 * @typedef {object} Run
 * @property {string} id
 * @property {string} conversation
 * @property {string | null} message the user message that started it
 * @property {RunStatusName} status
 * @property {string} text the answer as shown (protocol/text.py `shown_text`; the end event's text once ended)
 * @property {number} attempt 1, or more after a worker died and another restarted the run
 * @property {number} seq the last seq applied to this run (-1: none)
 * @property {string | null} answerMessage the stored assistant message, once ended with text
 * @property {string | null} behind the run it waits behind (double-texting)
 * @property {number | null} position its place in the queue for a worker (1: next)
 * @property {{ request: string, prompt: string } | null} input the question it waits on (human in the loop)
 * @property {ToolCall[]} tools
 * @property {unknown[]} custom the values of its `run.custom` events (what the agent's graph wrote to its custom
 *   stream) this device saw, in order; a restart begins them again. Not stored: REST does not return them.
 * @property {{ code: string, message: string } | null} error why it failed
 * @property {number | null} stoppedAt the seq of the last token of a cancelled run
 * @property {boolean} rolledBack discarded by a `rollback` with the message that started it
 */

/**
 * A message of a conversation. Assistant messages are views of their run (`status`, `text`).
 * @typedef {object} Message
 * @property {string | null} id null for an answer not stored yet
 * @property {string} conversation
 * @property {RoleName} role
 * @property {string} text
 * @property {string | null} run for a user message, the run it started; for an answer, its run
 * @property {string | null} device the device that sent a user message
 * @property {string | null} clientId the send's id (idempotency key)
 * @property {number | null} seq the seq of its `message.created`
 * @property {RunStatusName | null} status an answer's run status; null for user messages
 */

/**
 * A conversation; `loaded` once its newest messages came from REST.
 * @typedef {object} Conversation
 * @property {string} id
 * @property {string | null} title
 * @property {string | null} agent
 * @property {DoubleTextingName | null} double_texting
 * @property {string | null} created_at
 * @property {string | null} updated_at
 * @property {boolean} loaded
 * @property {number | null} nextBefore REST cursor of the previous page (null: none, or not loaded)
 */

/**
 * A message as REST returns it (`GET /v1/conversations/{id}/messages`).
 * @typedef {object} RestMessage
 * @property {string} id
 * @property {string} role
 * @property {string} content
 * @property {string | null} device
 * @property {string | null} run
 * @property {Array<{ call: string, name: string, arguments: unknown, summary?: string | null, error?: string | null }>} [tools]
 * @property {number | null} seq
 * @property {string} [created_at]
 */

/**
 * @typedef {object} StoreEvents
 * @property {Run} run a run changed
 * @property {Message} message a user message was added or changed
 * @property {{ conversation: string }} messages a conversation's list of messages changed (added, removed, reordered)
 * @property {Conversation} conversation a conversation was added or changed
 * @property {DeviceOnline[]} devices the user's devices online changed (the whole list, as `devices()` returns it)
 */

// The seq of a run known from its stored answer (REST): no token can add to it any more.
const STORED = Number.MAX_SAFE_INTEGER;

/** @type {ReadonlySet<string>} */
export const ENDED = new Set([RunStatus.COMPLETED, RunStatus.CANCELLED, RunStatus.FAILED]);
/** @type {ReadonlySet<string>} */
export const END_EVENTS = new Set([Event.RUN_COMPLETED, Event.RUN_CANCELLED, Event.RUN_FAILED]);

/** @extends {Emitter<StoreEvents>} */
export class Store extends Emitter {
  constructor() {
    super();
    /** @type {Map<string, Conversation>} */
    this.conversations = new Map();
    /** @type {Map<string, Run>} */
    this.runs = new Map();
    /** @type {Map<string, Message>} user messages by id */
    this._messages = new Map();
    /** @type {Map<string, string[]>} conversation -> its user messages' ids, in order */
    this._order = new Map();
    /** @type {Map<string, string[]>} conversation -> its runs' ids, in the order first seen */
    this._runOrder = new Map();
    /** @type {Map<string, DeviceOnline>} the user's devices online now, by device id */
    this._devices = new Map();
  }

  // Reading

  /** @param {string} id */
  run(id) {
    return this.runs.get(id);
  }

  /**
   * A conversation's messages in order: each user message, then the answer of the run it started;
   * runs whose user message this device has not seen (yet) come last.
   * @param {string} conversation
   * @returns {Message[]}
   */
  messages(conversation) {
    /** @type {Message[]} */
    const out = [];
    const shown = new Set();
    for (const id of this._order.get(conversation) ?? []) {
      const message = this._messages.get(id);
      if (!message) continue;
      out.push(message);
      const run = message.run ? this.runs.get(message.run) : undefined;
      if (run && !run.rolledBack) {
        out.push(answer(run));
        shown.add(run.id);
      }
    }
    for (const id of this._runOrder.get(conversation) ?? []) {
      const run = this.runs.get(id);
      if (run && !shown.has(id) && !run.rolledBack) out.push(answer(run));
    }
    return out;
  }

  /**
   * The user's devices online now (this one included once connected), each with the node serving it,
   * in the order they came online.
   * @returns {DeviceOnline[]}
   */
  devices() {
    return [...this._devices.values()];
  }

  /** Conversations, most recently active first (as REST lists them; new ones first). */
  conversationList() {
    const time = (/** @type {Conversation} */ c) => (c.updated_at ? Date.parse(c.updated_at) : Infinity);
    return [...this.conversations.values()].sort((a, b) => time(b) - time(a));
  }

  // Applying

  /**
   * Apply one event frame the seq gate delivered. Unknown events are ignored.
   * @param {EventFrame} frame
   */
  apply(frame) {
    const conversation = this._conversation(frame.conversation);
    if (frame.event === Event.MESSAGE_CREATED) {
      const data = frame.data;
      this._putMessage({
        id: data.message, conversation: conversation.id, role: data.role ?? Role.USER, text: data.text,
        run: frame.run, device: data.device, clientId: data.client_id, seq: frame.seq, status: null,
      });
      if (frame.run && !this.runs.has(frame.run)) {
        this._putRun({ ...newRun(frame.run, conversation.id), message: data.message });
      }
      this._touch(conversation.id, frame.ts);
      return;
    }
    if (frame.run === null) return;
    const before = this.runs.get(frame.run) ?? newRun(frame.run, conversation.id);
    // Already in the run (a snapshot or REST page covered it); a run known only from its stored
    // answer still takes its end event, which tells how it ended.
    if (frame.seq <= before.seq && !(before.seq === STORED && END_EVENTS.has(frame.event))) return;
    /** @type {Run} */
    const run = { ...before, seq: frame.seq };
    switch (frame.event) {
      case Event.RUN_QUEUED:
        run.status = frame.data.behind ? RunStatus.WAITING : RunStatus.QUEUED;
        run.behind = frame.data.behind;
        run.position = frame.data.position ?? null;
        if (frame.data.message) run.message = frame.data.message;
        break;
      case Event.RUN_STARTED:
        Object.assign(run, { status: RunStatus.RUNNING, attempt: frame.data.attempt, message: frame.data.message,
                             behind: null, position: null, input: null, tools: [], custom: [] });
        break;
      case Event.TOKEN:
        run.status = RunStatus.RUNNING;
        break;
      case Event.RUN_RESUMED:
        run.attempt = frame.data.attempt;
        break;
      case Event.TOOL_STARTED:
        run.tools = [...run.tools, { call: frame.data.call, name: frame.data.name, arguments: frame.data.arguments,
                                     summary: null, error: null, done: false }];
        break;
      case Event.TOOL_COMPLETED: {
        const data = frame.data;
        const done = { call: data.call, name: data.name, summary: data.summary, error: data.error, done: true };
        const known = run.tools.some((tool) => tool.call === data.call);
        run.tools = known
          ? run.tools.map((tool) => (tool.call === data.call ? { ...tool, ...done } : tool))
          : [...run.tools, { ...done, arguments: null }];
        break;
      }
      case Event.RUN_CUSTOM:
        run.status = RunStatus.RUNNING;
        run.custom = [...run.custom, frame.data.value];
        break;
      case Event.RUN_INPUT_REQUIRED:
        run.status = RunStatus.PAUSED;
        run.input = { request: frame.data.request, prompt: frame.data.prompt };
        break;
      case Event.RUN_INPUT_RECEIVED:
        if (run.input?.request === frame.data.request) {
          run.status = RunStatus.RUNNING;
          run.input = null;
        }
        break;
      case Event.RUN_COMPLETED:
      case Event.RUN_CANCELLED:
      case Event.RUN_FAILED:
        this._end(run, frame);
        break;
      default:
        return; // an event this SDK does not know: ignored, as the protocol asks
    }
    run.text = END_EVENTS.has(frame.event) ? run.text : shownText(run.text, frame.event, frame.data);
    this._putRun(run);
    if (run.rolledBack && run.message) this._removeMessage(run.conversation, run.message);
  }

  /**
   * @param {Run} run
   * @param {EventFrame} frame an end event
   */
  _end(run, frame) {
    const data = /** @type {{ text: string, message: string | null, rolled_back?: boolean, stopped_at?: number,
      code?: string, answer_message?: string | null }} */ (frame.data);
    // The end event's text is the whole answer (of the last attempt): equal to the tokens shown
    // when nothing was missed, and right even when this device joined after the run began.
    run.text = data.text;
    run.input = null;
    run.behind = null;
    run.position = null;
    run.rolledBack = Boolean(data.rolled_back);
    if (frame.event === Event.RUN_FAILED) {
      run.status = RunStatus.FAILED;
      run.error = { code: String(data.code), message: String(data.message) };
      run.answerMessage = data.answer_message ?? null;
    } else {
      run.status = frame.event === Event.RUN_COMPLETED ? RunStatus.COMPLETED : RunStatus.CANCELLED;
      run.answerMessage = data.message;
      run.stoppedAt = data.stopped_at ?? null;
    }
  }

  /**
   * Apply a `snapshot`: each run in flight with its text exact as of the snapshot's seq.
   * @param {Snapshot} snapshot
   */
  applySnapshot(snapshot) {
    for (const item of snapshot.runs) {
      this._conversation(item.conversation);
      const before = this.runs.get(item.run) ?? newRun(item.run, item.conversation);
      if (before.seq > snapshot.seq) continue;
      // A paused run comes with the question it waits on: this device can answer it.
      const input = item.input ? { request: item.input.request, prompt: item.input.prompt } : null;
      const tools = (item.tools ?? []).map((tool) => ({ call: tool.call, name: tool.name, arguments: tool.arguments,
                                                        summary: tool.summary ?? null, error: tool.error ?? null,
                                                        done: Boolean(tool.done) }));
      this._putRun({ ...before, status: item.status, text: item.text, seq: snapshot.seq, input, tools });
    }
  }

  /**
   * Conversations from REST (`GET /v1/conversations`): added or updated, never removed.
   * @param {Array<Omit<Conversation, "loaded" | "nextBefore">>} items
   */
  loadConversations(items) {
    for (const item of items) {
      const before = this.conversations.get(item.id);
      this._putConversation({ ...(before ?? stub(item.id)), ...item, loaded: before?.loaded ?? false,
                              nextBefore: before?.nextBefore ?? null });
    }
  }

  /**
   * A page of a conversation's messages from REST (oldest first), merged with what is known:
   * messages by id, answers into their runs (an answer in REST is a run that ended).
   * @param {string} conversation
   * @param {RestMessage[]} page
   * @param {{ nextBefore?: number | null, newest?: boolean }} [options] `newest`: the newest page
   */
  loadMessages(conversation, page, { nextBefore = null, newest = true } = {}) {
    const conv = this._conversation(conversation);
    /** @type {string[]} */
    const ids = [];
    for (const item of page) {
      if (item.role === Role.USER) {
        ids.push(item.id);
        const before = this._messages.get(item.id);
        this._putMessage({
          id: item.id, conversation, role: Role.USER, text: item.content, run: item.run, device: item.device,
          clientId: before?.clientId ?? null, seq: item.seq ?? before?.seq ?? null, status: null,
        }, false);
        if (item.run && !this.runs.has(item.run)) this._putRun({ ...newRun(item.run, conversation), message: item.id });
      } else if (item.run) {
        const before = this.runs.get(item.run) ?? newRun(item.run, conversation);
        // A stored answer belongs to a run that ended; REST does not say how, so a run not known to
        // have ended is shown completed (its end event, if it comes, sets the exact status).
        this._putRun({
          ...before,
          status: ENDED.has(before.status) ? before.status : RunStatus.COMPLETED,
          text: item.content,
          answerMessage: item.id,
          seq: STORED,
          input: null, behind: null, position: null,
          tools: (item.tools ?? []).map((tool) => ({ call: tool.call, name: tool.name, arguments: tool.arguments,
                                                    summary: tool.summary ?? null, error: tool.error ?? null,
                                                    done: true })),
        });
      }
    }
    this._order.set(conversation, mergeOrder(this._order.get(conversation) ?? [], ids));
    this._putConversation({ ...conv, loaded: conv.loaded || newest,
                            nextBefore: newest || conv.nextBefore !== null ? nextBefore : conv.nextBefore });
    this.emit("messages", { conversation });
  }

  /**
   * The devices a `hello` lists: they replace the list (what changed while this device was away
   * came with no `presence` frame to it).
   * @param {DeviceOnline[]} devices
   */
  setDevices(devices) {
    const next = new Map(devices.map(({ device, node }) => [device, { device, node }]));
    const same = next.size === this._devices.size
      && [...next.values()].every(({ device, node }) => this._devices.get(device)?.node === node);
    this._devices = next;
    if (!same) this.emit("devices", this.devices());
  }

  /**
   * A `presence` frame: one device came online (or moved to another node) or went offline. Not
   * sequenced, and sent to every socket of the user, so it is applied idempotently: a frame that
   * changes nothing emits nothing.
   * @param {Presence} frame
   */
  applyPresence(frame) {
    const known = this._devices.get(frame.device);
    if (frame.online) {
      if (known?.node === frame.node) return;
      this._devices.set(frame.device, { device: frame.device, node: frame.node });
    } else {
      if (!known) return;
      this._devices.delete(frame.device);
    }
    this.emit("devices", this.devices());
  }

  /** @param {string} conversation forget a deleted conversation */
  removeConversation(conversation) {
    for (const id of this._order.get(conversation) ?? []) this._messages.delete(id);
    for (const id of this._runOrder.get(conversation) ?? []) this.runs.delete(id);
    this._order.delete(conversation);
    this._runOrder.delete(conversation);
    this.conversations.delete(conversation);
    this.emit("messages", { conversation });
  }

  // Internals

  /** @param {string} id */
  _conversation(id) {
    const known = this.conversations.get(id);
    if (known) return known;
    const created = stub(id);
    this._putConversation(created);
    return created;
  }

  /** @param {Conversation} conversation */
  _putConversation(conversation) {
    this.conversations.set(conversation.id, conversation);
    this.emit("conversation", conversation);
  }

  /**
   * @param {string} id
   * @param {number} ts
   */
  _touch(id, ts) {
    const conversation = this.conversations.get(id);
    if (!conversation) return;
    if (!conversation.updated_at || Date.parse(conversation.updated_at) < ts) {
      this._putConversation({ ...conversation, updated_at: new Date(ts).toISOString() });
    }
  }

  /** @param {Message} message @param {boolean} [append] */
  _putMessage(message, append = true) {
    if (!message.id) return;
    const known = this._messages.has(message.id);
    this._messages.set(message.id, message);
    if (!known && append) {
      const order = this._order.get(message.conversation) ?? [];
      this._order.set(message.conversation, [...order, message.id]);
    }
    this.emit("message", message);
    if (!known && append) this.emit("messages", { conversation: message.conversation });
  }

  /** @param {string} conversation @param {string} id */
  _removeMessage(conversation, id) {
    if (!this._messages.delete(id)) return;
    this._order.set(conversation, (this._order.get(conversation) ?? []).filter((known) => known !== id));
    this.emit("messages", { conversation });
  }

  /** @param {Run} run */
  _putRun(run) {
    if (!this.runs.has(run.id)) {
      const order = this._runOrder.get(run.conversation) ?? [];
      this._runOrder.set(run.conversation, [...order, run.id]);
      if (!run.message) this.emit("messages", { conversation: run.conversation });
    }
    this.runs.set(run.id, run);
    this.emit("run", run);
  }
}

/** @param {string} id @param {string} conversation @returns {Run} */
function newRun(id, conversation) {
  return {
    id, conversation, message: null, status: RunStatus.QUEUED, text: "", attempt: 1, seq: -1, answerMessage: null,
    behind: null, position: null, input: null, tools: [], custom: [], error: null, stoppedAt: null,
    rolledBack: false,
  };
}

/** @param {string} id @returns {Conversation} */
function stub(id) {
  return { id, title: null, agent: null, double_texting: null, created_at: null, updated_at: null, loaded: false,
           nextBefore: null };
}

/** @param {Run} run @returns {Message} */
function answer(run) {
  return { id: run.answerMessage, conversation: run.conversation, role: Role.ASSISTANT, text: run.text, run: run.id,
           device: null, clientId: null, seq: null, status: run.status };
}

/**
 * The order after a REST page: ids seen before the page's first known one stay before it (older
 * pages), then the page in its order, then ids not in the page (newer, live ones).
 * @param {string[]} old
 * @param {string[]} page
 */
export function mergeOrder(old, page) {
  const inPage = new Set(page);
  const firstShared = old.findIndex((id) => inPage.has(id));
  const before = (firstShared === -1 ? [] : old.slice(0, firstShared)).filter((id) => !inPage.has(id));
  const after = (firstShared === -1 ? old : old.slice(firstShared)).filter((id) => !inPage.has(id));
  return [...before, ...page, ...after];
}
