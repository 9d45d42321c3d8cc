"""Authentication: HS256 JWTs carrying the user id in `sub`, with `exp` required."""

from __future__ import annotations

from dataclasses import dataclass

import jwt
from aiohttp import web

ALGORITHMS = ["HS256"]


class Unauthorized(Exception):
    """No token, or a token that does not verify; never says which part failed to the client."""


@dataclass(frozen=True)
class Identity:
    user: str
    expires_at: float


def verify(token: str, secret: str) -> Identity:
    try:
        claims = jwt.decode(token, secret, algorithms=ALGORITHMS, options={"require": ["exp", "sub"]})
    except jwt.PyJWTError as exc:
        raise Unauthorized(str(exc)) from None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub or len(sub) > 128:
        raise Unauthorized("sub must be a non-empty string")
    return Identity(user=sub, expires_at=float(claims["exp"]))


def token_of(request: web.Request) -> str:
    """The bearer token from the Authorization header, else the `access_token` query parameter."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    token = request.query.get("access_token", "")
    if not token:
        raise Unauthorized("no token")
    return token


def authenticate(request: web.Request, secret: str) -> Identity:
    return verify(token_of(request), secret)
