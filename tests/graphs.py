"""LangGraph graphs as a team brings its own, for the agents of tests/test_own_graphs.py (the
`graph` key of AGENTS_JSON): written against LangGraph only, as an existing agent would be."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage
from langgraph.graph import END, START, MessagesState, StateGraph

from agent_worker.agents import AgentSpec
from agent_worker.model import build_chat_model


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
