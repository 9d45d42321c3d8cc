"""What the client does after a close code, a refused handshake or an error reply: the tables of
docs/protocol.md ("Close codes", "Connecting", the error codes) as pure functions, the reconnect
backoff, and the schedule that combines them (`Reconnects`). Table-tested in
tests/test_python_client.py."""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol import CloseCode, ErrorCode

# A close the client makes itself to start again from its position (a gap, no hello in time).
CLIENT_RESET = 4000


class Action(enum.Enum):
    STOP = "stop"  # do not reconnect: fix the client (1000 normal, 1007, 1008; HTTP 400, 403)
    RENEW = "renew"  # ask the token provider for a fresh token, then reconnect (4001; HTTP 401)
    LATER = "later"  # another device must disconnect first: retry after a long delay (4029)
    NOW = "now"  # reconnect at once with after/epoch (1012 draining, 4008 slow consumer)
    BACKOFF = "backoff"  # reconnect with jittered backoff (1006 dropped, 1011, 1013, HTTP 429/503, ...)


def close_action(code: int | None) -> Action:
    """After the socket closed with `code` (None: no close frame at all, i.e. 1006)."""
    if code in (CloseCode.NORMAL, CloseCode.INVALID_TEXT, CloseCode.POLICY):
        return Action.STOP
    if code == CloseCode.UNAUTHORIZED:
        return Action.RENEW
    if code == CloseCode.TOO_MANY_DEVICES:
        return Action.LATER
    if code in (CloseCode.SERVICE_RESTART, CloseCode.SLOW_CONSUMER):
        return Action.NOW
    return Action.BACKOFF


def handshake_action(status: int) -> Action:
    """After the server refused the upgrade with an HTTP `status` (docs/protocol.md, Connecting):
    401 the token; 400 a malformed `after`/`epoch`/`device` and 403 a refused Origin will not get
    better; 429 and 503 (draining, keys unavailable) and anything else are worth retrying."""
    if status == 401:
        return Action.RENEW
    if status in (400, 403):
        return Action.STOP
    return Action.BACKOFF


_RETRYABLE = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL, ErrorCode.RATE_LIMITED,
                        ErrorCode.OVERLOADED})


def retryable(code: str) -> bool:
    """May a command that got this error be sent again with the same id? (`unavailable`,
    `internal`: nothing was acked; `rate_limited`, `overloaded`: waiting helps, `retry_after_ms`
    says how long.)"""
    return code in _RETRYABLE


@dataclass(frozen=True)
class Backoff:
    """"Full jitter" exponential backoff: a random delay in [0, min(max_s, base_s * 2^attempt)], so
    that a thousand devices dropped together do not come back together."""

    base_s: float = 0.05
    max_s: float = 2.0

    def delay_s(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        return float(rand() * min(self.max_s, self.base_s * 2 ** min(attempt, 30)))


@dataclass(frozen=True)
class Next:
    """After an attempt ended: wait `delay_s` and try again (asking the token provider for a fresh
    token first when `renew`), or give up (`delay_s` None) because of `why`."""

    delay_s: float | None
    renew: bool = False
    why: str = ""


@dataclass
class Reconnects:
    """One client's reconnect schedule. `attempt`: attempts since the last hello (the backoff's
    exponent); `unauthorized`: 4001s (or HTTP 401s) in a row, `max_unauthorized` of which give up."""

    backoff: Backoff = field(default_factory=Backoff)
    enabled: bool = True
    too_many_devices_retry_s: float | None = 30.0
    max_unauthorized: int = 3
    attempt: int = 0
    unauthorized: int = 0

    def connected(self) -> None:
        """A `hello` came: the schedule starts over."""
        self.attempt = self.unauthorized = 0

    def after(self, action: Action, code: int | None, *, renewable: bool, drain_s: float | None = None,
              retry_after_s: float | None = None, rand: Callable[[], float] = random.random) -> Next:
        """What to do after an attempt that ended with `action` (for close code or HTTP status
        `code`). `renewable`: a token provider can give a fresh token; `drain_s`: a draining node's
        `reconnect` frame said when; `retry_after_s`: a refused handshake's Retry-After."""
        backoff_s = self.backoff.delay_s(self.attempt, rand)
        if not self.enabled:
            return Next(None, why=f"closed ({code}); reconnecting is off")
        if action is Action.STOP:
            return Next(None, why=f"closed with {code}; not retried")
        if action is Action.RENEW:
            self.unauthorized += 1
            if not renewable:
                return Next(None, why=f"the token was refused ({code}) and there is no token provider")
            if self.unauthorized >= self.max_unauthorized:
                return Next(None, why=f"the token provider's tokens are refused ({code})")
            return self._wait(0.0 if self.unauthorized == 1 else backoff_s, renew=True)
        if action is Action.LATER:
            if self.too_many_devices_retry_s is None:
                return Next(None, why="too many devices online (4029)")
            return self._wait(self.too_many_devices_retry_s + backoff_s)
        if action is Action.NOW and self.attempt == 0:
            return self._wait(drain_s or 0.0)
        return self._wait(max(retry_after_s or 0.0, backoff_s))

    def _wait(self, delay_s: float, *, renew: bool = False) -> Next:
        self.attempt += 1
        return Next(delay_s, renew)
