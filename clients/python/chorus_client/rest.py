"""The REST API (docs/protocol.md, "REST"): conversations, their messages, agents and presence,
with the same token as the socket, over the client's aiohttp session."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import aiohttp

from chorus_client.errors import ChorusError
from chorus_client.models import Cursor

# The token to use: `fresh` after a 401 (the provider is asked again).
TokenFor = Callable[[bool], Awaitable[str]]


class RestClient:
    """`base_url` like "https://chat.example.com" (REST paths start with /v1). Every method raises
    ChorusError with REST's error `code` and the HTTP `status`."""

    def __init__(self, base_url: str, token: TokenFor, session: Callable[[], aiohttp.ClientSession],
                 *, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """One call; a 401 is retried once with a fresh token. The JSON body (None for 204)."""
        for attempt in range(2):
            headers = {"Authorization": f"Bearer {await self._token(attempt > 0)}"}
            async with self._session().request(method, f"{self.base_url}{path}", headers=headers, json=body,
                                               timeout=self._timeout) as response:
                if response.status == 401 and attempt == 0:
                    continue
                if response.status == 204:
                    return None
                text = await response.text()
                try:
                    parsed = json.loads(text) if text else None
                except ValueError:
                    parsed = None  # not JSON (a proxy's error page): reported below with the status
                if response.status >= 400:
                    error = parsed.get("error", {}) if isinstance(parsed, dict) else {}
                    raise ChorusError(str(error.get("code", f"http_{response.status}")),
                                      str(error.get("message", text[:200])), status=response.status)
                return parsed
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def list_conversations(self, *, limit: int | None = None,
                                 before: str | None = None) -> dict[str, Any]:
        """`{"conversations": [...], "next_before"}`, most recently active first."""
        path = f"/v1/conversations{_query(limit=limit, before=before)}"
        result: dict[str, Any] = await self.request("GET", path)
        return result

    async def create_conversation(self, **fields: Any) -> dict[str, Any]:
        """`title`, `agent`, `double_texting`: all optional."""
        result: dict[str, Any] = await self.request("POST", "/v1/conversations", fields)
        return result

    async def get_conversation(self, conversation: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"/v1/conversations/{_id(conversation)}")
        return result

    async def delete_conversation(self, conversation: str) -> None:
        await self.request("DELETE", f"/v1/conversations/{_id(conversation)}")

    async def list_messages(self, conversation: str, *, limit: int | None = None,
                            before: Cursor | None = None) -> dict[str, Any]:
        """`{"messages": [...], "next_before"}`: the newest `limit` before the cursor, oldest first."""
        path = f"/v1/conversations/{_id(conversation)}/messages{_query(limit=limit, before=before)}"
        result: dict[str, Any] = await self.request("GET", path)
        return result

    async def agents(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/v1/agents")
        return result

    async def presence(self) -> dict[str, Any]:
        """`{"devices": [{"device", "node"}...]}`: the user's devices online now."""
        result: dict[str, Any] = await self.request("GET", "/v1/presence")
        return result


def rest_base(ws_url: str) -> str:
    """The REST origin of a WebSocket URL: ws(s)://host/ws -> http(s)://host."""
    parts = urlsplit(ws_url)
    if parts.scheme not in ("ws", "wss", "http", "https") or not parts.netloc:
        raise ValueError(f"not a WebSocket URL: {ws_url!r}")
    return f"{'https' if parts.scheme in ('wss', 'https') else 'http'}://{parts.netloc}"


def _id(value: str) -> str:
    return quote(value, safe="")


def _query(**params: Any) -> str:
    given = {k: v for k, v in params.items() if v is not None}
    return f"?{urlencode(given)}" if given else ""
