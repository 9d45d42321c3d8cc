"""The agent graph a worker runs, and the stream of items it exposes.

Without tools the graph is one node, ``agent``, calling the chat model over the
conversation. With tools it is the usual tool loop::

    START -> agent --(tool calls, at most max_tool_rounds)--> tools -> agent -> ... -> END

``agent`` calls the model with the tools bound (OpenAI ``tools``); ``tools`` runs every tool
call of the model's last message, concurrently, and answers each with a ``ToolMessage``. A
tool that fails is answered with its error (the model reads it and carries on), never raised.
After ``max_tool_rounds`` rounds the model is called with ``tool_choice="none"``, so a run
always ends in a text answer however eager the model is.

The conversation lives in Postgres and is passed in whole for every run, so LangGraph holds no
state between runs. Within a run, a graph that may ask its user (``ask_user``) keeps its state in
a checkpointer, per run (the worker's: Postgres, so a paused run resumes on any worker).

:func:`stream_answer` reads the graph with ``stream_mode=["messages", "custom", "updates"]``:
LangGraph forwards every ``AIMessageChunk`` of the ``agent`` node's model calls as it arrives
(yielded as :class:`Text`), and the ``tools`` node writes :class:`ToolStarted` /
:class:`ToolCompleted` into the custom stream as calls begin and end. A graph of an agent's own
gets the same items from what its nodes return (tool calls of AI messages, the ``ToolMessage``
answering each), and whatever else it writes into the custom stream is passed on to devices as
``run.custom`` (:class:`protocol.events.RunCustom`).

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
always come before the first piece of *that* model call (a later call, after a tool
round, may fail after earlier text). Anything else (e.g. an unexpected status such as
422 arrives as a plain ``openai.APIStatusError``) is a bug or misconfiguration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
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
    ToolMessage,
)
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, tool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.config import get_stream_writer
from langgraph.errors import GraphBubbleUp
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command, interrupt
from pydantic import BaseModel

from agent_worker.mcp_client import summarize
from protocol.events import RunCustom, custom_value

log = logging.getLogger(__name__)

AGENT_NODE = "agent"
"""Name of the node whose model tokens :func:`stream_answer` forwards."""
TOOLS_NODE = "tools"
"""Name of the node that runs tool calls (only in graphs built with tools)."""
DEFAULT_MAX_TOOL_ROUNDS = 4

AgentGraph: TypeAlias = CompiledStateGraph[MessagesState, None, MessagesState, MessagesState]


@dataclass(frozen=True)
class Text:
    """A piece of the answer's text; the pieces of a run concatenate to the whole answer."""

    text: str


@dataclass(frozen=True)
class ToolStarted:
    """The model called a tool. ``arguments`` are as the model gave them (``{}`` if unparseable)."""

    call_id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolCompleted:
    """A tool call ended: ``summary`` is the start of its result, ``error`` says why it failed."""

    call_id: str
    name: str
    summary: str
    error: str | None = None


@dataclass(frozen=True)
class InputRequired:
    """The graph paused for the user (LangGraph ``interrupt``): resume it with the answer to
    ``prompt`` by calling :func:`stream_answer` again with the same ``thread``, ``resume`` and
    ``checkpoint`` (the checkpoint the graph paused at: resuming from it again, after a worker
    died mid-way, replays the same step with the same answer)."""

    request: str
    prompt: str
    checkpoint: str | None = None


@dataclass(frozen=True)
class Resumption:
    """How a paused run goes on: its user's ``answer`` to the question asked at ``checkpoint``."""

    answer: str
    checkpoint: str | None = None


@dataclass(frozen=True)
class Usage:
    """Tokens one model call counted (its stream's ``usage_metadata``, where the provider reports
    it); a run's are the sum of its calls'."""

    prompt_tokens: int
    completion_tokens: int


Item: TypeAlias = Text | ToolStarted | ToolCompleted | InputRequired | Usage | RunCustom
"""What :func:`stream_answer` yields. A payload the graph wrote to its custom stream has no meaning
to Chorus: it is yielded as the event devices get (``run.custom``), its value made JSON."""


ASK_USER = "ask_user"


class InputTimeout(Exception):
    """A run asked the user a question and no device answered in time.

    (Not a TimeoutError: that is an OSError, which the worker takes for an infrastructure
    outage and retries.)"""


@tool(ASK_USER)
def ask_user_tool(question: str) -> str:
    """Ask the user a question and wait for their answer. Use it when you need a decision or a
    fact only the user has."""
    answer = interrupt({"question": question})
    return str(answer)


def build_graph(
    model: BaseChatModel,
    *,
    system_prompt: str | None = None,
    tools: Sequence[BaseTool] = (),
    max_tool_rounds: int = DEFAULT_MAX_TOOL_ROUNDS,
    ask_user: bool = False,
    checkpointer: BaseCheckpointSaver[str] | None = None,
) -> AgentGraph:
    """Compile the agent graph over ``MessagesState``.

    Args:
        model: the chat model the ``agent`` node calls (see ``build_chat_model``); with
            ``tools`` it must support ``bind_tools`` (ChatOpenAI does, the demo model not).
        system_prompt: sent as the first message of every model call; it is not
            written into the graph state, so it never shows up in the output.
        tools: offered to the model; none gives exactly ``START -> agent -> END``.
        max_tool_rounds: how many times one run may go through ``tools``; the model
            call after the last round may not call tools.
        ask_user: offer the ``ask_user`` tool, which pauses the run for the user (human in
            the loop); the graph then keeps its state in `checkpointer` (in memory when None),
            per ``thread``.
    """
    prefix: list[BaseMessage] = [SystemMessage(system_prompt)] if system_prompt else []
    builder = StateGraph(MessagesState)
    if ask_user:
        tools = [*tools, ask_user_tool]
    if not tools:

        async def agent(state: MessagesState, config: RunnableConfig) -> dict[str, list[AnyMessage]]:
            # Passing `config` on keeps LangGraph's streaming callback attached to the
            # model call even where contextvars do not flow into the node's task.
            reply = await model.ainvoke([*prefix, *state["messages"]], config)
            return {"messages": [reply]}

        builder.add_node(AGENT_NODE, agent)
        builder.add_edge(START, AGENT_NODE)
        builder.add_edge(AGENT_NODE, END)
        return builder.compile()

    with_tools = model.bind_tools(tools)
    # Still *offered* (the history holds tool calls and results), but not callable.
    last_word = model.bind_tools(tools, tool_choice="none")

    async def agent_with_tools(state: MessagesState, config: RunnableConfig) -> dict[str, list[AnyMessage]]:
        callable_ = with_tools if _tool_rounds(state["messages"]) < max_tool_rounds else last_word
        reply = await callable_.ainvoke([*prefix, *state["messages"]], config)
        return {"messages": [reply]}

    def route(state: MessagesState) -> str:
        last = state["messages"][-1]
        wants_tools = isinstance(last, AIMessage) and bool(last.tool_calls or last.invalid_tool_calls)
        # A model that calls tools despite tool_choice="none" is cut off here.
        return TOOLS_NODE if wants_tools and _tool_rounds(state["messages"]) <= max_tool_rounds else END

    builder.add_node(AGENT_NODE, agent_with_tools)
    builder.add_node(TOOLS_NODE, _tools_node(tools))
    builder.add_edge(START, AGENT_NODE)
    builder.add_conditional_edges(AGENT_NODE, route, [TOOLS_NODE, END])
    builder.add_edge(TOOLS_NODE, AGENT_NODE)
    return builder.compile(checkpointer=(checkpointer or InMemorySaver()) if ask_user else None)


def _tools_node(tools: Sequence[BaseTool]) -> Any:
    """The ``tools`` node: ``async (state, config) -> {"messages": [ToolMessage, ...]}``.

    (``Any``: LangGraph's node protocols want the parameter names, which a ``Callable``
    type cannot state.)
    """
    by_name = {tool.name: tool for tool in tools}

    async def run_tools(state: MessagesState, config: RunnableConfig) -> dict[str, list[AnyMessage]]:
        last = state["messages"][-1]
        assert isinstance(last, AIMessage)
        write = get_stream_writer()
        calls: list[tuple[str, str, dict[str, Any], str | None]] = [
            (call["id"] or "", call["name"], call["args"], None) for call in last.tool_calls
        ]
        # Every call the model made needs an answer, or the next request is invalid.
        calls += [
            (call["id"] or "", call["name"] or "", {}, f"invalid arguments: {call['error'] or call['args']}")
            for call in last.invalid_tool_calls
        ]
        for call_id, name, arguments, _ in calls:
            if name != ASK_USER:  # the question travels as InputRequired, not as a tool call
                write(ToolStarted(call_id=call_id, name=name, arguments=arguments))

        async def one(call_id: str, name: str, arguments: dict[str, Any], error: str | None) -> ToolMessage:
            content = ""
            tool = by_name.get(name)
            if error is None and tool is None:
                error = f"unknown tool {name!r}"
            elif error is None and tool is not None:
                try:
                    content = _as_text(await tool.ainvoke(arguments, config))
                except GraphBubbleUp:
                    raise  # ask_user's interrupt: the run pauses here
                except Exception as exc:  # told to the model, which may recover; the run goes on
                    log.warning("tool %s failed: %r", name, exc)
                    error = str(exc) or type(exc).__name__
            if name != ASK_USER:
                write(ToolCompleted(call_id=call_id, name=name, summary=summarize(content),
                                    error=None if error is None else summarize(error)))
            if error is not None:
                return ToolMessage(f"Error: {error}", tool_call_id=call_id, name=name, status="error")
            return ToolMessage(content, tool_call_id=call_id, name=name)

        replies = await asyncio.gather(*(one(*call) for call in calls))
        return {"messages": list(replies)}

    return run_tools


def _tool_rounds(messages: Sequence[BaseMessage]) -> int:
    """How many times the model called tools since the user's last message."""
    rounds = 0
    for message in reversed(messages):
        if isinstance(message, HumanMessage):
            break
        if isinstance(message, AIMessage) and (message.tool_calls or message.invalid_tool_calls):
            rounds += 1
    return rounds


def _as_text(output: Any) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, ToolMessage):
        return str(output.text)
    return str(output)


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


async def stream_answer(
    graph: AgentGraph, history: Sequence[tuple[str, str]], *, thread: str | None = None,
    resume: str | None = None, checkpoint: str | None = None, node: str | None = AGENT_NODE,
) -> AsyncGenerator[Item, None]:
    """Run ``graph`` over ``history`` and yield the answer's text and tool calls as they happen.

    Args:
        graph: from :func:`build_graph`.
        history: the conversation, oldest first; the last entry is the user's new
            message. Roles are ``"user"`` and ``"assistant"``.

    Yields:
        :class:`Text` for the non-empty text of each ``AIMessageChunk`` of every ``agent``
        model call, in order (their concatenation is the whole answer, text written before
        and after tool rounds included); :class:`ToolStarted` when the ``tools`` node starts
        a call and :class:`ToolCompleted` when that call ends (calls of one round run
        concurrently, so completions may come in any order); a :class:`RunCustom` for each
        other payload a node writes with ``get_stream_writer()`` (see :func:`_custom`).

    Raises:
        ValueError: ``history`` has a role other than ``"user"``/``"assistant"``.
        langchain_core.exceptions.ModelError: the LLM call failed (tree in the
            module docstring). Tool failures are not raised (see :class:`ToolCompleted`).

    ``node``: the node whose model output is the answer (:func:`build_graph`'s ``agent``); None for
    a graph of the agent's own (``AgentSpec.graph``): every node's AI messages are the answer,
    streamed chunks and the whole messages a node returns without streaming them alike, and its
    tool calls are those its nodes return: a :class:`ToolStarted` for each of an ``AIMessage``'s
    ``tool_calls`` once its node ended, a :class:`ToolCompleted` for the ``ToolMessage`` answering
    it (``langgraph.prebuilt.ToolNode``'s, or any node's), its ``error`` the message's text when
    its ``status`` is ``"error"``. A call the graph also reports itself in the custom stream (as
    :func:`build_graph`'s ``tools`` node does) is yielded once, whichever comes first.

    Human in the loop: with a graph built with ``ask_user=True``, the stream ends with an
    :class:`InputRequired` when the model asks the user; pass the same ``thread`` (one per run),
    the user's answer as ``resume`` and the question's ``checkpoint`` to continue from there (in
    this process or any other sharing the checkpointer).

    Cancelling the task while it awaits the next item, or ``aclose()``-ing this
    generator, cancels the node and closes the model's HTTP response (or the tool's
    request), so the LLM stops generating. A consumer that can be cancelled (or can stop)
    while doing something else between items, e.g. publishing one, must hold the
    generator in ``contextlib.aclosing``: otherwise the request lives on until garbage
    collection.
    """
    config: RunnableConfig = {"configurable": {"thread_id": thread}} if thread else {}
    if thread and checkpoint and resume is not None:
        config["configurable"]["checkpoint_id"] = checkpoint
    start: Any = Command(resume=resume) if resume is not None else {"messages": to_messages(history)}
    questions: list[InputRequired] = []
    # astream is an async generator function, though annotated as an AsyncIterator.
    stream = cast(
        AsyncGenerator[Any, None],
        graph.astream(start, config, stream_mode=["messages", "custom", "updates"]),
    )
    # aclosing: tear LangGraph's run down here, in this task, not whenever the
    # generator happens to be garbage-collected.
    streamed: set[str] = set()  # ids of the messages whose chunks came (node=None)
    calls = _ToolCalls()  # node=None
    async with aclosing(stream):
        try:
            async for mode, payload in stream:
                if mode == "updates":
                    for paused in payload.get("__interrupt__", ()) if isinstance(payload, dict) else ():
                        value = paused.value if isinstance(paused.value, dict) else {"question": paused.value}
                        question = InputRequired(request=paused.id, prompt=str(value.get("question", "")))
                        questions.append(question)
                    if node is None:
                        for call in calls.returned(payload):
                            yield call
                    continue
                if mode == "custom":
                    if isinstance(payload, ToolStarted | ToolCompleted):
                        if node is not None or calls.first(payload):
                            yield payload
                    elif (custom := _custom(payload)) is not None:
                        yield custom
                    continue
                message, metadata = _unpack(payload)
                whole = isinstance(message, AIMessage) and not isinstance(message, AIMessageChunk)
                if node is None and whole:
                    # A graph of the agent's own may answer from a node that calls no model:
                    # LangGraph emits its message whole (one it streamed comes again by id).
                    if message.id not in streamed and message.text:
                        yield Text(str(message.text))
                    continue
                if (node is not None and metadata.get("langgraph_node") != node) or not isinstance(
                        message, AIMessageChunk):
                    # Whole AIMessages are LangGraph re-emitting finished outputs
                    # (deduplicated against the chunks by id), never new text;
                    # ToolMessages come from the tools node.
                    continue
                if message.id:
                    streamed.add(message.id)
                text = str(message.text)
                if text:
                    yield Text(text)
                if message.usage_metadata:
                    yield usage_of(message)
            if questions and thread:
                # The graph stopped at its interrupt: the checkpoint it stopped at is where the
                # answer resumes it (read after the stream, when LangGraph has saved it).
                paused_at = (await graph.aget_state({"configurable": {"thread_id": thread}})).config
                at = paused_at.get("configurable", {}).get("checkpoint_id")
                questions = [dataclasses.replace(q, checkpoint=at) for q in questions]
            for question in questions:
                yield question
        except TimeoutError as exc:
            # langchain-openai's stream_chunk_timeout raises a bare TimeoutError
            # subclass; keep the contract "every LLM failure is a ModelError".
            raise ModelTimeoutError(str(exc)) from exc


async def stream_model(
    model: BaseChatModel, history: Sequence[tuple[str, str]], *, system_prompt: str | None = None
) -> AsyncGenerator[Item, None]:
    """What :func:`stream_answer` yields for the graph without tools (``START -> agent -> END``),
    streamed from the model directly: the same :class:`Text` items, errors and cancellation,
    without LangGraph's per-chunk callbacks, which cost more CPU per token than the model client
    itself (issue 15: 70-140 µs of 210). Only for an agent without tools or ``ask_user``.

    ChatOpenAI's ``stream_chunk_timeout`` is kept, but watched by one :class:`_StallWatch` per
    stream instead of ChatOpenAI's ``asyncio.wait_for`` per chunk, which runs every chunk in a
    task of its own (issue 15: a tenth of the worker's CPU at 50 runs)."""
    prefix: list[BaseMessage] = [SystemMessage(system_prompt)] if system_prompt else []
    timeout_s = getattr(model, "stream_chunk_timeout", None)
    if timeout_s:
        model = model.model_copy(update={"stream_chunk_timeout": None})
    stream = cast(AsyncGenerator[Any, None], model.astream([*prefix, *to_messages(history)]))
    watch = _StallWatch(timeout_s) if timeout_s else None
    async with aclosing(stream):
        try:
            async for chunk in stream:
                if watch is not None:
                    watch.last = watch.loop.time()
                text = str(chunk.text)
                if text:
                    yield Text(text)
                if chunk.usage_metadata:
                    yield usage_of(chunk)
        except asyncio.CancelledError:
            if watch is not None and watch.fired():
                raise ModelTimeoutError(f"no chunk from the model for {timeout_s}s") from None
            raise
        except TimeoutError as exc:
            raise ModelTimeoutError(str(exc)) from exc
        finally:
            if watch is not None:
                watch.close()


def usage_of(chunk: AIMessageChunk) -> Usage:
    usage = chunk.usage_metadata
    return Usage(usage["input_tokens"], usage["output_tokens"]) if usage else Usage(0, 0)


class _StallWatch:
    """Cancels the task reading a stream once no chunk came for `timeout_s`. One timer per
    stream, re-armed only when it goes off (the reader just stores the time of each chunk);
    the reader turns the cancellation into its timeout error when :meth:`fired`."""

    def __init__(self, timeout_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.timeout_s = timeout_s
        self.last = self.loop.time()
        self._stalled = False
        self._timer = self.loop.call_at(self.last + timeout_s, self._check)

    def _check(self) -> None:
        due = self.last + self.timeout_s
        if self.loop.time() < due:
            self._timer = self.loop.call_at(due, self._check)
        elif self.task is not None:
            self._stalled = True
            self.task.cancel()

    def fired(self) -> bool:
        """Whether this watch's cancellation is the one being raised (and not someone else's too):
        takes the cancellation back, as `asyncio.timeout` does."""
        if not self._stalled or self.task is None:
            return False
        self._stalled = False
        return self.task.uncancel() == 0

    def close(self) -> None:
        self._timer.cancel()


class _ToolCalls:
    """The tool calls of a graph of an agent's own, each started and completed once: a call shows
    in what its nodes return, and may also be written into the custom stream."""

    def __init__(self) -> None:
        self.started: dict[str, str] = {}  # call id -> tool name
        self.completed: set[str] = set()

    def first(self, item: ToolStarted | ToolCompleted) -> bool:
        """Whether `item` is the first report of its call's start (or end); remembers it."""
        if isinstance(item, ToolStarted):
            if item.call_id in self.started:
                return False
            self.started[item.call_id] = item.name
            return True
        if item.call_id in self.completed:
            return False
        self.completed.add(item.call_id)
        return True

    def returned(self, update: Any) -> list[ToolStarted | ToolCompleted]:
        """The calls started and ended in one ``updates`` payload (``{node: what it returned}``)."""
        items: list[ToolStarted | ToolCompleted] = []
        for message in _messages_in(update, _UPDATE_DEPTH):
            if isinstance(message, AIMessage):
                items += [ToolStarted(call_id=call["id"] or "", name=call["name"], arguments=call["args"])
                          for call in message.tool_calls if call["name"] != ASK_USER]
            elif isinstance(message, ToolMessage) and message.name != ASK_USER:
                call, text = message.tool_call_id, summarize(str(message.text))
                failed = message.status == "error"
                items.append(ToolCompleted(call_id=call, name=message.name or self.started.get(call, ""),
                                           summary="" if failed else text, error=text if failed else None))
        return [item for item in items if self.first(item)]


# {node: update}, an update being a dict of channels, a Command, or a list of those; a channel
# holds a message or a list of them. Deeper is a node's own data, not walked.
_UPDATE_DEPTH = 5


def _messages_in(value: Any, depth: int) -> list[BaseMessage]:
    if isinstance(value, BaseMessage):
        return [value]
    if depth == 0:
        return []
    if isinstance(value, Command):
        value = value.update
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [message for item in value for message in _messages_in(item, depth - 1)]
    return []


def _custom(payload: Any) -> RunCustom | None:
    """A payload a graph wrote to its custom stream, as the ``run.custom`` event devices get; None
    (and a log line) when it has no JSON form or is over the event's limits
    (``protocol.events.custom_value``): a graph's payload never fails its run."""
    try:
        return RunCustom(value=custom_value(payload, default=_jsonable))
    except Exception as exc:  # ValueError, or whatever a model_dump raised
        log.warning("a custom stream event (%s) was dropped: %s", type(payload).__name__, exc)
        return None


def _jsonable(obj: Any) -> Any:
    """What ``json`` cannot encode by itself, in a form it can: pydantic models (LangChain's
    messages among them) and dataclasses as their fields, sets as lists."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, set | frozenset):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _unpack(item: Any) -> tuple[Any, dict[str, Any]]:
    # stream_mode="messages" yields (message, metadata) pairs.
    message, metadata = item
    return message, metadata if isinstance(metadata, dict) else {}
