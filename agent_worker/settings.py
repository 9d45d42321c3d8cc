"""Worker settings: declared once below, read once from the environment in `__main__`, then passed down.

Each field names its variable, default, bounds and docs line (`common.config`); the tables of
docs/operations.md are these declarations rendered (``python -m common.config
agent_worker.settings:WorkerSettings``). The agents' own variables (``AGENT_*``, ``AGENTS_*``,
``MCP_TIMEOUT_SECONDS``) are declared here too: `agent_worker.agents` reads them through these
declarations, so each default is written once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from common.config import (
    SettingError,
    SharedSettings,
    boolean,
    comma_list,
    computed,
    http_url,
    integer,
    millis,
    number,
    optional,
    read,
    setting,
    text,
)


@dataclass(frozen=True, kw_only=True, repr=False)  # SharedSettings.__repr__ hides secrets
class WorkerSettings(SharedSettings):
    worker_id: str = computed(
        "NODE_ID", text,
        "this worker's name: the consumer name in the runs group, and in logs. Must be unique per process; "
        "the chart uses the pod name", shown="`<host name>-<pid>`")
    # The model (agent_worker.agents, agent_worker.model)
    llm_base_url: str | None = optional(
        "LLM_BASE_URL", http_url,
        "OpenAI-compatible endpoint (`http://` or `https://`), e.g. `https://api.openai.com/v1` or "
        "`http://vllm:8000/v1`. Unset: the built-in offline demo model")
    llm_api_key: str | None = optional(
        "LLM_API_KEY", text, "sent as the API key; unset sends a placeholder (local servers ignore it)",
        secret=True)
    llm_model: str = setting("LLM_MODEL", "gpt-4o-mini", text, "model name sent with every request")
    llm_stream_usage: bool = setting(
        "LLM_STREAM_USAGE", "false", boolean,
        "ask the endpoint for the token counts of each streamed answer (`stream_options.include_usage`; "
        "OpenAI and vLLM take it, some compatible servers refuse it): stored on each run, in "
        "`run.completed` and in `GET /v1/usage`. The demo model always reports its own")
    llm_timeout_s: float = setting(
        "LLM_TIMEOUT_SECONDS", "60", number(low=0.1),
        "longest wait to connect, for the response, and for each next chunk (at least 0.1)")
    # Retries, breakers and the fallback (agent_worker.resilience)
    retry_attempts: int = setting(
        "LLM_RETRY_ATTEMPTS", "3", integer(1, 10),
        "calls per endpoint for one answer before giving up on it (1 to 10; 1 = no retry). Only retryable "
        "errors (429, 5xx, connection, timeout) and only before the first token: a stream that breaks "
        "mid-answer is never restarted")
    retry_base_s: float = setting(
        "LLM_RETRY_BASE_MS", "200", millis(1, 60_000),
        "the base of the full-jitter exponential backoff between those calls (1 to 60000): the n-th wait is "
        "random in [0, min(cap, base × 2ⁿ)], never shorter than the server's `Retry-After` (capped too)")  # noqa: RUF001
    retry_cap_s: float = setting(
        "LLM_RETRY_CAP_MS", "5000", millis(1, 600_000),
        "the cap of that backoff, at least `LLM_RETRY_BASE_MS` (1 to 600000)")
    breaker_failures: int = setting(
        "LLM_BREAKER_FAILURES", "5", integer(1, 1000),
        "consecutive failures that open an endpoint's circuit breaker (1 to 1000); while open, calls fail "
        "at once without a request")
    breaker_reset_s: float = setting(
        "LLM_BREAKER_RESET_SECONDS", "30", number(low=0.1),
        "how long a breaker stays open before one trial call is let through (at least 0.1)")
    fallback_base_url: str | None = optional(
        "LLM_FALLBACK_BASE_URL", http_url,
        "a second OpenAI-compatible endpoint, used when the primary still fails (or its breaker is open) "
        "before any token")
    fallback_model: str | None = optional(
        "LLM_FALLBACK_MODEL", text, "model name for the fallback endpoint", shown="`LLM_MODEL`")
    fallback_api_key: str | None = optional("LLM_FALLBACK_API_KEY", text, "API key for the fallback endpoint",
                                            secret=True)
    # The agents (agent_worker.agents)
    system_prompt: str = setting(
        "AGENT_SYSTEM_PROMPT", "You are a helpful assistant.", text,
        "the system message of the `default` agent")
    mcp_servers: tuple[str, ...] = setting(
        "AGENT_MCP_SERVERS", "", comma_list,
        "comma-separated MCP server URLs (Streamable HTTP) whose tools the `default` agent may call; needs "
        "`LLM_BASE_URL`")
    max_tool_rounds: int = setting(
        "AGENT_MAX_TOOL_ROUNDS", "4", integer(0, 50),
        "tool-call rounds per answer of the `default` agent (0 to 50)")
    ask_user: bool = setting(
        "AGENT_ASK_USER", "false", boolean,
        "lets the `default` agent pause a run to ask the user a question (human in the loop); needs "
        "`LLM_BASE_URL`")
    input_timeout_s: float = setting(
        "INPUT_TIMEOUT_SECONDS", "3600", number(low=1.0),
        "how long a paused run waits for a device's answer before it ends `run.failed` with "
        "`input_timeout` (at least 1). A paused run holds no worker: it waits in Postgres")
    mcp_timeout_s: float = setting(
        "MCP_TIMEOUT_SECONDS", "30", number(low=0.1), "timeout of a call to an MCP server (at least 0.1)")
    agents_json: str | None = optional(
        "AGENTS_JSON", text,
        "more named agents (or a replacement `default`), as JSON text. The format is in "
        "`agent_worker/agents.py`")
    agents_file: str | None = optional(
        "AGENTS_FILE", text, "path to a file holding that JSON instead; not together with `AGENTS_JSON`")
    # Running runs (agent_worker.worker)
    processes: int = setting(
        "WORKER_PROCESSES", "1", integer(1, 256),
        "worker processes under one supervisor (1 to 256): a process uses one core, so set it to the "
        "cores the worker may use; each has `WORKER_CONCURRENCY` slots and its own consumer name "
        "(`NODE_ID-<i>`), and one that dies is started again")
    serves: tuple[str, ...] = setting(
        "WORKER_AGENTS", "", comma_list,
        "comma-separated agents this worker serves (a name: all its versions; `name@version`: one); empty: "
        "every configured agent. Runs of an agent go only to workers serving it")
    concurrency: int = setting(
        "WORKER_CONCURRENCY", "8", integer(1, 10_000), "runs one worker executes at once (1 to 10000)")
    drain_s: float = setting(
        "WORKER_DRAIN_SECONDS", "30", number(),
        "on SIGTERM: stop taking runs and let running ones finish for this long; the rest are cancelled and "
        "taken over by another worker once their lease expires")
    lease_s: float = setting(
        "RUN_LEASE_SECONDS", "5", number(low=1.0),
        "a worker's claim on a run, renewed every third of it; a run of a dead worker is taken over within "
        "about 1.4 times it (at least 1; tests/test_worker.py measures the takeover)")
    max_deliveries: int = setting(
        "RUN_MAX_DELIVERIES", "3", integer(1, 100),
        "deliveries of one run before it goes to the dead-letter stream and ends `run.failed` (1 to 100)")
    coalesce_s: float = setting(
        "TOKEN_COALESCE_MS", "30", millis(0, 1000),
        "model tokens arriving within this many milliseconds are published as one event (0 to 1000): "
        "fewer frames, same text")
    checkpoint_s: float = setting(
        "CHECKPOINT_SECONDS", "1", number(low=0.05),
        "how often the answer so far is saved to Postgres, for the `snapshot` a new or resynced device "
        "gets (at least 0.05)")
    store_retry_s: float = setting(
        "STORE_RETRY_SECONDS", "600", number(low=1.0),
        "how long a worker keeps retrying Postgres to store a finished run before giving up (at least 1)")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerSettings:
        """Raises `common.config.SettingError` naming the first missing or invalid variable."""
        values = read(cls, env)
        values["worker_id"] = values["worker_id"] or f"{socket.gethostname()}-{os.getpid()}"
        if values["retry_cap_s"] < values["retry_base_s"]:
            raise SettingError("LLM_RETRY_CAP_MS: must be at least LLM_RETRY_BASE_MS")
        return cls(**values)
