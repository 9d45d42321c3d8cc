"""The raw-frame probe: the least a fan-out server can do per delivery in Python.

    python -m loadtest.peers.raw_probe --port 8080 --redis redis://127.0.0.1:6379/0 --secret S

A device opens ``ws://host:port/ws?user=U&token=T`` (``tokens.py``); the first local device of a
user subscribes Redis channel ``probe:U``, the last one's leaving unsubscribes it. The Pub/Sub
connection is an ``asyncio.Protocol`` whose reads all go to one hiredis ``Reader`` (many messages
per read, no per-message timeout); each message is framed once as an unmasked WebSocket text frame
and written with ``transport.write`` to every socket of the user: no task, no queue, no awaiting.
The WebSocket side is the minimum of RFC 6455 a server needs: the upgrade, text frames out, and
close and ping frames in (everything else a client sends is skipped). Publishers send a plain
``PUBLISH probe:U payload``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from collections.abc import Callable
from typing import cast
from urllib.parse import parse_qs, urlsplit

import hiredis

from loadtest.peers.cli import server_arguments
from loadtest.peers.tokens import valid

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CHANNEL_PREFIX = "probe:"
_MAX_REQUEST_BYTES = 8192


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def parse_upgrade(request: bytes) -> tuple[str, dict[str, str], dict[str, str]]:
    """(path, query, lower-cased headers) of an HTTP request head (through the blank line)."""
    lines = request.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    if method != "GET":
        raise ValueError(f"method {method}")
    url = urlsplit(target)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    query = {name: values[0] for name, values in parse_qs(url.query).items()}
    return url.path, query, headers


def upgrade_response(key: str) -> bytes:
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key).encode() + b"\r\n\r\n")


def frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One unmasked, final server frame (text by default)."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return head + payload


def client_frames(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Pop the complete (masked) client frames from ``buffer``: (opcode, unmasked payload)."""
    out = []
    while len(buffer) >= 2:
        size, at = buffer[1] & 0x7F, 2
        if size == 126:
            if len(buffer) < 4:
                break
            size, at = struct.unpack_from("!H", buffer, 2)[0], 4
        elif size == 127:
            if len(buffer) < 10:
                break
            size, at = struct.unpack_from("!Q", buffer, 2)[0], 10
        masked = buffer[1] & 0x80
        end = at + (4 if masked else 0) + size
        if len(buffer) < end:
            break
        body = bytes(buffer[end - size:end])
        if masked:
            mask = buffer[at:at + 4]
            body = bytes(b ^ mask[i % 4] for i, b in enumerate(body))
        out.append((buffer[0] & 0x0F, body))
        del buffer[:end]
    return out


def resp(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class PubSub(asyncio.Protocol):
    """Redis Pub/Sub through a hiredis Reader; ``on_message(channel, payload)`` per message."""

    def __init__(self, on_message: Callable[[bytes, bytes], None]) -> None:
        self.on_message = on_message
        self.reader = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if isinstance(reply, list) and reply[0] == b"message":
                self.on_message(reply[1], reply[2])

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, *command: bytes) -> None:
        assert self.transport is not None
        self.transport.write(resp(*command))


class Probe:
    """The user → sockets registry and the Pub/Sub connection."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.sockets: dict[bytes, set[asyncio.Transport]] = {}
        self.pubsub: PubSub | None = None

    async def connect(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        _, self.pubsub = await loop.create_connection(lambda: PubSub(self.deliver), host, port)

    def deliver(self, channel: bytes, payload: bytes) -> None:
        sockets = self.sockets.get(channel)
        if sockets:
            data = frame(payload)
            for transport in sockets:
                transport.write(data)

    def attach(self, user: str, transport: asyncio.Transport) -> bytes:
        channel = (CHANNEL_PREFIX + user).encode()
        sockets = self.sockets.setdefault(channel, set())
        if not sockets and self.pubsub:
            self.pubsub.send(b"SUBSCRIBE", channel)
        sockets.add(transport)
        return channel

    def detach(self, channel: bytes, transport: asyncio.Transport) -> None:
        sockets = self.sockets.get(channel)
        if sockets is None:
            return
        sockets.discard(transport)
        if not sockets:
            del self.sockets[channel]
            if self.pubsub:
                self.pubsub.send(b"UNSUBSCRIBE", channel)


class Socket(asyncio.Protocol):
    """One device: the upgrade, then close and ping frames in; frames out come from ``Probe``."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.channel: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        if self.channel is None:
            self._upgrade()
            return
        for opcode, body in client_frames(self.buffer):
            if opcode == 0x8:
                self.transport.write(frame(body[:2], 0x8))
                self.transport.close()
            elif opcode == 0x9:
                self.transport.write(frame(body, 0xA))

    def _upgrade(self) -> None:
        assert self.transport is not None
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > _MAX_REQUEST_BYTES:
                self.transport.close()
            return
        try:
            path, query, headers = parse_upgrade(bytes(self.buffer[:end]))
            key = headers["sec-websocket-key"]
        except (ValueError, KeyError):
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()
            return
        user = query.get("user", "")
        if path != "/ws" or not valid(self.probe.secret, user, query.get("token", "")):
            self.transport.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()
            return
        del self.buffer[:end + 4]
        self.transport.write(upgrade_response(key))
        self.channel = self.probe.attach(user, self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.channel is not None and self.transport is not None:
            self.probe.detach(self.channel, self.transport)


async def serve(host: str, port: int, redis_url: str, secret: str,
                ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled (or until the Pub/Sub connection is lost)."""
    url = urlsplit(redis_url)
    probe = Probe(secret)
    await probe.connect(url.hostname or "127.0.0.1", url.port or 6379)
    server = await asyncio.get_running_loop().create_server(lambda: Socket(probe), host, port, backlog=4096)
    if ready is not None:
        ready.set()
    assert probe.pubsub is not None
    try:
        await probe.pubsub.lost
    finally:
        server.close()
        if probe.pubsub.transport is not None:
            probe.pubsub.transport.close()


def main() -> None:
    args = server_arguments("python -m loadtest.peers.raw_probe")
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port, args.redis, args.secret))
    else:
        uvloop.run(serve(args.host, args.port, args.redis, args.secret))


if __name__ == "__main__":
    main()
