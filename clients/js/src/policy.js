// What the client does after a close code and after an error reply: docs/protocol.md's
// "Close codes" and error tables as two pure functions (table-tested in test/policy.test.js).

import { CloseCode, ErrorCode } from "./vocabulary.js";

/** A close the client makes itself to start again from its position (a gap, no hello in time, a dead socket). */
export const CLIENT_RESET = 4000;

/**
 * - "stop": do not reconnect (1000 normal, 1007 invalid text, 1008 policy: fix the client);
 * - "renew": get a fresh token from the provider, then reconnect (4001);
 * - "later": another device must disconnect first: retry after a long delay (4029);
 * - "now": reconnect at once with after/epoch (1012 draining, 4008 slow consumer);
 * - "backoff": reconnect with jittered backoff (1001, 1006 dropped, 1009, 1011, 1013, anything else).
 * @typedef {"stop" | "renew" | "later" | "now" | "backoff"} CloseAction
 */

/**
 * @param {number} code
 * @returns {CloseAction}
 */
export function closeAction(code) {
  switch (code) {
    case CloseCode.NORMAL:
    case CloseCode.INVALID_TEXT:
    case CloseCode.POLICY:
      return "stop";
    case CloseCode.UNAUTHORIZED:
      return "renew";
    case CloseCode.TOO_MANY_DEVICES:
      return "later";
    case CloseCode.SERVICE_RESTART:
    case CloseCode.SLOW_CONSUMER:
      return "now";
    default:
      return "backoff";
  }
}

/** @type {ReadonlySet<string>} */
const RETRY_CODES = new Set([ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL, ErrorCode.RATE_LIMITED, ErrorCode.OVERLOADED]);

/**
 * May a command that got this error be sent again with the same id? (`unavailable`, `internal`:
 * nothing was acked; `rate_limited`, `overloaded`: waiting helps, `retry_after_ms` says how long.)
 * @param {string} code
 */
export function retryable(code) {
  return RETRY_CODES.has(code);
}
