"""`WireSession`: a device's socket served by the node's own WebSocket code (`ws_node.lean`), from
the upgrade `lean.Front` hands over to its close, through the steps of `ws_node.sockets`."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections import deque
from collections.abc import Awaitable

from aiohttp import web

from ws_node import lean
from ws_node.auth import TokenLease
from ws_node.connection import Connection
from ws_node.services import ADMISSION, SERVICES, Admission, Services
from ws_node.sockets import (
    INBOX_MAX_FRAMES,
    admit,
    begun,
    connect,
    disconnect,
    ended,
    first_frame_auth,
    handle_frame,
    open_stream,
    refuse_binary,
)

log = logging.getLogger(__name__)


class WireSession:
    """A socket served by `ws_node.lean`: `_serve_socket`'s steps, driven by the socket's events.
    A task runs only while the socket opens, while its frames are being served, and while it
    closes; an idle socket is this, its `WireSocket` and its `Connection`, and nothing awaits."""

    __slots__ = ("_commands", "_context", "_inbox", "_waiter", "conn", "guard", "lease", "live", "sock",
                 "started", "svc")

    def __init__(self, svc: Services, guard: Admission) -> None:
        self.svc = svc
        self.guard = guard
        self.sock: lean.WireSocket | None = None
        self.conn: Connection | None = None
        self.lease: TokenLease | None = None
        self.live = False  # opened: frames are served as they come
        self.started = 0.0
        self._inbox: deque[str | bytes] = deque()  # frames read, not yet served
        self._waiter: asyncio.Future[None] | None = None  # the first-frame auth waiting for a frame
        self._commands: asyncio.Task[None] | None = None
        self._context = contextvars.copy_context()  # the socket's log fields, for each of its tasks

    @classmethod
    def start(cls, app: web.Application, transport: asyncio.Transport, upgrade: lean.Upgrade) -> None:
        """`lean.Front`'s hand-over: admit the upgrade and serve the socket."""
        session = cls(app[SERVICES], app[ADMISSION])
        session.started = begun(session.svc)
        session.svc.openings.add(functools.partial(session._begin, transport, upgrade))

    def _begin(self, transport: asyncio.Transport, upgrade: lean.Upgrade) -> None:
        self._spawn(self._run(transport, upgrade))

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(coro, context=self._context)  # type: ignore[arg-type]

    async def _run(self, transport: asyncio.Transport, upgrade: lean.Upgrade) -> None:
        try:
            await self._open(transport, upgrade)
        except Exception:
            log.exception("socket failed while opening")
        if not self.live:
            await self._finish()

    async def _open(self, transport: asyncio.Transport, upgrade: lean.Upgrade) -> None:
        svc, settings = self.svc, self.svc.settings
        reply: bytes | web.HTTPException
        try:
            admitted = await admit(upgrade.headers, upgrade.raw_query, svc, self.guard)
            device, after, client_epoch, ident = admitted
            reply = lean.handshake(upgrade)
        except web.HTTPException as exc:
            reply = exc
        if upgrade.lost:
            return
        if isinstance(reply, web.HTTPException):
            transport.write(lean.refusal(reply))
            transport.close()
            return
        transport.write(reply)
        sock = self.sock = lean.WireSocket(transport, self, max_size=settings.max_frame_bytes)
        transport.set_protocol(sock)
        svc.stats.connects += 1
        svc.heartbeats.add(sock)
        if upgrade.paused:  # before the bytes held: serving them may pause it again
            transport.resume_reading()
        if upgrade.rest:
            sock.data_received(bytes(upgrade.rest))
        auth_id = None
        if ident is None:
            first = await first_frame_auth(self._receive, self._close, self.guard, settings)
            if first is None:
                return
            ident, auth_id = first
        self.conn, self.lease = connect(svc, self.guard, sock, transport, ident, device, auth_id)
        if await open_stream(svc, self.conn, after, client_epoch) and not sock.closed:
            self.live = True
            self._serve_inbox()

    async def _receive(self, timeout_s: float) -> str | bytes | None:
        """The next frame read (None once the socket closed), for the first-frame auth."""
        async with asyncio.timeout(timeout_s):
            while not self._inbox:
                if self.sock is None or self.sock.closed:
                    return None
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        return self._inbox.popleft()

    async def _close(self, code: int, message: bytes) -> None:
        assert self.sock is not None
        await self.sock.close(code=code, message=message)

    # lean.Handler

    def on_message(self, data: str | bytes) -> None:
        self._inbox.append(data)
        if len(self._inbox) >= INBOX_MAX_FRAMES and self.sock is not None:
            self.sock.transport.pause_reading()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self.live:
            self._serve_inbox()

    def on_end(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self.live:
            self.live = False
            self.svc.teardowns.add(self._begin_finish)

    def _begin_finish(self) -> None:
        self._spawn(self._finish())

    # Serving

    def _serve_inbox(self) -> None:
        if self._commands is None and self._inbox:
            self._commands = self._spawn(self._serve())

    async def _serve(self) -> None:
        """Serve the frames read, one after another, as `_serve_socket`'s loop does; then end."""
        assert self.sock is not None and self.conn is not None and self.lease is not None
        try:
            while self._inbox and self.live:
                data = self._inbox.popleft()
                if len(self._inbox) == INBOX_MAX_FRAMES // 2 and not self.sock.lost:
                    self.sock.transport.resume_reading()
                if isinstance(data, str):
                    await handle_frame(self.svc, self.guard, self.conn, self.lease, data)
                else:
                    refuse_binary(self.conn)
        finally:
            self._commands = None

    async def _finish(self) -> None:
        svc, sock = self.svc, self.sock
        try:
            if self._commands is not None:  # the frame being served is served first
                await asyncio.gather(self._commands, return_exceptions=True)
            if self.conn is not None and self.lease is not None:
                await disconnect(svc, self.conn, self.lease)
        except Exception:
            log.exception("socket failed while closing")
        finally:
            if sock is not None:
                sock.end()
                svc.heartbeats.remove(sock)
            ended(svc, self.started, sock.close_code if sock else None, upgraded=sock is not None)
            # The socket holds this session (its handler) and the connection holds the socket:
            # without these links none of the three is in a cycle, so all go by reference counts
            # once the transport lets go, not in a full pass of the collector (common/collector.py).
            self.sock = self.conn = self.lease = None
