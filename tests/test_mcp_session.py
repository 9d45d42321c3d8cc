"""The MCP client's session over the `mcp` package, against real `mcp` servers: opened once and
shared by calls from many tasks, opened again after a server restart, clear errors, and calls
that fail, time out or are cancelled leaving the session usable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from agent_worker.mcp_client import McpClient, McpError
from loadtest.procs import free_port
from tests.support import WAIT_S, McpTestServer


@pytest.fixture(params=["sse", "json"])
def mcp_server(request: pytest.FixtureRequest) -> Iterator[McpTestServer]:
    """The server answering with event streams, or with plain JSON bodies."""
    server = McpTestServer(json_response=request.param == "json")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def client(mcp_server: McpTestServer) -> AsyncIterator[McpClient]:
    mcp = McpClient(mcp_server.url, timeout_s=WAIT_S)
    yield mcp
    await mcp.aclose()


async def test_calls_from_many_tasks_share_one_session(client: McpClient, mcp_server: McpTestServer) -> None:
    async with asyncio.timeout(WAIT_S):
        results = await asyncio.gather(*(client.call_tool("add", {"a": a, "b": 1}) for a in range(5)))
        # Another task, after those have ended: the session outlives the tasks that used it.
        tools = await asyncio.create_task(client.list_tools())

    assert [result.text for result in results] == ["1", "2", "3", "4", "5"]
    assert "add" in {tool.name for tool in tools}
    assert mcp_server.methods.count("initialize") == 1
    assert mcp_server.methods.count("tools/call") == 5


async def test_a_server_restart_mid_session_opens_a_new_session() -> None:
    port = free_port()
    first = McpTestServer(port=port)
    first.start()
    mcp = McpClient(first.url, timeout_s=WAIT_S)
    second = McpTestServer(port=port)
    try:
        assert (await mcp.call_tool("add", {"a": 1, "b": 2})).text == "3"
        before = mcp.session_id
        first.stop()  # the new process knows nothing of the old session
        second.start()

        result = await mcp.call_tool("add", {"a": 2, "b": 2})

        assert result.text == "4"
        assert mcp.session_id not in (None, before)
        # Its first request (the call, or the GET stream reconnecting) got 404; the call ran once.
        last_call = max(i for i, method in enumerate(second.methods) if method == "tools/call")
        assert "initialize" in second.methods[:last_call]
        assert second.tool_calls() == [("add", {"a": 2, "b": 2})]
    finally:
        await mcp.aclose()
        second.stop()


async def test_an_unreachable_server_is_an_error_and_is_tried_again_on_the_next_call() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    mcp = McpClient(url, timeout_s=WAIT_S)
    server = McpTestServer(port=port)
    try:
        with pytest.raises(McpError, match=r"initialize: cannot connect") as caught:
            await mcp.call_tool("add", {"a": 1, "b": 1})
        assert str(caught.value).startswith(url)

        server.start()
        assert (await mcp.call_tool("add", {"a": 1, "b": 1})).text == "2"
    finally:
        await mcp.aclose()
        server.stop()


async def test_a_failing_tool_is_a_result_and_the_session_goes_on(
    client: McpClient, mcp_server: McpTestServer
) -> None:
    failed = await client.call_tool("crash", {})
    after = await client.call_tool("add", {"a": 20, "b": 22})

    assert failed.is_error and failed.text == "Error executing tool crash"
    assert (after.is_error, after.text) == (False, "42")
    assert mcp_server.methods.count("initialize") == 1


async def test_a_call_cancelled_mid_flight_leaves_the_session_usable(
    client: McpClient, mcp_server: McpTestServer
) -> None:
    await client.list_tools()
    session = client.session_id
    call = asyncio.create_task(client.call_tool("slow", {"seconds": 30}))
    assert await asyncio.to_thread(mcp_server.slow_started.wait, WAIT_S)

    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, 2.0)
    result = await asyncio.wait_for(client.call_tool("add", {"a": 1, "b": 1}), WAIT_S)

    assert result.text == "2"
    assert client.session_id == session
    # The server was told, so it stops the slow tool instead of running it for 30 s.
    assert "notifications/cancelled" in mcp_server.methods
    assert mcp_server.methods.count("initialize") == 1


async def test_a_timed_out_call_leaves_the_session_usable(mcp_server: McpTestServer) -> None:
    mcp = McpClient(mcp_server.url, timeout_s=1.0)
    try:
        await mcp.list_tools()
        with pytest.raises(McpError, match=r"tools/call: no answer within 1 s"):
            await mcp.call_tool("slow", {"seconds": 30})
        assert (await mcp.call_tool("add", {"a": 5, "b": 5})).text == "10"
    finally:
        await mcp.aclose()
    assert mcp_server.methods.count("initialize") == 1


async def test_aclose_ends_the_session_on_the_server(mcp_server: McpTestServer) -> None:
    mcp = McpClient(mcp_server.url, timeout_s=WAIT_S)
    await mcp.list_tools()
    session = mcp.session_id
    assert session is not None

    await mcp.aclose()

    async with httpx.AsyncClient(timeout=WAIT_S) as http:
        gone = await http.post(mcp_server.url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                               headers={"Mcp-Session-Id": session, "Accept": "application/json, text/event-stream"})
    assert gone.status_code == 404
    with pytest.raises(McpError, match="the client is closed"):
        await mcp.list_tools()
