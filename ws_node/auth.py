"""Authentication and admission: who a socket or request belongs to, and which pages may open one.

A token is a JWT verified against an explicit algorithm list: HS256 (or HS384/512) with a shared
secret, RS256/ES256 (and the rest of `PUBLIC_KEY_ALGORITHMS`) with a PEM public key or a JWKS URL.
The key is chosen by the family of the token's `alg`, never by the token alone, so an RSA public key
can never be used as an HMAC secret (the classic algorithm-confusion attack). `exp` and `sub` are
required; `aud` and `iss` are required and checked when configured. A token whose admin claim
(`AUTH_ADMIN_CLAIM`) is, or lists, the admin value (`AUTH_ADMIN_VALUE`) is an admin's
(`Identity.admin`: the admin API, `ws_node.admin`).

A client presents its token in one of three ways (docs/security.md has the trade-offs):
``Authorization: Bearer`` header, ``?access_token=`` query parameter, or, after connecting with
``?auth=frame``, a first frame ``{"type":"auth","token":...}``. A connected socket may send a new
token at any time; when the token it holds expires, the socket is closed with 4001.

Exceptions: `Unauthorized` (no token, or one that does not verify; becomes 401 / close 4001),
`Forbidden` (a renewal for a different user), `AuthUnavailable` (the JWKS server cannot be reached
and no key is cached; becomes 503 / close 1013).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_public_key

log = logging.getLogger(__name__)

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                                   "ES512", "EdDSA"})
MAX_TOKEN_CHARS = 8192
MAX_TIMER_S = 86_400.0


class Unauthorized(Exception):
    """No token, or a token that does not verify; the client is never told which part failed."""


class Forbidden(Exception):
    """A valid token, but for a different user than the socket's."""


class AuthUnavailable(Exception):
    """The keys cannot be fetched right now (JWKS server unreachable, nothing cached)."""


@dataclass(frozen=True)
class Identity:
    user: str
    expires_at: float
    admin: bool = False  # may call the admin API (`has_role`)


IDENTITY = web.RequestKey("identity", Identity)


class JwksKeys:
    """Signing keys from a JWKS URL: cached for `cache_s`, fetched again at once for an unknown
    `kid` (key rotation) but at most every `cooldown_s`, so tokens with made-up kids cannot make
    the node hammer the key server. A failed refresh keeps serving the keys it has."""

    def __init__(self, url: str, *, cache_s: float, cooldown_s: float, timeout_s: float = 5.0) -> None:
        # PyJWKClient for the fetch itself: http(s) only, no redirects, a timeout; caching is ours.
        self._client = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=timeout_s,
                                       headers={"User-Agent": "chorus-ws-node"})
        self.url = url
        self.cache_s = cache_s
        self.cooldown_s = cooldown_s
        self._keys: jwt.PyJWKSet | None = None
        self._fetched_at = -math.inf
        self._retry_at = -math.inf
        self._lock = asyncio.Lock()

    async def key(self, kid: Any) -> jwt.PyJWK:
        if not isinstance(kid, str) or not 0 < len(kid) <= 256:
            raise Unauthorized("token header has no usable kid")
        if self._keys is None or time.monotonic() - self._fetched_at > self.cache_s:
            await self._refresh()
        key = self._find(kid)
        if key is None and time.monotonic() - self._fetched_at >= self.cooldown_s:
            await self._refresh()
            key = self._find(kid)
        if key is None:
            raise Unauthorized(f"no signing key {kid[:40]!r}")
        return key

    def _find(self, kid: str) -> jwt.PyJWK | None:
        for key in self._keys or ():
            if key.key_id == kid and key.public_key_use in ("sig", None):
                return key
        return None

    async def _refresh(self) -> None:
        started = time.monotonic()
        async with self._lock:
            if self._fetched_at >= started:
                return  # another task fetched while this one waited
            if time.monotonic() < self._retry_at:  # a fetch failed a moment ago: not again yet
                if self._keys is None:
                    raise AuthUnavailable("JWKS fetch failed recently")
                return
            try:
                keys = await asyncio.to_thread(self._client.get_jwk_set, True)
            except (jwt.PyJWTError, ValueError, OSError) as exc:
                # A key server that is down must not be asked again by every connecting client.
                self._retry_at = time.monotonic() + min(self.cooldown_s, 5.0)
                if self._keys is None:
                    raise AuthUnavailable(f"JWKS fetch failed: {type(exc).__name__}") from None
                log.warning("JWKS refresh from %s failed (%s); keeping the cached keys", self.url, exc)
                return
            self._keys, self._fetched_at = keys, time.monotonic()


class Verifier:
    """Verifies tokens under one deployment's policy; shared by every socket and request of a node."""

    def __init__(
        self,
        *,
        algorithms: tuple[str, ...],
        secret: str | None = None,
        public_key: str | None = None,
        jwks: JwksKeys | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: int = 0,
        admin_claim: str | None = None,
        admin_value: str | None = None,
    ) -> None:
        self.algorithms = frozenset(algorithms)
        self.secret = secret
        self.public_key = _load_public_key(public_key) if public_key else None
        self.jwks = jwks
        self.audience = audience
        self.issuer = issuer
        self.leeway_s = leeway_s
        self.admin_claim = admin_claim  # None: no token is an admin's
        self.admin_value = admin_value
        self._require = ["exp", "sub"] + (["aud"] if audience else []) + (["iss"] if issuer else [])

    async def verify(self, token: str) -> Identity:
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS:
            raise Unauthorized("token missing or too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise Unauthorized("algorithm not allowed")
        key: Any
        if alg in HMAC_ALGORITHMS:
            key = self.secret
        elif self.jwks is not None:
            key = await self.jwks.key(header.get("kid"))
        else:
            key = self.public_key
        if key is None:
            raise Unauthorized("no key for this algorithm")
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                                leeway=self.leeway_s, options={"require": self._require})
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError) as exc:  # OverflowError: exp 1e999
            raise Unauthorized(str(exc)) from None
        sub, exp = claims.get("sub"), claims.get("exp")
        if not isinstance(sub, str) or not 0 < len(sub) <= 128 or not sub.isprintable():
            raise Unauthorized("sub must be 1-128 printable characters")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise Unauthorized("exp must be a number")
        admin = (self.admin_claim is not None and self.admin_value is not None
                 and has_role(claims, self.admin_claim, self.admin_value))
        return Identity(user=sub, expires_at=float(exp), admin=admin)


def has_role(claims: dict[str, Any], claim: str, value: str) -> bool:
    """Is `value` the token's `claim`, or one of its values (a list)? A claim name with dots that no
    top-level claim has is a path into nested objects (Keycloak's ``realm_access.roles``); a name
    that is itself a key wins (Auth0's namespaced ``https://example.com/roles``)."""
    found: Any = claims.get(claim)
    if claim not in claims and "." in claim:
        found = claims
        for part in claim.split("."):
            found = found.get(part) if isinstance(found, dict) else None
    if isinstance(found, str):
        return found == value
    return isinstance(found, list) and value in found


def _load_public_key(pem: str) -> Any:
    if "-----BEGIN CERTIFICATE-----" in pem:
        return x509.load_pem_x509_certificate(pem.encode()).public_key()
    return load_pem_public_key(pem.encode())


def token_of(request: web.Request) -> str | None:
    """The bearer token of a REST request: see `token_from`."""
    return token_from(request.headers, request.query)


def token_from(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The bearer token from the Authorization header, else the `access_token` query parameter."""
    header = headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return query.get("access_token") or None


def ws_query(raw_query: str) -> dict[str, str]:
    """The query of a WebSocket request, parsed into a dict of its own (first value of each name):
    `request.query` would keep a parsed copy, token included, for the whole life of the socket."""
    query: dict[str, str] = {}
    for name, value in parse_qsl(raw_query, keep_blank_values=True):
        query.setdefault(name, value)
    return query


class TokenLease:
    """The identity a socket holds and the timer that ends the socket when its token expires.
    A renewal with a fresh token of the same user moves the deadline."""

    def __init__(self, verifier: Verifier, identity: Identity, on_expire: Callable[[], None]) -> None:
        self.verifier = verifier
        self.identity = identity
        self.on_expire = on_expire
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.stop()
        # Capped and re-armed when it fires early: an `exp` centuries away stays an ordinary timer.
        delay_s = min(self._remaining_s(), MAX_TIMER_S)
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay_s), self._fire)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _remaining_s(self) -> float:
        return self.identity.expires_at + self.verifier.leeway_s - time.time()

    def _fire(self) -> None:
        if self._remaining_s() > 0:
            self.start()
        else:
            self._timer = None
            self.on_expire()

    async def renew(self, token: str) -> Identity:
        """Raises Unauthorized, Forbidden or AuthUnavailable; the old token then stays in force."""
        identity = await self.verifier.verify(token)
        if identity.user != self.identity.user:
            raise Forbidden("token is for another user")
        self.identity = identity
        self.start()
        return identity


# Origins (cross-site WebSocket hijacking)


def normalise_origin(value: str) -> str | None:
    """``scheme://host[:port]`` in lower case without a default port; None if `value` is not one."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/")
            or parts.query or parts.fragment or parts.username is not None):
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default_port = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != default_port else "")


def origin_allowed(origin: str | None, *, host: str | None, allowed: tuple[str, ...], dev: bool) -> bool:
    """May a page from `origin` open a socket? Requests without an Origin come from non-browser
    clients and pass (they could send any Origin anyway); so do pages of the node's own host."""
    if origin is None:
        return True
    if dev or "*" in allowed:
        return True
    normal = normalise_origin(origin)
    if normal is None:
        return False  # includes "null" (sandboxed frames, file: pages)
    if normal in allowed:
        return True
    scheme = normal.split("://", 1)[0]
    return host is not None and normalise_origin(f"{scheme}://{host}") == normal
