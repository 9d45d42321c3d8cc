"""Chorus's own `/ws`: the upgrade served on the node's port with no aiohttp objects and no task
per socket while it is idle (issue 14: an aiohttp socket held ~19 KB of Python objects, its
request, parser, response, reader, writer, timers and a handler coroutine awaiting the next frame).

`Front` is the protocol of every accepted connection. It reads the request head: a plain
`GET /ws` upgrade (no body; a permessage-deflate offer declined unless `WS_COMPRESSION`) is handed
to `on_upgrade`, which admits it and puts a `WireSocket` on the transport; anything else goes,
bytes and all, to aiohttp, which serves it exactly as before (REST, the page, /ws with compression,
and malformed requests, which aiohttp answers). `Heartbeats` pings all of a node's wire sockets
from one timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

from aiohttp import web
from multidict import CIMultiDict

from ws_node import wire

log = logging.getLogger(__name__)
MAX_LINE_BYTES = 8190  # aiohttp's limit on a request line or a header line; longer heads go to it
MAX_HEAD_BYTES = 32 * 1024
CLOSE_WAIT_S = 5.0  # after its close frame, how long the node waits for the client's


@dataclass(slots=True)
class Upgrade:
    """A `GET /ws` upgrade request: its headers, its raw query, and the bytes after its head."""

    headers: CIMultiDict[str]
    raw_query: str
    rest: bytearray = field(default_factory=bytearray)
    lost: bool = False  # the client went away while it was being admitted
    paused: bool = False  # reading stopped: the client sent more than a head's worth meanwhile


def parse_upgrade(head: bytes, *, compression: bool = False) -> Upgrade | None:
    """The upgrade in a request head (without its blank line), or None for anything aiohttp should
    serve: another path or method, a body, non-ASCII, an over-long line, and with `compression` a
    permessage-deflate offer (without it the offer is declined: the 101 names no extension)."""
    if not head.isascii():
        return None
    lines = head.decode().split("\r\n")
    if any(len(line) > MAX_LINE_BYTES for line in lines):
        return None
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[0] != "GET" or parts[2] != "HTTP/1.1":
        return None
    path, _, query = parts[1].partition("?")
    if path != "/ws":
        return None
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            return None
        headers.add(name, value.strip(" \t"))
    if ("content-length" in headers or "transfer-encoding" in headers
            or (compression and "permessage-deflate" in headers.get("sec-websocket-extensions", "").lower())
            or headers.get("upgrade", "").lower() != "websocket"):
        return None
    return Upgrade(headers, query)


def http_response(status: int, reason: str, body: str = "", headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 response, after which the connection closes."""
    data = body.encode()
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if status != 101:
        lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(data)}",
                  "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def refusal(exc: web.HTTPException) -> bytes:
    """aiohttp's HTTP error as the response the aiohttp path would have sent."""
    extra = {name: value for name, value in exc.headers.items()
             if name.lower() not in ("content-type", "content-length")}
    return http_response(exc.status, exc.reason, exc.text or "", extra)


def handshake(upgrade: Upgrade) -> bytes | web.HTTPException:
    """The 101 for a valid upgrade, else the 400 aiohttp would answer."""
    headers = upgrade.headers
    if "upgrade" not in headers.get("connection", "").lower():
        return web.HTTPBadRequest(text="No CONNECTION upgrade hdr")
    if headers.get("sec-websocket-version") != "13":
        return web.HTTPBadRequest(text="Unsupported version", headers={"Sec-WebSocket-Version": "13"})
    accept = wire.accept_key(headers.get("sec-websocket-key", ""))
    if accept is None:
        return web.HTTPBadRequest(text="Handshake error")
    return http_response(101, "Switching Protocols", headers={
        "Upgrade": "websocket", "Connection": "upgrade", "Sec-WebSocket-Accept": accept})


class Front(asyncio.Protocol):
    """Every connection's first protocol: it reads the request head and hands the connection on."""

    __slots__ = ("_buffer", "_compression", "_http", "_on_upgrade", "_transport", "_upgrade")

    def __init__(self, http: Callable[[], asyncio.Protocol],
                 on_upgrade: Callable[[asyncio.Transport, Upgrade], None], *,
                 compression: bool = False) -> None:
        """`compression`: upgrades offering permessage-deflate go to aiohttp, which accepts it."""
        self._http = http
        self._compression = compression
        self._on_upgrade = on_upgrade
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._upgrade: Upgrade | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not its subclasses

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        if self._upgrade is not None:  # being admitted: the socket will read it
            self._upgrade.rest += data
            if len(self._upgrade.rest) > MAX_HEAD_BYTES and not self._upgrade.paused:
                self._upgrade.paused = True  # no more until it is a socket
                self._transport.pause_reading()
            return
        buffer = self._buffer + data
        end = buffer.find(b"\r\n\r\n")
        if end < 0 and len(buffer) <= MAX_HEAD_BYTES:
            self._buffer = buffer
            return
        upgrade = parse_upgrade(buffer[:end], compression=self._compression) if end >= 0 else None
        if upgrade is None:
            self._hand_over(buffer)
            return
        self._buffer = b""
        upgrade.rest += buffer[end + 4:]
        self._upgrade = upgrade
        self._on_upgrade(self._transport, upgrade)

    def _hand_over(self, buffer: bytes) -> None:
        """aiohttp takes the connection from here, the bytes read so far included."""
        assert self._transport is not None
        protocol = self._http()
        self._transport.set_protocol(protocol)
        protocol.connection_made(self._transport)
        protocol.data_received(buffer)

    def eof_received(self) -> bool:
        return False  # half a request: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._upgrade is not None:
            self._upgrade.lost = True


class Handler(Protocol):
    """What a `WireSocket` tells its owner (`ws_node.wire_session.WireSession`)."""

    def on_message(self, data: str | bytes) -> None: ...

    def on_end(self) -> None: ...


class WireSocket(asyncio.Protocol):
    """One upgraded connection. Events are handed to `handler` as they are read; frames go
    straight to the transport. `closed`, `send_str` and `close` are what `ws_node.connection`
    uses of an aiohttp `WebSocketResponse`, with the same meaning. The handler hears of the end
    once: the client's close frame, a protocol failure or the connection lost. The node answers a
    client's close frame when it is done with the socket (the handler calls `close` or `end`), so a
    client that waits for that answer finds the device gone from presence when it reconnects."""

    __slots__ = ("__weakref__", "_drained", "_ended", "_reader", "close_code", "closing", "due", "eof",
                 "handler", "lost", "notified", "peer_closed", "pinged", "seen", "transport")

    def __init__(self, transport: asyncio.Transport, handler: Handler, *, max_size: int) -> None:
        self.transport = transport
        self.handler = handler
        self._reader = wire.FrameReader(max_size)
        self.close_code: int | None = None
        self.closing = False  # the node's close frame went out: nothing may follow it
        self.peer_closed = False  # the client's close frame came
        self.lost = False
        self.eof = False  # the client shut its side without a close frame: nothing more comes or goes
        self.notified = False  # the handler heard of the end
        self.seen = True  # read something since the last heartbeat check
        self.pinged = False
        self.due = 0  # the second of its next heartbeat look (`Heartbeats`)
        self._drained: asyncio.Future[None] | None = None  # while the transport is over its high-water mark
        self._ended: asyncio.Future[None] | None = None  # while the node waits for the client's close

    @property
    def closed(self) -> bool:
        return self.closing or self.peer_closed or self.lost or self.eof

    def data_received(self, data: bytes) -> None:
        self.seen = True
        for event in self._reader.feed(data):
            if self.peer_closed:
                return  # nothing counts after a close frame
            if isinstance(event, wire.Message):
                if not self.closing:
                    self.handler.on_message(event.data)
            elif isinstance(event, wire.Ping):
                if not self.closing:
                    self.transport.write(wire.frame(wire.Opcode.PONG, event.payload))
            elif isinstance(event, wire.Close):
                self._closed_by_client(event.code)
            elif isinstance(event, wire.Failure):
                log.info("client broke the protocol: %s", event.reason, extra={"code": event.code})
                self._send_close(event.code, event.reason)
                self.transport.close()

    def _closed_by_client(self, code: int) -> None:
        self.peer_closed = True
        if self.close_code is None:
            self.close_code = code
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)  # the answer to the node's close
        self._notify()

    def _notify(self) -> None:
        if not self.notified:
            self.notified = True
            self.handler.on_end()

    def _send_close(self, code: int, reason: str) -> None:
        if not self.closing:
            self.closing = True
            if self.close_code is None:
                self.close_code = code
            self.transport.write(wire.close_frame(code, reason))

    def ping(self) -> None:
        if not self.closed:
            self.transport.write(wire.frame(wire.Opcode.PING, b""))

    def abort(self, code: int) -> None:
        """End without a close handshake (a client that stopped answering pings)."""
        if self.close_code is None:
            self.close_code = code
        self.transport.abort()

    async def send_str(self, data: str) -> None:
        if self.closed:
            raise ConnectionResetError("the socket is closing")
        self.transport.write(wire.frame(wire.Opcode.TEXT, data.encode()))
        if self._drained is not None:
            await asyncio.shield(self._drained)

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        """Send a close frame and wait (up to `CLOSE_WAIT_S`) for the client's, then end."""
        if self.lost or self.eof:
            return False
        self._send_close(code, message.decode(errors="replace"))
        if not self.peer_closed:
            if self._ended is None:
                self._ended = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._ended), CLOSE_WAIT_S)
        self.end()
        return True

    def end(self) -> None:
        """Let go of the connection, answering the client's close frame if it is unanswered:
        closed gracefully when nothing waits to be written, else aborted."""
        if self.lost:
            return
        if self.peer_closed:
            self._send_close(1000, "")
        if self.transport.get_write_buffer_size() > wire.WRITE_HIGH_WATER:
            self.transport.abort()
        else:
            self.transport.close()

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None:
            self._drained.set_result(None)
            self._drained = None

    def eof_received(self) -> bool:
        """The client shut its side (its process or its socket closed without a close frame).
        The transport is kept (True) and closed as the socket is torn down (`end`, paced with the
        other teardowns): closed here, in the read's callback, every socket whose end arrived in
        one read of the loop was closed in one turn of it, ~20 µs each in uvloop and the kernel,
        and a fleet of clients gone at once made ~2,000 a turn (S1's closing, 15,000 sockets:
        ticks 30-50 ms late, issue 14)."""
        self.eof = True
        self._gone()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._gone()

    def _gone(self) -> None:
        if self.close_code is None:
            self.close_code = 1006  # gone without a close frame
        for waiter in (self._drained, self._ended):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        self._drained = None
        self._notify()


class Heartbeats:
    """One timer for all of a node's wire sockets, where aiohttp keeps one per socket (and a
    wake-up for each): each socket is looked at once per `interval_s`; one that sent nothing since
    its last look is pinged, and one that then sends nothing for another half interval is ended
    (1006), as aiohttp's heartbeat does."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._slots: dict[int, set[WireSocket]] = {}
        self._cursor = 0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, sock: WireSocket) -> None:
        loop = asyncio.get_running_loop()
        if self._timer is None:
            self._cursor = int(loop.time()) + 1
            self._timer = loop.call_at(self._cursor, self._tick)
        self._put(sock, loop.time() + self.interval_s)

    def remove(self, sock: WireSocket) -> None:
        """`sock` is done: let it go now, not at its next look."""
        slot = self._slots.get(sock.due)
        if slot is not None:
            slot.discard(sock)

    def _put(self, sock: WireSocket, when: float) -> None:
        sock.due = max(int(when), self._cursor + 1)
        self._slots.setdefault(sock.due, set()).add(sock)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = int(now)
        while self._cursor <= due:
            for sock in self._slots.pop(self._cursor, ()):
                self._look(sock, now)
            self._cursor += 1
        self._timer = loop.call_at(self._cursor, self._tick)

    def _look(self, sock: WireSocket, now: float) -> None:
        if sock.lost or sock.eof:  # its teardown is on its way
            return
        if sock.seen:
            sock.seen = sock.pinged = False
            self._put(sock, now + self.interval_s)
        elif sock.pinged:
            sock.abort(1006)
        else:
            sock.ping()
            sock.pinged = True
            self._put(sock, now + self.interval_s / 2)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._slots.clear()


class Paced:
    """Work started at most `per_turn` items per turn of the event loop, in the order it came.
    When 10,000 sockets of a node close at once (a client fleet restarting, a network blip), their
    teardowns (hub, presence, log line: ~100 µs each) started together held the loop for up to a
    second, every other socket's deliveries with it (issue 14, S1's closing phase). Sockets opening
    are started the same way (token check, admission, upgrade: ~300 µs each until their first
    wait), 16 a turn: S1's opening at 2,000 sockets a second had 15 ticks over 20 ms, now 3-6."""

    def __init__(self, per_turn: int = 64) -> None:
        self.per_turn = per_turn
        self._due: deque[Callable[[], object]] = deque()
        self._task: asyncio.Task[None] | None = None

    def add(self, start: Callable[[], object]) -> None:
        self._due.append(start)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        due = self._due
        try:
            while due:
                for _ in range(min(self.per_turn, len(due))):
                    due.popleft()()
                await asyncio.sleep(0)
        finally:
            self._task = None
