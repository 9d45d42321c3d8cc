"""The steps a device's socket takes from its upgrade to its close, whichever code serves it:
aiohttp's (`ws_node.aiohttp_socket`, for clients offering permessage-deflate and for
`LEAN_SOCKETS=false`) or the node's own (`ws_node.wire_session` over `ws_node.lean`). Both take
them in the same order: admitted (`admit`: HTTP refusals), upgraded, authenticated (by
`first_frame_auth` when the upgrade carried no token), connected (`connect`), opened
(`open_stream`: hub, device limit, hello and resume), served frame by frame (`handle_frame`),
disconnected (`disconnect`); `begun` and `ended` count it for the drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from multidict import CIMultiDictProxy

import protocol
from common import logs
from common.redis_client import TRANSIENT
from fanout.hub import Unavailable as HubUnavailable
from persistence.store import Unavailable as StoreUnavailable
from protocol import Ack, CloseCode, Error, ErrorCode, ProtocolError, Reconnect, encode
from ws_node import commands, limits
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
from ws_node.services import Admission, Services
from ws_node.settings import NodeSettings

log = logging.getLogger(__name__)
# A wire socket stops reading while this many of its frames wait for the one before them to be
# served (aiohttp's reader pauses on a byte limit in the same way).
INBOX_MAX_FRAMES = 32

Receive = Callable[[float], Awaitable["str | bytes | None"]]
CloseWith = Callable[[int, bytes], Awaitable[object]]


def begun(svc: Services) -> float:
    """A socket's request arrived: counted from its first byte (a drain waits for sockets still
    opening); when."""
    svc.sockets += 1
    svc.idle.clear()
    return asyncio.get_running_loop().time()


def ended(svc: Services, started: float, code: int | None, *, upgraded: bool) -> None:
    """A socket's request is done; `upgraded`: it was a socket, closed with `code`."""
    svc.sockets -= 1
    if svc.sockets == 0:
        svc.idle.set()
    if upgraded:
        svc.stats.closed(code)
        duration_s = round(asyncio.get_running_loop().time() - started, 3)
        log.info("socket closed", extra={"code": code, "duration_s": duration_s})


def connect(svc: Services, guard: Admission, ws: Socket, transport: asyncio.Transport | None,
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


async def open_stream(svc: Services, conn: Connection, after: int | None, client_epoch: str | None) -> bool:
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


async def disconnect(svc: Services, conn: Connection, lease: TokenLease) -> None:
    lease.stop()
    svc.connections.discard(conn)
    conn.close(CloseCode.NORMAL, "bye")
    await asyncio.gather(_detach(svc, conn), return_exceptions=True)
    await conn.finish(timeout_s=5)


def refuse_binary(conn: Connection) -> None:
    conn.send(encode(Error(ErrorCode.BAD_REQUEST, "binary frames are not supported")))


async def admit(
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


async def first_frame_auth(
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

