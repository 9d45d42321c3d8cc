"""Build the chat model a worker runs: ChatOpenAI for a configured endpoint, else the demo.

The endpoint is anything that speaks the OpenAI chat-completions streaming format
(OpenAI, vLLM, Ollama, llama.cpp, LiteLLM, ...). The settings here are chosen so
that a *minimal* such server works: plain ``/chat/completions`` with ``stream: true``
and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import openai
from langchain_core.language_models import BaseChatModel
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from agent_worker.demo import DemoChatModel

# Local servers (Ollama, vLLM, llama.cpp) accept any key, but the openai SDK
# refuses to build a client without one.
_PLACEHOLDER_API_KEY = "not-needed"


def _cheaper_chunk_parsing() -> None:
    """The openai SDK builds a model object for every streamed chunk, and each build tests the
    model's pydantic config with ``isinstance`` against a runtime-checkable Protocol
    (``openai._models._ConfigProtocol``). typing_extensions answers that through
    ``inspect.getattr_static``: py-spy put that one test at 27% of a worker's CPU with 50 runs
    streaming (issue 15). Under pydantic 2 the config is a dict, which the Protocol never
    matches, so a plain class gives the same answer at C speed. Left alone under pydantic 1, or
    when the SDK no longer has the name."""
    from openai import _models

    if getattr(_models, "PYDANTIC_V1", True) or not hasattr(_models, "_ConfigProtocol"):
        return

    class NeverAPydanticV1Config:
        pass

    _models._ConfigProtocol = NeverAPydanticV1Config  # type: ignore[misc,assignment]


_cheaper_chunk_parsing()


@dataclass(frozen=True)
class ModelConfig:
    """Which LLM to call and how patiently.

    Attributes:
        base_url: ``LLM_BASE_URL``, e.g. ``"http://vllm:8000/v1"``; ``None`` selects the
            offline :class:`~agent_worker.demo.DemoChatModel`.
        api_key: ``LLM_API_KEY``; ``None`` sends a placeholder (local servers ignore it).
        model: ``LLM_MODEL``, the model name sent with every request.
        timeout_s: the longest wait to connect, for the response, and for each next
            streamed chunk (SSE keep-alive comments do not count as a chunk).
        max_retries: retries of the *request* (connection errors, 408/409/429/5xx) by
            the openai SDK before any token arrived; a stream that breaks mid-answer
            is never retried.
    """

    base_url: str | None
    api_key: str | None
    model: str = "gpt-4o-mini"
    timeout_s: float = 60.0
    max_retries: int = 0  # retries are agent_worker.resilience's: jittered, and seen by the breaker
    stream_usage: bool = False  # ask for the usage chunk (`stream_options.include_usage`)


def build_chat_model(config: ModelConfig) -> BaseChatModel:
    """Return the chat model for ``config``: streaming ChatOpenAI, or the demo model."""
    if config.base_url is None:
        return DemoChatModel()
    return ChatOpenAI(
        base_url=config.base_url,
        api_key=SecretStr(config.api_key or _PLACEHOLDER_API_KEY),
        model=config.model,
        streaming=True,
        # A Timeout object rather than a float: langchain-openai shares one cached
        # httpx client per (base_url, hashable timeout) across the whole process, and
        # that pool's keep-alive connections belong to the event loop that opened
        # them. An unhashable Timeout gives every model its own client.
        timeout=openai.Timeout(config.timeout_s),
        # httpx's read timeout restarts on every byte, keep-alive comments included;
        # this bounds the wait for actual content the same way.
        stream_chunk_timeout=config.timeout_s,
        max_retries=config.max_retries,
        # `stream_options: {"include_usage": true}` is rejected by some compatible
        # servers; ChatOpenAI already leaves it off for a custom base_url, so it is
        # asked for only when LLM_STREAM_USAGE says the endpoint takes it.
        stream_usage=config.stream_usage,
        # Chat Completions only: LC_OUTPUT_VERSION=responses/v1 or some model names
        # would otherwise route to /responses, which most compatible servers lack.
        use_responses_api=False,
        # Same string-content AIMessageChunks whatever LC_OUTPUT_VERSION says.
        output_version="v0",
    )
