"""The token: a fixed JWT, or a provider the client asks again before the token expires and after
the server refused it. docs/protocol.md: the token goes in the first frame (`?auth=frame`) or the
URL; before `exp` a fresh one is handed to the open socket in an `auth` frame, else the server
closes it with 4001.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import json
import time
from collections.abc import Awaitable, Callable
from typing import Literal

# Why the provider is asked: the first connect (or a reconnect after the cached token came close
# to expiry), a renewal before expiry (sent in place as an `auth` frame), or a 4001 / HTTP 401.
TokenReason = Literal["connect", "expiring", "unauthorized"]
TokenProvider = Callable[[TokenReason], str | Awaitable[str]]


class Tokens:
    """The current token and when it expires (its JWT `exp`, or the server's `expires_at`)."""

    def __init__(self, token: str | TokenProvider, *, refresh_before_s: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._provider = None if isinstance(token, str) else token
        self._value: str | None = token if isinstance(token, str) else None
        self._expires_s = jwt_expiry_s(token) if isinstance(token, str) else None
        self._refresh_before_s = refresh_before_s
        self._clock = clock

    @property
    def renewable(self) -> bool:
        """Can a fresh token be had? (A fixed token cannot: a 4001 then ends the client.)"""
        return self._provider is not None

    async def get(self, reason: TokenReason) -> str:
        """The token to use now: the cached one while it is not close to expiry, else the provider's."""
        if self._value is not None and (self._provider is None or (
                reason == "connect" and not self._due(self._refresh_before_s / 2))):
            return self._value
        value = await self.fetch(reason)
        self.adopt(value)
        return value

    async def fetch(self, reason: TokenReason) -> str:
        """A fresh token from the provider, not adopted yet (a renewal is adopted once the server
        accepted it: a refused one must not replace the token in force)."""
        if self._provider is None:
            assert self._value is not None
            return self._value
        value = self._provider(reason)
        if inspect.isawaitable(value):
            value = await value
        if not isinstance(value, str) or not value:
            raise ValueError("the token provider returned no token")
        return value

    def adopt(self, token: str, expires_at_s: float | None = None) -> None:
        """Use `token` from now on (e.g. one the server accepted in an `auth` frame)."""
        self._value = token
        self._expires_s = expires_at_s if expires_at_s is not None else jwt_expiry_s(token)

    def expires_at(self, expires_at_s: float) -> None:
        """The server's word on when the current token expires (`expires_at` of the auth ack)."""
        self._expires_s = expires_at_s

    def forget(self) -> None:
        """The server refused the token: never send it again (a fixed token is kept: nothing else)."""
        if self._provider is not None:
            self._value = None

    def refresh_in_s(self) -> float | None:
        """Seconds until the token should be renewed on the open socket: `refresh_before_s` before
        it expires, or halfway through what is left when that is less; None: never (a fixed token,
        or one without `exp`)."""
        if self._provider is None or self._expires_s is None:
            return None
        left = self._expires_s - self._clock()
        return max(1.0, left - min(self._refresh_before_s, left / 2))

    def seconds_left(self) -> float:
        return float("inf") if self._expires_s is None else self._expires_s - self._clock()

    def _due(self, margin_s: float) -> bool:
        return self._expires_s is not None and self._expires_s - self._clock() <= margin_s


def jwt_expiry_s(token: str) -> float | None:
    """A JWT's `exp` (not verified: only to know when to renew), or None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
