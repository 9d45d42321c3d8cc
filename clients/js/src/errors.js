// The SDK's errors, drawn once:
//
//   Error
//   └── ChorusError        an `error` frame in reply to a command, or a REST error (`code`, `status`)
//       ├── ConnectionError  the socket closed before a reply that cannot be retried (ping, auth)
//       └── ClosedError      the client was closed (or gave up: `code` names why) with the command pending

export class ChorusError extends Error {
  /**
   * @param {string} code an `ErrorCode`, or the SDK's own ("closed", "disconnected", "timeout")
   * @param {string} message
   * @param {{ status?: number, retryAfterMs?: number | null, frame?: unknown }} [details]
   */
  constructor(code, message, { status, retryAfterMs = null, frame } = {}) {
    super(`${code}: ${message}`);
    this.name = "ChorusError";
    this.code = code;
    /** the HTTP status of a REST error */
    this.status = status;
    this.retryAfterMs = retryAfterMs;
    this.frame = frame;
  }
}

export class ConnectionError extends ChorusError {
  /** @param {string} message */
  constructor(message) {
    super("disconnected", message);
    this.name = "ConnectionError";
  }
}

export class ClosedError extends ChorusError {
  /** @param {string} message @param {string} [code] */
  constructor(message, code = "closed") {
    super(code, message);
    this.name = "ClosedError";
  }
}
