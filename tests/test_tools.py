"""MCP tools end to end: a real MCP server (the `mcp` package's), our client over the package's
ClientSession, the agent registry, and ChatOpenAI against the fake LLM asking for tool calls in
OpenAI's streaming format. The session's life (restarts, cancellation) is in test_mcp_session.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent_worker.agents import AgentRegistry, agents_from_env
from agent_worker.graph import Item, Text, ToolCompleted, ToolStarted
from agent_worker.mcp_client import McpClient, McpError, McpRpcError, summarize
from common.config import SettingError
from loadtest.procs import free_port
from runs.agents import UnknownAgent
from tests.fake_llm import FakeLLM
from tests.support import WAIT_S, McpTestServer, text_of, weather

# How MCPServer reports a ToolError to the caller.
ATLANTIS = "Error executing tool lookup_weather: no weather station in Atlantis"


@pytest.fixture(params=["sse", "json"])
def mcp_server(request: pytest.FixtureRequest) -> Iterator[McpTestServer]:
    """The server answering with event streams, or with plain JSON bodies."""
    server = McpTestServer(json_response=request.param == "json")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fake_llm() -> Iterator[FakeLLM]:
    with FakeLLM(token_delay_s=0.002) as fake:
        yield fake


@pytest.fixture
async def client(mcp_server: McpTestServer) -> AsyncIterator[McpClient]:
    mcp = McpClient(mcp_server.url, timeout_s=WAIT_S)
    yield mcp
    await mcp.aclose()


async def collect(stream: AsyncIterator[Item]) -> list[Item]:
    async with asyncio.timeout(WAIT_S):
        return [item async for item in stream]


# -- the MCP client --------------------------------------------------------------------------


async def test_client_lists_the_servers_tools(client: McpClient, mcp_server: McpTestServer) -> None:
    tools = {tool.name: tool for tool in await client.list_tools()}

    assert set(tools) == {"add", "lookup_weather", "crash", "slow"}
    assert tools["add"].description == "Add two integers."
    assert tools["add"].input_schema["required"] == ["a", "b"]
    assert tools["add"].input_schema["properties"]["a"]["type"] == "integer"
    assert client.session_id is not None
    assert mcp_server.methods == ["initialize", "notifications/initialized", "tools/list"]


async def test_client_calls_a_tool(client: McpClient, mcp_server: McpTestServer) -> None:
    result = await client.call_tool("add", {"a": 2, "b": 40})

    assert (result.text, result.is_error, result.structured) == ("42", False, {"result": 42})
    assert mcp_server.tool_calls() == [("add", {"a": 2, "b": 40})]


async def test_a_tool_failure_is_a_result_not_an_exception(client: McpClient) -> None:
    failed = await client.call_tool("lookup_weather", {"city": "Atlantis"})
    crashed = await client.call_tool("crash", {})

    assert (failed.is_error, failed.text) == (True, ATLANTIS)
    assert crashed.is_error and "crash" in crashed.text


async def test_long_results_are_summarised_for_events(client: McpClient) -> None:
    result = await client.call_tool("lookup_weather", {"city": "Paris"})

    assert len(result.text) > 400
    assert result.summary.startswith("Sunny, 21 C in Paris; light wind")
    assert len(result.summary) == 200 and result.summary.endswith("…")
    assert summarize("  short \n text ") == "short text"


async def test_a_jsonrpc_error_is_raised_with_its_code(client: McpClient) -> None:
    with pytest.raises(McpRpcError) as caught:
        await client.request("no/such/method")

    assert caught.value.code == -32601
    assert client.url in str(caught.value)


async def test_an_expired_session_is_opened_again(client: McpClient, mcp_server: McpTestServer) -> None:
    await client.list_tools()
    first = client.session_id
    assert first is not None
    # The server forgets the session (as after a restart): DELETE it behind the client's back.
    async with httpx.AsyncClient(timeout=WAIT_S) as http:
        gone = await http.delete(mcp_server.url, headers={"Mcp-Session-Id": first})
    assert gone.status_code == 200

    result = await client.call_tool("add", {"a": 1, "b": 1})

    assert result.text == "2"
    assert client.session_id not in (None, first)
    assert mcp_server.methods.count("initialize") == 2


async def test_a_stateless_server_works_without_a_session() -> None:
    server = McpTestServer(json_response=True, stateless=True)
    server.start()
    mcp = McpClient(server.url, timeout_s=WAIT_S)
    try:
        assert "add" in [tool.name for tool in await mcp.list_tools()]
        assert (await mcp.call_tool("add", {"a": 3, "b": 4})).text == "7"
        assert mcp.session_id is None
    finally:
        await mcp.aclose()
        server.stop()


async def test_a_slow_server_times_out(mcp_server: McpTestServer) -> None:
    mcp = McpClient(mcp_server.url, timeout_s=0.3)
    try:
        await mcp.list_tools()
        started = time.monotonic()
        with pytest.raises(McpError, match=r"tools/call: no answer within 0.3 s"):
            await mcp.call_tool("slow", {"seconds": 5})
        assert time.monotonic() - started < 2.0
    finally:
        await mcp.aclose()


async def test_an_unreachable_server_or_wrong_path_is_a_clear_error(mcp_server: McpTestServer) -> None:
    closed = f"http://127.0.0.1:{free_port()}/mcp"
    wrong_path = mcp_server.url.replace("/mcp", "/nope")
    for url, message in [(closed, "initialize: cannot connect"), (wrong_path, "initialize: HTTP 404")]:
        mcp = McpClient(url, timeout_s=WAIT_S)
        try:
            with pytest.raises(McpError, match=message) as caught:
                await mcp.list_tools()
            assert str(caught.value).startswith(url)
        finally:
            await mcp.aclose()


# -- agents with MCP tools, ChatOpenAI against the fake LLM ----------------------------------


def registry_with_tools(
    fake_llm: FakeLLM, *servers: str, relist_after_s: float = 30.0, **extra: Any
) -> AgentRegistry:
    agents = [{"name": "weather", "description": "Knows the weather", "mcp_servers": list(servers), **extra}]
    specs = agents_from_env({"LLM_BASE_URL": fake_llm.base_url, "LLM_API_KEY": "sk-secret",
                             "LLM_MODEL": "fake-model", "AGENTS_JSON": json.dumps(agents)})
    return AgentRegistry(specs, mcp_timeout_s=WAIT_S, relist_after_s=relist_after_s)


async def test_an_agent_calls_an_mcp_tool_and_answers_with_its_result(
    fake_llm: FakeLLM, mcp_server: McpTestServer
) -> None:
    registry = registry_with_tools(fake_llm, mcp_server.url)
    try:
        history = [("user", 'weather? [[tool:lookup_weather:{"city": "Paris"}]]')]
        items = await collect(registry.answer("weather", history))
    finally:
        await registry.aclose()

    call_id = next(item.call_id for item in items if isinstance(item, ToolStarted))
    kinds = [type(item) for item in items]
    assert kinds.index(ToolStarted) < kinds.index(ToolCompleted)
    assert [item for item in items if not isinstance(item, Text)] == [
        ToolStarted(call_id=call_id, name="lookup_weather", arguments={"city": "Paris"}),
        ToolCompleted(call_id=call_id, name="lookup_weather",
                      summary=summarize(weather("Paris"))),
    ]
    assert isinstance(items[0], Text) and isinstance(items[-1], Text)
    assert text_of(items).startswith("Calling lookup_weather. Tool said: Sunny, 21 C in Paris;")
    # The MCP server really ran the call, and the model saw the whole result.
    assert mcp_server.tool_calls() == [("lookup_weather", {"city": "Paris"})]
    assert "tools/call" in mcp_server.methods
    tool_message = fake_llm.requests[-1]["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["content"].endswith("Details follow. ")
    offered = {tool["function"]["name"]: tool["function"] for tool in fake_llm.requests[0]["tools"]}
    assert set(offered) == {"add", "lookup_weather", "crash", "slow"}
    assert offered["lookup_weather"]["parameters"]["required"] == ["city"]


async def test_a_failing_mcp_tool_gives_an_error_event_and_the_run_still_answers(
    fake_llm: FakeLLM, mcp_server: McpTestServer
) -> None:
    registry = registry_with_tools(fake_llm, mcp_server.url)
    try:
        history = [("user", '[[tool:lookup_weather:{"city": "Atlantis"}]] [[tool:crash:{}]]')]
        items = await collect(registry.answer("weather", history))
    finally:
        await registry.aclose()

    completed = {item.name: item for item in items if isinstance(item, ToolCompleted)}
    assert completed["lookup_weather"].error == ATLANTIS
    assert completed["crash"].error is not None and "crash" in completed["crash"].error
    assert f"Tool said: Error: {ATLANTIS}." in text_of(items)
    assert {name for name, _ in mcp_server.tool_calls()} == {"lookup_weather", "crash"}


async def test_tool_lists_are_fetched_once_per_server(fake_llm: FakeLLM, mcp_server: McpTestServer) -> None:
    registry = registry_with_tools(fake_llm, mcp_server.url)
    try:
        for a in range(3):
            history = [("user", f'[[tool:add:{{"a": {a}, "b": 1}}]]')]
            items = await collect(registry.answer("weather", history))
            assert text_of(items).endswith(f"Tool said: {a + 1}.")
        await registry.describe()
    finally:
        await registry.aclose()

    assert mcp_server.methods.count("tools/list") == 1
    assert mcp_server.methods.count("initialize") == 1
    assert mcp_server.methods.count("tools/call") == 3


async def test_an_unreachable_tool_server_is_left_out_and_asked_again_later(fake_llm: FakeLLM) -> None:
    port = free_port()
    registry = registry_with_tools(fake_llm, f"http://127.0.0.1:{port}/mcp", relist_after_s=0)
    server = McpTestServer(port=port)
    try:
        [described] = [a for a in await registry.describe() if a["name"] == "weather"]
        assert described["tools"] == [] and described["tools_error"] == "1 of 1 tool servers unreachable"
        # Without its tools the agent still answers (and offers the model none).
        items = await collect(registry.answer("weather", [("user", "hello")]))
        assert text_of(items).startswith("Echo: hello.")
        assert "tools" not in fake_llm.requests[-1]

        server.start()
        items = await collect(registry.answer("weather", [("user", '[[tool:add:{"a": 2, "b": 2}]]')]))
        assert text_of(items).endswith("Tool said: 4.")
        [described] = [a for a in await registry.describe() if a["name"] == "weather"]
        assert described["tools_error"] is None and "add" in described["tools"]
    finally:
        await registry.aclose()
        server.stop()


async def test_an_unreachable_tool_server_is_not_asked_again_too_soon(fake_llm: FakeLLM) -> None:
    port = free_port()
    registry = registry_with_tools(fake_llm, f"http://127.0.0.1:{port}/mcp", relist_after_s=60)
    server = McpTestServer(port=port)
    try:
        await collect(registry.answer("weather", [("user", "first")]))
        server.start()
        items = await collect(registry.answer("weather", [("user", '[[tool:add:{"a": 2, "b": 2}]]')]))
    finally:
        await registry.aclose()
        server.stop()

    assert text_of(items).startswith("Echo: ")  # no tools offered: the server was not asked again
    assert server.methods == []


async def test_cancelling_a_run_during_an_mcp_tool_call_ends_it_promptly(
    fake_llm: FakeLLM, mcp_server: McpTestServer
) -> None:
    registry = registry_with_tools(fake_llm, mcp_server.url)
    started = asyncio.Event()

    async def consume() -> None:
        async for item in registry.answer("weather", [("user", '[[tool:slow:{"seconds": 30}]]')]):
            if isinstance(item, ToolStarted):
                started.set()

    try:
        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), WAIT_S)
        assert await asyncio.to_thread(mcp_server.slow_started.wait, WAIT_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2.0)
    finally:
        await registry.aclose()
    assert mcp_server.tool_calls() == [("slow", {"seconds": 30})]


# -- the registry ------------------------------------------------------------------------------


async def test_the_default_agent_has_no_tools_and_answers_as_before(fake_llm: FakeLLM) -> None:
    registry = AgentRegistry.from_env({"LLM_BASE_URL": fake_llm.base_url, "AGENT_SYSTEM_PROMPT": "Be brief."})
    try:
        items = await collect(registry.answer(None, [("user", "hi")]))
        again = await collect(registry.answer("default", [("user", "hi")]))
    finally:
        await registry.aclose()

    assert all(isinstance(item, Text) for item in items)
    assert text_of(items) == text_of(again) == "Echo: hi. This is fake answer number 1 from the test model."
    assert "tools" not in fake_llm.requests[0]
    assert fake_llm.requests[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert registry.names() == ["default"]


async def test_each_agent_has_its_own_prompt_and_model(fake_llm: FakeLLM) -> None:
    agents = [{"name": "pirate", "system_prompt": "Talk like a pirate.", "model": "pirate-model"}]
    registry = AgentRegistry.from_env({"LLM_BASE_URL": fake_llm.base_url, "AGENTS_JSON": json.dumps(agents)})
    try:
        await collect(registry.answer("pirate", [("user", "ahoy")]))
        await collect(registry.answer("default", [("user", "hello")]))
    finally:
        await registry.aclose()

    pirate, default = fake_llm.requests
    assert (pirate["model"], pirate["messages"][0]["content"]) == ("pirate-model", "Talk like a pirate.")
    assert default["model"] == "gpt-4o-mini"
    assert default["messages"][0]["content"] == "You are a helpful assistant."


def test_an_unknown_agent_is_a_clear_error_before_anything_runs() -> None:
    registry = AgentRegistry.from_env({"AGENTS_JSON": '[{"name": "helper"}]'})

    with pytest.raises(UnknownAgent, match=r"unknown agent 'nope' \(known: default, helper\)") as caught:
        registry.answer("nope", [("user", "hi")])
    assert (caught.value.name, caught.value.known) == ("nope", ("default", "helper"))
    assert isinstance(caught.value, LookupError)


async def test_describe_lists_agents_models_and_tools_without_secrets(
    fake_llm: FakeLLM, mcp_server: McpTestServer
) -> None:
    registry = registry_with_tools(fake_llm, mcp_server.url, system_prompt="secret prompt")
    try:
        described = await registry.describe()
    finally:
        await registry.aclose()

    assert described == [
        {"pool": "default", "version": None, "weight": 1.0, "name": "default", "description": "",
         "model": "fake-model", "tools": [], "tools_error": None},
        {"pool": "weather", "version": None, "weight": 1.0, "name": "weather", "description": "Knows the weather",
         "model": "fake-model", "tools": ["add", "lookup_weather", "crash", "slow"], "tools_error": None},
    ]
    shown = json.dumps(described)
    assert "sk-secret" not in shown and "secret prompt" not in shown and "127.0.0.1" not in shown


# -- configuration -----------------------------------------------------------------------------


def test_agents_inherit_the_llm_settings_and_keys_go_only_where_meant() -> None:
    env = {
        "LLM_BASE_URL": "http://llm:8000/v1", "LLM_API_KEY": "main-key", "LLM_MODEL": "big",
        "LLM_TIMEOUT_SECONDS": "20", "AGENT_MAX_TOOL_ROUNDS": "3", "OTHER_KEY": "other-key",
        "AGENT_MCP_SERVERS": "http://a:1/mcp, http://b:2/mcp",
        "AGENTS_JSON": json.dumps([
            {"name": "same", "description": "d"},
            {"name": "elsewhere", "base_url": "http://other:9/v1", "model": "small"},
            {"name": "keyed", "base_url": "http://other:9/v1", "api_key_env": "OTHER_KEY", "timeout_s": 5,
             "max_tool_rounds": 0, "mcp_servers": ["http://c:3/mcp"]},
            {"name": "offline", "base_url": None},
        ]),
    }
    default, same, elsewhere, keyed, offline = agents_from_env(env)

    assert (default.name, default.mcp_servers, default.max_tool_rounds) == (
        "default", ("http://a:1/mcp", "http://b:2/mcp"), 3)
    assert (default.model.base_url, default.model.api_key, default.model.model, default.model.timeout_s) == (
        "http://llm:8000/v1", "main-key", "big", 20.0)
    assert (same.model, same.mcp_servers, same.max_tool_rounds) == (default.model, (), 3)
    assert same.description == "d"
    assert (elsewhere.model.base_url, elsewhere.model.api_key, elsewhere.model.model) == (
        "http://other:9/v1", None, "small")
    assert (keyed.model.api_key, keyed.model.timeout_s, keyed.max_tool_rounds, keyed.mcp_servers) == (
        "other-key", 5.0, 0, ("http://c:3/mcp",))
    assert offline.model.base_url is None


def test_an_agent_named_default_replaces_the_built_in_one() -> None:
    specs = agents_from_env({"AGENTS_JSON": '[{"name": "x"}, {"name": "default", "system_prompt": "Hi."}]'})

    assert [(spec.name, spec.system_prompt) for spec in specs] == [
        ("default", "Hi."), ("x", "You are a helpful assistant.")]


def test_agents_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "agents.json"
    path.write_text('[{"name": "from-file"}]')

    assert [spec.name for spec in agents_from_env({"AGENTS_FILE": str(path)})] == ["default", "from-file"]


@pytest.mark.parametrize(("agents_json", "message"), [
    ("[{", "not valid JSON"),
    ('{"name": "x"}', "expected a JSON list of agents, got dict"),
    ('["x"]', "agent #1: expected an object, got str"),
    ('[{"description": "no name"}]', "agent #1: name must match"),
    ('[{"name": "has space"}]', "agent #1: name must match"),
    ('[{"name": "a"}, {"name": "a"}]', "two agents are 'a'"),
    ('[{"name": "a", "prompt": "typo"}]', "agent #1 (a): unknown keys ['prompt']"),
    ('[{"name": "a", "max_tool_rounds": "3"}]', "agent #1 (a): max_tool_rounds must be an integer"),
    ('[{"name": "a", "max_tool_rounds": 99}]', "agent #1 (a): max_tool_rounds must be an integer 0..50"),
    ('[{"name": "a", "timeout_s": 0}]', "agent #1 (a): timeout_s must be a number"),
    ('[{"name": "a", "mcp_servers": "http://x/mcp"}]', "agent #1 (a): mcp_servers must be a list"),
    ('[{"name": "a", "mcp_servers": ["ftp://x"]}]', "agent #1 (a): mcp_servers expected an http"),
    ('[{"name": "a", "base_url": "llm:80"}]', "agent #1 (a): base_url expected an http"),
    ('[{"name": "a", "api_key_env": "UNSET_KEY"}]', "api_key_env names UNSET_KEY, which is not set"),
    ('[{"name": "a", "model": ""}]', "agent #1 (a): model must be a model name"),
    ('[{"name": "a", "system_prompt": 3}]', "agent #1 (a): system_prompt must be a string"),
    ('[{"name": "a", "base_url": null, "mcp_servers": ["http://x/mcp"]}]', "the offline demo model cannot"),
])
def test_invalid_agents_json_names_the_variable(agents_json: str, message: str) -> None:
    env = {"LLM_BASE_URL": "http://llm/v1", "AGENTS_JSON": agents_json}
    with pytest.raises(SettingError, match=r"^AGENTS_JSON: ") as caught:
        AgentRegistry.from_env(env)
    assert message in str(caught.value)


@pytest.mark.parametrize(("env", "message"), [
    ({"AGENTS_FILE": "/nonexistent/agents.json"}, "AGENTS_FILE: cannot read /nonexistent/agents.json"),
    ({"AGENTS_JSON": "[]", "AGENTS_FILE": "/x"}, "AGENTS_JSON: set AGENTS_JSON or AGENTS_FILE, not both"),
    ({"AGENT_MCP_SERVERS": "http://x/mcp"}, "AGENT_MCP_SERVERS: tools need an LLM"),
    ({"LLM_BASE_URL": "http://llm/v1", "AGENT_MCP_SERVERS": "x/mcp"}, "AGENT_MCP_SERVERS: expected an http"),
    ({"AGENT_MAX_TOOL_ROUNDS": "many"}, "AGENT_MAX_TOOL_ROUNDS: expected an integer"),
    ({"MCP_TIMEOUT_SECONDS": "0"}, "MCP_TIMEOUT_SECONDS: must be at least 0.1"),
    ({"LLM_BASE_URL": "llm:8000"}, "LLM_BASE_URL: expected an http"),
])
def test_other_agent_settings_errors_name_their_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingError) as caught:
        AgentRegistry.from_env(env)
    assert str(caught.value).startswith(message)


def test_agents_file_with_invalid_json_names_agents_file(tmp_path: Path) -> None:
    path = tmp_path / "agents.json"
    path.write_text("[{]")

    with pytest.raises(SettingError, match=r"^AGENTS_FILE: not valid JSON"):
        agents_from_env({"AGENTS_FILE": str(path)})
