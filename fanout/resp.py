"""What the lean Redis connections share (`resp_pubsub.RespPubSub`, `resp_pipe.RespPipe`): RESP
encoding of a command, and opening a connection (TCP or unix socket) with its AUTH and SELECT.

Plain `redis://` and `unix://` URLs, with a username/password and a database number; `rediss://`
stays with redis-py (the broker chooses)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

CONNECT_TIMEOUT_S = 3.0


def command(*parts: str | bytes | int) -> bytes:
    """One command in RESP."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


async def connect(protocol: asyncio.Protocol, params: dict[str, Any],
                  request: Callable[[bytes], Awaitable[Any]], *, select: bool) -> None:
    """Connect `protocol` as `params` say (`host`/`port` or `path`), then AUTH and, when `select`,
    SELECT the database; `request` sends one command and returns its reply. Raises
    ConnectionError (a `common.redis_client.TRANSIENT` error) when Redis refuses either."""
    loop = asyncio.get_running_loop()
    if "path" in params:
        connecting = loop.create_unix_connection(lambda: protocol, params["path"])
    else:
        connecting = loop.create_connection(lambda: protocol, params.get("host", "localhost"),
                                            params.get("port", 6379))
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        transport, _ = await connecting
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    password, username = params.get("password"), params.get("username")
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        if password:
            auth = ("AUTH", username, password) if username else ("AUTH", password)
            if isinstance(reply := await request(command(*auth)), Exception):
                raise ConnectionError(f"redis AUTH failed: {reply}")
        if select and int(params.get("db") or 0):
            if isinstance(reply := await request(command("SELECT", int(params["db"]))), Exception):
                raise ConnectionError(f"redis SELECT failed: {reply}")
