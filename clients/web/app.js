// The chat page: one ChorusClient per browser (one device of the user), and the SDK's store drawn on
// every change. Everything the page knows comes from the store: the stream, snapshots and REST pages
// are merged there, so a reload, a reconnect or a node dying mid-answer needs nothing here.

import { ChorusClient, ENDED } from "@chorus/client";

import { devLogin, devUser, deviceId, signOut, takeToken } from "./session.js";
import { MessageList, renderConnection, renderConversations, renderDevices } from "./view.js";

/** @typedef {import("@chorus/client").Conversation} Conversation */
/** @typedef {import("@chorus/client").Run} Run */
/** @typedef {import("./view.js").PendingSend} PendingSend */

/**
 * @template {Element} T
 * @param {string} selector
 * @returns {T}
 */
function $(selector) {
  const found = document.querySelector(selector);
  if (!found) throw new Error(`the page has no ${selector}`);
  return /** @type {T} */ (found);
}

/** @param {string} reason why the page asks (empty the first time) */
function showSignIn(reason) {
  /** @type {HTMLElement} */ ($(".layout")).hidden = true;
  /** @type {HTMLElement} */ ($(".menu")).hidden = true;
  /** @type {HTMLElement} */ ($(".signin")).hidden = false;
  $("[data-testid=connection]").textContent = "not signed in";
  /** @type {HTMLFormElement} */
  const form = $(".signin form");
  const error = $(".signin .error");
  error.textContent = reason;
  form.onsubmit = async (event) => {
    event.preventDefault();
    error.textContent = "";
    try {
      await devLogin(String(new FormData(form).get("user")).trim());
      location.reload(); // the page starts again with the token this tab now keeps
    } catch (e) {
      error.textContent = e instanceof Error ? e.message : String(e);
    }
  };
}

/** A random id for a send (its idempotency key), from getRandomValues: randomUUID needs https. */
function newId() {
  return [...crypto.getRandomValues(new Uint8Array(16))].map((b) => b.toString(16).padStart(2, "0")).join("");
}

class Chat {
  /** @param {string} token */
  constructor(token) {
    this.me = deviceId();
    // A dev login's token is minted again before it expires or when it is refused. A token from
    // the fragment cannot be renewed from here: given as a string, it is used until the server
    // refuses it, and then the page asks to sign in again.
    const user = devUser();
    let current = token;
    this.chorus = new ChorusClient({
      url: `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`,
      device: this.me,
      token: user === null ? token : async (reason) => {
        if (reason !== "connect") current = await devLogin(user);
        return current;
      },
    });
    /** @type {string | null} the open conversation; null: a new one, created by its first send */
    this.active = null;
    /** @type {PendingSend[]} */
    this.pending = [];
    this._drawing = false;
    this.el = {
      connection: /** @type {HTMLElement} */ ($("[data-testid=connection]")),
      devices: /** @type {HTMLElement} */ ($(".devices")),
      conversations: /** @type {HTMLElement} */ ($(".conversations")),
      empty: /** @type {HTMLElement} */ ($(".empty")),
      problem: /** @type {HTMLElement} */ ($(".problem")),
      composer: /** @type {HTMLTextAreaElement} */ ($("[data-testid=composer]")),
      stop: /** @type {HTMLButtonElement} */ ($("[data-testid=stop]")),
    };
    this.messages = new MessageList($(".messages"), {
      runOf: (id) => this.chorus.store.run(id),
      onAnswer: (run, request, text) => this.chorus.respond(run, request, text),
      me: () => this.me,
    });
    /** @type {HTMLElement} */ ($(".layout")).hidden = false;
    /** @type {HTMLElement} */ ($(".menu")).hidden = false;
    this._listen();
    this._wire();
    this._start();
  }

  async _start() {
    try {
      await this.chorus.connect();
      const conversations = await this.chorus.loadConversations();
      if (this.active === null && conversations[0] && !this.pending.length) this.open(conversations[0].id);
      else this.draw();
    } catch (e) {
      this.problem(e);
    }
  }

  _listen() {
    const { chorus } = this;
    chorus.on("state", (state) => {
      renderConnection(this.el.connection, state);
      renderDevices(this.el.devices, chorus.store.devices(), this.me, state.status === "connected");
      if (state.status === "closed" && state.code === 4001) {
        signOut();
        showSignIn("The server refused the token (expired?): sign in again, or open the page with a fresh one.");
      }
    });
    chorus.on("hello", (hello) => {
      $(".user").textContent = hello.user;
    });
    chorus.on("devices", (devices) => renderDevices(this.el.devices, devices, this.me, chorus.state.status === "connected"));
    chorus.on("conversation", () => this.draw());
    chorus.on("messages", () => this.draw());
    chorus.on("message", (message) => {
      const mine = this.pending.find((send) => send.id === message.clientId);
      if (mine) this.pending = this.pending.filter((send) => send !== mine);
      // A new conversation opens where its first message went: on this device as soon as the
      // message is back, on another one that shows nothing yet (a fresh page, nothing typed). Only
      // live messages (they carry their send's id), not a REST page being merged.
      const idle = !this.pending.length && !this.el.composer.value && message.device !== this.me
        && message.clientId !== null;
      if (this.active === null && (mine || idle)) this.open(message.conversation);
      else this.draw();
    });
    chorus.on("run", (run) => {
      if (run.conversation !== this.active) return;
      if (!this.messages.update(run)) this.draw();
      this._stopState();
    });
    chorus.on("error", (error) => this.problem(error));
  }

  _wire() {
    const { composer, stop } = this.el;
    /** @type {HTMLFormElement} */ ($(".composer")).addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    composer.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.send();
      }
    });
    composer.addEventListener("input", () => {
      composer.style.height = "auto";
      composer.style.height = `${composer.scrollHeight}px`;
    });
    stop.addEventListener("click", () => this.stop());
    $("[data-testid=new-conversation]").addEventListener("click", () => {
      this.active = null;
      this.draw();
      this._nav(false);
      composer.focus();
    });
    this.el.conversations.addEventListener("click", (event) => {
      const button = /** @type {HTMLElement} */ (event.target).closest("[data-conversation]");
      if (button instanceof HTMLElement && button.dataset.conversation) this.open(button.dataset.conversation);
    });
    const menu = $(".menu");
    menu.addEventListener("click", () => this._nav(!document.body.classList.contains("nav-open")));
    const signout = /** @type {HTMLButtonElement} */ ($(".signout"));
    signout.hidden = false;
    signout.addEventListener("click", () => {
      this.chorus.close();
      signOut();
      location.replace("/");
    });
  }

  /** @param {string} conversation */
  open(conversation) {
    this.active = conversation;
    this._nav(false);
    this.draw();
    this.chorus.loadMessages(conversation).catch((e) => this.problem(e));
  }

  send() {
    const text = this.el.composer.value.trim();
    if (!text) return;
    const send = { id: newId(), text, conversation: this.active };
    this.pending.push(send);
    this.el.composer.value = "";
    this.el.composer.style.height = "";
    this.problem(null);
    this.draw();
    this.chorus.send(text, { id: send.id, conversation: send.conversation ?? undefined }).then((ack) => {
      this.pending = this.pending.filter((p) => p !== send);
      if (send.conversation === null && this.active === null && ack.conversation) this.open(ack.conversation);
      else this.draw();
    }, (e) => {
      this.pending = this.pending.filter((p) => p !== send);
      if (!this.el.composer.value) this.el.composer.value = text; // not sent: keep what was typed
      this.problem(e);
      this.draw();
    });
  }

  /** Stop every answer in flight in the open conversation (the one streaming and any queued behind it). */
  stop() {
    for (const run of this._inFlight()) {
      this.chorus.cancel(run.id).catch((/** @type {any} */ e) => {
        if (e?.code !== "conflict") this.problem(e); // conflict: it ended meanwhile
      });
    }
  }

  /** @returns {Run[]} */
  _inFlight() {
    if (this.active === null) return [];
    return [...this.chorus.store.runs.values()].filter((run) => run.conversation === this.active && !ENDED.has(run.status));
  }

  /** Draw the lists once for all the store changes of this turn (a frame often makes several). */
  draw() {
    if (this._drawing) return;
    this._drawing = true;
    queueMicrotask(() => {
      this._drawing = false;
      const store = this.chorus.store;
      renderConversations(this.el.conversations, store.conversationList(), this.active, (c) => this._title(c));
      const messages = this.active === null ? [] : store.messages(this.active);
      const pending = this.pending.filter((send) => send.conversation === this.active);
      this.messages.render(messages, pending);
      this.el.empty.hidden = messages.length > 0 || pending.length > 0;
      this._stopState();
    });
  }

  _stopState() {
    this.el.stop.disabled = this._inFlight().length === 0;
  }

  /** @param {Conversation} conversation */
  _title(conversation) {
    if (conversation.title) return conversation.title;
    const first = this.chorus.store.messages(conversation.id).find((message) => message.role === "user");
    return first?.text || "New conversation";
  }

  /** @param {unknown} error null clears */
  problem(error) {
    this.el.problem.hidden = error === null;
    this.el.problem.textContent = error === null ? "" : error instanceof Error ? error.message : String(error);
  }

  /** @param {boolean} open the conversation list, over the chat on a narrow screen */
  _nav(open) {
    document.body.classList.toggle("nav-open", open);
    $(".menu").setAttribute("aria-expanded", String(open));
  }
}

// Classes are not hoisted: start once everything above is defined.
const token = takeToken();
if (token) new Chat(token);
else showSignIn("");
