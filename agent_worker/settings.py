"""Worker settings: read once from the environment in `__main__`, then passed down."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from common.config import SettingError, env_float, env_int, env_opt, env_str, env_url


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
    input_timeout_s: float = 3600.0
    store_retry_s: float = 600.0
    internal_port: int | None = None
    redis_prefix: str = "chorus"
    history_max: int = 10_000
    history_ttl_s: int = 86_400
    system_prompt: str = "You are a helpful assistant."
    retry_attempts: int = 3
    retry_base_s: float = 0.2
    retry_cap_s: float = 5.0
    breaker_failures: int = 5
    breaker_reset_s: float = 30.0
    fallback_base_url: str | None = None
    fallback_model: str | None = None
    fallback_api_key: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerSettings:
        """Raises `common.config.SettingError` naming the first missing or invalid variable."""
        base_url = _http_url(env, "LLM_BASE_URL")
        retry_base_ms = env_int(env, "LLM_RETRY_BASE_MS", 200, low=1, high=60_000)
        retry_cap_ms = env_int(env, "LLM_RETRY_CAP_MS", 5000, low=1, high=600_000)
        if retry_cap_ms < retry_base_ms:
            raise SettingError("LLM_RETRY_CAP_MS: must be at least LLM_RETRY_BASE_MS")
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
            input_timeout_s=env_float(env, "INPUT_TIMEOUT_SECONDS", 3600.0, low=1.0),
            store_retry_s=env_float(env, "STORE_RETRY_SECONDS", 600.0, low=1.0),
            internal_port=env_int(env, "INTERNAL_PORT", 0, low=0, high=65535) or None,
            redis_prefix=env_str(env, "REDIS_PREFIX", "chorus"),
            history_max=env_int(env, "HISTORY_MAX_EVENTS", 10_000, low=10),
            history_ttl_s=env_int(env, "HISTORY_TTL_SECONDS", 86_400, low=60),
            system_prompt=env_str(env, "AGENT_SYSTEM_PROMPT", "You are a helpful assistant."),
            retry_attempts=env_int(env, "LLM_RETRY_ATTEMPTS", 3, low=1, high=10),
            retry_base_s=retry_base_ms / 1000,
            retry_cap_s=retry_cap_ms / 1000,
            breaker_failures=env_int(env, "LLM_BREAKER_FAILURES", 5, low=1, high=1000),
            breaker_reset_s=env_float(env, "LLM_BREAKER_RESET_SECONDS", 30.0, low=0.1),
            fallback_base_url=_http_url(env, "LLM_FALLBACK_BASE_URL"),
            fallback_model=env_opt(env, "LLM_FALLBACK_MODEL"),
            fallback_api_key=env_opt(env, "LLM_FALLBACK_API_KEY"),
        )


def _http_url(env: Mapping[str, str], name: str) -> str | None:
    url = env_opt(env, name)
    if url is not None and not url.startswith(("http://", "https://")):
        raise SettingError(f"{name}: expected an http:// or https:// URL")
    return url
