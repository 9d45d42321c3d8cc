"""A small MCP client over Streamable HTTP: ``initialize``, ``tools/list`` and ``tools/call``.

One :class:`McpClient` talks to one MCP server URL (e.g. ``http://tools:8000/mcp``) with
httpx, speaking the handshake era of the protocol (2024-11-05 .. 2025-11-25)::

    POST initialize              -> result + ``Mcp-Session-Id`` header (if the server keeps sessions)
    POST notifications/initialized  (202, no body)
    POST tools/list, tools/call  with ``Mcp-Session-Id`` and ``MCP-Protocol-Version`` headers

Each POST is answered either with one ``application/json`` JSON-RPC response or with a
``text/event-stream`` whose events may carry server notifications before the response; both
are read. The session is opened lazily on the first request and opened again, once, when the
server answers 404 (the spec's "session expired": it restarted, or dropped an idle session).

Errors::

    McpError             the server could not be reached, timed out, answered with an HTTP
     │                   error or something that is not JSON-RPC; the message names the URL
     └── McpRpcError     the server answered with a JSON-RPC error (.code; the message has it)

A tool that *ran and failed* is not an exception here: :meth:`McpClient.call_tool` returns a
:class:`ToolResult` with ``is_error=True`` (the protocol reports it in the result, so the model
can read the reason and recover).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

PROTOCOL_VERSION = "2025-06-18"
"""The revision offered in ``initialize``; the server may answer with any of ``_HANDSHAKE_VERSIONS``."""

_HANDSHAKE_VERSIONS = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})
_CLIENT_INFO = {"name": "chorus-agent-worker", "version": "0.1.0"}
_ACCEPT = "application/json, text/event-stream"
_CLOSE_TIMEOUT_S = 2.0
_BODY_SNIPPET_CHARS = 200

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
        structured: ``structuredContent``, if the tool returned any.
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

    Safe for concurrent use from one event loop: calls share the session, and only one of
    them opens it. Every request is bounded by ``timeout_s`` as a whole (connect, response,
    and the event stream up to the JSON-RPC response). Close with :meth:`aclose`.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), transport=transport,
                                       headers=dict(headers or {}))
        self._ids = itertools.count(1)
        self._session_id: str | None = None
        self._protocol_version: str | None = None
        self._opening = asyncio.Lock()

    @property
    def session_id(self) -> str | None:
        """The server's ``Mcp-Session-Id``, once a session is open (``None`` if it keeps none)."""
        return self._session_id

    async def list_tools(self) -> list[McpTool]:
        """Every tool the server offers (all pages of ``tools/list``)."""
        tools: list[McpTool] = []
        cursor: str | None = None
        while True:
            result = await self.request("tools/list", {"cursor": cursor} if cursor else None)
            for raw in result.get("tools") or []:
                if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                    raise McpError(f"{self.url}: tools/list returned a tool without a name")
                schema = raw.get("inputSchema")
                tools.append(McpTool(name=raw["name"], description=str(raw.get("description") or ""),
                                     input_schema=schema if isinstance(schema, dict) else {"type": "object"}))
            cursor = result.get("nextCursor")
            if not cursor:
                return tools

    async def call_tool(self, name: str, arguments: Mapping[str, Any]) -> ToolResult:
        """Run tool ``name``; a failure of the tool itself is a result with ``is_error``."""
        result = await self.request("tools/call", {"name": name, "arguments": dict(arguments)})
        structured = result.get("structuredContent")
        structured = structured if isinstance(structured, dict) else None
        parts = [_content_text(block) for block in result.get("content") or [] if isinstance(block, dict)]
        text = "\n".join(part for part in parts if part)
        if not text and structured is not None:
            text = json.dumps(structured, ensure_ascii=False)
        return ToolResult(text=text, is_error=bool(result.get("isError")), structured=structured)

    async def request(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Send one JSON-RPC request in the session (opening it first if needed); return its result."""
        await self._open()
        try:
            return await self._request(method, params)
        except _SessionExpired:
            # The server forgot us (restart, idle expiry): a new session, and one more try.
            await self._open(expired=self._session_id)
            try:
                return await self._request(method, params)
            except _SessionExpired as exc:
                raise McpError(f"{self.url}: {method}: HTTP 404 even in a fresh session") from exc

    async def aclose(self) -> None:
        """End the session (a best-effort ``DELETE``) and close the HTTP connections."""
        try:
            if self._session_id is not None:
                try:
                    await self._http.delete(self.url, headers=self._headers(), timeout=_CLOSE_TIMEOUT_S)
                except httpx.HTTPError:
                    pass  # the server may be gone already; it expires idle sessions itself
                self._session_id = None
        finally:
            await self._http.aclose()

    # -- the session ----------------------------------------------------------------------

    async def _open(self, expired: str | None = None) -> None:
        """Run the ``initialize`` handshake unless a session is open (other than ``expired``)."""
        async with self._opening:
            if self._protocol_version is not None and (expired is None or self._session_id != expired):
                return
            self._session_id = None
            self._protocol_version = None
            params = {"protocolVersion": PROTOCOL_VERSION, "capabilities": {}, "clientInfo": _CLIENT_INFO}
            # No session id is sent yet, so a 404 here is an McpError (a wrong URL), not _SessionExpired.
            result = await self._request("initialize", params)
            version = result.get("protocolVersion")
            if version not in _HANDSHAKE_VERSIONS:
                raise McpError(f"{self.url}: the server speaks protocol version {version!r}, "
                               f"this client {sorted(_HANDSHAKE_VERSIONS)}")
            self._protocol_version = str(version)
            await self._notify("notifications/initialized")

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": _ACCEPT}
        if self._session_id is not None:
            headers["Mcp-Session-Id"] = self._session_id
        if self._protocol_version is not None:
            headers["MCP-Protocol-Version"] = self._protocol_version
        return headers

    async def _notify(self, method: str) -> None:
        body = {"jsonrpc": "2.0", "method": method}
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await self._http.post(self.url, json=body, headers=self._headers())
        except (httpx.HTTPError, TimeoutError) as exc:
            raise McpError(f"{self.url}: {method}: {_describe(exc, self.timeout_s)}") from exc
        if response.status_code >= 400:
            raise McpError(f"{self.url}: {method}: HTTP {response.status_code}")

    async def _request(self, method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
        request_id = next(self._ids)
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            body["params"] = dict(params)
        try:
            async with asyncio.timeout(self.timeout_s):
                request = self._http.stream("POST", self.url, json=body, headers=self._headers())
                async with request as response:
                    if response.status_code == 404 and self._session_id is not None:
                        raise _SessionExpired
                    if response.status_code >= 400:
                        snippet = (await response.aread()).decode(errors="replace")[:_BODY_SNIPPET_CHARS]
                        raise McpError(f"{self.url}: {method}: HTTP {response.status_code}: {snippet}")
                    if method == "initialize":
                        self._session_id = response.headers.get("mcp-session-id")
                    message = await _response_message(response, request_id)
        except (httpx.HTTPError, TimeoutError) as exc:
            raise McpError(f"{self.url}: {method}: {_describe(exc, self.timeout_s)}") from exc
        if message is None:
            raise McpError(f"{self.url}: {method}: the response ended without a JSON-RPC answer")
        error = message.get("error")
        if isinstance(error, dict):
            raise McpRpcError(self.url, method, int(error.get("code", 0)), str(error.get("message", "")))
        result = message.get("result")
        if not isinstance(result, dict):
            raise McpError(f"{self.url}: {method}: the JSON-RPC response has no result object")
        return result


class _SessionExpired(Exception):
    """HTTP 404 on a request that carried a session id."""


async def _response_message(response: httpx.Response, request_id: int) -> dict[str, Any] | None:
    """The JSON-RPC response to ``request_id`` in a JSON body or an event stream."""
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "text/event-stream":
        async for data in _sse_data(response.aiter_lines()):
            message = _parse(data)
            # Skip notifications (progress, logs) and requests the server may interleave.
            if isinstance(message, dict) and message.get("id") == request_id and "method" not in message:
                return message
        return None
    raw = await response.aread()
    if not raw.strip():
        return None
    message = _parse(raw.decode(errors="replace"))
    if isinstance(message, list):  # a batch answer: pick ours
        message = next((m for m in message if isinstance(m, dict) and m.get("id") == request_id), None)
    if not isinstance(message, dict):
        raise McpError(f"{response.request.url}: the response is not a JSON-RPC message")
    return message


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event (multi-line data joined with newlines)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
        # "event:", "id:", "retry:" and ":" comments carry nothing we need.
    if data:
        yield "\n".join(data)


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _content_text(block: dict[str, Any]) -> str:
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text", ""))
    if kind == "resource":
        resource = block.get("resource") or {}
        return str(resource.get("text") or f"[resource {resource.get('uri', '')}]")
    if kind == "resource_link":
        return f"[resource {block.get('uri', '')}]"
    return f"[{kind} content]"


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({exc})"
    return f"{type(exc).__name__}: {exc}"
