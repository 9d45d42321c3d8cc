"""A device's socket from its upgrade to its close, whichever code serves it: aiohttp's
(`ws_handler`, for clients offering permessage-deflate and for `LEAN_SOCKETS=false`) or the node's
own (`WireSession` over `ws_node.lean`). Both take the same steps, in the same order: admitted
(HTTP refusals), upgraded, authenticated (by a first frame when the upgrade carried no token),
connected, opened (hub, device limit, hello and resume), served frame by frame, disconnected."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import math
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import WSMsgType, web
from multidict import CIMultiDictProxy

import protocol
from common import logs
from common.redis_client import TRANSIENT
from fanout.hub import Unavailable as HubUnavailable
from persistence.store import Unavailable as StoreUnavailable
from protocol import Ack, CloseCode, Error, ErrorCode, ProtocolError, Reconnect, encode
from ws_node import commands, lean, limits
from ws_node.auth import (
    AuthUnavailable,
    Identity,
    TokenLease,
    Unauthorized,
    origin_allowed,
    token_from,
    ws_query,
)
from ws_node.connection import Connection, Socket
from ws_node.services import ADMISSION, SERVICES, Admission, Services
from ws_node.settings import NodeSettings

log = logging.getLogger(__name__)
# A wire socket stops reading while this many of its frames wait for the one before them to be
# served (aiohttp's reader pauses on a byte limit in the same way).
INBOX_MAX_FRAMES = 32

Receive = Callable[[float], Awaitable["str | bytes | None"]]
CloseWith = Callable[[int, bytes], Awaitable[object]]


async def ws_handler(request: web.Request) -> web.StreamResponse:
    """One device's socket, counted from the first byte (a drain waits for sockets still opening)."""
    svc = request.app[SERVICES]
    started = _begun(svc)
    ws: web.StreamResponse | None = None
    try:
        ws = await _serve_socket(request)
        return ws
    finally:
        _release(request, ws)
        if isinstance(ws, web.WebSocketResponse):
            _ended(svc, started, ws.close_code, upgraded=ws.prepared)
        else:
            _ended(svc, started, None, upgraded=False)


def _begun(svc: Services) -> float:
    """A socket's request arrived: counted from its first byte (a drain waits for sockets still
    opening); when."""
    svc.sockets += 1
    svc.idle.clear()
    return asyncio.get_running_loop().time()


def _ended(svc: Services, started: float, code: int | None, *, upgraded: bool) -> None:
    """A socket's request is done; `upgraded`: it was a socket, closed with `code`."""
    svc.sockets -= 1
    if svc.sockets == 0:
        svc.idle.set()
    if upgraded:
        svc.stats.closed(code)
        duration_s = round(asyncio.get_running_loop().time() - started, 3)
        log.info("socket closed", extra={"code": code, "duration_s": duration_s})


def _release(request: web.Request, ws: web.StreamResponse | None) -> None:
    """Let a finished socket go by reference counts, not wait for a full pass of the cyclic
    collector, which a node makes rarely (`common/collector.py`): under churn, the cycles of closed
    sockets cost a ~1 s pass every 15-20 s (issue 14, `loadtest/churn_bench.py`). aiohttp (3.14)
    leaves two: the protocol keeps the response's data callback after the socket ends
    (`RequestHandler._data_received_cb` -> `WebSocketResponse` -> `Request` -> the protocol, ~27
    objects a socket); and a socket that ended in an error keeps it (`ws.exception()`), whose
    traceback holds the frame of `WebSocketResponse.close`, which holds the response. Nothing reads
    from the socket, or that traceback, once its handler is done."""
    protocol = request.protocol
    if getattr(protocol, "_data_received_cb", None) is not None:
        protocol._data_received_cb = None
    error = ws.exception() if isinstance(ws, web.WebSocketResponse) else None
    seen: set[int] = set()
    while error is not None and id(error) not in seen:  # and what it was raised while handling
        seen.add(id(error))
        error.__traceback__ = None
        error = error.__context__


async def _serve_socket(request: web.Request) -> web.StreamResponse:
    """Admitted, upgraded, authenticated (by its first frame when it came without a token), held
    to the device limit, then served until it closes or its token expires."""
    svc, guard = request.app[SERVICES], request.app[ADMISSION]
    settings = svc.settings
    admitted = await _admit(request.headers, request.rel_url.raw_query_string, svc, guard)
    device, after, client_epoch, ident = admitted

    ws = web.WebSocketResponse(heartbeat=settings.heartbeat_s, max_msg_size=settings.max_frame_bytes,
                               compress=settings.ws_compression)
    await ws.prepare(request)
    svc.stats.connects += 1
    auth_id = None
    if ident is None:

        async def receive(timeout_s: float) -> str | bytes | None:
            msg = await ws.receive(timeout=timeout_s)
            return msg.data if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY) else None

        async def close(code: int, message: bytes) -> None:
            await ws.close(code=code, message=message)

        first = await _first_frame_auth(receive, close, guard, settings)
        if first is None:
            return ws
        ident, auth_id = first
    # deflate: frames go through aiohttp, not straight to the transport
    conn, lease = _connect(svc, guard, ws, None if ws.compress else request.transport, ident, device, auth_id)
    try:
        if await _open(svc, conn, after, client_epoch):
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await handle_frame(svc, guard, conn, lease, msg.data)
                elif msg.type is WSMsgType.BINARY:
                    _refuse_binary(conn)
    finally:
        await _disconnect(svc, conn, lease)
    return ws


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
        session.started = _begun(session.svc)
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
            admitted = await _admit(upgrade.headers, upgrade.raw_query, svc, self.guard)
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
            first = await _first_frame_auth(self._receive, self._close, self.guard, settings)
            if first is None:
                return
            ident, auth_id = first
        self.conn, self.lease = _connect(svc, self.guard, sock, transport, ident, device, auth_id)
        if await _open(svc, self.conn, after, client_epoch) and not sock.closed:
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
                    _refuse_binary(self.conn)
        finally:
            self._commands = None

    async def _finish(self) -> None:
        svc, sock = self.svc, self.sock
        try:
            if self._commands is not None:  # the frame being served is served first
                await asyncio.gather(self._commands, return_exceptions=True)
            if self.conn is not None and self.lease is not None:
                await _disconnect(svc, self.conn, self.lease)
        except Exception:
            log.exception("socket failed while closing")
        finally:
            if sock is not None:
                sock.end()
                svc.heartbeats.remove(sock)
            _ended(svc, self.started, sock.close_code if sock else None, upgraded=sock is not None)
            # The socket holds this session (its handler) and the connection holds the socket:
            # without these links none of the three is in a cycle, so all go by reference counts
            # once the transport lets go, not in a full pass of the collector (common/collector.py).
            self.sock = self.conn = self.lease = None


def _connect(svc: Services, guard: Admission, ws: Socket, transport: asyncio.Transport | None,
             ident: Identity, device: str, auth_id: str | None) -> tuple[Connection, TokenLease]:
    """The authenticated socket as a `Connection` of this node, its token's lease running."""
    settings = svc.settings
    logs.bind(user=ident.user, device=device)  # on every line about this socket, its writer's too
    conn = Connection(ws, user=ident.user, device=device, broker=svc.broker,
                      queue_max_frames=settings.queue_max_frames, runs_in_flight=svc.store.runs_in_flight,
                      stats=svc.stats, merged_token_max_chars=settings.merged_token_max_chars,
                      transport=transport)
    lease = TokenLease(guard.verifier, ident, on_expire=lambda: conn.close(
        CloseCode.UNAUTHORIZED, "token expired; refresh it and reconnect"))
    lease.start()
    if auth_id is not None:
        conn.send(encode(Ack(auth_id, expires_at=int(ident.expires_at))))
    svc.connections.add(conn)
    return conn, lease


async def _open(svc: Services, conn: Connection, after: int | None, client_epoch: str | None) -> bool:
    """Attach to the hub, take a place under the device limit, say hello and resume; False when
    the socket is not to be served (closed with the reason)."""
    settings = svc.settings
    try:
        await svc.hub.attach(conn)
        # The device limit is checked and the device marked online in one step (presence.lua):
        # a check before it, as there was, let devices connecting at the same instant all in.
        devices = await svc.presence.join(conn.user, conn.device, socket_id(conn),
                                          max_devices=settings.max_devices_per_user)
        if devices is None:
            svc.stats.rate_limited["devices",] += 1
            limit = settings.max_devices_per_user
            conn.close(CloseCode.TOO_MANY_DEVICES, f"at most {limit} devices at once")
            return False  # the close frame goes out as the socket is finished
        await conn.open(after=after, client_epoch=client_epoch, node=settings.node_id,
                        heartbeat_s=settings.heartbeat_s, devices=devices)
        log.info("socket open", extra={"after": after})
        if svc.draining:  # it opened while the node began to drain: send it on at once
            send_elsewhere(conn)
        return True
    except (HubUnavailable, *TRANSIENT) as exc:
        log.warning("cannot serve %s/%s: %r", conn.user, conn.device, exc)
        conn.close(CloseCode.TRY_AGAIN_LATER, "stream unavailable; reconnect later")
        return False


async def _disconnect(svc: Services, conn: Connection, lease: TokenLease) -> None:
    lease.stop()
    svc.connections.discard(conn)
    conn.close(CloseCode.NORMAL, "bye")
    await asyncio.gather(_detach(svc, conn), return_exceptions=True)
    await conn.finish(timeout_s=5)


def _refuse_binary(conn: Connection) -> None:
    conn.send(encode(Error(ErrorCode.BAD_REQUEST, "binary frames are not supported")))


async def _admit(
    headers: CIMultiDictProxy[str] | Mapping[str, str], raw_query: str, svc: Services, guard: Admission
) -> tuple[str, int | None, str | None, Identity | None]:
    """Everything a client can be refused before the upgrade is refused here, with an HTTP status
    (503 draining or keys unavailable, 403 origin, 429 rate, 400 parameters, 401 token); after the
    upgrade, with a close code (docs/security.md). The identity is None for ``?auth=frame``."""
    settings = svc.settings
    if svc.draining:
        raise web.HTTPServiceUnavailable(text="draining")
    if not origin_allowed(headers.get("Origin"), host=headers.get("Host"),
                          allowed=settings.allowed_origins, dev=settings.dev):
        raise web.HTTPForbidden(text="origin not allowed")
    admitted = guard.connections.take()
    if not admitted.allowed:
        svc.stats.rate_limited["connections",] += 1
        retry_s = max(1, math.ceil(admitted.retry_after_ms / 1000))
        raise web.HTTPTooManyRequests(text="too many new connections; retry later",
                                      headers={"Retry-After": str(retry_s)})
    query = ws_query(raw_query)
    device, after, epoch = _position(query)
    token = token_from(headers, query)
    if token is None:
        if query.get("auth") == "frame":  # the token comes as the first frame
            return device, after, epoch, None
        raise web.HTTPUnauthorized(text="missing token: send it as a Bearer header or access_token, "
                                        "or connect with auth=frame and send an auth frame")
    try:
        return device, after, epoch, await guard.verifier.verify(token)
    except Unauthorized:
        raise web.HTTPUnauthorized(text="missing or invalid token") from None
    except AuthUnavailable:
        raise web.HTTPServiceUnavailable(text="cannot verify tokens right now") from None


def _position(query: Mapping[str, str]) -> tuple[str, int | None, str | None]:
    """`device`, `after` and `epoch` from the query, or 400."""
    device = query.get("device") or f"d_{secrets.token_hex(6)}"
    after, epoch = query.get("after"), query.get("epoch") or None
    # isdigit() alone lets "²" through, which int() refuses.
    after_ok = after is None or (after.isascii() and after.isdigit() and len(after) <= 18)
    # Printable: no NUL (Postgres), no lone surrogate (UTF-8), no control characters in frames.
    device_ok = len(device) <= 128 and device.isprintable()
    epoch_ok = epoch is None or (len(epoch) <= 64 and epoch.isprintable())
    if not (device_ok and epoch_ok and after_ok):
        raise web.HTTPBadRequest(text="device must be at most 128 printable characters, epoch at most 64, "
                                      "after a non-negative integer")
    return device, int(after) if after is not None else None, epoch


async def _first_frame_auth(
    receive: Receive, close: CloseWith, guard: Admission, settings: NodeSettings
) -> tuple[Identity, str | None] | None:
    """Wait for the auth frame of a socket opened with ``?auth=frame``; on anything else close
    with 4001 (1013 when the keys cannot be fetched) and return None. Nothing else reads or writes
    the socket meanwhile: no writer exists yet. `receive` gives a frame's data, None once closed."""
    try:
        data = await receive(settings.auth_frame_timeout_s)
    except TimeoutError:
        await close(CloseCode.UNAUTHORIZED, b"no auth frame in time")
        return None
    if data is None:
        return None
    cmd = None
    if isinstance(data, str):
        with contextlib.suppress(ProtocolError):
            cmd = protocol.parse_command(data, max_text_chars=settings.max_text_chars)
    if not isinstance(cmd, protocol.Auth):
        await close(CloseCode.UNAUTHORIZED, b"the first frame must be an auth frame")
        return None
    try:
        return await guard.verifier.verify(cmd.token), cmd.id
    except Unauthorized:
        await close(CloseCode.UNAUTHORIZED, b"invalid token")
    except AuthUnavailable:
        await close(CloseCode.TRY_AGAIN_LATER, b"cannot verify tokens right now")
    return None


async def _detach(svc: Services, conn: Connection) -> None:
    await svc.hub.detach(conn)
    await svc.presence.closed(conn.user, conn.device, socket_id(conn))


def socket_id(conn: Connection) -> str:
    """The socket's name in presence: never reused by this process (an `id()` would be, and a
    new socket could then take an old one's pending offline for its own)."""
    return f"{conn.serial:x}"


async def handle_frame(svc: Services, guard: Admission, conn: Connection, lease: TokenLease,
                       raw: str) -> None:
    """Serve one client frame. Nothing a client sends may end the socket or the node."""
    cmd_id, kind, result = None, "invalid", "ok"
    try:
        cmd = protocol.parse_command(raw, max_text_chars=svc.settings.max_text_chars)
        cmd_id, kind = cmd.id, type(cmd).__name__.lower()
        try:
            allowed = await guard.commands.take(conn.user)
        except TRANSIENT:
            # Redis away: the limit fails open (ping and auth keep working); commands that need
            # Redis fail by themselves with `unavailable`.
            allowed = limits.Decision(True, 0, limits.Bucket(0, 0))
        if not allowed.allowed:
            svc.stats.rate_limited["commands",] += 1
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many commands; slow down", cmd_id,
                                retry_after_ms=allowed.retry_after_ms)
        reply = await commands.execute(svc, conn, cmd, lease)
    except ProtocolError as exc:
        result = exc.code
        reply = encode(Error(exc.code, exc.message, exc.id, retry_after_ms=exc.retry_after_ms))
    except (StoreUnavailable, *TRANSIENT) as exc:
        log.warning("command from %s failed: %r", conn.user, exc)
        result = ErrorCode.UNAVAILABLE
        reply = encode(Error(ErrorCode.UNAVAILABLE, "storage unavailable; retry with the same id", cmd_id))
    except Exception:
        log.exception("command from %s failed", conn.user)
        result = ErrorCode.INTERNAL
        reply = encode(Error(ErrorCode.INTERNAL, "internal error; retry with the same id", cmd_id))
    svc.stats.commands[kind, str(result)] += 1
    if cmd_id is not None or reply.startswith('{"type":"error"'):
        conn.send(reply)



def send_elsewhere(conn: Connection) -> None:
    conn.send(encode(Reconnect(after_ms=0)))
    conn.close(CloseCode.SERVICE_RESTART, "node draining; reconnect")

