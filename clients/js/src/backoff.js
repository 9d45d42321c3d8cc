// Reconnect delays: "full jitter" exponential backoff, as docs/protocol.md asks (the reference
// client waits a random time in [0, min(2 s, 50 ms x 2^attempt)]) so that a thousand devices
// dropped together do not come back together.

/**
 * @typedef {object} BackoffOptions
 * @property {number} [baseMs] the cap of the first attempt's delay (50)
 * @property {number} [maxMs] the largest cap (2000)
 * @property {() => number} [random] a uniform number in [0, 1) (Math.random)
 */

/**
 * The delay before reconnect attempt `attempt` (0 for the first after a drop).
 * @param {number} attempt
 * @param {BackoffOptions} [options]
 * @returns {number} milliseconds
 */
export function backoffMs(attempt, { baseMs = 50, maxMs = 2000, random = Math.random } = {}) {
  const cap = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}
