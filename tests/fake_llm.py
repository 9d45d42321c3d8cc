"""A real OpenAI-compatible streaming HTTP server for tests: the fake at the LLM seam.

:class:`FakeLLM` runs an aiohttp server on ``127.0.0.1`` (free port) in a background
thread with its own event loop, so sync tests, async tests and worker subprocesses
can all point ``LLM_BASE_URL`` at :attr:`FakeLLM.base_url`.

Routes: ``POST /v1/chat/completions`` (streaming SSE or a plain JSON completion) and
``GET /v1/models``. The answer is :meth:`FakeLLM.answer_for` the request's messages,
streamed one word (with its trailing space) per chunk.

Directives in the *last user message* steer a request from the outside::

    [[status:429]]      reply with that HTTP status and a JSON error body, no tokens
    [[stall:SECONDS]]   send the response headers, then wait before the first chunk
    [[slow:SECONDS]]    per-token delay for this request (default: token_delay_s)
    [[tokens:N]]        answer is exactly N word tokens: "word1 word2 ... wordN"
    [[die_after:N]]     close the TCP connection abruptly after N content tokens
    [[tool:NAME:{...}]] call tool NAME with these JSON arguments (repeat for parallel calls)
    [[tool_rounds:N]]   keep calling the tools until N tool rounds happened (default 1)

Tool calls follow OpenAI's streaming format: ``"Calling NAME. "`` as content, then
``delta.tool_calls`` chunks (index, id, function name, then the arguments split across
chunks) and ``finish_reason: "tool_calls"``. They are only made while the request offers
``tools`` and its ``tool_choice`` is not ``"none"``. When the request's last message is a
tool result, the answer is ``"Tool said: <content>."`` (one sentence per trailing result),
so tests can see that the result reached the model.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from aiohttp import web

__all__ = ["FakeLLM", "split_words"]

_DIRECTIVE = re.compile(r"\[\[(status|stall|slow|tokens|die_after|tool_rounds):([0-9.]+)\]\]")
_TOOL_DIRECTIVE = re.compile(r"\[\[tool:([A-Za-z0-9_-]+):(\{.*?\})\]\]")
_ARGUMENT_PIECES = 3
_WORD = re.compile(r"\S+\s*")
_START_TIMEOUT_S = 10.0


def split_words(text: str) -> list[str]:
    """Split ``text`` into the pieces the server streams (they concatenate to ``text``)."""
    return _WORD.findall(text)


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    # OpenAI content-part list: [{"type": "text", "text": ...}, ...]
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def _directives(messages: list[dict[str, Any]]) -> tuple[str, dict[str, float]]:
    """Return the last user message's text without directives, and the directives."""
    text = _last_user_text(messages)
    found = {name: float(value) for name, value in _DIRECTIVE.findall(text)}
    return " ".join(_DIRECTIVE.sub(" ", _TOOL_DIRECTIVE.sub(" ", text)).split()), found


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    users = [m for m in messages if m.get("role") == "user"]
    return _text_of(users[-1]) if users else ""


def _trailing_tool_results(messages: list[dict[str, Any]]) -> list[str]:
    results: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        results.insert(0, _text_of(message))
    return results


def _split_arguments(arguments: str) -> list[str]:
    """``arguments`` in up to ``_ARGUMENT_PIECES`` pieces, as a model streams them."""
    size = max(1, -(-len(arguments) // _ARGUMENT_PIECES))
    return [arguments[i : i + size] for i in range(0, len(arguments), size)] or [""]


class FakeLLM:
    """An OpenAI-compatible chat-completions server on a free local port.

    Use as a context manager (or call :meth:`start` / :meth:`stop`). Everything it
    observed is readable from any thread: :attr:`requests`, :attr:`disconnects`.
    """

    def __init__(self, *, token_delay_s: float = 0.01) -> None:
        self.token_delay_s = token_delay_s
        self.base_url = ""
        self._cond = threading.Condition()
        self._requests: list[dict[str, Any]] = []
        self._disconnects = 0
        self._stopping = False
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ids = 0

    # -- observations ---------------------------------------------------------------

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every ``/chat/completions`` body received, oldest first, SDK retries included (a copy)."""
        with self._cond:
            return list(self._requests)

    @property
    def disconnects(self) -> int:
        """How many streams the client aborted before the server finished them."""
        with self._cond:
            return self._disconnects

    def wait_until(self, predicate: Callable[[FakeLLM], bool], timeout_s: float = 5.0) -> None:
        """Block until ``predicate(self)`` holds; raise ``TimeoutError`` after ``timeout_s``."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self), timeout=timeout_s):
                raise TimeoutError(f"fake LLM: condition not met within {timeout_s} s")

    async def wait_until_async(self, predicate: Callable[[FakeLLM], bool], timeout_s: float = 5.0) -> None:
        """:meth:`wait_until` without blocking the caller's event loop."""
        await asyncio.to_thread(self.wait_until, predicate, timeout_s)

    # -- the deterministic answer -------------------------------------------------------

    def answer_for(self, messages: list[dict[str, Any]]) -> str:
        """The full answer the server streams for these request ``messages``.

        ``"Echo: <last user text>. "`` plus a sentence counting the user turns, or
        ``"word1 ... wordN"`` under ``[[tokens:N]]``. Directives are not echoed.
        """
        results = _trailing_tool_results(messages)
        if results:
            return " ".join(f"Tool said: {result}." for result in results)
        text, directives = _directives(messages)
        if "tokens" in directives:
            return " ".join(f"word{i}" for i in range(1, int(directives["tokens"]) + 1))
        turns = sum(1 for m in messages if m.get("role") == "user")
        return f"Echo: {text}. This is fake answer number {turns} from the test model."

    def tool_calls_for(self, body: dict[str, Any]) -> list[tuple[str, str]]:
        """The ``(name, JSON arguments)`` calls the server makes for this request body, if any.

        The ``[[tool:...]]`` directives of the last user message, while the request offers
        tools (``tool_choice`` not ``"none"``) and fewer than ``[[tool_rounds:N]]`` (default 1)
        assistant tool-call messages follow that user message.
        """
        if not body.get("tools") or body.get("tool_choice") == "none":
            return []
        messages: list[dict[str, Any]] = body.get("messages", [])
        calls = _TOOL_DIRECTIVE.findall(_last_user_text(messages))
        _, directives = _directives(messages)
        rounds = 0
        for message in reversed(messages):
            if message.get("role") == "user":
                break
            if message.get("role") == "assistant" and message.get("tool_calls"):
                rounds += 1
        return calls if rounds < int(directives.get("tool_rounds", 1)) else []

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the server thread and wait until it accepts connections."""
        with self._cond:
            self._stopping = False
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="fake-llm", daemon=True)
        self._thread.start()
        if not self._ready.wait(_START_TIMEOUT_S):
            raise TimeoutError("fake LLM did not start")
        if self._startup_error is not None:
            raise RuntimeError("fake LLM failed to start") from self._startup_error

    def stop(self) -> None:
        """Stop the server (open streams are cut without counting as disconnects)."""
        if self._thread is None or self._loop is None or self._stop_event is None:
            return
        with self._cond:
            self._stopping = True
        self._loop.call_soon_threadsafe(self._stop_event.set)
        self._thread.join(_START_TIMEOUT_S)
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(), which re-raises
            self._startup_error = exc
            self._ready.set()

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._models)
        # handler_cancellation: a client disconnect cancels the handler at once, even
        # while it sleeps in [[stall:...]], so `disconnects` is counted promptly.
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            self.base_url = f"http://127.0.0.1:{port}/v1"
            self._loop = asyncio.get_running_loop()
            self._stop_event = asyncio.Event()
            self._ready.set()
            await self._stop_event.wait()
        finally:
            await runner.cleanup()

    # -- handlers -----------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [_model_card("fake-model")]})

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        body: dict[str, Any] = await request.json()
        with self._cond:
            self._requests.append(body)
            self._ids += 1
            completion_id = f"chatcmpl-fake-{self._ids}"
            self._cond.notify_all()
        messages: list[dict[str, Any]] = body.get("messages", [])
        _, directives = _directives(messages)
        if "status" in directives:
            return _error_response(int(directives["status"]))
        calls = self.tool_calls_for(body)
        answer = f"Calling {', '.join(name for name, _ in calls)}. " if calls else self.answer_for(messages)
        model = str(body.get("model", "fake-model"))
        if not body.get("stream"):
            return web.json_response(_completion(completion_id, model, answer, calls))
        return await self._stream(request, completion_id, model, answer, directives, body, calls)

    async def _stream(
        self,
        request: web.Request,
        completion_id: str,
        model: str,
        answer: str,
        directives: dict[str, float],
        body: dict[str, Any],
        calls: list[tuple[str, str]],
    ) -> web.StreamResponse:
        delay_s = directives.get("slow", self.token_delay_s)
        die_after = int(directives["die_after"]) if "die_after" in directives else None
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)

        async def send(delta: dict[str, Any], finish_reason: str | None = None) -> None:
            chunk = _chunk(completion_id, model, delta, finish_reason)
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        try:
            await asyncio.sleep(directives.get("stall", 0.0))
            await send({"role": "assistant", "content": ""})
            for sent, word in enumerate(split_words(answer)):
                if sent == die_after:
                    # close() flushes what was written, then FIN without the final
                    # zero-length chunk: the client sees an incomplete body.
                    if request.transport is not None:
                        request.transport.close()
                    return response
                await asyncio.sleep(delay_s)
                await send({"content": word})
            for index, (name, arguments) in enumerate(calls):
                start = {"index": index, "id": _call_id(completion_id, index), "type": "function",
                         "function": {"name": name, "arguments": ""}}
                await send({"tool_calls": [start]})
                for piece in _split_arguments(arguments):
                    await asyncio.sleep(delay_s)
                    await send({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
            await send({}, "tool_calls" if calls else "stop")
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = _chunk(completion_id, model, None, None) | {"usage": _usage(answer)}
                await response.write(f"data: {json.dumps(usage)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            with self._cond:
                if not self._stopping:
                    self._disconnects += 1
                self._cond.notify_all()
            raise
        return response


def _model_card(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "chorus-tests"}


def _chunk(
    completion_id: str, model: str, delta: dict[str, Any] | None, finish_reason: str | None
) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }


def _usage(answer: str) -> dict[str, int]:
    completion_tokens = len(split_words(answer))
    return {"prompt_tokens": 1, "completion_tokens": completion_tokens, "total_tokens": completion_tokens + 1}


def _call_id(completion_id: str, index: int) -> str:
    return f"call_{completion_id.rsplit('-', 1)[-1]}_{index}"


def _completion(
    completion_id: str, model: str, answer: str, calls: list[tuple[str, str]] | None = None
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer}
    if calls:
        message["tool_calls"] = [
            {"id": _call_id(completion_id, index), "type": "function",
             "function": {"name": name, "arguments": arguments}}
            for index, (name, arguments) in enumerate(calls)
        ]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}
        ],
        "usage": _usage(answer),
    }


def _error_response(status: int) -> web.Response:
    kind = (
        "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
    )
    # retry-after-ms keeps the openai SDK's retries of 429/5xx fast in tests.
    return web.json_response(
        {"error": {"message": f"fake LLM: forced status {status}", "type": kind, "code": status}},
        status=status,
        headers={"retry-after-ms": "10"},
    )
