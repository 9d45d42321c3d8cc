"""The agent graph over the demo model and over ChatOpenAI against a real fake LLM server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing
from typing import Any

import httpx
import openai
import pytest
from langchain_core.exceptions import ModelAPIError, ModelConnectionError, ModelTimeoutError
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI

from agent_worker.demo import DemoChatModel, demo_answer, split_tokens
from agent_worker.graph import AgentGraph, build_graph, stream_answer, to_messages
from agent_worker.model import ModelConfig, build_chat_model
from tests.fake_llm import FakeLLM, split_words

WAIT_S = 10.0
History = Sequence[tuple[str, str]]


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    with FakeLLM(token_delay_s=0.005) as fake:
        yield fake


@pytest.fixture
async def make_graph(fake_llm: FakeLLM) -> AsyncIterator[Callable[..., AgentGraph]]:
    """Build graphs over ChatOpenAI pointed at ``fake_llm``; close their HTTP clients after."""
    models: list[ChatOpenAI] = []

    def make(*, system_prompt: str | None = None, **config: Any) -> AgentGraph:
        model = build_chat_model(ModelConfig(base_url=fake_llm.base_url, api_key=None, **config))
        assert isinstance(model, ChatOpenAI)
        models.append(model)
        return build_graph(model, system_prompt=system_prompt)

    yield make
    for model in models:
        await model.root_async_client.close()


async def collect(graph: AgentGraph, history: History) -> list[str]:
    async with asyncio.timeout(WAIT_S):
        return [piece async for piece in stream_answer(graph, history)]


def wire(history: History) -> list[dict[str, str]]:
    """``history`` as the OpenAI request messages the server should receive."""
    return [{"role": role, "content": text} for role, text in history]


# -- the demo model -----------------------------------------------------------------------


async def test_demo_model_streams_its_whole_answer_in_pieces() -> None:
    history = [("user", "hi"), ("assistant", "hello!"), ("user", "what is Chorus?")]
    pieces = await collect(build_graph(DemoChatModel(delay_s=0)), history)

    answer = demo_answer(to_messages(history))
    assert len(pieces) > 1
    assert "".join(pieces) == answer
    assert 40 <= len(split_tokens(answer)) <= 80
    assert '"what is Chorus?"' in answer
    assert "2 user turns" in answer


def test_demo_model_streams_synchronously_too() -> None:
    messages = [HumanMessage("sync please")]
    chunks = list(DemoChatModel(delay_s=0).stream(messages))

    assert len(chunks) > 1
    assert "".join(str(chunk.text) for chunk in chunks) == demo_answer(messages)


def test_no_base_url_selects_the_demo_model() -> None:
    model = build_chat_model(ModelConfig(base_url=None, api_key=None))

    assert isinstance(model, DemoChatModel)
    assert model.model_name == "chorus-demo"


# -- ChatOpenAI against the fake LLM --------------------------------------------------------


async def test_stream_answer_yields_the_llm_answer_incrementally(
    fake_llm: FakeLLM, make_graph: Callable[..., AgentGraph]
) -> None:
    history = [("user", "hello there [[slow:0.02]]")]
    arrivals: list[float] = []
    pieces: list[str] = []
    async with asyncio.timeout(WAIT_S):
        async for piece in stream_answer(make_graph(), history):
            arrivals.append(time.monotonic())
            pieces.append(piece)

    answer = fake_llm.answer_for(wire(history))
    assert "".join(pieces) == answer
    assert pieces == split_words(answer)
    # The server spaces the pieces 20 ms apart; a client that buffered the whole
    # response would receive them all at once.
    assert arrivals[-1] - arrivals[0] >= 0.02 * (len(pieces) - 1) * 0.8


async def test_whole_history_and_system_prompt_reach_the_llm_in_order(
    fake_llm: FakeLLM, make_graph: Callable[..., AgentGraph]
) -> None:
    history = [("user", "first"), ("assistant", "first answer"), ("user", "second")]
    pieces = await collect(make_graph(system_prompt="You are terse."), history)

    [request] = fake_llm.requests
    assert request["messages"] == [{"role": "system", "content": "You are terse."}, *wire(history)]
    assert request["stream"] is True
    assert "stream_options" not in request  # minimal servers reject it
    assert "".join(pieces) == fake_llm.answer_for(request["messages"])
    assert "number 2" in "".join(pieces)  # two user turns


async def test_cancelling_the_consumer_aborts_the_http_stream(
    fake_llm: FakeLLM, make_graph: Callable[..., AgentGraph]
) -> None:
    graph = make_graph()
    first_piece = asyncio.Event()
    received: list[str] = []

    async def consume() -> None:
        async for piece in stream_answer(graph, [("user", "[[tokens:1000]] [[slow:0.02]]")]):
            received.append(piece)
            first_piece.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_piece.wait(), WAIT_S)
    assert fake_llm.disconnects == 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT_S)

    await fake_llm.wait_until_async(lambda fake: fake.disconnects == 1, WAIT_S)
    assert len(received) < 1000


async def test_cancelling_a_consumer_busy_between_pieces_aborts_the_http_stream(
    fake_llm: FakeLLM, make_graph: Callable[..., AgentGraph]
) -> None:
    # The worker awaits Redis between pieces, so the cancel lands outside the
    # generator; aclosing() is what then closes it (and the HTTP stream) at once.
    graph = make_graph()
    first_piece = asyncio.Event()
    never = asyncio.Event()

    async def consume() -> None:
        async with aclosing(stream_answer(graph, [("user", "[[tokens:1000]] [[slow:0.02]]")])) as pieces:
            async for _ in pieces:
                first_piece.set()
                await never.wait()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_piece.wait(), WAIT_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT_S)

    await fake_llm.wait_until_async(lambda fake: fake.disconnects == 1, WAIT_S)


async def test_server_error_raises_model_api_error(
    fake_llm: FakeLLM, make_graph: Callable[..., AgentGraph]
) -> None:
    with pytest.raises(ModelAPIError) as caught:
        await collect(make_graph(max_retries=0), [("user", "boom [[status:500]]")])

    # langchain-openai's OpenAIAPIError is both the langchain-core and the SDK type.
    assert isinstance(caught.value, openai.InternalServerError)
    assert caught.value.status_code == 500
    assert len(fake_llm.requests) == 1


async def test_connection_drop_mid_answer_raises_after_the_partial_text(
    make_graph: Callable[..., AgentGraph],
) -> None:
    pieces: list[str] = []
    with pytest.raises(ModelConnectionError):
        async with asyncio.timeout(WAIT_S):
            async for piece in stream_answer(make_graph(), [("user", "[[tokens:10]] [[die_after:3]]")]):
                pieces.append(piece)

    assert pieces == ["word1 ", "word2 ", "word3 "]


async def test_silent_llm_raises_model_timeout(
    fake_llm: FakeLLM, make_graph: Callable[..., AgentGraph]
) -> None:
    with pytest.raises(ModelTimeoutError):
        await collect(make_graph(max_retries=0, timeout_s=0.2), [("user", "[[stall:30]]")])

    # The client gave up and closed the connection; the server saw it go.
    await fake_llm.wait_until_async(lambda fake: fake.disconnects == 1, WAIT_S)


def test_unknown_history_role_is_rejected() -> None:
    with pytest.raises(ValueError, match="'tool'"):
        to_messages([("tool", "x")])


# -- the fake itself (other tests and worker subprocesses rely on it) ----------------------


def test_fake_llm_serves_models_and_non_streaming_completions(fake_llm: FakeLLM) -> None:
    messages = [{"role": "user", "content": "plain"}]
    with httpx.Client(base_url=fake_llm.base_url, timeout=WAIT_S) as client:
        models = client.get("/models").json()
        completion = client.post("/chat/completions", json={"model": "m", "messages": messages}).json()

    assert models["object"] == "list"
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == fake_llm.answer_for(messages)
    assert fake_llm.answer_for(messages) == "Echo: plain. This is fake answer number 1 from the test model."
