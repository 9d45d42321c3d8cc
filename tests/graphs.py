"""LangGraph graphs as a team brings its own, for the agents of tests/test_own_graphs.py (the
`graph` key of AGENTS_JSON): written against LangGraph only, as an existing agent would be."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

from agent_worker.agents import AgentSpec
from agent_worker.model import build_chat_model
from protocol.events import MAX_CUSTOM_BYTES


def _shout(state: MessagesState) -> dict[str, Any]:
    return {"messages": [AIMessage(content=str(state["messages"][-1].content).upper())]}


# Not compiled: Chorus compiles it (with its checkpointer). Its one node calls no model.
shouter = StateGraph(MessagesState)
shouter.add_node("shout", _shout)
shouter.add_edge(START, "shout")
shouter.add_edge("shout", END)

SIGNATURE = " (the writer)"


def writer(spec: AgentSpec) -> Any:
    """A factory, called with the agent's spec: a "write" node streams the agent's model, then a
    "sign" node adds a signature without one."""
    model = build_chat_model(spec.model)

    async def write(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    def sign(state: MessagesState) -> dict[str, Any]:
        return {"messages": [AIMessage(content=SIGNATURE)]}

    graph = StateGraph(MessagesState)
    graph.add_node("write", write)
    graph.add_node("sign", sign)
    graph.add_edge(START, "write")
    graph.add_edge("write", "sign")
    graph.add_edge("sign", END)
    return graph.compile()


# Custom stream events and tool calls (tests/test_own_graphs.py).

STEP_S = 0.05  # the work a `progress` step stands for
DROPPED = [object(), "x" * (MAX_CUSTOM_BYTES + 1)]  # no JSON form; over the size limit


async def _work(state: MessagesState) -> dict[str, Any]:
    """Reports each of the `steps N` the user asked for as it is done, with a payload no device may
    get between the first two."""
    match = re.search(r"steps (\d+)", str(state["messages"][-1].content))
    steps = int(match[1]) if match else 1
    write = get_stream_writer()
    for step in range(1, steps + 1):
        await asyncio.sleep(STEP_S)
        write({"step": step, "of": steps})
        if step == 1:
            for payload in DROPPED:
                write(payload)
    return {"messages": [AIMessage(content=f"did {steps} steps")]}


# Compiled: its one node writes progress into the custom stream, and answers without a model.
_progress = StateGraph(MessagesState)
_progress.add_node("work", _work)
_progress.add_edge(START, "work")
_progress.add_edge("work", END)
progress = _progress.compile()


@tool
def forecast(city: str) -> str:
    """Today's weather in a city."""
    return f"sunny in {city}"


@tool
def broken() -> str:
    """A tool whose service is down."""
    raise RuntimeError("the service is down")


def forecaster(spec: AgentSpec) -> Any:
    """A factory: :func:`tool_loop` over the agent's model."""
    return tool_loop(build_chat_model(spec.model))


def tool_loop(chat_model: BaseChatModel) -> Any:
    """The usual LangGraph tool loop (the model with tools bound, `ToolNode`, `tools_condition`),
    its model node telling the devices which round it is in."""
    model = chat_model.bind_tools([forecast, broken])

    async def think(state: MessagesState) -> dict[str, Any]:
        rounds = sum(1 for m in state["messages"] if isinstance(m, AIMessage) and m.tool_calls)
        get_stream_writer()({"stage": "thinking", "round": rounds})
        return {"messages": [await model.ainvoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("think", think)
    graph.add_node("tools", ToolNode([forecast, broken], handle_tool_errors=True))
    graph.add_edge(START, "think")
    graph.add_conditional_edges("think", tools_condition)
    graph.add_edge("tools", "think")
    return graph.compile()
