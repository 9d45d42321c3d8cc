"""python-socketio peer: ``socketio.AsyncServer`` on aiohttp with ``AsyncRedisManager``.

    <peers venv>/bin/python -m loadtest.peers.socketio_server --port P --redis URL --secret S

WebSocket transport only (no long-polling). A device connects with the auth payload
``{"user": U, "token": T}`` (``tokens.py``) and is put in room ``U``. The publisher
(``publisher.py --system python-socketio``) emits event ``ev`` to room ``U`` through a write-only
``AsyncRedisManager``; every server process receives every emit on the manager's one channel and
delivers it to its local members of the room.
"""

from __future__ import annotations

from typing import Any

import socketio
from aiohttp import web

from loadtest.peers.cli import run_aiohttp, server_arguments
from loadtest.peers.tokens import valid


def app(redis_url: str, secret: str) -> web.Application:
    sio = socketio.AsyncServer(client_manager=socketio.AsyncRedisManager(redis_url), async_mode="aiohttp",
                               transports=["websocket"], cors_allowed_origins="*")

    @sio.event  # type: ignore[untyped-decorator]
    async def connect(sid: str, environ: dict[str, Any], auth: dict[str, str] | None) -> bool:
        user = (auth or {}).get("user", "")
        if not valid(secret, user, (auth or {}).get("token", "")):
            return False
        await sio.enter_room(sid, user)
        return True

    application = web.Application()
    sio.attach(application)
    return application


def main() -> None:
    args = server_arguments("python -m loadtest.peers.socketio_server")
    run_aiohttp(app(args.redis, args.secret), args)


if __name__ == "__main__":
    main()
