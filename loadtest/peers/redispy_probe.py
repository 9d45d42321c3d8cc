"""The redis-py probe: the obvious aiohttp + redis-py Pub/Sub fan-out server, nothing more.

    python -m loadtest.peers.redispy_probe --port 8080 --redis redis://127.0.0.1:6379/0 --secret S

A device opens ``ws://host:port/ws?user=U&token=T`` (``tokens.py``); the first local device of a
user subscribes channel ``probe:U`` on the process's one ``redis.asyncio`` PubSub, the last one's
leaving unsubscribes it. One task reads ``pubsub.listen()`` and writes each message to the user's
sockets with ``send_str``. Publishers send a plain ``PUBLISH probe:U payload``.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import WSMsgType, web
from redis.asyncio import Redis

from loadtest.peers.cli import run_aiohttp, server_arguments
from loadtest.peers.tokens import valid

CHANNEL_PREFIX = "probe:"
_IDLE_CHANNEL = "probe:-"  # listen() ends when nothing is subscribed; this keeps it going


class Probe:
    def __init__(self, redis_url: str, secret: str) -> None:
        self.redis = Redis.from_url(redis_url)
        self.pubsub = self.redis.pubsub()
        self.secret = secret
        self.sockets: dict[str, set[web.WebSocketResponse]] = {}
        self.reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.pubsub.subscribe(_IDLE_CHANNEL)
        self.reader = asyncio.create_task(self.read())

    async def close(self) -> None:
        if self.reader:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        await self.redis.aclose()

    async def read(self) -> None:
        async for message in self.pubsub.listen():
            if message["type"] != "message":
                continue
            text = message["data"].decode()
            for ws in list(self.sockets.get(message["channel"].decode(), ())):
                with contextlib.suppress(ConnectionError):
                    await ws.send_str(text)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        user = request.query.get("user", "")
        if not valid(self.secret, user, request.query.get("token", "")):
            raise web.HTTPUnauthorized()
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        channel = CHANNEL_PREFIX + user
        sockets = self.sockets.setdefault(channel, set())
        first = not sockets
        sockets.add(ws)
        try:
            if first:
                await self.pubsub.subscribe(channel)
            async for message in ws:
                if message.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                    break
        finally:
            sockets.discard(ws)
            if not sockets and self.sockets.get(channel) is sockets:
                del self.sockets[channel]
                await self.pubsub.unsubscribe(channel)
        return ws


def app(redis_url: str, secret: str) -> web.Application:
    probe = Probe(redis_url, secret)
    application = web.Application()
    application.router.add_get("/ws", probe.handle)

    async def lifecycle(_: web.Application):  # type: ignore[no-untyped-def]
        await probe.start()
        yield
        await probe.close()

    application.cleanup_ctx.append(lifecycle)
    return application


def main() -> None:
    args = server_arguments("python -m loadtest.peers.redispy_probe")
    run_aiohttp(app(args.redis, args.secret), args)


if __name__ == "__main__":
    main()
