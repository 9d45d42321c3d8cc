"""Agents with a LangGraph graph of their own (`"graph": "package.module:attribute"` in
AGENTS_JSON): tests/graphs.py's graphs streamed to devices like the built-in one, their custom
stream events (`run.custom`) and tool calls (`tool.started` / `tool.completed`) included.

The `stream_answer` tests need no cluster; the others run one (module-scoped)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import aiohttp
import pytest
from chorus_client.testing import RecordingClient as ChorusClient
from langchain_core.messages import AIMessage, HumanMessage
from langchain_openai import ChatOpenAI
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from pydantic import BaseModel

from agent_worker.agents import agents_from_env
from agent_worker.graph import (
    AGENT_NODE,
    AgentGraph,
    Item,
    Text,
    ToolCompleted,
    ToolStarted,
    build_graph,
    stream_answer,
)
from agent_worker.model import ModelConfig, build_chat_model
from common.config import SettingError
from loadtest.cluster import ClusterConfig, LocalCluster
from protocol.events import MAX_CUSTOM_BYTES, RunCustom
from tests.fake_llm import FakeLLM
from tests.graphs import SIGNATURE, broken, forecast, tool_loop
from tests.support import WAIT_S, comparable, get_agents, rest, text_of, unique

AGENTS = [{"name": "shouter", "graph": "tests.graphs:shouter"}, {"name": "writer", "graph": "tests.graphs:writer"},
          {"name": "progress", "graph": "tests.graphs:progress"},
          {"name": "forecaster", "graph": "tests.graphs:forecaster"}]
TOOLS_PLEASE = '[[tool:forecast:{"city": "Paris"}]] [[tool:broken:{}]] weather?'


@pytest.fixture(scope="module")
def teams(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLM) -> Iterator[LocalCluster]:
    config = ClusterConfig(nodes=1, workers=1, nginx=False,
                           env={"LLM_BASE_URL": fake_llm.base_url, "AGENTS_JSON": json.dumps(AGENTS)})
    with LocalCluster(tmp_path_factory.mktemp("teams"), config) as cluster:
        yield cluster


def token_text(device: ChorusClient, run: str) -> str:
    return "".join(e["data"]["text"] for e in device.events if e["run"] == run and e["event"] == "token")


async def test_an_own_graph_is_streamed_to_the_device(teams: LocalCluster, http: aiohttp.ClientSession) -> None:
    token = teams.token(unique("alice"))
    assert {a["name"] for a in await get_agents(http, teams, token)} == {"default", *(a["name"] for a in AGENTS)}
    device = ChorusClient(f"ws://127.0.0.1:{teams.node_ports[0]}/ws", token, device="phone")
    await device.connect()
    try:
        # A StateGraph Chorus compiles; its node returns a whole message without a model.
        ack = await device.send("hello there", agent="shouter")
        end = await device.wait_run_end(ack["run"], 30)
        assert end["event"] == "run.completed" and end["data"]["text"] == "HELLO THERE"
        assert token_text(device, ack["run"]) == "HELLO THERE"

        # A factory's graph: one node streams the agent's model token by token, the next signs.
        ack = await device.send("[[tokens:10]] [[slow:0.02]] write", agent="writer")
        end = await device.wait_run_end(ack["run"], 30)
        words = " ".join(f"word{i}" for i in range(1, 11))
        assert end["event"] == "run.completed" and end["data"]["text"] == words + SIGNATURE
        assert token_text(device, ack["run"]) == words + SIGNATURE
        tokens = [e for e in device.events if e["run"] == ack["run"] and e["event"] == "token"]
        assert len(tokens) >= 3, "streamed, not one whole message"
        assert device.gaps == [] and device.duplicates == 0
    finally:
        await device.close()


@pytest.mark.parametrize(("graph", "error"), [
    ("tests.graphs", "package.module:attribute"),
    ("tests.no_such_module:graph", "No module named"),
    ("tests.graphs:nothing", "has no attribute"),
])
def test_a_graph_that_cannot_be_loaded_stops_the_worker_at_start(graph: str, error: str) -> None:
    with pytest.raises(SettingError, match=error) as raised:
        agents_from_env({"AGENTS_JSON": json.dumps([{"name": "mine", "graph": graph}])})
    assert "AGENTS_JSON" in str(raised.value)


# stream_answer over graphs of an agent's own (node=None)


async def items_of(graph: AgentGraph, history: Sequence[tuple[str, str]], node: str | None = None) -> list[Item]:
    async with asyncio.timeout(WAIT_S):
        return [item async for item in stream_answer(graph, history, node=node)]


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Source(BaseModel):
    title: str
    pages: list[int]


AT_THE_LIMIT = "x" * (MAX_CUSTOM_BYTES - 2)  # with its quotes, exactly MAX_CUSTOM_BYTES of JSON
DROP = object()
# (what a node writes, what devices get, or DROP)
WRITTEN: list[tuple[Any, Any]] = [
    ({"stage": "plan", "steps": [1, 2]}, {"stage": "plan", "steps": [1, 2]}),
    (object(), DROP),
    ("searching", "searching"),
    (Point(1, 2), {"x": 1, "y": 2}),
    (Source(title="Dune", pages=[3]), {"title": "Dune", "pages": [3]}),
    (float("nan"), DROP),
    ({"seen": {"a"}, 7: (1, 2.5)}, {"seen": ["a"], "7": [1, 2.5]}),
    (AT_THE_LIMIT + "x", DROP),
    (AT_THE_LIMIT, AT_THE_LIMIT),
    (None, None),
]


async def test_a_graphs_custom_payloads_are_yielded_in_order_as_json(caplog: pytest.LogCaptureFixture) -> None:
    async def work(state: MessagesState) -> dict[str, Any]:
        write = get_stream_writer()
        for payload, _ in WRITTEN:
            write(payload)
        return {"messages": [AIMessage(content="done")]}

    graph = StateGraph(MessagesState)
    graph.add_node("work", work)
    graph.add_edge(START, "work")
    graph.add_edge("work", END)
    with caplog.at_level(logging.WARNING, logger="agent_worker.graph"):
        items = await items_of(graph.compile(), [("user", "go")])

    kept = [value for _, value in WRITTEN if value is not DROP]
    assert items == [*(RunCustom(value=value) for value in kept), Text("done")]
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 3
    assert "no JSON form" in dropped[0] and "no JSON form" in dropped[1]
    assert f"over the {MAX_CUSTOM_BYTES} allowed" in dropped[2]


def decide_loop(decide: Any) -> AgentGraph:
    """`decide` (a node, no model) -> ToolNode -> `decide` ... while it calls tools."""
    graph = StateGraph(MessagesState)
    graph.add_node("decide", decide)
    graph.add_node("tools", ToolNode([forecast, broken], handle_tool_errors=True))
    graph.add_edge(START, "decide")
    graph.add_conditional_edges("decide", tools_condition)
    graph.add_edge("tools", "decide")
    return graph.compile()


def call_twice(state: MessagesState) -> dict[str, Any]:
    if isinstance(state["messages"][-1], HumanMessage):
        calls = [{"id": "c1", "name": "forecast", "args": {"city": "Oslo"}}, {"id": "c2", "name": "broken", "args": {}}]
        return {"messages": [AIMessage(content="Looking. ", tool_calls=calls)]}
    return {"messages": [AIMessage(content="Done.")]}


async def test_an_own_graphs_tool_calls_are_yielded_from_the_messages_its_nodes_return() -> None:
    items = await items_of(decide_loop(call_twice), [("user", "weather?")])

    failure = next(item for item in items if isinstance(item, ToolCompleted) and item.call_id == "c2")
    assert failure.error is not None and "the service is down" in failure.error
    assert items == [
        Text("Looking. "),
        ToolStarted(call_id="c1", name="forecast", arguments={"city": "Oslo"}),
        ToolStarted(call_id="c2", name="broken", arguments={}),
        ToolCompleted(call_id="c1", name="forecast", summary="sunny in Oslo", error=None),
        ToolCompleted(call_id="c2", name="broken", summary="", error=failure.error),
        Text("Done."),
    ]
    # The built-in graph's path (a node named) takes tool calls only from its custom stream.
    named = await items_of(decide_loop(call_twice), [("user", "weather?")], node=AGENT_NODE)
    assert not [item for item in named if isinstance(item, ToolStarted | ToolCompleted)]


async def test_a_call_a_graph_also_reports_itself_is_yielded_once() -> None:
    def report_too(state: MessagesState) -> dict[str, Any]:
        reply = call_twice(state)
        if isinstance(state["messages"][-1], HumanMessage):
            write = get_stream_writer()  # before the node returns its calls, and again after
            write(ToolStarted(call_id="c1", name="forecast", arguments={"city": "Oslo"}))
            write(ToolCompleted(call_id="c1", name="forecast", summary="early", error=None))
        return reply

    items = await items_of(decide_loop(report_too), [("user", "weather?")])
    tools = [item for item in items if isinstance(item, ToolStarted | ToolCompleted)]
    assert [(type(item).__name__, item.call_id) for item in tools] == [
        ("ToolStarted", "c1"), ("ToolCompleted", "c1"), ("ToolStarted", "c2"), ("ToolCompleted", "c2")]
    assert tools[1] == ToolCompleted(call_id="c1", name="forecast", summary="early", error=None)


@pytest.fixture
async def model(fake_llm: FakeLLM) -> AsyncIterator[ChatOpenAI]:
    """ChatOpenAI on the fake LLM; its HTTP client closed after the test."""
    chat = build_chat_model(ModelConfig(base_url=fake_llm.base_url, api_key=None))
    assert isinstance(chat, ChatOpenAI)
    yield chat
    await chat.root_async_client.close()


async def test_a_streamed_tool_loop_yields_its_calls_custom_events_and_text_in_order(model: ChatOpenAI) -> None:
    items = await items_of(tool_loop(model), [("user", TOOLS_PLEASE)])  # tests.graphs.forecaster's graph

    started = [item for item in items if isinstance(item, ToolStarted)]
    assert [(item.name, item.arguments) for item in started] == [("forecast", {"city": "Paris"}), ("broken", {})]
    completed = [item for item in items if isinstance(item, ToolCompleted)]
    assert [(item.call_id, item.summary, item.error is None) for item in completed] == [
        (started[0].call_id, "sunny in Paris", True), (started[1].call_id, "", False)]
    first, last = (items.index(item) for item in (started[0], completed[-1]))
    assert text_of(items[:first]) == "Calling forecast, broken. "  # streamed before the calls
    assert items[0] == RunCustom(value={"stage": "thinking", "round": 0})
    assert items[last + 1] == RunCustom(value={"stage": "thinking", "round": 1})
    assert text_of(items[last:]).startswith("Tool said: sunny in Paris. Tool said: Error: ")
    # Chorus's own graph run as an own graph: its tools node writes each call, its agent node returns it.
    builtin = build_graph(model, tools=[forecast])
    history = [("user", '[[tool:forecast:{"city": "Oslo"}]]')]
    own, named = await items_of(builtin, history), await items_of(builtin, history, node=AGENT_NODE)
    assert [type(item) for item in own] == [type(item) for item in named]
    assert [(type(item).__name__, item.name) for item in own if isinstance(item, ToolStarted | ToolCompleted)] == [
        ("ToolStarted", "forecast"), ("ToolCompleted", "forecast")]


# Devices


def run_events(device: ChorusClient, run: str) -> list[dict[str, Any]]:
    return [e for e in device.events if e["run"] == run]


def custom_values(device: ChorusClient, run: str) -> list[Any]:
    return [e["data"]["value"] for e in run_events(device, run) if e["event"] == "run.custom"]


@pytest.fixture
async def two_devices(teams: LocalCluster) -> AsyncIterator[tuple[ChorusClient, ChorusClient]]:
    """A phone and a laptop of one new user, connected to the node."""
    token = teams.token(unique("carol"))
    url = f"ws://127.0.0.1:{teams.node_ports[0]}/ws"
    phone, laptop = ChorusClient(url, token, device="phone"), ChorusClient(url, token, device="laptop")
    await phone.connect()
    await laptop.connect()
    try:
        yield phone, laptop
    finally:
        await phone.close()
        await laptop.close()


async def test_two_devices_see_a_graphs_custom_events_and_tool_calls_alike(
    teams: LocalCluster, http: aiohttp.ClientSession, two_devices: tuple[ChorusClient, ChorusClient],
) -> None:
    phone, laptop = two_devices
    ack = await phone.send(TOOLS_PLEASE, agent="forecaster")
    run = ack["run"]
    end = await phone.wait_run_end(run, 30)
    await laptop.wait_run_end(run, 30)

    events = run_events(phone, run)
    assert comparable(events) == comparable(run_events(laptop, run))
    assert end["event"] == "run.completed" and end["data"]["text"] == token_text(phone, run)
    calls = {e["data"]["name"]: e["data"]["call"] for e in events if e["event"] == "tool.started"}
    failed = next(e["data"]["error"] for e in events if e["event"] == "tool.completed" and e["data"]["name"] == "broken")
    assert "the service is down" in failed
    assert [(e["event"], e["data"]) for e in events if e["event"] in ("run.custom", "tool.started", "tool.completed")] == [
        ("run.custom", {"value": {"stage": "thinking", "round": 0}}),
        ("tool.started", {"call": calls["forecast"], "name": "forecast", "arguments": {"city": "Paris"}}),
        ("tool.started", {"call": calls["broken"], "name": "broken", "arguments": {}}),
        ("tool.completed", {"call": calls["forecast"], "name": "forecast", "summary": "sunny in Paris", "error": None}),
        ("tool.completed", {"call": calls["broken"], "name": "broken", "summary": "", "error": failed}),
        ("run.custom", {"value": {"stage": "thinking", "round": 1}}),
    ]
    first_call = next(i for i, e in enumerate(events) if e["event"] == "tool.started")
    assert "".join(e["data"]["text"] for e in events[:first_call] if e["event"] == "token") == "Calling forecast, broken. "
    for device in (phone, laptop):
        shown = device.client.store.run(run)
        assert shown is not None and shown.custom == ({"stage": "thinking", "round": 0}, {"stage": "thinking", "round": 1})
        assert [(t.name, t.summary, t.done) for t in shown.tools] == [("forecast", "sunny in Paris", True),
                                                                       ("broken", "", True)]
    # The calls are stored with the answer; the custom events are not.
    status, page = await rest(http, teams.http_url, phone.token, "GET", f"/v1/conversations/{ack['conversation']}/messages")
    assert status == 200
    answer = page["messages"][-1]
    assert answer["run"] == run and [(t["call"], t["summary"], t["error"]) for t in answer["tools"]] == [
        (calls["forecast"], "sunny in Paris", None), (calls["broken"], "", failed)]


async def test_a_graphs_progress_resumes_on_a_device_that_reconnects_mid_run(
    two_devices: tuple[ChorusClient, ChorusClient],
) -> None:
    phone, laptop = two_devices
    ack = await phone.send("steps 10", agent="progress")
    run = ack["run"]
    await laptop.wait_for(lambda: len(custom_values(laptop, run)) >= 1, 20)
    await laptop.drop()
    await phone.wait_for(lambda: len(custom_values(phone, run)) >= 4, 20)  # sent while the laptop was away
    assert len(custom_values(laptop, run)) < 4
    await laptop.connect()
    await phone.wait_run_end(run, 30)
    await laptop.wait_run_end(run, 30)

    steps = [{"step": step, "of": 10} for step in range(1, 11)]  # tests.graphs.DROPPED never shows
    assert custom_values(phone, run) == custom_values(laptop, run) == steps
    assert comparable(run_events(laptop, run)) == comparable(run_events(phone, run))
    assert laptop.connects == 2 and laptop.gaps == [] and laptop.duplicates == 0
    shown = laptop.client.store.run(run)
    assert shown is not None and shown.custom == tuple(steps) and shown.text == "did 10 steps"


async def test_no_custom_event_passes_the_cancel_fence(two_devices: tuple[ChorusClient, ChorusClient]) -> None:
    phone, laptop = two_devices
    ack = await phone.send("steps 60", agent="progress")  # 3 s of steps
    run = ack["run"]
    await laptop.wait_for(lambda: len(custom_values(laptop, run)) >= 2, 20)
    await laptop.cancel(run)
    end = await phone.wait_run_end(run, 30)
    await laptop.wait_run_end(run, 30)

    assert end["event"] == "run.cancelled"
    customs = [e for e in run_events(phone, run) if e["event"] == "run.custom"]
    assert 2 <= len(customs) < 60
    assert max(e["seq"] for e in customs) <= end["data"]["stopped_at"] < end["seq"]
    assert run_events(phone, run)[-1] is end
    assert comparable(run_events(phone, run)) == comparable(run_events(laptop, run))
