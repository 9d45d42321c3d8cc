// The REST API (docs/protocol.md, "REST"; ws_node/rest.py): conversations and their messages, the
// agents and the user's devices online, with the same token as the socket, over `fetch` (global, or
// injected).

import { ChorusError } from "./errors.js";

/** @typedef {import("./store.js").RestMessage} RestMessage */
/** @typedef {import("./protocol.js").DoubleTexting} DoubleTexting */

/**
 * A conversation as REST returns it.
 * @typedef {object} RestConversation
 * @property {string} id
 * @property {string} title
 * @property {string} agent
 * @property {DoubleTexting} double_texting
 * @property {string} created_at
 * @property {string} updated_at
 */

/**
 * @typedef {object} RestOptions
 * @property {string} baseUrl e.g. "https://chat.example.com" (REST paths start with /v1)
 * @property {(fresh: boolean) => Promise<string>} token the current token (`fresh`: after a 401)
 * @property {typeof fetch} [fetch]
 */

export class RestClient {
  /** @param {RestOptions} options */
  constructor({ baseUrl, token, fetch: fetchImpl }) {
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this._token = token;
    const found = fetchImpl ?? globalThis.fetch;
    if (!found) throw new TypeError("no fetch: pass one as the `fetch` option");
    this._fetch = found.bind(globalThis);
  }

  /**
   * One call; a 401 is retried once with a fresh token. Throws ChorusError with REST's code.
   * @param {string} method
   * @param {string} path
   * @param {unknown} [body]
   * @returns {Promise<any>} the JSON body (null for 204)
   */
  async request(method, path, body) {
    for (let attempt = 0; ; attempt++) {
      const token = await this._token(attempt > 0);
      /** @type {Record<string, string>} */
      const headers = { Authorization: `Bearer ${token}` };
      if (body !== undefined) headers["Content-Type"] = "application/json";
      const response = await this._fetch(`${this.baseUrl}${path}`, {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      });
      if (response.status === 401 && attempt === 0) continue;
      if (response.status === 204) return null;
      const text = await response.text();
      let json = null;
      try {
        json = text ? JSON.parse(text) : null;
      } catch {
        // not JSON (a proxy's error page): reported below with the status
      }
      if (!response.ok) {
        const error = json?.error ?? {};
        throw new ChorusError(error.code ?? `http_${response.status}`, error.message ?? text.slice(0, 200),
                              { status: response.status });
      }
      return json;
    }
  }

  /**
   * @param {{ limit?: number, before?: string }} [page]
   * @returns {Promise<{ conversations: RestConversation[], next_before: string | null }>}
   */
  listConversations(page = {}) {
    return this.request("GET", `/v1/conversations${query(page)}`);
  }

  /**
   * @param {{ title?: string, agent?: string, double_texting?: DoubleTexting }} [fields]
   * @returns {Promise<RestConversation>}
   */
  createConversation(fields = {}) {
    return this.request("POST", "/v1/conversations", fields);
  }

  /** @param {string} id @returns {Promise<RestConversation>} */
  getConversation(id) {
    return this.request("GET", `/v1/conversations/${encodeURIComponent(id)}`);
  }

  /** @param {string} id @returns {Promise<null>} */
  deleteConversation(id) {
    return this.request("DELETE", `/v1/conversations/${encodeURIComponent(id)}`);
  }

  /**
   * The newest `limit` messages before `before`, oldest first.
   * @param {string} id
   * @param {{ limit?: number, before?: number }} [page]
   * @returns {Promise<{ messages: RestMessage[], next_before: number | null }>}
   */
  listMessages(id, page = {}) {
    return this.request("GET", `/v1/conversations/${encodeURIComponent(id)}/messages${query(page)}`);
  }

  /**
   * The user's devices online now (what `hello` carries as `devices`).
   * @returns {Promise<{ devices: import("./protocol.js").DeviceOnline[] }>}
   */
  presence() {
    return this.request("GET", "/v1/presence");
  }

  /** @returns {Promise<{ agents: Array<{ name: string, description: string, model: string, tools: string[] }> }>} */
  agents() {
    return this.request("GET", "/v1/agents");
  }
}

/** @param {Record<string, string | number | undefined>} params */
function query(params) {
  const parts = Object.entries(params)
    .filter(([, value]) => value !== undefined)
    .map(([key, value]) => `${encodeURIComponent(key)}=${encodeURIComponent(String(value))}`);
  return parts.length ? `?${parts.join("&")}` : "";
}
