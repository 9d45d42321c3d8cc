"""Several agents and MCP tools, end to end: workers advertise agents, nodes check and list them,
tool calls stream as events to every device and are stored with the answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from chorus_client.testing import ClientError
from chorus_client.testing import RecordingClient as ChorusClient

from loadtest.cluster import ClusterConfig, LocalCluster
from tests.fake_llm import FakeLLM
from tests.support import McpTestServer, get_agents, unique


@pytest.fixture(scope="module")
def tool_server() -> Iterator[McpTestServer]:
    server = McpTestServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def agents_cluster(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLM,
                   tool_server: McpTestServer) -> Iterator[LocalCluster]:
    agents = [{"name": "calc", "description": "adds numbers", "system_prompt": "You add.",
               "mcp_servers": [tool_server.url]},
              {"name": "asker", "description": "asks before it answers", "ask_user": True}]
    config = ClusterConfig(nodes=2, workers=1, nginx=False, env={
        "LLM_BASE_URL": fake_llm.base_url, "AGENTS_JSON": json.dumps(agents), "INPUT_TIMEOUT_SECONDS": "3",
    })
    with LocalCluster(tmp_path_factory.mktemp("agents"), config) as cluster:
        yield cluster


async def two_devices(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> tuple[str, ChorusClient, ChorusClient]:
    """A new user's phone on node A and laptop on node B, once the agents are advertised."""
    token = cluster.token(unique("alice"))
    await get_agents(http, cluster, token)
    phone = ChorusClient(f"ws://127.0.0.1:{cluster.node_ports[0]}/ws", token, device="phone")
    laptop = ChorusClient(f"ws://127.0.0.1:{cluster.node_ports[1]}/ws", token, device="laptop")
    await phone.connect()
    await laptop.connect()
    return token, phone, laptop


async def test_agents_are_listed_with_their_tools(agents_cluster: LocalCluster, http: aiohttp.ClientSession) -> None:
    agents = await get_agents(http, agents_cluster, agents_cluster.token(unique("alice")))
    by_name = {a["name"]: a for a in agents}
    assert set(by_name) == {"default", "calc", "asker"}
    assert by_name["calc"]["description"] == "adds numbers"
    assert {"add", "lookup_weather"} <= set(by_name["calc"]["tools"])
    assert by_name["default"]["tools"] == []
    assert "mcp_servers" not in by_name["calc"] and "system_prompt" not in by_name["calc"]


async def test_a_tool_call_streams_to_every_device_and_is_stored(
    agents_cluster: LocalCluster, http: aiohttp.ClientSession, tool_server: McpTestServer, fake_llm: FakeLLM
) -> None:
    token, phone, laptop = await two_devices(agents_cluster, http)
    try:
        ack = await phone.send('[[tool:add:{"a": 20, "b": 22}]] what is 20 + 22?', agent="calc")
        run = ack["run"]
        for device in (phone, laptop):
            end = await device.wait_run_end(run, 30)
            assert end["event"] == "run.completed"
            names = [e["event"] for e in device.events if e["run"] == run]
            assert names.index("tool.started") < names.index("tool.completed") < names.index("run.completed")
            started = next(e for e in device.events if e["run"] == run and e["event"] == "tool.started")
            completed = next(e for e in device.events if e["run"] == run and e["event"] == "tool.completed")
            assert (started["data"]["name"], started["data"]["arguments"]) == ("add", {"a": 20, "b": 22})
            assert completed["data"]["summary"] == "42" and completed["data"]["error"] is None
            assert device.run_text(run) == end["data"]["text"]
            assert "42" in end["data"]["text"]
        assert ("add", {"a": 20, "b": 22}) in tool_server.tool_calls()
        # the model was called with the calc agent's system prompt
        assert any(m == {"role": "system", "content": "You add."} for m in fake_llm.requests[-1]["messages"])
        async with http.get(f"http://127.0.0.1:{agents_cluster.node_ports[0]}/v1/conversations/"
                            f"{ack['conversation']}/messages", headers={"Authorization": f"Bearer {token}"}) as r:
            stored = (await r.json())["messages"]
        answer = stored[-1]
        assert answer["role"] == "assistant" and answer["content"] == phone.run_text(run)
        assert [(t["name"], t["arguments"], t["summary"]) for t in answer["tools"]] == [
            ("add", {"a": 20, "b": 22}, "42")]
    finally:
        await phone.close()
        await laptop.close()


async def test_an_unknown_agent_is_a_clear_error(agents_cluster: LocalCluster, http: aiohttp.ClientSession) -> None:
    token = agents_cluster.token(unique("alice"))
    await get_agents(http, agents_cluster, token)
    device = ChorusClient(f"ws://127.0.0.1:{agents_cluster.node_ports[0]}/ws", token, device="phone")
    await device.connect()
    try:
        with pytest.raises(ClientError) as info:
            await device.send("hi", agent="nope")
        assert info.value.code == "bad_request"
        assert "unknown agent 'nope'" in str(info.value) and "calc" in str(info.value)
    finally:
        await device.close()
    async with http.post(f"http://127.0.0.1:{agents_cluster.node_ports[0]}/v1/conversations",
                         json={"agent": "nope"}, headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 400
        assert "unknown agent" in (await response.json())["error"]["message"]
    async with http.post(f"http://127.0.0.1:{agents_cluster.node_ports[0]}/v1/conversations",
                         json={"agent": "calc"}, headers={"Authorization": f"Bearer {token}"}) as response:
        assert response.status == 201


async def test_a_question_reaches_every_device_and_the_first_answer_resumes_the_run(
    agents_cluster: LocalCluster, http: aiohttp.ClientSession, fake_llm: FakeLLM
) -> None:
    _, phone, laptop = await two_devices(agents_cluster, http)
    try:
        ack = await phone.send('[[tool:ask_user:{"question": "Which city?"}]] plan my trip', agent="asker")
        run = ack["run"]

        def asked(device: ChorusClient) -> dict[str, Any] | None:
            return next((e for e in device.events if e["run"] == run and e["event"] == "run.input_required"), None)

        for device in (phone, laptop):
            await device.wait_for(lambda d=device: asked(d) is not None, 20)
        question = asked(laptop)
        assert question is not None and question["data"]["prompt"] == "Which city?"
        request = question["data"]["request"]
        reply = await laptop.respond(run, request, "Paris")
        assert reply["type"] == "ack"
        with pytest.raises(ClientError) as info:
            await phone.respond(run, request, "Rome")
        assert info.value.code == "conflict" and "laptop" in str(info.value)
        for device in (phone, laptop):
            end = await device.wait_run_end(run, 30)
            assert end["event"] == "run.completed"
            received = [e for e in device.events if e["run"] == run and e["event"] == "run.input_received"]
            assert [(e["data"]["by"], e["data"]["text"]) for e in received] == [("laptop", "Paris")]
            assert "Paris" in end["data"]["text"] and "Rome" not in end["data"]["text"]
            assert not [e for e in device.events if e["run"] == run and e["event"].startswith("tool.")]
        # the model got the answer as the ask_user tool's result
        assert any(m.get("role") == "tool" and m.get("content") == "Paris" for m in fake_llm.requests[-1]["messages"])
        with pytest.raises(ClientError) as info:
            await laptop.respond(run, request, "too late")
        assert info.value.code == "conflict"
    finally:
        await phone.close()
        await laptop.close()


async def test_an_unanswered_question_fails_the_run_after_the_timeout(
    agents_cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    token = agents_cluster.token(unique("alice"))
    await get_agents(http, agents_cluster, token)
    phone = ChorusClient(f"ws://127.0.0.1:{agents_cluster.node_ports[0]}/ws", token, device="phone")
    await phone.connect()
    try:
        ack = await phone.send('[[tool:ask_user:{"question": "Anyone?"}]] hello', agent="asker")
        end = await phone.wait_run_end(ack["run"], 30)
        assert end["event"] == "run.failed" and end["data"]["code"] == "input_timeout"
    finally:
        await phone.close()
