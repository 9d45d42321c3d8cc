"""Named agents: a registry of (system prompt, model, MCP tools) chosen per conversation.

The agent ``"default"`` comes from the ``LLM_*`` / ``AGENT_*`` variables; more agents (or a
replacement ``default``) from ``AGENTS_JSON`` (the JSON text) or ``AGENTS_FILE`` (a path to
it): a list of objects ::

    [{"name": "researcher",                     required; [A-Za-z0-9][A-Za-z0-9_.-]{0,63}
      "description": "Looks things up",         shown by GET /v1/agents
      "system_prompt": "You research ...",      default AGENT_SYSTEM_PROMPT
      "model": "gpt-4o",                        default LLM_MODEL
      "base_url": "http://vllm:8000/v1",        default LLM_BASE_URL (null: the offline demo)
      "api_key_env": "RESEARCHER_LLM_KEY",      a variable holding the key; LLM_API_KEY is
                                                inherited only together with LLM_BASE_URL
      "timeout_s": 60,                          default LLM_TIMEOUT_SECONDS
      "stream_usage": true,                     ask for token counts; default LLM_STREAM_USAGE
      "mcp_servers": ["http://tools:8000/mcp"], MCP servers (Streamable HTTP) giving tools
      "max_tool_rounds": 4,                     default AGENT_MAX_TOOL_ROUNDS
      "ask_user": true,                         human in the loop: the model may pause the run
                                                to ask the user (default AGENT_ASK_USER)
      "graph": "my_team.agents:graph",          a LangGraph graph of the team's own instead of the
                                                built-in one (docs/agents.md): a compiled graph, a
                                                StateGraph, or a factory taking the AgentSpec
      "version": "2",                           entries may share a name with distinct versions;
                                                each version is a pool of its own (name@version)
      "weight": 10}]                            the version's share of new runs, relative to the
                                                other live versions' (default 1; 0: none)

A worker serves the pools `WORKER_AGENTS` names (an agent's name: all its versions; or
``name@version``), by default all; runs of an agent go only to workers serving it (`runs.agents`).

Everything is read once (:meth:`AgentRegistry.from_env`), and an invalid setting raises
``common.config.SettingError`` naming the variable. Nothing touches the network until an agent
is used: an agent's tools are listed from its MCP servers on its first run (or
:meth:`AgentRegistry.describe`) and cached; a server that cannot be reached is left out (logged)
and asked again by the first run ``relist_after_s`` later (so a server that hangs does not
add its timeout to every run), and a tool call that cannot reach its server makes the next
run list that server's tools again.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import json
import logging
import math
import re
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from langchain_core.language_models import BaseChatModel
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import StateGraph
from langgraph.pregel import Pregel

from agent_worker.graph import (
    AGENT_NODE,
    DEFAULT_MAX_TOOL_ROUNDS,
    AgentGraph,
    Item,
    Resumption,
    build_graph,
    stream_answer,
    stream_model,
)
from agent_worker.mcp_client import McpClient, McpError, McpTool
from agent_worker.model import ModelConfig, build_chat_model
from agent_worker.settings import WorkerSettings
from common.config import SettingError, declared, env_opt
from runs.agents import DEFAULT as DEFAULT_AGENT
from runs.agents import UnknownAgent, pool_of

log = logging.getLogger(__name__)

# The LLM_*, AGENT_*, AGENTS_* and MCP_* variables, declared (defaults included) with the worker's.
_SETTINGS = declared(WorkerSettings)
DEFAULT_MCP_TIMEOUT_S: float = _SETTINGS["mcp_timeout_s"].default
DEFAULT_RELIST_AFTER_S = 30.0
_MAX_ROUNDS_LIMIT = 50
_AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# OpenAI function names: ^[a-zA-Z0-9_-]{1,64}$; MCP tool names may hold more ('.', '/').
_NOT_IN_TOOL_NAME = re.compile(r"[^A-Za-z0-9_-]")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_GRAPH_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_SPEC_KEYS = frozenset({"name", "description", "system_prompt", "model", "base_url", "api_key_env",
                        "timeout_s", "stream_usage", "mcp_servers", "max_tool_rounds", "ask_user",
                        "graph", "version", "weight"})


@dataclass(frozen=True)
class AgentSpec:
    """One named agent: what it is told, which model it calls and which tools it may use."""

    name: str
    system_prompt: str | None
    model: ModelConfig
    mcp_servers: tuple[str, ...] = ()
    max_tool_rounds: int = DEFAULT_MAX_TOOL_ROUNDS
    description: str = ""
    ask_user: bool = False
    graph: str | None = None  # "package.module:attribute": a LangGraph graph of the agent's own
    version: str | None = None  # one of several versions of `name` (a canary), each a pool of its own
    weight: float = 1.0  # the version's share of new runs among the agent's live versions

    @property
    def pool(self) -> str:
        """Where this agent's (version's) runs are queued: ``name`` or ``name@version``."""
        return pool_of(self.name, self.version)


class AgentRegistry:
    """The configured agents, and their runs.

    Build once per process (:meth:`from_env` needs no event loop), use from one event loop,
    :meth:`aclose` at shutdown (MCP sessions and model HTTP clients).
    """

    def __init__(
        self,
        specs: Sequence[AgentSpec],
        *,
        mcp_timeout_s: float = DEFAULT_MCP_TIMEOUT_S,
        relist_after_s: float = DEFAULT_RELIST_AFTER_S,
        checkpointer: BaseCheckpointSaver[str] | None = None,
    ) -> None:
        if not specs:
            raise ValueError("at least one agent is needed")
        self._specs: dict[str, AgentSpec] = {}  # by pool
        for spec in specs:
            if spec.pool in self._specs:
                raise ValueError(f"two agents are {spec.pool!r}")
            self._specs[spec.pool] = spec
        self.mcp_timeout_s = mcp_timeout_s
        self.relist_after_s = relist_after_s
        self._models: dict[str, BaseChatModel] = {}
        self._graphs: dict[str, AgentGraph] = {}
        self._clients: dict[str, McpClient] = {}
        self._server_tools: dict[str, list[BaseTool]] = {}  # by server URL, once listed
        self._listing: dict[str, asyncio.Lock] = {}
        self._failed_at: dict[str, float] = {}  # server URL -> loop time of its last failed listing
        # The graphs' state within a run (ask_user pauses), by thread (the run): in memory unless
        # the worker sets its Postgres checkpointer before the first run, so any worker resumes it.
        self.checkpointer: BaseCheckpointSaver[str] = checkpointer or InMemorySaver()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AgentRegistry:
        """Read the agents (module docstring) and ``MCP_TIMEOUT_SECONDS`` from ``env``.

        Raises:
            common.config.SettingError: naming the first invalid variable.
        """
        timeout_s = _SETTINGS["mcp_timeout_s"].read(env)
        return cls(agents_from_env(env), mcp_timeout_s=timeout_s)

    def names(self) -> list[str]:
        """The agents' names, each once, in configuration order (``"default"`` first unless replaced)."""
        return list(dict.fromkeys(spec.name for spec in self._specs.values()))

    def pools(self) -> list[str]:
        """The agents' pools (``name`` or ``name@version``), in configuration order."""
        return list(self._specs)

    def serving(self, wanted: Sequence[str]) -> list[str]:
        """The pools of `wanted` (`WORKER_AGENTS`: agent names, meaning all their versions, or
        ``name@version``); all pools when empty. Raises ValueError naming one that matches none."""
        if not wanted:
            return self.pools()
        served: list[str] = []
        for item in wanted:
            matched = [p for p, spec in self._specs.items() if item in (p, spec.name)]
            if not matched:
                raise ValueError(f"{item!r} is no agent (known: {', '.join(self.pools())})")
            served += [p for p in matched if p not in served]
        return served

    def spec(self, pool: str) -> AgentSpec:
        """The agent (version) of ``pool``. Raises :class:`UnknownAgent`."""
        try:
            return self._specs[pool]
        except KeyError:
            raise UnknownAgent(pool, self.pools()) from None

    async def describe(self, pools: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """For ``GET /v1/agents``: each pool's (of `pools`; None: all) agent name, version, weight,
        description, model and tool names.

        No URLs, keys or prompts. Lists tools from MCP servers not asked yet (bounded by
        ``mcp_timeout_s``); ``tools_error`` says when some could not be reached.
        """
        described = []
        for spec in (self._specs[p] for p in (self.pools() if pools is None else pools)):
            tools, missing = await self._tools(spec)
            error = f"{missing} of {len(spec.mcp_servers)} tool servers unreachable" if missing else None
            described.append({
                "pool": spec.pool,
                "version": spec.version,
                "weight": spec.weight,
                "name": spec.name,
                "description": spec.description,
                "model": spec.model.model if spec.model.base_url else "chorus-demo",
                "tools": [tool.name for tool in tools],
                "tools_error": error,
            })
        return described

    def answer(
        self, agent: str | None, history: Sequence[tuple[str, str]], *, thread: str | None = None,
        resume: Resumption | None = None,
    ) -> AsyncGenerator[Item, None]:
        """Run agent pool ``agent`` (``None``: the default) over ``history``; see ``graph.stream_answer``.

        Raises :class:`UnknownAgent` at once, before anything is awaited. The items, errors
        and cancellation are those of ``agent_worker.graph.stream_answer``.
        """
        return self._answer(self.spec(agent or DEFAULT_AGENT), history, thread, resume)

    async def forget(self, thread: str) -> None:
        """Drop a run's saved graph state (it ended, or starts over)."""
        await self.checkpointer.adelete_thread(thread)

    async def aclose(self) -> None:
        """End MCP sessions and close the models' HTTP clients; the registry is done after."""
        clients, self._clients = list(self._clients.values()), {}
        self._server_tools.clear()
        await asyncio.gather(*(client.aclose() for client in clients), return_exceptions=True)
        for model in self._models.values():
            if isinstance(model, ChatOpenAI):
                await model.root_async_client.close()
        self._models.clear()
        self._graphs.clear()

    # -- internals ------------------------------------------------------------------------

    async def _answer(
        self, spec: AgentSpec, history: Sequence[tuple[str, str]], thread: str | None,
        resume: Resumption | None,
    ) -> AsyncGenerator[Item, None]:
        if spec.graph is None and not spec.mcp_servers and not spec.ask_user and resume is None:
            # One model call and nothing else: the graph would only add its overhead per token.
            model = self._model(spec)
            direct = stream_model(model, history, system_prompt=spec.system_prompt)
            async with aclosing(direct) as items:
                async for item in items:
                    yield item
            return
        graph = await self._graph(spec)
        node = AGENT_NODE if spec.graph is None else None  # an own graph: every node's answer
        streamed = stream_answer(graph, history, thread=thread, node=node,
                                 resume=resume.answer if resume else None,
                                 checkpoint=resume.checkpoint if resume else None)
        async with aclosing(streamed) as items:
            async for item in items:
                yield item

    def _model(self, spec: AgentSpec) -> BaseChatModel:
        model = self._models.get(spec.pool)
        if model is None:
            model = self._models[spec.pool] = build_chat_model(spec.model)
        return model

    async def _graph(self, spec: AgentSpec) -> AgentGraph:
        graph = self._graphs.get(spec.pool)
        if graph is not None:
            return graph
        if spec.graph is not None:
            graph = self._graphs[spec.pool] = own_graph(spec, self.checkpointer)
            return graph
        tools, missing = await self._tools(spec)
        graph = build_graph(self._model(spec), system_prompt=spec.system_prompt, tools=tools,
                            max_tool_rounds=spec.max_tool_rounds, ask_user=spec.ask_user,
                            checkpointer=self.checkpointer)
        if not missing:  # a graph short of tools is rebuilt next run, when its servers may be back
            self._graphs[spec.pool] = graph
        return graph

    async def _tools(self, spec: AgentSpec) -> tuple[list[BaseTool], int]:
        """The agent's tools (first server wins a name clash), and how many servers failed."""
        listed = await asyncio.gather(*(self._list(url) for url in spec.mcp_servers))
        tools: dict[str, BaseTool] = {}
        for url, server_tools in zip(spec.mcp_servers, listed, strict=True):
            for tool in server_tools or ():
                if tool.name in tools:
                    log.warning("agent %s: tool %s of %s hidden by another server's",
                                spec.name, tool.name, url)
                    continue
                tools[tool.name] = tool
        return list(tools.values()), sum(1 for server_tools in listed if server_tools is None)

    async def _list(self, url: str) -> list[BaseTool] | None:
        """The tools of server ``url``, listed once; ``None`` if it cannot be reached now."""
        async with self._listing.setdefault(url, asyncio.Lock()):
            if url in self._server_tools:
                return self._server_tools[url]
            now = asyncio.get_running_loop().time()
            if now - self._failed_at.get(url, -math.inf) < self.relist_after_s:
                return None
            client = self._clients.get(url)
            if client is None:
                client = self._clients[url] = McpClient(url, timeout_s=self.mcp_timeout_s)
            try:
                listed = await client.list_tools()
            except McpError as exc:
                log.warning("tools unavailable for %g s: %s", self.relist_after_s, exc)
                self._failed_at[url] = asyncio.get_running_loop().time()
                return None
            self._failed_at.pop(url, None)
            forget = functools.partial(self._forget, url)
            tools: list[BaseTool] = [langchain_tool(client, tool, on_unreachable=forget) for tool in listed]
            self._server_tools[url] = tools
            log.info("%d tools from %s: %s", len(tools), url, ", ".join(t.name for t in tools))
            return tools

    def _forget(self, url: str) -> None:
        """List ``url``'s tools again on the next run (it may have restarted with others)."""
        self._server_tools.pop(url, None)
        for spec in self._specs.values():
            if url in spec.mcp_servers:
                self._graphs.pop(spec.pool, None)


def langchain_tool(client: McpClient, tool: McpTool, *,
                   on_unreachable: Callable[[], None] | None = None) -> StructuredTool:
    """``tool`` of ``client``'s server as a LangChain tool (its input schema as the arguments).

    The tool returns the result's text; a result with ``isError`` raises ``ToolException``
    with the tool's message, and an :class:`McpError` (server unreachable, JSON-RPC error)
    is raised after calling ``on_unreachable``.
    """

    async def call(**arguments: Any) -> str:
        try:
            result = await client.call_tool(tool.name, arguments)
        except McpError:
            if on_unreachable is not None:
                on_unreachable()
            raise
        if result.is_error:
            raise ToolException(result.text or f"tool {tool.name} failed")
        return result.text

    return StructuredTool.from_function(
        coroutine=call,
        name=_NOT_IN_TOOL_NAME.sub("_", tool.name)[:64],
        description=tool.description or tool.name,
        args_schema=tool.input_schema,
    )


# -- configuration ----------------------------------------------------------------------------


def agents_from_env(env: Mapping[str, str]) -> list[AgentSpec]:
    """The default agent from ``LLM_*``/``AGENT_*``, then those of ``AGENTS_JSON``/``AGENTS_FILE``.

    Raises:
        common.config.SettingError: naming the first invalid variable.
    """
    def setting(name: str) -> Any:
        return _SETTINGS[name].read(env)

    base_url = setting("llm_base_url")
    model = ModelConfig(base_url=base_url, api_key=setting("llm_api_key"), model=setting("llm_model"),
                        timeout_s=setting("llm_timeout_s"), stream_usage=setting("llm_stream_usage"))
    servers = setting("mcp_servers")
    for url in servers:
        _check_url("AGENT_MCP_SERVERS", url)
    default = AgentSpec(
        name=DEFAULT_AGENT,
        system_prompt=setting("system_prompt"),
        model=model,
        mcp_servers=servers,
        max_tool_rounds=setting("max_tool_rounds"),
        ask_user=setting("ask_user"),
    )
    if default.ask_user and base_url is None:
        raise SettingError("AGENT_ASK_USER: asking the user is a tool call, which needs an LLM "
                           "(set LLM_BASE_URL)")
    if servers and base_url is None:
        raise SettingError("AGENT_MCP_SERVERS: tools need an LLM (set LLM_BASE_URL); "
                           "the offline demo model cannot call them")
    specs = {DEFAULT_AGENT: default}
    variable, entries = _agent_entries(env)
    named: set[str] = set()
    for index, entry in enumerate(entries):
        spec = _spec(entry, default, env, where=f"{variable}: agent #{index + 1}")
        if spec.pool in named:
            raise SettingError(f"{variable}: two agents are {spec.pool!r} (versions tell apart entries "
                               "of one name)")
        named.add(spec.pool)
        specs[spec.pool] = spec
    return list(specs.values())


def _agent_entries(env: Mapping[str, str]) -> tuple[str, list[Any]]:
    text, path = _SETTINGS["agents_json"].read(env), _SETTINGS["agents_file"].read(env)
    if text is not None and path is not None:
        raise SettingError("AGENTS_JSON: set AGENTS_JSON or AGENTS_FILE, not both")
    variable = "AGENTS_JSON" if text is not None else "AGENTS_FILE"
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingError(f"AGENTS_FILE: cannot read {path}: {exc.strerror or exc}") from None
    if text is None:
        return variable, []
    try:
        entries = json.loads(text)
    except ValueError as exc:
        raise SettingError(f"{variable}: not valid JSON ({exc})") from None
    if not isinstance(entries, list):
        raise SettingError(f"{variable}: expected a JSON list of agents, got {type(entries).__name__}")
    return variable, entries


def _spec(entry: Any, default: AgentSpec, env: Mapping[str, str], *, where: str) -> AgentSpec:
    if not isinstance(entry, dict):
        raise SettingError(f"{where}: expected an object, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not _AGENT_NAME.fullmatch(name):
        raise SettingError(f"{where}: name must match {_AGENT_NAME.pattern}, got {name!r}")
    where = f"{where} ({name})"
    if unknown := sorted(set(entry) - _SPEC_KEYS):
        raise SettingError(f"{where}: unknown keys {unknown}; known: {sorted(_SPEC_KEYS)}")

    def text(key: str, fallback: str | None) -> str | None:
        value = entry.get(key, fallback)
        if value is not None and not isinstance(value, str):
            raise SettingError(f"{where}: {key} must be a string")
        return value

    base_url, api_key = default.model.base_url, default.model.api_key
    if "base_url" in entry:
        # Another endpoint never gets LLM_API_KEY: a key goes only where it was meant to.
        base_url, api_key = text("base_url", None), None
        if base_url is not None:
            _check_url(where, base_url, key="base_url")
    if (key_variable := text("api_key_env", None)) is not None:
        api_key = env_opt(env, key_variable)
        if api_key is None:
            raise SettingError(f"{where}: api_key_env names {key_variable}, which is not set")
    timeout_s = entry.get("timeout_s", default.model.timeout_s)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s < 0.1:
        raise SettingError(f"{where}: timeout_s must be a number of seconds >= 0.1, got {timeout_s!r}")
    rounds = entry.get("max_tool_rounds", default.max_tool_rounds)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 0 <= rounds <= _MAX_ROUNDS_LIMIT:
        raise SettingError(f"{where}: max_tool_rounds must be an integer 0..{_MAX_ROUNDS_LIMIT}, "
                           f"got {rounds!r}")
    model = text("model", default.model.model)
    if not model:
        raise SettingError(f"{where}: model must be a model name")
    servers = entry.get("mcp_servers", [])
    if not isinstance(servers, list) or not all(isinstance(url, str) for url in servers):
        raise SettingError(f"{where}: mcp_servers must be a list of URLs")
    for url in servers:
        _check_url(where, url, key="mcp_servers")
    if servers and base_url is None:
        raise SettingError(f"{where}: mcp_servers need an LLM (base_url or LLM_BASE_URL); "
                           "the offline demo model cannot call tools")
    ask = entry.get("ask_user", default.ask_user)
    if not isinstance(ask, bool):
        raise SettingError(f"{where}: ask_user must be true or false")
    stream_usage = entry.get("stream_usage", default.model.stream_usage)
    if not isinstance(stream_usage, bool):
        raise SettingError(f"{where}: stream_usage must be true or false")
    if ask and base_url is None:
        raise SettingError(f"{where}: ask_user needs an LLM (base_url or LLM_BASE_URL)")
    version = entry.get("version")
    if version is not None and (not isinstance(version, str) or not _VERSION.fullmatch(version)):
        raise SettingError(f"{where}: version must match {_VERSION.pattern}, got {version!r}")
    weight = entry.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= 1_000_000:
        raise SettingError(f"{where}: weight must be a number 0..1000000, got {weight!r}")
    graph = entry.get("graph")
    if graph is not None:
        try:
            load_graph_attribute(graph)
        except (ValueError, ImportError, AttributeError) as exc:
            raise SettingError(f"{where}: graph: {exc}") from None
    return AgentSpec(
        name=name,
        system_prompt=text("system_prompt", default.system_prompt),
        model=ModelConfig(base_url=base_url, api_key=api_key, model=model,
                          timeout_s=float(timeout_s), max_retries=default.model.max_retries,
                          stream_usage=stream_usage),
        mcp_servers=tuple(servers),
        max_tool_rounds=rounds,
        description=text("description", "") or "",
        ask_user=ask,
        graph=graph,
        version=version,
        weight=float(weight),
    )


def load_graph_attribute(path: object) -> object:
    """What ``"package.module:attribute"`` names (imported now, so a typo fails at start)."""
    if not isinstance(path, str) or not _GRAPH_PATH.fullmatch(path):
        raise ValueError(f"expected \"package.module:attribute\", got {path!r}")
    module, _, attribute = path.partition(":")
    found: object = importlib.import_module(module)
    for part in attribute.split("."):
        found = getattr(found, part)
    return found


def own_graph(spec: AgentSpec, checkpointer: BaseCheckpointSaver[str]) -> AgentGraph:
    """The agent's own graph: a compiled graph as it is; a `StateGraph` compiled here, with the
    worker's checkpointer (so an ``interrupt`` pauses the run for the user and resumes it); a
    factory called with the agent's `AgentSpec` (its model, prompt, ...), returning either."""
    assert spec.graph is not None
    found = load_graph_attribute(spec.graph)
    if callable(found) and not isinstance(found, StateGraph | Pregel):
        found = found(spec)
    if isinstance(found, StateGraph):
        found = found.compile(checkpointer=checkpointer)
    if not isinstance(found, Pregel):
        raise TypeError(f"agent {spec.name}: graph {spec.graph} is not a LangGraph graph, nor makes one")
    return cast(AgentGraph, found)


def _check_url(where: str, url: str, *, key: str | None = None) -> None:
    if not url.startswith(("http://", "https://")):
        field = f"{key} " if key else ""
        raise SettingError(f"{where}: {field}expected an http:// or https:// URL, got {url!r}")
