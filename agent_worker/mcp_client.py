"""A client of one MCP server over Streamable HTTP, on the official ``mcp`` package.

One :class:`McpClient` talks to one server URL (e.g. ``http://tools:8000/mcp``) through the
SDK's :class:`mcp.ClientSession` over its ``streamable_http_client`` transport, so protocol
revisions, SSE handling and MCP auth (``auth=``, an ``httpx2.Auth`` such as the SDK's OAuth
provider) come with upgrades of ``mcp``. What this module adds is the life of the session::

    first call       -> open a session (``initialize`` handshake) in a background task
    every call       -> a request in that session, from whichever task calls
    404 on a session -> the server lost it (restart, idle expiry): open a new one, try once more
    aclose()         -> end the session (``DELETE``) and the task

Errors::

    McpError             the server could not be reached, timed out, answered with an HTTP
     │                   error or an invalid result; the message names the URL and the method
     └── McpRpcError     the server answered with a JSON-RPC error (.code; the message has it)

A tool that *ran and failed* is not an exception here: :meth:`McpClient.call_tool` returns a
:class:`ToolResult` with ``is_error=True`` (the protocol reports it in the result, so the model
can read the reason and recover).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx2
import mcp.types as types
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

_CLIENT_INFO = types.Implementation(name="chorus-agent-worker", version="0.1.0")
_CLOSE_TIMEOUT_S = 2.0
# How long a call that saw the connection close waits for the session task to say why.
_CAUSE_WAIT_S = 1.0
# The GET stream for server-initiated messages idles for long; the per-call bound is timeout_s.
_STREAM_READ_TIMEOUT_S = 300.0
_T = TypeVar("_T")
_ResponseHook = Callable[[httpx2.Response], Awaitable[None]]

SUMMARY_CHARS = 200
"""How much of a tool result :func:`summarize` keeps for ``tool.completed`` events."""


class McpError(Exception):
    """Talking to an MCP server failed; the message names the server's URL."""


class McpRpcError(McpError):
    """The MCP server answered a request with a JSON-RPC error."""

    def __init__(self, url: str, method: str, code: int, message: str) -> None:
        super().__init__(f"{url}: {method} failed: {message} (JSON-RPC error {code})")
        self.code = code


@dataclass(frozen=True)
class McpTool:
    """One tool as ``tools/list`` describes it."""

    name: str
    description: str
    input_schema: dict[str, Any]


@dataclass(frozen=True)
class ToolResult:
    """The result of ``tools/call``.

    Attributes:
        text: the result as text for the model: the text content blocks joined by newlines
            (other blocks as short placeholders), or the structured content as JSON if there
            is no text.
        is_error: the tool ran and reported a failure; ``text`` says why.
        structured: ``structuredContent``, if the tool returned an object.
    """

    text: str
    is_error: bool = False
    structured: dict[str, Any] | None = field(default=None)

    @property
    def summary(self) -> str:
        """The first :data:`SUMMARY_CHARS` characters of :attr:`text`, for events."""
        return summarize(self.text)


def summarize(text: str, limit_chars: int = SUMMARY_CHARS) -> str:
    """``text`` with whitespace runs collapsed, cut to ``limit_chars`` (ending in ``…`` if cut)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit_chars else flat[: limit_chars - 1] + "…"


class McpClient:
    """A client of one MCP server over Streamable HTTP.

    Safe for concurrent use from any tasks of one event loop: calls share one session, and
    only one of them opens it. Each call (opening the session included) is bounded by
    ``timeout_s``; a cancelled call sends the server a cancellation and leaves the session
    usable. Close with :meth:`aclose`.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        headers: Mapping[str, str] | None = None,
        auth: httpx2.Auth | None = None,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._headers = dict(headers or {})
        self._auth = auth
        self._session: _Session | None = None
        self._opening = asyncio.Lock()
        self._closed = False

    @property
    def session_id(self) -> str | None:
        """The server's ``Mcp-Session-Id``, once a session is open (``None`` if it keeps none)."""
        return self._session.id if self._session is not None else None

    async def list_tools(self) -> list[McpTool]:
        """Every tool the server offers (all pages of ``tools/list``)."""
        tools: list[McpTool] = []
        cursor: str | None = None
        while True:
            params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
            page = await self._call("tools/list", functools.partial(ClientSession.list_tools, params=params))
            tools.extend(McpTool(name=tool.name, description=tool.description or "",
                                 input_schema=tool.input_schema) for tool in page.tools)
            cursor = page.next_cursor
            if not cursor:
                return tools

    async def call_tool(self, name: str, arguments: Mapping[str, Any]) -> ToolResult:
        """Run tool ``name``; a failure of the tool itself is a result with ``is_error``."""
        result = await self._call("tools/call", lambda session: session.call_tool(name, dict(arguments)))
        if not isinstance(result, types.CallToolResult):  # input_required, or an extension's shape
            raise McpError(f"{self.url}: tools/call: unsupported result type {type(result).__name__}")
        structured = result.structured_content if isinstance(result.structured_content, dict) else None
        text = "\n".join(part for part in map(_content_text, result.content) if part)
        if not text and structured is not None:
            text = json.dumps(structured, ensure_ascii=False)
        return ToolResult(text=text, is_error=result.is_error, structured=structured)

    async def request(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Send any JSON-RPC request in the session; return its raw result."""
        request = types.Request[dict[str, Any] | None, str](method=method, params=dict(params or {}) or None)
        result = await self._call(method, lambda session: session.send_request(request, _RawResult))
        return dict(result.model_extra or {})

    async def aclose(self) -> None:
        """End the session (a best-effort ``DELETE``); calls after this raise :class:`McpError`."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- one call ---------------------------------------------------------------------------

    async def _call(self, method: str, send: Callable[[ClientSession], Awaitable[_T]]) -> _T:
        """``send`` in the open session, once more in a new one if the server lost the session."""
        for attempt in (1, 2):
            exchange = _Exchange()
            token = _EXCHANGE.set(exchange)  # the transport's POST task runs in a copy of this context
            session: _Session | None = None
            stage = "initialize"
            try:
                async with asyncio.timeout(self.timeout_s):
                    session = await self._open()
                    opened = await session.ready()
                    stage = method
                    return await send(opened)
            except TimeoutError:
                raise McpError(f"{self.url}: {stage}: no answer within {self.timeout_s:g} s") from None
            except Exception as exc:
                if session is not None and session.lost and attempt == 1:
                    # A 404 to our session id: the server restarted or expired it, and did not
                    # run the request. A fresh session, and one more try.
                    log.info("%s: session %s lost, opening a new one", self.url, session.id)
                    continue
                cause: BaseException = exc
                if session is not None and _closed_connection(exc):
                    cause = await session.cause(exc)
                if session is not None and stage == "initialize":
                    exchange = session.exchange  # the handshake ran in the session's task
                raise _failure(self.url, stage, cause, exchange, self.timeout_s) from exc
            finally:
                _EXCHANGE.reset(token)
        raise AssertionError("unreachable")

    async def _open(self) -> _Session:
        """The current session, or a new one if there is none or it is lost or ended."""
        async with self._opening:
            if self._closed:
                raise McpError(f"{self.url}: the client is closed")
            current = self._session
            if current is not None and current.usable:
                return current
            if current is not None:
                await current.close()
            self._session = _Session(self.url, self._http_client)
            return self._session

    def _http_client(self, on_response: _ResponseHook) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(
            headers=self._headers, auth=self._auth, event_hooks={"response": [on_response]},
            timeout=httpx2.Timeout(self.timeout_s, read=max(self.timeout_s, _STREAM_READ_TIMEOUT_S)),
        )


class _RawResult(BaseModel):
    """Any JSON-RPC result, its fields kept as they came."""

    model_config = ConfigDict(extra="allow")


@dataclass
class _Exchange:
    """What the HTTP layer saw of one call: the status of an HTTP error answer."""

    http_status: int | None = None


_EXCHANGE: ContextVar[_Exchange | None] = ContextVar("mcp_exchange", default=None)


class _Session:
    """One MCP session, owned by one background task.

    The SDK's transport and session run anyio task groups whose context managers must be
    entered and exited in one task; calls come from many (LangGraph runs each tool call in
    a task of its own). So a task of ours enters them, runs the handshake and waits to be
    stopped, while callers send requests through the session's memory streams, which any
    task may use. One session per call would cost three extra requests per tool call
    (``initialize``, ``notifications/initialized``, ``DELETE``) and hide session loss.
    """

    def __init__(self, url: str, http_client: Callable[[_ResponseHook], httpx2.AsyncClient]) -> None:
        self.url = url
        self.id: str | None = None
        self.lost = False
        self.exchange = _Exchange()
        self._failure: BaseException | None = None
        self._opened: asyncio.Future[ClientSession] = asyncio.get_running_loop().create_future()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._own(http_client(self._on_response)), name=f"mcp-session {url}")

    @property
    def usable(self) -> bool:
        """Open (or opening), and not known to be lost by the server."""
        return not self.lost and not self._task.done()

    async def ready(self) -> ClientSession:
        """The session once its handshake is done; raises what made opening fail."""
        # shield: a caller that gives up must not cancel the opening others wait for.
        return await asyncio.shield(self._opened)

    async def cause(self, closed: Exception) -> BaseException:
        """Why the connection closed under a call: what ended the session task, if it says."""
        await asyncio.wait([self._task], timeout=_CAUSE_WAIT_S)
        return self._failure or closed

    async def close(self) -> None:
        """Stop the task: it leaves the session (``DELETE``), or is cancelled if it hangs."""
        self._stop.set()
        done, _ = await asyncio.wait([self._task], timeout=_CLOSE_TIMEOUT_S)
        if not done:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=_CLOSE_TIMEOUT_S)

    async def _own(self, http: httpx2.AsyncClient) -> None:
        _EXCHANGE.set(self.exchange)  # this task's context: the handshake's requests report here
        try:
            async with (
                http,
                streamable_http_client(self.url, http_client=http) as (read, write),
                ClientSession(read, write, client_info=_CLIENT_INFO) as session,
            ):
                # The handshake era (2024-11-05 .. 2025-11-25, the newest offered): sessions with an
                # Mcp-Session-Id. The stateless 2026-07-28 era (server/discover) is mcp.Client's
                # mode="auto"; opting in changes what servers see, so it is a decision of its own.
                await session.initialize()
                self._opened.set_result(session)
                await self._stop.wait()
        except Exception as exc:  # an ExceptionGroup when the transport's task group failed
            self._failure = _leaf(exc)
            log.debug("%s: session ended: %r", self.url, exc)
        finally:
            if not self._opened.done():
                self._opened.set_exception(self._failure or McpError(f"{self.url}: the session was closed"))
                self._opened.exception()  # retrieved: nobody may be waiting any more

    async def _on_response(self, response: httpx2.Response) -> None:
        sent = response.request.headers.get("mcp-session-id")
        if sent is None and response.status_code < 400:
            self.id = response.headers.get("mcp-session-id") or self.id
        if response.status_code >= 400:
            exchange = _EXCHANGE.get()
            if exchange is not None:
                exchange.http_status = response.status_code
            # The spec's "session expired": 404 to a request carrying the session id.
            if response.status_code == 404 and sent is not None and sent == self.id:
                self.lost = True


def _closed_connection(exc: Exception) -> bool:
    return isinstance(exc, MCPError) and exc.code == types.CONNECTION_CLOSED


def _leaf(exc: BaseException) -> BaseException:
    """The first exception in ``exc`` that is not a group (task groups wrap what failed)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _failure(url: str, method: str, exc: BaseException, exchange: _Exchange, timeout_s: float) -> McpError:
    """``exc`` as an :class:`McpError` naming ``url`` and ``method``."""
    exc = _leaf(exc)
    if isinstance(exc, McpError):
        return exc
    if isinstance(exc, MCPError):
        if exc.code == types.REQUEST_TIMEOUT:
            return McpError(f"{url}: {method}: no answer within {timeout_s:g} s")
        if exchange.http_status is not None:
            return McpError(f"{url}: {method}: HTTP {exchange.http_status}: {exc.message}")
        if exc.code == types.CONNECTION_CLOSED:
            return McpError(f"{url}: {method}: the connection closed ({exc.message})")
        return McpRpcError(url, method, exc.code, exc.message)
    if isinstance(exc, httpx2.TimeoutException):
        return McpError(f"{url}: {method}: no answer within {timeout_s:g} s")
    if isinstance(exc, httpx2.ConnectError):
        return McpError(f"{url}: {method}: cannot connect ({exc})")
    # Anything else: a transport failure, an invalid result (pydantic), a result that does not
    # match the tool's output schema (RuntimeError).
    return McpError(f"{url}: {method}: {type(exc).__name__}: {exc}")


def _content_text(block: types.ContentBlock) -> str:
    if isinstance(block, types.TextContent):
        return block.text
    if isinstance(block, types.EmbeddedResource):
        if isinstance(block.resource, types.TextResourceContents):
            return block.resource.text
        return f"[resource {block.resource.uri}]"
    if isinstance(block, types.ResourceLink):
        return f"[resource {block.uri}]"
    return f"[{block.type} content]"
