"""The built-in offline demo model, used when no ``LLM_BASE_URL`` is configured.

A fresh install has no LLM to talk to, yet the whole pipeline (worker, fan-out,
WebSocket nodes, resume) should be demonstrable. :class:`DemoChatModel` is a real
langchain-core chat model that streams a short, deterministic answer derived from
the conversation, one word-ish token every ``delay_s`` seconds, so it exercises the
same streaming path as a real model at a realistic pace.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

_QUOTE_MAX_WORDS = 12
_TOKEN = re.compile(r"\S+\s*")


def split_tokens(text: str) -> list[str]:
    """Split ``text`` into word-ish tokens that concatenate back to exactly ``text``.

    Each token is a word plus its trailing whitespace; leading whitespace, if any,
    is glued to the first token so nothing is lost.
    """
    tokens = _TOKEN.findall(text)
    lead = len(text) - len(text.lstrip())
    if lead and tokens:
        tokens[0] = text[:lead] + tokens[0]
    elif lead:
        tokens = [text]
    return tokens


def demo_answer(messages: Sequence[BaseMessage]) -> str:
    """Return the demo model's full answer to ``messages`` (pure, deterministic).

    It quotes (a prefix of) the user's last message, counts the user turns and says
    a few sentences about what Chorus does; 40-80 tokens long.
    """
    user_texts = [str(m.text) for m in messages if isinstance(m, HumanMessage)]
    turns = len(user_texts)
    words = user_texts[-1].split() if user_texts else []
    quote = " ".join(words[:_QUOTE_MAX_WORDS]) + (" ..." if len(words) > _QUOTE_MAX_WORDS else "")
    opening = f'You said: "{quote}".' if quote else "You sent an empty message."
    plural = "turn" if turns == 1 else "turns"
    return (
        f"{opening} This conversation has {turns} user {plural} so far. "
        "I am the Chorus demo model, answering because no LLM_BASE_URL is configured. "
        "Each word you see is streamed through Redis to every WebSocket node, so all of "
        "your open devices receive the same tokens in the same order. Reload the page or "
        "open a second tab mid-answer and the stream resumes where you left off."
    )


class DemoChatModel(BaseChatModel):
    """A deterministic chat model that streams :func:`demo_answer` word by word.

    Streams one token per ``delay_s`` seconds (``asyncio.sleep`` on the async path,
    so a cancelled run stops immediately). Non-streaming calls return the same text.
    """

    model_name: str = "chorus-demo"
    delay_s: float = 0.03

    @property
    def _llm_type(self) -> str:
        return "chorus-demo"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name}

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return _result(demo_answer(messages))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return _result(demo_answer(messages))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        tokens = split_tokens(demo_answer(messages))
        for i, token in enumerate(tokens):
            if i:
                time.sleep(self.delay_s)
            chunk = _chunk(token)
            # langchain-core >= 1.x fires on_llm_new_token itself and passes no
            # run_manager here; older cores pass one and expect the model to fire it.
            if run_manager:
                run_manager.on_llm_new_token(token, chunk=chunk)
            yield chunk
        yield _usage(messages, tokens)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        tokens = split_tokens(demo_answer(messages))
        for i, token in enumerate(tokens):
            if i:
                await asyncio.sleep(self.delay_s)
            chunk = _chunk(token)
            if run_manager:
                await run_manager.on_llm_new_token(token, chunk=chunk)
            yield chunk
        yield _usage(messages, tokens)


def _chunk(token: str) -> ChatGenerationChunk:
    return ChatGenerationChunk(message=AIMessageChunk(content=token))


def _usage(messages: list[BaseMessage], answer: list[str]) -> ChatGenerationChunk:
    """The last chunk, as a provider reporting usage sends it: no text, the counts (the demo's
    tokens are its words)."""
    prompt = sum(len(split_tokens(str(m.content))) for m in messages)
    usage = UsageMetadata(input_tokens=prompt, output_tokens=len(answer), total_tokens=prompt + len(answer))
    return ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=usage))


def _result(text: str) -> ChatResult:
    return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])
