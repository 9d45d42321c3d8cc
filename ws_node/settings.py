"""Node settings: declared once below, read once from the environment in `__main__`, then passed down.

Each field names its variable, default, bounds and docs line (`common.config`); the tables of
docs/operations.md are these declarations rendered (``python -m common.config
ws_node.settings:NodeSettings``). The rules that span several variables (which keys authenticate,
the algorithms they allow) follow the table in `from_env`. Security settings are described with
their threat in docs/security.md; keep that table in step with this file.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.config import (
    SettingError,
    SharedSettings,
    boolean,
    comma_list,
    computed,
    integer,
    min_chars,
    number,
    optional,
    read,
    setting,
    text,
    url,
)
from ws_node.auth import HMAC_ALGORITHMS, PUBLIC_KEY_ALGORITHMS, normalise_origin


def _origins(variable: str, value: str) -> tuple[str, ...]:
    """``*`` or a comma list of ``scheme://host[:port]``, normalised."""
    origins = []
    for entry in comma_list(variable, value):
        normal = entry if entry == "*" else normalise_origin(entry)
        if normal is None:
            raise SettingError(f"{variable}: {entry!r} is not an origin like https://app.example.com")
        origins.append(normal)
    return tuple(dict.fromkeys(origins))


@dataclass(frozen=True, kw_only=True, repr=False)  # SharedSettings.__repr__ hides secrets
class NodeSettings(SharedSettings):
    node_id: str = computed(
        "NODE_ID", text,
        "this node's name: in `hello`, presence and logs. Must be unique per process; the chart uses the "
        "pod name", shown="the host name")
    port: int = setting(
        "PORT", "8080", integer(1, 65535), "public port: `/ws`, `/v1/…` (and `/healthz`, `/readyz`)")
    host: str = setting("HOST", "0.0.0.0", text, "address both ports bind to")
    drain_s: float = setting(
        "DRAIN_SECONDS", "10", number(),
        "on SIGTERM: the window over which the node tells its sockets to reconnect elsewhere (see "
        "*Upgrading*)")
    heartbeat_s: int = setting(
        "HEARTBEAT_SECONDS", "25", integer(1, 3600),
        "the node pings an idle socket this often and drops it when no pong comes within half of it; sent "
        "to clients in `hello` (1 to 3600)")
    gc_freeze_s: float = setting(
        "GC_FREEZE_SECONDS", "1", number(),
        "every this many seconds, what the node has held since is frozen out of the garbage "
        "collector's passes (`gc.freeze`), so a full pass walks only what is new, not every socket; "
        "0: only at start-up (docs/operations.md, *Garbage collection*)")
    presence_debounce_s: float = setting(
        "PRESENCE_DEBOUNCE_SECONDS", "5", number(),
        "a device whose last socket closed is announced offline (`presence`) only if it has not come "
        "back within this many seconds, so a quick reconnect is not an offline/online pair")
    queue_max_frames: int = setting(
        "SEND_QUEUE_MAX_FRAMES", "1024", integer(low=8),
        "frames queued per socket (at least 8). When the queue is full, the token events in it are merged "
        "into fewer frames; if that leaves it more than three quarters full, the socket is closed with 4008 "
        "and resumes, so one slow phone never slows the others")
    merged_token_max_chars: int = setting(
        "MERGED_TOKEN_MAX_CHARS", "65536", integer(low=1024),
        "the most text one merged token frame may carry (at least 1024); a slow socket's queue holds at "
        "most `SEND_QUEUE_MAX_FRAMES` frames of this size")
    max_frame_bytes: int = setting(
        "MAX_FRAME_BYTES", "65536", integer(low=1024),
        "largest WebSocket message (larger: close 1009) and largest REST body accepted (at least 1024)")
    max_text_chars: int = setting("MAX_TEXT_CHARS", "8000", integer(low=1), "longest `send` text")
    lean_sockets: bool = setting(
        "LEAN_SOCKETS", "true", boolean,
        "serve `/ws` upgrades with the node's own WebSocket code (`ws_node.lean`: ~5 KB a socket where "
        "aiohttp's takes ~20); false: every socket through aiohttp")
    ws_compression: bool = setting(
        "WS_COMPRESSION", "false", boolean,
        "accept permessage-deflate from clients that offer it (every browser does): less traffic for long "
        "answers, but ~200 KB of zlib state per such socket, which aiohttp then serves; false: the offer "
        "is declined, as Socket.IO and Centrifugo do by default")
    dev: bool = setting(
        "CHORUS_DEV", "false", boolean, "development mode: disables the `Origin` check. Never in production")
    web_root: str | None = optional(
        "WEB_ROOT", text,
        "the directory holding the chat page (`web/`) and the JavaScript SDK (`js/src/`) served at `/`; the "
        "image sets `/opt/chorus/clients`. Unset: `clients/` of the checkout the node runs from",
        shown="the checkout's clients/")
    dev_login: bool = setting(
        "DEV_LOGIN", "false", boolean,
        "the chat page's dev login: `POST /dev/login` mints a token (HS256 with `AUTH_JWT_SECRET`) for any "
        "user name it is given, so anyone who reaches the node can be anyone. Never in production; off, it "
        "answers 404")
    # Authentication (ws_node.auth); which keys may be set together is checked in from_env
    jwt_secret: str | None = optional(
        "AUTH_JWT_SECRET", min_chars(16),
        "HMAC (HS256/384/512) secret, at least 16 characters. Required unless a public key or a JWKS URL "
        "is set", secret=True)
    jwt_public_key: str | None = optional(
        "AUTH_JWT_PUBLIC_KEY", text, "PEM public key (or certificate) for RS/PS/ES/EdDSA tokens")
    jwt_public_key_file: str | None = optional(
        "AUTH_JWT_PUBLIC_KEY_FILE", text, "path to that PEM instead; not together with `AUTH_JWT_PUBLIC_KEY`")
    jwks_url: str | None = optional(
        "AUTH_JWKS_URL", url("https", "http"),
        "`https://` (or `http://`) URL of your identity provider's JWKS; not together with a public key")
    jwt_algorithms: tuple[str, ...] = computed(
        "AUTH_JWT_ALGORITHMS", comma_list, "comma-separated allow-list; each needs its kind of key",
        shown="HS256 with a secret, plus RS256,ES256 with a key or JWKS")
    jwt_audience: str | None = optional("AUTH_JWT_AUDIENCE", text, "when set, tokens must carry this `aud`")
    jwt_issuer: str | None = optional("AUTH_JWT_ISSUER", text, "when set, tokens must carry this `iss`")
    jwt_leeway_s: int = setting(
        "AUTH_LEEWAY_SECONDS", "0", integer(0, 300), "clock skew allowed on `exp` (0 to 300)")
    jwks_cache_s: int = setting(
        "AUTH_JWKS_CACHE_SECONDS", "300", integer(low=1),
        "how long fetched keys are used before fetching again")
    jwks_cooldown_s: float = setting(
        "AUTH_JWKS_COOLDOWN_SECONDS", "30", number(),
        "at most one extra fetch per this interval for an unknown `kid`")
    auth_frame_timeout_s: float = setting(
        "AUTH_FRAME_TIMEOUT_SECONDS", "5", number(low=0.1),
        "with `?auth=frame`, the time a socket has to send its `auth` frame, else close 4001")
    admin_claim: str = setting(
        "AUTH_ADMIN_CLAIM", "roles", text,
        "the token claim that grants the admin API (`/v1/admin/…`): a string or a list of strings; a "
        "dotted name (`realm_access.roles`) reaches into nested objects when no claim has the whole name")
    admin_value: str = setting(
        "AUTH_ADMIN_VALUE", "chorus-admin", text,
        "the value of `AUTH_ADMIN_CLAIM` (or one of its values) that makes a token an admin's")
    allowed_origins: tuple[str, ...] = setting(
        "CHORUS_ALLOWED_ORIGINS", "", _origins,
        "browser origins allowed to open sockets, comma-separated, or `*`. Empty: only clients that send no "
        "`Origin` (apps, servers) and pages served from the node's own host")
    # Limits (ws_node.limits); 0 turns a limit off
    max_devices_per_user: int = setting(
        "USER_MAX_DEVICES", "100", integer(),
        "sockets one user may have open at once (close 4029 beyond); 0 for no limit")
    connections_per_s: float = setting(
        "NEW_CONNECTIONS_PER_SECOND", "500", number(),
        "new sockets a node accepts per second (HTTP 429 beyond); 0 for no limit")
    connections_burst: int = setting(
        "NEW_CONNECTIONS_BURST", "1000", integer(low=1),
        "new sockets a node accepts at once above that rate (at least 1)")
    commands_per_s: float = setting(
        "USER_COMMANDS_PER_SECOND", "20", number(),
        "commands per user per second across the whole cluster (error `rate_limited` beyond); 0 for no "
        "limit")
    commands_burst: int = setting(
        "USER_COMMANDS_BURST", "60", integer(low=1),
        "commands a user may send at once above that rate (at least 1)")
    rest_per_s: float = setting(
        "USER_REST_PER_SECOND", "20", number(),
        "authenticated REST requests (`/v1/…`) per user per second across the whole cluster (HTTP 429 "
        "`rate_limited` with `Retry-After` beyond); a bucket of its own, apart from the commands'; 0 for "
        "no limit")
    rest_burst: int = setting(
        "USER_REST_BURST", "100", integer(low=1),
        "REST requests a user may make at once above that rate (at least 1)")
    max_runs_in_flight: int = setting(
        "USER_MAX_RUNS_IN_FLIGHT", "8", integer(),
        "runs one user may have not yet ended (waiting, queued, running or paused) across the whole "
        "cluster; a `send` beyond is refused with `rate_limited`; 0 for no limit")
    max_queue_depth: int = setting(
        "RUN_QUEUE_MAX_DEPTH", "0", integer(),
        "runs waiting for a worker beyond which a new `send` is refused with `overloaded` (and "
        "`retry_after_ms`) instead of queued; 0 for no limit")
    max_queue_age_s: float = setting(
        "RUN_QUEUE_MAX_AGE_SECONDS", "0", number(),
        "how long the oldest run may have waited for a worker before a new `send` is refused with "
        "`overloaded`; 0 for no limit")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NodeSettings:
        """Raises `common.config.SettingError` naming the first missing or invalid variable."""
        values = read(cls, env)
        values["node_id"] = values["node_id"] or socket.gethostname()
        public_key = _public_key(values["jwt_public_key"], values["jwt_public_key_file"])
        secret, jwks_url = values["jwt_secret"], values["jwks_url"]
        has_public_key = public_key is not None or jwks_url is not None
        if secret is None and not has_public_key:
            raise SettingError("AUTH_JWT_SECRET: required but not set (or set AUTH_JWT_PUBLIC_KEY, "
                               "AUTH_JWT_PUBLIC_KEY_FILE or AUTH_JWKS_URL)")
        if public_key is not None and jwks_url is not None:
            raise SettingError("AUTH_JWKS_URL: set either a JWKS URL or a public key, not both")
        values["jwt_public_key"] = public_key
        values["jwt_algorithms"] = _algorithms(values["jwt_algorithms"], secret is not None, has_public_key)
        return cls(**values)


def _public_key(pem: str | None, path: str | None) -> str | None:
    """The PEM from AUTH_JWT_PUBLIC_KEY or the file AUTH_JWT_PUBLIC_KEY_FILE names, checked."""
    if pem is not None and path is not None:
        raise SettingError("AUTH_JWT_PUBLIC_KEY_FILE: set it or AUTH_JWT_PUBLIC_KEY, not both")
    if path is not None:
        try:
            pem = Path(path).read_text()
        except OSError as exc:
            raise SettingError(f"AUTH_JWT_PUBLIC_KEY_FILE: cannot read {path}: {exc.strerror}") from None
    if pem is None:
        return None
    name = "AUTH_JWT_PUBLIC_KEY_FILE" if path else "AUTH_JWT_PUBLIC_KEY"
    if "-----BEGIN PUBLIC KEY-----" not in pem and "-----BEGIN CERTIFICATE-----" not in pem:
        raise SettingError(f"{name}: expected a PEM public key (-----BEGIN PUBLIC KEY-----)")
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        if "-----BEGIN PUBLIC KEY-----" in pem:
            load_pem_public_key(pem.encode())
    except ValueError:
        raise SettingError(f"{name}: not a valid PEM public key") from None
    return pem


def _algorithms(listed: tuple[str, ...] | None, has_secret: bool, has_public_key: bool) -> tuple[str, ...]:
    """The explicit allow-list; by default HS256 with a secret, RS256 and ES256 with public keys."""
    if listed is None:
        return (("HS256",) if has_secret else ()) + (("RS256", "ES256") if has_public_key else ())
    algorithms = tuple(dict.fromkeys(listed))
    for algorithm in algorithms:
        if algorithm not in HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS:
            raise SettingError(f"AUTH_JWT_ALGORITHMS: unsupported algorithm {algorithm!r}")
        if algorithm in HMAC_ALGORITHMS and not has_secret:
            raise SettingError(f"AUTH_JWT_ALGORITHMS: {algorithm} needs AUTH_JWT_SECRET")
        if algorithm in PUBLIC_KEY_ALGORITHMS and not has_public_key:
            raise SettingError(f"AUTH_JWT_ALGORITHMS: {algorithm} needs AUTH_JWT_PUBLIC_KEY or AUTH_JWKS_URL")
    if not algorithms:
        raise SettingError("AUTH_JWT_ALGORITHMS: lists no algorithm")
    return algorithms
