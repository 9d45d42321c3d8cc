"""The agent graph a worker runs, and the token stream it exposes.

One LangGraph node, ``agent``, calls the chat model over the conversation. The
graph is compiled without a checkpointer: the conversation lives in Postgres and is
passed in whole for every run, so LangGraph holds no state between runs.

Tokens are read with ``stream_mode="messages"``: LangGraph attaches a callback to
the model call inside the node and forwards every ``AIMessageChunk`` as the model
produces it, so :func:`stream_answer` yields text while the HTTP response is still
arriving.

Errors: every failure of the LLM call surfaces from :func:`stream_answer` as a
``langchain_core.exceptions.ModelError`` (langchain-openai's subclasses also inherit
the openai SDK's exception, so ``except openai.APIError`` works too)::

    ModelError                        .is_retryable says whether a new run may succeed
     ├── ModelRateLimitError          HTTP 429 (after the SDK's max_retries)
     ├── ModelAPIError                HTTP 5xx (after the SDK's max_retries)
     ├── ModelTimeoutError            no connection / response / next chunk within timeout_s
     ├── ModelConnectionError         connect refused, or connection dropped mid-answer
     ├── ModelAuthenticationError     HTTP 401
     ├── ModelPermissionDeniedError   HTTP 403
     ├── ModelNotFoundError           HTTP 404 (unknown model)
     ├── ModelInvalidRequestError     HTTP 400
     └── ContextOverflowError         HTTP 400 that says the context window is exceeded

Timeouts and drops can happen after some text was already yielded; HTTP statuses
always come before the first piece. Anything else (e.g. an unexpected status such as
422 arrives as a plain ``openai.APIStatusError``) is a bug or misconfiguration.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any, TypeAlias, cast

from langchain_core.exceptions import ModelTimeoutError
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    AnyMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.state import CompiledStateGraph

__all__ = ["AGENT_NODE", "AgentGraph", "build_graph", "stream_answer", "to_messages"]

AGENT_NODE = "agent"
"""Name of the node whose model tokens :func:`stream_answer` forwards."""

AgentGraph: TypeAlias = CompiledStateGraph[MessagesState, None, MessagesState, MessagesState]


def build_graph(model: BaseChatModel, *, system_prompt: str | None = None) -> AgentGraph:
    """Compile the agent graph: ``START -> agent -> END`` over ``MessagesState``.

    Args:
        model: the chat model the ``agent`` node calls (see ``build_chat_model``).
        system_prompt: sent as the first message of every model call; it is not
            written into the graph state, so it never shows up in the output.
    """
    prefix: list[BaseMessage] = [SystemMessage(system_prompt)] if system_prompt else []

    async def agent(state: MessagesState, config: RunnableConfig) -> dict[str, list[AnyMessage]]:
        # Passing `config` on keeps LangGraph's streaming callback attached to the
        # model call even where contextvars do not flow into the node's task.
        reply = await model.ainvoke([*prefix, *state["messages"]], config)
        return {"messages": [reply]}

    builder = StateGraph(MessagesState)
    builder.add_node(AGENT_NODE, agent)
    builder.add_edge(START, AGENT_NODE)
    builder.add_edge(AGENT_NODE, END)
    return builder.compile()


def to_messages(history: Sequence[tuple[str, str]]) -> list[AnyMessage]:
    """Convert ``[("user" | "assistant", text), ...]`` into LangChain messages.

    Raises:
        ValueError: on any other role.
    """
    messages: list[AnyMessage] = []
    for role, text in history:
        if role == "user":
            messages.append(HumanMessage(text))
        elif role == "assistant":
            messages.append(AIMessage(text))
        else:
            raise ValueError(f"history role must be 'user' or 'assistant', got {role!r}")
    return messages


async def stream_answer(graph: AgentGraph, history: Sequence[tuple[str, str]]) -> AsyncGenerator[str, None]:
    """Run ``graph`` over ``history`` and yield the assistant's text as it streams.

    Args:
        graph: from :func:`build_graph`.
        history: the conversation, oldest first; the last entry is the user's new
            message. Roles are ``"user"`` and ``"assistant"``.

    Yields:
        The non-empty text of each ``AIMessageChunk`` the ``agent`` node's model
        streams, in order; their concatenation is the whole answer.

    Raises:
        ValueError: ``history`` has a role other than ``"user"``/``"assistant"``.
        langchain_core.exceptions.ModelError: the LLM call failed (tree in the
            module docstring).

    Cancelling the task while it awaits the next piece, or ``aclose()``-ing this
    generator, cancels the node and closes the model's HTTP response, so the LLM
    stops generating. A consumer that can be cancelled (or can stop) while doing
    something else between pieces, e.g. publishing one, must hold the generator in
    ``contextlib.aclosing``: otherwise the request lives on until garbage collection.
    """
    # astream is an async generator function, though annotated as an AsyncIterator.
    stream = cast(
        AsyncGenerator[Any, None],
        graph.astream({"messages": to_messages(history)}, stream_mode="messages"),
    )
    # aclosing: tear LangGraph's run down here, in this task, not whenever the
    # generator happens to be garbage-collected.
    async with aclosing(stream):
        try:
            async for item in stream:
                message, metadata = _unpack(item)
                if metadata.get("langgraph_node") != AGENT_NODE or not isinstance(message, AIMessageChunk):
                    # Whole AIMessages are LangGraph re-emitting finished outputs
                    # (deduplicated against the chunks by id), never new text.
                    continue
                text = str(message.text)
                if text:
                    yield text
        except TimeoutError as exc:
            # langchain-openai's stream_chunk_timeout raises a bare TimeoutError
            # subclass; keep the contract "every LLM failure is a ModelError".
            raise ModelTimeoutError(str(exc)) from exc


def _unpack(item: Any) -> tuple[Any, dict[str, Any]]:
    # stream_mode="messages" yields (message, metadata) pairs.
    message, metadata = item
    return message, metadata if isinstance(metadata, dict) else {}
