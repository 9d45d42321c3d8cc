"""Worker settings: read once from the environment in `__main__`, then passed down."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from fanout.config import env_float, env_int, env_opt, env_str, env_url


@dataclass(frozen=True)
class WorkerSettings:
    redis_url: str
    database_url: str
    worker_id: str
    llm_base_url: str | None = None
    llm_api_key: str | None = None
    llm_model: str = "gpt-4o-mini"
    llm_timeout_s: float = 60.0
    concurrency: int = 8
    drain_s: float = 30.0
    lease_s: float = 30.0
    max_deliveries: int = 3
    coalesce_s: float = 0.03
    checkpoint_s: float = 1.0
    store_retry_s: float = 600.0
    internal_port: int | None = None
    redis_prefix: str = "chorus"
    history_max: int = 10_000
    history_ttl_s: int = 86_400
    system_prompt: str = "You are a helpful assistant."

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerSettings:
        """Raises `fanout.config.SettingError` naming the first missing or invalid variable."""
        base_url = env_opt(env, "LLM_BASE_URL")
        if base_url is not None and not base_url.startswith(("http://", "https://")):
            from fanout.config import SettingError

            raise SettingError("LLM_BASE_URL: expected an http:// or https:// URL")
        return cls(
            redis_url=env_url(env, "REDIS_URL", ("redis", "rediss", "unix")),
            database_url=env_url(env, "DATABASE_URL", ("postgresql", "postgres")),
            worker_id=env_str(env, "NODE_ID", f"{socket.gethostname()}-{os.getpid()}"),
            llm_base_url=base_url,
            llm_api_key=env_opt(env, "LLM_API_KEY"),
            llm_model=env_str(env, "LLM_MODEL", "gpt-4o-mini"),
            llm_timeout_s=env_float(env, "LLM_TIMEOUT_SECONDS", 60.0, low=0.1),
            concurrency=env_int(env, "WORKER_CONCURRENCY", 8, low=1, high=10_000),
            drain_s=env_float(env, "WORKER_DRAIN_SECONDS", 30.0),
            lease_s=env_float(env, "RUN_LEASE_SECONDS", 30.0, low=1.0),
            max_deliveries=env_int(env, "RUN_MAX_DELIVERIES", 3, low=1, high=100),
            coalesce_s=env_int(env, "TOKEN_COALESCE_MS", 30, low=0, high=1000) / 1000,
            checkpoint_s=env_float(env, "CHECKPOINT_SECONDS", 1.0, low=0.05),
            store_retry_s=env_float(env, "STORE_RETRY_SECONDS", 600.0, low=1.0),
            internal_port=env_int(env, "INTERNAL_PORT", 0, low=0, high=65535) or None,
            redis_prefix=env_str(env, "REDIS_PREFIX", "chorus"),
            history_max=env_int(env, "HISTORY_MAX_EVENTS", 10_000, low=10),
            history_ttl_s=env_int(env, "HISTORY_TTL_SECONDS", 86_400, low=60),
            system_prompt=env_str(env, "AGENT_SYSTEM_PROMPT", "You are a helpful assistant."),
        )
