"""Node settings: read once from the environment in `__main__`, then passed down."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass

from fanout.config import env_bool, env_float, env_int, env_opt, env_str, env_url


@dataclass(frozen=True)
class NodeSettings:
    redis_url: str
    database_url: str
    jwt_secret: str
    node_id: str
    port: int = 8080
    internal_port: int | None = None
    host: str = "0.0.0.0"
    redis_prefix: str = "chorus"
    heartbeat_s: int = 25
    drain_s: float = 10.0
    queue_max_frames: int = 1024
    max_frame_bytes: int = 65_536
    max_text_chars: int = 8_000
    history_max: int = 10_000
    history_ttl_s: int = 86_400
    dev: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NodeSettings:
        """Raises `fanout.config.SettingError` naming the first missing or invalid variable."""
        internal = env_int(env, "INTERNAL_PORT", 0, low=0, high=65535)
        return cls(
            redis_url=env_url(env, "REDIS_URL", ("redis", "rediss", "unix")),
            database_url=env_url(env, "DATABASE_URL", ("postgresql", "postgres")),
            jwt_secret=_secret(env),
            node_id=env_str(env, "NODE_ID", socket.gethostname()),
            port=env_int(env, "PORT", 8080, low=1, high=65535),
            internal_port=internal or None,
            host=env_str(env, "HOST", "0.0.0.0"),
            redis_prefix=env_str(env, "REDIS_PREFIX", "chorus"),
            heartbeat_s=env_int(env, "HEARTBEAT_SECONDS", 25, low=1, high=3600),
            drain_s=env_float(env, "DRAIN_SECONDS", 10.0),
            queue_max_frames=env_int(env, "SEND_QUEUE_MAX_FRAMES", 1024, low=8),
            max_frame_bytes=env_int(env, "MAX_FRAME_BYTES", 65_536, low=1024),
            max_text_chars=env_int(env, "MAX_TEXT_CHARS", 8_000, low=1),
            history_max=env_int(env, "HISTORY_MAX_EVENTS", 10_000, low=10),
            history_ttl_s=env_int(env, "HISTORY_TTL_SECONDS", 86_400, low=60),
            dev=env_bool(env, "CHORUS_DEV"),
        )


def _secret(env: Mapping[str, str]) -> str:
    from fanout.config import SettingError

    secret = env_opt(env, "AUTH_JWT_SECRET")
    if secret is None:
        raise SettingError("AUTH_JWT_SECRET: required but not set")
    if len(secret) < 16:
        raise SettingError("AUTH_JWT_SECRET: must be at least 16 characters")
    return secret
