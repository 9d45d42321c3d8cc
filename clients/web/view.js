// What the page shows, drawn from the SDK's store. Text from the agent (or from the user) is only
// ever set as textContent, never parsed as HTML.
//
// Test hooks (tests/test_chat_page.py) are `data-testid` attributes: `message` with `data-role`, and
// on answers `data-run` and `data-status` (streaming / completed / cancelled / failed); `device` on
// each device online; `connection`, whose text names the node when connected.

import { ENDED, RunStatus } from "@chorus/client";

/** @typedef {import("@chorus/client").Run} Run */
/** @typedef {import("@chorus/client").Message} Message */
/** @typedef {import("@chorus/client").Conversation} Conversation */
/** @typedef {import("@chorus/client").ConnectionState} ConnectionState */
/** @typedef {import("@chorus/client").DeviceOnline} DeviceOnline */

/** A send not acknowledged yet, shown greyed until its message comes back from the stream. */
/** @typedef {{ id: string, text: string, conversation: string | null }} PendingSend */

/**
 * @param {string} tag
 * @param {Record<string, string>} [attributes]
 * @param {string} [text]
 */
function el(tag, attributes = {}, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

/**
 * @param {HTMLElement} node
 * @param {ConnectionState} state
 */
export function renderConnection(node, state) {
  node.dataset.state = state.status;
  node.dataset.node = state.node ?? "";
  node.textContent = connectionText(state);
}

/** @param {ConnectionState} state */
function connectionText(state) {
  switch (state.status) {
    case "connected":
      return `connected to ${state.node}${state.resumed ? " · resumed" : ""}`;
    case "reconnecting":
      return state.delayMs && state.delayMs >= 1000 ? `reconnecting in ${Math.round(state.delayMs / 1000)} s…` : "reconnecting…";
    case "connecting":
      return "connecting…";
    case "closed":
      return state.code === 4001 ? "signed out: the token was refused" : "disconnected";
    default:
      return "starting…";
  }
}

/**
 * The user's devices online, this one marked; dimmed while this page is not connected (the list
 * may be stale until the next hello replaces it).
 * @param {HTMLElement} list
 * @param {DeviceOnline[]} devices
 * @param {string | null} me
 * @param {boolean} live
 */
export function renderDevices(list, devices, me, live) {
  list.classList.toggle("stale", !live);
  list.replaceChildren(...devices.map(({ device, node }) => {
    const item = el("li", { "data-testid": "device", "data-device": device, "data-node": node }, device);
    item.append(el("small", {}, ` on ${node}`));
    if (device === me) {
      item.classList.add("me");
      item.append(el("small", {}, " (this device)"));
    }
    return item;
  }));
}

/**
 * @param {HTMLElement} list
 * @param {Conversation[]} conversations
 * @param {string | null} active
 * @param {(conversation: Conversation) => string} titleOf
 */
export function renderConversations(list, conversations, active, titleOf) {
  list.replaceChildren(...conversations.map((conversation) => {
    const button = el("button", { type: "button", "data-testid": "conversation", "data-conversation": conversation.id },
                      titleOf(conversation));
    if (conversation.id === active) button.setAttribute("aria-current", "true");
    const item = el("li");
    item.append(button);
    return item;
  }));
}

/**
 * The shown status of an answer: the four the test hooks name (a run not ended is `streaming`,
 * queued or not; `data-run-status` has the SDK's own).
 * @param {string} status
 */
function shownStatus(status) {
  return ENDED.has(status) ? status : "streaming";
}

/** @param {Run} run */
function noteOf(run) {
  if (run.status === RunStatus.WAITING) return "waiting for the answer before it";
  if (run.status === RunStatus.QUEUED) return run.position ? `queued (${run.position === 1 ? "next" : `#${run.position}`} in line)` : "queued";
  if (run.status === RunStatus.CANCELLED) return run.text ? "stopped" : "stopped before it began";
  if (run.status === RunStatus.FAILED) return `failed: ${run.error?.message ?? "unknown error"}`;
  const notes = [];
  if (run.attempt > 1) notes.push(`restarted (attempt ${run.attempt})`);
  if (run.tools.length) notes.push(`tools: ${run.tools.map((tool) => tool.name + (tool.error ? " (failed)" : "")).join(", ")}`);
  if (run.status === RunStatus.RUNNING && !run.text && !run.input) notes.push("thinking…");
  return notes.join(" · ");
}

/**
 * The messages of the open conversation, keyed, so streaming tokens touch one element and a
 * question being answered keeps its input (and its focus) while the rest of the list changes.
 */
export class MessageList {
  /**
   * @param {HTMLOListElement} root
   * @param {{ runOf: (id: string) => Run | undefined, onAnswer: (run: string, request: string, text: string) => Promise<unknown>,
   *           me: () => string | null }} hooks
   */
  constructor(root, hooks) {
    this.root = root;
    this.hooks = hooks;
    /** @type {Map<string, HTMLLIElement>} */
    this._items = new Map();
  }

  /**
   * @param {Message[]} messages
   * @param {PendingSend[]} pending
   */
  render(messages, pending) {
    const stick = this._atBottom();
    /** @type {HTMLLIElement[]} */
    const items = [];
    /** @type {Map<string, HTMLLIElement>} */
    const next = new Map();
    for (const message of messages) {
      const key = message.role === "user" ? `m:${message.id}` : `r:${message.run}`;
      let item = this._items.get(key);
      if (!item) item = message.role === "user" ? this._user(message) : this._answer(/** @type {string} */ (message.run));
      if (message.role !== "user") this._paint(item, message);
      next.set(key, item);
      items.push(item);
    }
    for (const send of pending) {
      const key = `p:${send.id}`;
      const item = this._items.get(key) ?? el("li", { class: "message user pending" }, send.text);
      next.set(key, /** @type {HTMLLIElement} */ (item));
      items.push(/** @type {HTMLLIElement} */ (item));
    }
    items.forEach((item, index) => {
      if (this.root.children[index] !== item) this.root.insertBefore(item, this.root.children[index] ?? null);
    });
    while (this.root.children.length > items.length) this.root.lastElementChild?.remove();
    this._items = next;
    if (stick) this._toBottom();
  }

  /**
   * A run changed: repaint its answer in place; false when it is not in the list (render again).
   * @param {Run} run
   */
  update(run) {
    const item = this._items.get(`r:${run.id}`);
    if (!item) return false;
    const stick = this._atBottom();
    this._paint(item, { text: run.text, status: run.status, run: run.id });
    if (stick) this._toBottom();
    return true;
  }

  /** @param {Message} message */
  _user(message) {
    const item = /** @type {HTMLLIElement} */ (el("li", { class: "message user", "data-testid": "message", "data-role": "user" }));
    item.append(el("div", { class: "text" }, message.text));
    const me = this.hooks.me();
    if (message.device && message.device !== me) item.append(el("div", { class: "note" }, `from ${message.device}`));
    return item;
  }

  /** @param {string} run */
  _answer(run) {
    const item = /** @type {HTMLLIElement} */ (el("li", { class: "message assistant", "data-testid": "message",
                                                         "data-role": "assistant", "data-run": run }));
    item.append(el("div", { class: "text" }), el("div", { class: "note" }));
    return item;
  }

  /**
   * @param {HTMLLIElement} item
   * @param {{ text: string, status: string | null, run: string | null }} answer
   */
  _paint(item, answer) {
    const run = answer.run ? this.hooks.runOf(answer.run) : undefined;
    const status = answer.status ?? RunStatus.COMPLETED;
    item.dataset.status = shownStatus(status);
    item.dataset.runStatus = status;
    const [text, note] = /** @type {HTMLElement[]} */ ([...item.children]);
    if (text.textContent !== answer.text) text.textContent = answer.text;
    note.textContent = run ? noteOf(run) : "";
    item.classList.toggle("asking", Boolean(run?.input)); // paused for the question, not streaming
    this._question(item, run);
  }

  /**
   * Human in the loop: the run's question with an inline answer, until some device answers it.
   * @param {HTMLLIElement} item
   * @param {Run | undefined} run
   */
  _question(item, run) {
    const shown = /** @type {HTMLFormElement | null} */ (item.querySelector("form.question"));
    const input = run?.input;
    if (shown && shown.dataset.request === input?.request) return;
    shown?.remove();
    if (!run || !input) return;
    const form = /** @type {HTMLFormElement} */ (el("form", { class: "question", "data-request": input.request }));
    const field = /** @type {HTMLInputElement} */ (el("input", { name: "answer", "aria-label": "Your answer", required: "" }));
    const error = el("p", { class: "error", role: "alert" });
    form.append(el("p", { class: "prompt" }, input.prompt), field, el("button", { type: "submit" }, "Answer"), error);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      error.textContent = "";
      this.hooks.onAnswer(run.id, input.request, field.value).catch((/** @type {any} */ e) => {
        error.textContent = e?.code === "conflict" ? "Already answered from another device." : String(e?.message ?? e);
      });
    });
    item.append(form);
  }

  _atBottom() {
    const { scrollHeight, scrollTop, clientHeight } = this.root;
    return scrollHeight - scrollTop - clientHeight < 48;
  }

  _toBottom() {
    this.root.scrollTop = this.root.scrollHeight;
  }
}
