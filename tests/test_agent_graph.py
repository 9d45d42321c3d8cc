"""The agent graph over the demo model and over ChatOpenAI against a real fake LLM server.

Tools here are plain LangChain tools (the graph is tool-agnostic); MCP tools are in test_tools.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import aclosing
from typing import Any

import httpx
import openai
import pytest
from langchain_core.exceptions import ModelAPIError, ModelConnectionError, ModelTimeoutError
from langchain_core.messages import HumanMessage
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from langchain_openai import ChatOpenAI

from agent_worker.demo import DemoChatModel, demo_answer, split_tokens
from agent_worker.graph import (
    AgentGraph,
    Item,
    Text,
    ToolCompleted,
    ToolStarted,
    Usage,
    build_graph,
    stream_answer,
    stream_model,
    to_messages,
)
from agent_worker.model import ModelConfig, build_chat_model
from tests.fake_llm import FakeLLM, split_words
from tests.support import WAIT_S, History, text_of


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    with FakeLLM(token_delay_s=0.005) as fake:
        yield fake


@pytest.fixture
async def make_graph(fake_llm: FakeLLM) -> AsyncIterator[Callable[..., AgentGraph]]:
    """Build graphs over ChatOpenAI pointed at ``fake_llm``; close their HTTP clients after."""
    models: list[ChatOpenAI] = []

    def make(
        *, system_prompt: str | None = None, tools: Sequence[BaseTool] = (), max_tool_rounds: int = 4,
        **config: Any,
    ) -> AgentGraph:
        model = build_chat_model(ModelConfig(base_url=fake_llm.base_url, api_key=None, **config))
        assert isinstance(model, ChatOpenAI)
        models.append(model)
        return build_graph(model, system_prompt=system_prompt, tools=tools, max_tool_rounds=max_tool_rounds)

    yield make
    for model in models:
        await model.root_async_client.close()


async def collect_items(graph: AgentGraph, history: History) -> list[Item]:
    async with asyncio.timeout(WAIT_S):
        return [item async for item in stream_answer(graph, history)]


async def collect(graph: AgentGraph, history: History) -> list[str]:
    """The text pieces of a run that calls no tools (and the usage the demo model reports)."""
    items = await collect_items(graph, history)
    assert all(isinstance(item, Text | Usage) for item in items), items
    return [item.text for item in items if isinstance(item, Text)]


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


async def test_demo_model_reports_its_usage_last() -> None:
    history = [("user", "hi there"), ("assistant", "hello!"), ("user", "what is Chorus?")]
    items = await collect_items(build_graph(DemoChatModel(delay_s=0)), history)
    answer = demo_answer(to_messages(history))
    prompt = sum(len(split_tokens(text)) for _, text in history)
    assert items[-1] == Usage(prompt_tokens=prompt, completion_tokens=len(split_tokens(answer)))
    assert [item for item in items if isinstance(item, Usage)] == [items[-1]]


async def test_the_endpoints_usage_is_streamed_when_asked_for(fake_llm: FakeLLM) -> None:
    history = [("user", "[[tokens:12]] hello")]
    for stream_usage, expected in ((True, [Usage(1, 12)]), (False, [])):
        model = build_chat_model(ModelConfig(base_url=fake_llm.base_url, api_key=None, stream_usage=stream_usage))
        try:
            async with asyncio.timeout(WAIT_S):
                items = [item async for item in stream_model(model, history)]
        finally:
            await model.root_async_client.close()  # type: ignore[attr-defined]
        assert [item for item in items if isinstance(item, Usage)] == expected
        assert bool(fake_llm.requests[-1].get("stream_options")) is stream_usage
        assert "".join(i.text for i in items if isinstance(i, Text)).count("word") == 12


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
        async for item in stream_answer(make_graph(), history):
            assert isinstance(item, Text)
            arrivals.append(time.monotonic())
            pieces.append(item.text)

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
        async for item in stream_answer(graph, [("user", "[[tokens:1000]] [[slow:0.02]]")]):
            assert isinstance(item, Text)
            received.append(item.text)
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
            async for item in stream_answer(make_graph(), [("user", "[[tokens:10]] [[die_after:3]]")]):
                assert isinstance(item, Text)
                pieces.append(item.text)

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


# -- tools -----------------------------------------------------------------------------------


class Toolbox:
    """Plain LangChain tools that record their calls (from the graph's thread or not)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.waiting = asyncio.Event()
        self.cancelled = threading.Event()

    def tools(self) -> list[BaseTool]:
        async def add(a: float, b: float) -> str:
            self.calls.append(("add", {"a": a, "b": b}))
            return f"{a + b:g}"

        async def fail(reason: str) -> str:
            self.calls.append(("fail", {"reason": reason}))
            raise ToolException(reason)

        async def wait() -> str:
            self.waiting.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return "never"

        return [
            StructuredTool.from_function(coroutine=add, name="add", description="Add two numbers."),
            StructuredTool.from_function(coroutine=fail, name="fail", description="Always fails."),
            StructuredTool.from_function(coroutine=wait, name="wait", description="Waits forever."),
        ]


def test_without_tools_the_graph_is_one_agent_node() -> None:
    graph = build_graph(DemoChatModel(delay_s=0))

    assert set(graph.get_graph().nodes) == {"__start__", "agent", "__end__"}


async def test_a_streamed_tool_call_runs_the_tool_and_the_answer_goes_on(
    fake_llm: FakeLLM, make_graph: Callable[..., AgentGraph]
) -> None:
    toolbox = Toolbox()
    graph = make_graph(tools=toolbox.tools(), system_prompt="Use tools.")
    items = await collect_items(graph, [("user", 'sum please [[tool:add:{"a": 2, "b": 3.5}]]')])

    started = [item for item in items if isinstance(item, ToolStarted)]
    completed = [item for item in items if isinstance(item, ToolCompleted)]
    assert started == [ToolStarted(call_id=started[0].call_id, name="add", arguments={"a": 2, "b": 3.5})]
    assert completed == [ToolCompleted(call_id=started[0].call_id, name="add", summary="5.5", error=None)]
    assert items.index(started[0]) < items.index(completed[0])
    # Text before the call (streamed with it) and the answer after the tool round.
    assert text_of(items) == "Calling add. Tool said: 5.5."
    assert isinstance(items[0], Text) and isinstance(items[-1], Text)
    assert toolbox.calls == [("add", {"a": 2, "b": 3.5})]

    first, second = fake_llm.requests
    assert [tool["function"]["name"] for tool in first["tools"]] == ["add", "fail", "wait"]
    assert first["tools"][0]["function"]["parameters"]["required"] == ["a", "b"]
    call, result = second["messages"][-2:]
    assert call["role"] == "assistant"
    assert call["tool_calls"][0]["id"] == started[0].call_id
    assert json.loads(call["tool_calls"][0]["function"]["arguments"]) == {"a": 2, "b": 3.5}
    assert result == {"role": "tool", "content": "5.5", "tool_call_id": started[0].call_id}
    assert second["messages"][0] == {"role": "system", "content": "Use tools."}


async def test_parallel_tool_calls_each_get_events_and_a_result(
    fake_llm: FakeLLM, make_graph: Callable[..., AgentGraph]
) -> None:
    toolbox = Toolbox()
    history = [("user", '[[tool:add:{"a": 1, "b": 1}]] [[tool:add:{"a": 40, "b": 2}]]')]
    items = await collect_items(make_graph(tools=toolbox.tools()), history)

    started = [item for item in items if isinstance(item, ToolStarted)]
    completed = {item.call_id: item for item in items if isinstance(item, ToolCompleted)}
    assert [item.arguments for item in started] == [{"a": 1, "b": 1}, {"a": 40, "b": 2}]
    assert len({item.call_id for item in started}) == 2
    assert [completed[item.call_id].summary for item in started] == ["2", "42"]
    assert text_of(items).endswith("Tool said: 2. Tool said: 42.")
    assert len(fake_llm.requests) == 2


async def test_a_failing_or_unknown_tool_is_reported_and_the_run_still_answers(
    fake_llm: FakeLLM, make_graph: Callable[..., AgentGraph]
) -> None:
    toolbox = Toolbox()
    history = [("user", '[[tool:fail:{"reason": "disk on fire"}]] [[tool:nope:{}]]')]
    items = await collect_items(make_graph(tools=toolbox.tools()), history)

    # Calls of one round run concurrently: completions come in any order.
    completed = sorted((item for item in items if isinstance(item, ToolCompleted)), key=lambda i: i.name)
    assert [(item.name, item.summary, item.error) for item in completed] == [
        ("fail", "", "disk on fire"), ("nope", "", "unknown tool 'nope'")]
    assert text_of(items).endswith("Tool said: Error: disk on fire. Tool said: Error: unknown tool 'nope'.")
    tool_messages = [m for m in fake_llm.requests[-1]["messages"] if m["role"] == "tool"]
    assert [m["content"] for m in tool_messages] == ["Error: disk on fire", "Error: unknown tool 'nope'"]


async def test_a_tool_call_with_broken_arguments_is_answered_with_an_error(
    fake_llm: FakeLLM, make_graph: Callable[..., AgentGraph]
) -> None:
    toolbox = Toolbox()
    items = await collect_items(make_graph(tools=toolbox.tools()), [("user", '[[tool:add:{"a": 1,}]]')])

    [started] = [item for item in items if isinstance(item, ToolStarted)]
    [completed] = [item for item in items if isinstance(item, ToolCompleted)]
    assert (started.name, started.arguments) == ("add", {})
    assert completed.call_id == started.call_id
    assert completed.error is not None and completed.error.startswith("invalid arguments")
    assert toolbox.calls == []
    # The broken call and its error both went back to the model, which answered.
    call, result = fake_llm.requests[-1]["messages"][-2:]
    assert call["tool_calls"][0]["id"] == result["tool_call_id"] == started.call_id
    assert text_of(items).startswith("Calling add. Tool said: Error: invalid arguments")


async def test_tool_rounds_are_capped_and_the_last_call_may_not_use_tools(
    fake_llm: FakeLLM, make_graph: Callable[..., AgentGraph]
) -> None:
    toolbox = Toolbox()
    history = [("user", '[[tool:add:{"a": 1, "b": 1}]] [[tool_rounds:10]]')]
    items = await collect_items(make_graph(tools=toolbox.tools(), max_tool_rounds=2), history)

    assert sum(isinstance(item, ToolStarted) for item in items) == 2
    assert len(toolbox.calls) == 2
    assert [request.get("tool_choice") for request in fake_llm.requests] == [None, None, "none"]
    assert text_of(items) == "Calling add. Calling add. Tool said: 2."


async def test_tool_rounds_start_again_with_each_user_message(
    fake_llm: FakeLLM, make_graph: Callable[..., AgentGraph]
) -> None:
    # Earlier turns' answers are plain text in the history; only this turn's rounds count.
    toolbox = Toolbox()
    history = [("user", "hi"), ("assistant", "hello"), ("user", '[[tool:add:{"a": 1, "b": 2}]]')]
    items = await collect_items(make_graph(tools=toolbox.tools(), max_tool_rounds=1), history)

    assert text_of(items) == "Calling add. Tool said: 3."


async def test_cancelling_during_a_tool_call_cancels_the_tool(
    fake_llm: FakeLLM, make_graph: Callable[..., AgentGraph]
) -> None:
    toolbox = Toolbox()
    graph = make_graph(tools=toolbox.tools())
    items: list[Item] = []

    async def consume() -> None:
        async with aclosing(stream_answer(graph, [("user", "[[tool:wait:{}]]")])) as stream:
            async for item in stream:
                items.append(item)

    task = asyncio.create_task(consume())
    await asyncio.wait_for(toolbox.waiting.wait(), WAIT_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT_S)

    assert toolbox.cancelled.is_set()
    assert [type(item) for item in items if not isinstance(item, Text)] == [ToolStarted]
    assert len(fake_llm.requests) == 1


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


def test_fake_llm_streams_tool_calls_in_the_openai_format(fake_llm: FakeLLM) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    body: dict[str, Any] = {"model": "m", "stream": True, "tools": tools,
            "messages": [{"role": "user", "content": 'go [[tool:lookup:{"city": "Paris", "days": 3}]]'}]}
    with httpx.Client(base_url=fake_llm.base_url, timeout=WAIT_S) as client:
        with client.stream("POST", "/chat/completions", json=body) as response:
            chunks = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: {")]
        plain = client.post("/chat/completions", json={**body, "stream": False}).json()
        told = client.post("/chat/completions", json={**body, "stream": False, "tool_choice": "none"}).json()

    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    calls = [delta["tool_calls"][0] for delta in deltas if "tool_calls" in delta]
    assert calls[0] == {"index": 0, "id": calls[0]["id"], "type": "function",
                        "function": {"name": "lookup", "arguments": ""}}
    pieces = [call["function"]["arguments"] for call in calls[1:]]
    assert len(pieces) > 1 and all(call["index"] == 0 and "id" not in call for call in calls[1:])
    assert json.loads("".join(pieces)) == {"city": "Paris", "days": 3}
    assert "".join(delta.get("content") or "" for delta in deltas) == "Calling lookup. "
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    [choice] = plain["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    assert told["choices"][0]["message"]["content"] == fake_llm.answer_for(body["messages"])
    assert fake_llm.answer_for(body["messages"]).startswith("Echo: go. This is")


def test_fake_llm_answers_a_tool_result_with_it(fake_llm: FakeLLM) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": '[[tool:lookup:{"city": "Oslo"}]]'},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
    ]

    assert fake_llm.answer_for(messages) == "Tool said: rain."
    assert fake_llm.tool_calls_for({"tools": [{}], "messages": messages}) == []
    first_call = fake_llm.tool_calls_for({"tools": [{}], "messages": messages[:1]})
    assert first_call == [("lookup", '{"city": "Oslo"}')]
    assert fake_llm.tool_calls_for({"messages": messages[:1]}) == []  # no tools offered


async def test_an_agent_without_tools_streams_the_same_from_the_model_as_through_the_graph(
    make_graph: Callable[..., AgentGraph], fake_llm: FakeLLM
) -> None:
    """The worker's fast path (`stream_model`) for the tool-less graph: same request, same items."""
    history = [("user", "hi"), ("assistant", "hello"), ("user", "[[tokens:40]] tell me more")]
    via_graph = await collect_items(make_graph(system_prompt="Be brief."), history)
    model = build_chat_model(ModelConfig(base_url=fake_llm.base_url, api_key=None))
    assert isinstance(model, ChatOpenAI)
    try:
        async with asyncio.timeout(WAIT_S):
            direct = [item async for item in stream_model(model, history, system_prompt="Be brief.")]
    finally:
        await model.root_async_client.close()
    assert direct == via_graph and len(direct) > 1
    # and the same request: the system prompt first, then the history
    assert fake_llm.requests[-1]["messages"] == fake_llm.requests[-2]["messages"]
    assert fake_llm.requests[-1]["messages"][0] == {"role": "system", "content": "Be brief."}


async def test_an_agent_without_tools_still_maps_a_stalled_stream_to_a_model_timeout(fake_llm: FakeLLM) -> None:
    model = build_chat_model(ModelConfig(base_url=fake_llm.base_url, api_key=None, timeout_s=0.3))
    assert isinstance(model, ChatOpenAI)
    try:
        with pytest.raises(ModelTimeoutError):
            async with asyncio.timeout(WAIT_S):
                async for _ in stream_model(model, [("user", "[[tokens:5]] [[stall:5]] hello")]):
                    pass
    finally:
        await model.root_async_client.close()


async def test_an_agent_without_tools_times_out_a_stream_that_sends_only_keepalives() -> None:
    """Bytes that are not chunks (SSE comments) keep httpx's read timeout happy; the chunk
    timeout (stream_model's own watch, not ChatOpenAI's per-chunk wait_for) must still fire."""
    from aiohttp import web

    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": "first "}}]}
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        for _ in range(200):  # 10 s of keep-alive comments, never another chunk
            await response.write(b": keepalive\n\n")
            await asyncio.sleep(0.05)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    model = build_chat_model(ModelConfig(base_url=f"http://127.0.0.1:{port}/v1", api_key=None, timeout_s=0.3))
    assert isinstance(model, ChatOpenAI)
    seen: list[Item] = []
    started = time.monotonic()
    try:
        with pytest.raises(ModelTimeoutError):
            async with asyncio.timeout(WAIT_S):
                async for item in stream_model(model, [("user", "hello")]):
                    seen.append(item)
    finally:
        await model.root_async_client.close()
        await runner.cleanup()
    assert seen == [Text("first ")]
    assert 0.3 <= time.monotonic() - started < 3.0


async def test_an_agent_without_tools_streams_on_past_the_chunk_timeout_while_chunks_come(
    fake_llm: FakeLLM,
) -> None:
    """The chunk timeout bounds the gap between chunks, not the answer: 8 chunks 0.1 s apart
    under a 0.3 s timeout take 0.8 s and complete."""
    model = build_chat_model(ModelConfig(base_url=fake_llm.base_url, api_key=None, timeout_s=0.3))
    try:
        async with asyncio.timeout(WAIT_S):
            items = [item async for item in stream_model(model, [("user", "[[tokens:8]] [[slow:0.1]] hi")])]
    finally:
        assert isinstance(model, ChatOpenAI)
        await model.root_async_client.close()
    assert "".join(item.text for item in items if isinstance(item, Text)).split() == [
        f"word{n}" for n in range(1, 9)]


async def test_cancelling_a_model_stream_is_a_cancellation_not_a_timeout(fake_llm: FakeLLM) -> None:
    model = build_chat_model(ModelConfig(base_url=fake_llm.base_url, api_key=None, timeout_s=0.3))

    async def read() -> None:
        async for _ in stream_model(model, [("user", "[[tokens:50]] [[slow:0.05]] hi")]):
            pass

    task = asyncio.create_task(read())
    try:
        await fake_llm.wait_until_async(lambda llm: len(llm.requests) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT_S)
    finally:
        assert isinstance(model, ChatOpenAI)
        await model.root_async_client.close()


def test_the_cheaper_chunk_parsing_builds_the_same_chunks() -> None:
    """agent_worker.model swaps the SDK's slow config Protocol check (see there): a streamed chunk
    must still be built exactly as pydantic validation builds it."""
    from openai.types.chat import ChatCompletionChunk

    import agent_worker.model  # noqa: F401  (applies the swap)

    data = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}]}
    built = ChatCompletionChunk.construct(**data)  # what the SDK does per streamed line
    assert built.model_dump() == ChatCompletionChunk.model_validate(data).model_dump()
    assert built.choices[0].delta.content == "hi"
