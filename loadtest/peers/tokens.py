"""The peers' authentication: a device presents ``user`` and ``token(secret, user)``; the server
checks it before joining the device to the user's room. An HMAC, so each connect pays a real
check (Chorus verifies an HS256 JWT); ``node/server.js`` computes the same."""

from __future__ import annotations

import hashlib
import hmac


def token(secret: str, user: str) -> str:
    return hmac.new(secret.encode(), user.encode(), hashlib.sha256).hexdigest()[:32]


def valid(secret: str, user: str, presented: str) -> bool:
    return bool(user) and hmac.compare_digest(token(secret, user), presented)
