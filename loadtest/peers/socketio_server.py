"""python-socketio peer: ``socketio.AsyncServer`` on aiohttp with ``AsyncRedisManager``.

    <peers venv>/bin/python -m loadtest.peers.socketio_server --port P --redis URL --secret S

WebSocket transport only (no long-polling). A device connects with the auth payload
``{"user": U, "token": T}`` (``tokens.py``) and is put in room ``U``. The publisher
(``publisher.py --system python-socketio``) emits event ``ev`` to room ``U`` through a write-only
``AsyncRedisManager``; every server process receives every emit on the manager's one channel and
delivers it to its local members of the room.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import socketio
from aiohttp import web

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
    parser = argparse.ArgumentParser(prog="python -m loadtest.peers.socketio_server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--secret", required=True)
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    web.run_app(app(args.redis, args.secret), host=args.host, port=args.port, print=None,
                access_log=None, backlog=4096)


if __name__ == "__main__":
    main()
