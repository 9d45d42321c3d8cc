"""Node settings: read once from the environment in `__main__`, then passed down.

Security settings (authentication, origins, limits) are described with their threat in
docs/security.md; keep that table in step with this file.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from common.config import SettingError, env_bool, env_float, env_int, env_opt, env_str, env_url
from ws_node.auth import HMAC_ALGORITHMS, PUBLIC_KEY_ALGORITHMS, normalise_origin


@dataclass(frozen=True)
class NodeSettings:
    redis_url: str
    database_url: str
    jwt_secret: str | None
    node_id: str
    port: int = 8080
    internal_port: int | None = None
    host: str = "0.0.0.0"
    redis_prefix: str = "chorus"
    heartbeat_s: int = 25
    drain_s: float = 10.0
    queue_max_frames: int = 1024
    merged_token_max_chars: int = 65_536
    max_frame_bytes: int = 65_536
    max_text_chars: int = 8_000
    history_max: int = 10_000
    history_ttl_s: int = 86_400
    dev: bool = False
    # Authentication (ws_node.auth)
    jwt_public_key: str | None = None
    jwks_url: str | None = None
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: int = 0
    jwks_cache_s: int = 300
    jwks_cooldown_s: float = 30.0
    auth_frame_timeout_s: float = 5.0
    allowed_origins: tuple[str, ...] = ()
    # Limits (ws_node.limits); 0 turns a limit off
    max_devices_per_user: int = 100
    connections_per_s: float = 500.0
    connections_burst: int = 1000
    commands_per_s: float = 20.0
    commands_burst: int = 60
    max_runs_in_flight: int = 8

    def __repr__(self) -> str:
        # URLs may carry passwords, and the secret is one: a logged settings object shows neither.
        return (f"NodeSettings(node_id={self.node_id!r}, port={self.port}, "
                f"redis_url={redact_url(self.redis_url)!r}, database_url={redact_url(self.database_url)!r}, "
                f"algorithms={self.jwt_algorithms!r})")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NodeSettings:
        """Raises `common.config.SettingError` naming the first missing or invalid variable."""
        internal = env_int(env, "INTERNAL_PORT", 0, low=0, high=65535)
        secret, public_key, jwks_url = _secret(env), _public_key(env), _jwks_url(env)
        has_public_key = public_key is not None or jwks_url is not None
        if secret is None and not has_public_key:
            raise SettingError("AUTH_JWT_SECRET: required but not set (or set AUTH_JWT_PUBLIC_KEY, "
                               "AUTH_JWT_PUBLIC_KEY_FILE or AUTH_JWKS_URL)")
        if public_key is not None and jwks_url is not None:
            raise SettingError("AUTH_JWKS_URL: set either a JWKS URL or a public key, not both")
        return cls(
            redis_url=env_url(env, "REDIS_URL", ("redis", "rediss", "unix")),
            database_url=env_url(env, "DATABASE_URL", ("postgresql", "postgres")),
            jwt_secret=secret,
            node_id=env_str(env, "NODE_ID", socket.gethostname()),
            port=env_int(env, "PORT", 8080, low=1, high=65535),
            internal_port=internal or None,
            host=env_str(env, "HOST", "0.0.0.0"),
            redis_prefix=env_str(env, "REDIS_PREFIX", "chorus"),
            heartbeat_s=env_int(env, "HEARTBEAT_SECONDS", 25, low=1, high=3600),
            drain_s=env_float(env, "DRAIN_SECONDS", 10.0),
            queue_max_frames=env_int(env, "SEND_QUEUE_MAX_FRAMES", 1024, low=8),
            merged_token_max_chars=env_int(env, "MERGED_TOKEN_MAX_CHARS", 65_536, low=1024),
            max_frame_bytes=env_int(env, "MAX_FRAME_BYTES", 65_536, low=1024),
            max_text_chars=env_int(env, "MAX_TEXT_CHARS", 8_000, low=1),
            history_max=env_int(env, "HISTORY_MAX_EVENTS", 10_000, low=10),
            history_ttl_s=env_int(env, "HISTORY_TTL_SECONDS", 86_400, low=60),
            dev=env_bool(env, "CHORUS_DEV"),
            jwt_public_key=public_key,
            jwks_url=jwks_url,
            jwt_algorithms=_algorithms(env, secret is not None, has_public_key),
            jwt_audience=env_opt(env, "AUTH_JWT_AUDIENCE"),
            jwt_issuer=env_opt(env, "AUTH_JWT_ISSUER"),
            jwt_leeway_s=env_int(env, "AUTH_LEEWAY_SECONDS", 0, low=0, high=300),
            jwks_cache_s=env_int(env, "AUTH_JWKS_CACHE_SECONDS", 300, low=1),
            jwks_cooldown_s=env_float(env, "AUTH_JWKS_COOLDOWN_SECONDS", 30.0),
            auth_frame_timeout_s=env_float(env, "AUTH_FRAME_TIMEOUT_SECONDS", 5.0, low=0.1),
            allowed_origins=_origins(env),
            max_devices_per_user=env_int(env, "USER_MAX_DEVICES", 100),
            connections_per_s=env_float(env, "NEW_CONNECTIONS_PER_SECOND", 500.0),
            connections_burst=env_int(env, "NEW_CONNECTIONS_BURST", 1000, low=1),
            commands_per_s=env_float(env, "USER_COMMANDS_PER_SECOND", 20.0),
            commands_burst=env_int(env, "USER_COMMANDS_BURST", 60, low=1),
            max_runs_in_flight=env_int(env, "USER_MAX_RUNS_IN_FLIGHT", 8),
        )


def redact_url(url: str) -> str:
    """`url` with any password replaced by ``***``: safe to log."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "<unparseable url>"
    return urlunsplit((parts.scheme, f"{user}:***@{host}{port}", parts.path, parts.query, parts.fragment))


def _secret(env: Mapping[str, str]) -> str | None:
    secret = env_opt(env, "AUTH_JWT_SECRET")
    if secret is not None and len(secret) < 16:
        raise SettingError("AUTH_JWT_SECRET: must be at least 16 characters")
    return secret


def _public_key(env: Mapping[str, str]) -> str | None:
    pem = env_opt(env, "AUTH_JWT_PUBLIC_KEY")
    path = env_opt(env, "AUTH_JWT_PUBLIC_KEY_FILE")
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


def _jwks_url(env: Mapping[str, str]) -> str | None:
    if env_opt(env, "AUTH_JWKS_URL") is None:
        return None
    return env_url(env, "AUTH_JWKS_URL", ("https", "http"))


def _algorithms(env: Mapping[str, str], has_secret: bool, has_public_key: bool) -> tuple[str, ...]:
    """The explicit allow-list; by default HS256 with a secret, RS256 and ES256 with public keys."""
    raw = env_opt(env, "AUTH_JWT_ALGORITHMS")
    if raw is None:
        return (("HS256",) if has_secret else ()) + (("RS256", "ES256") if has_public_key else ())
    algorithms = tuple(dict.fromkeys(a.strip() for a in raw.split(",") if a.strip()))
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


def _origins(env: Mapping[str, str]) -> tuple[str, ...]:
    """`CHORUS_ALLOWED_ORIGINS`: ``*`` or a comma list of ``scheme://host[:port]`` (normalised)."""
    raw = env_opt(env, "CHORUS_ALLOWED_ORIGINS")
    if raw is None:
        return ()
    origins = []
    for entry in (e.strip() for e in raw.split(",")):
        if not entry:
            continue
        if entry == "*":
            origins.append(entry)
            continue
        normal = normalise_origin(entry)
        if normal is None:
            raise SettingError(f"CHORUS_ALLOWED_ORIGINS: {entry!r} is not an origin like https://app.example.com")
        origins.append(normal)
    return tuple(dict.fromkeys(origins))
