import assert from "node:assert/strict";
import { test } from "node:test";

import { backoffMs } from "../src/backoff.js";
import { closeAction, retryable } from "../src/policy.js";

test("close codes are handled as docs/protocol.md says", () => {
  const table = {
    1000: "stop", 1001: "backoff", 1005: "backoff", 1006: "backoff", 1007: "stop", 1008: "stop", 1009: "backoff",
    1011: "backoff", 1012: "now", 1013: "backoff", 4000: "backoff", 4001: "renew", 4008: "now", 4029: "later",
    4999: "backoff",
  };
  for (const [code, action] of Object.entries(table)) assert.equal(closeAction(Number(code)), action, code);
});

test("only errors after which nothing was acked are retried with the same id", () => {
  for (const code of ["unavailable", "internal", "rate_limited", "overloaded"]) assert.equal(retryable(code), true, code);
  for (const code of ["bad_request", "not_found", "conflict", "too_large", "forbidden", "unauthorized"]) {
    assert.equal(retryable(code), false, code);
  }
});

test("backoff is full jitter under min(2 s, 50 ms x 2^attempt)", () => {
  const top = () => 0.999999;
  assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 10, 100].map((a) => backoffMs(a, { random: top })),
                   [49, 99, 199, 399, 799, 1599, 1999, 1999, 1999]);
  assert.equal(backoffMs(5, { random: () => 0 }), 0);
  assert.equal(backoffMs(2, { baseMs: 100, maxMs: 300, random: () => 0.5 }), 150);
  for (let i = 0; i < 200; i++) {
    const delay = backoffMs(3);
    assert.ok(delay >= 0 && delay < 400, String(delay));
  }
});
