"""A fast OpenAI-compatible streaming server: the load generator's side of ``loadtest.bench``.

    python -m loadtest.llm_server --port 8099 --chunks 2000

Every ``POST /v1/chat/completions`` with ``stream: true`` gets the same answer, ``--chunks`` one-token
chunks ``"w0 "``, ``"w1 "``, ... (``expected_answer``) with no delay between them, then
``data: [DONE]``. ``tests/fake_llm.py`` is the fake for behaviour (directives, tools, faults); this one
is for speed: the chunks are encoded once at start and written ``--batch`` at a time, so on a small
machine the server costs little next to the client it feeds. The chunk JSON is what ChatOpenAI reads:
``id``, ``object: "chat.completion.chunk"``, ``choices[0].delta.content``, ``finish_reason``, and a
final ``usage`` chunk when ``stream_options.include_usage`` asks for one.

``GET /arrivals`` returns ``{"arrivals": {last user text: wall-clock arrival time}}``, taken as the
request's headers are read (``time.time()``, so a benchmark on the same machine shares the clock), so
each run can be matched with its request by sending a unique text. ``GET /v1/models`` and
``GET /healthz`` answer too. Plain (non-streaming) completions are not served: Chorus always streams.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

__all__ = ["expected_answer", "main"]

_ID = "chatcmpl-bench"
_MODEL = "bench-model"


def expected_answer(chunks: int) -> str:
    """The text every answer adds up to: ``"w0 w1 ... w{chunks-1} "``."""
    return "".join(_token(n) for n in range(chunks))


def _token(n: int) -> str:
    return f"w{n} "


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _chunk(delta: dict[str, Any] | None, finish_reason: str | None = None) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return {"id": _ID, "object": "chat.completion.chunk", "created": int(time.time()), "model": _MODEL,
            "choices": choices}


class StreamingLLM:
    """The answer, encoded once, and the arrival time of every request."""

    def __init__(self, chunks: int, batch: int) -> None:
        self.chunks = chunks
        lines = [_sse(_chunk({"role": "assistant", "content": ""}))]
        lines += [_sse(_chunk({"content": _token(n)})) for n in range(chunks)]
        lines.append(_sse(_chunk({}, "stop")))
        # The role chunk and the first token go out alone, so the first token is not held back
        # behind a batch; then `batch` chunks per write (one syscall, not one per chunk).
        head, rest = lines[:2], lines[2:]
        self.writes = [b"".join(head)] + [b"".join(rest[i:i + batch]) for i in range(0, len(rest), batch)]
        usage = {"prompt_tokens": 1, "completion_tokens": chunks, "total_tokens": chunks + 1}
        self.usage = _sse(_chunk(None) | {"usage": usage})
        self.arrivals: dict[str, float] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/arrivals", self.arrivals_json)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def completions(self, request: web.Request) -> web.StreamResponse:
        arrived = time.time()
        body: dict[str, Any] = orjson.loads(await request.read())
        users = [m for m in body.get("messages", []) if m.get("role") == "user"]
        self.arrivals[_text_of(users[-1]) if users else ""] = arrived
        if not body.get("stream"):
            raise web.HTTPBadRequest(text="this server only streams (stream: true)")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        for data in self.writes:
            await response.write(data)
            # A turn for every other stream between batches, as a model server's decoding steps
            # advance all its sequences together: without it, a client that reads fast enough
            # never makes `write` wait, gets its whole answer at once, and the other requests
            # are not even read until it is done.
            await asyncio.sleep(0)
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(self.usage)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": _MODEL, "object": "model", "created": 0, "owned_by": "chorus-bench"}
        return web.json_response({"object": "list", "data": [card]})

    async def arrivals_json(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps({"arrivals": self.arrivals}), content_type="application/json")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "chunks": self.chunks})


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.llm_server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=2000, help="one-token chunks per answer")
    parser.add_argument("--batch", type=int, default=16, help="chunks per socket write after the first")
    args = parser.parse_args(argv)
    server = StreamingLLM(args.chunks, max(1, args.batch))
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(server, args.host, args.port))
    else:
        uvloop.run(_serve(server, args.host, args.port))


async def _serve(server: StreamingLLM, host: str, port: int) -> None:
    # SIGTERM (how loadtest.procs.Proc stops it) ends the process as is: nothing here to drain.
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    print(f"llm_server: {server.chunks} chunks per answer on http://{host}:{port}/v1", flush=True)
    await asyncio.Event().wait()

if __name__ == "__main__":
    main()
