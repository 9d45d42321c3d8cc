"""A device's socket served by aiohttp (`ws_handler`): for clients offering permessage-deflate
when `WS_COMPRESSION` accepts it, and for every socket with `LEAN_SOCKETS=false`; through the steps
of `ws_node.sockets`."""

from __future__ import annotations

from aiohttp import WSMsgType, web

from ws_node.services import ADMISSION, SERVICES
from ws_node.sockets import (
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


async def ws_handler(request: web.Request) -> web.StreamResponse:
    """One device's socket, counted from the first byte (a drain waits for sockets still opening)."""
    svc = request.app[SERVICES]
    started = begun(svc)
    ws: web.StreamResponse | None = None
    try:
        ws = await _serve_socket(request)
        return ws
    finally:
        _release(request, ws)
        if isinstance(ws, web.WebSocketResponse):
            ended(svc, started, ws.close_code, upgraded=ws.prepared)
        else:
            ended(svc, started, None, upgraded=False)


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
    admitted = await admit(request.headers, request.rel_url.raw_query_string, svc, guard)
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

        first = await first_frame_auth(receive, close, guard, settings)
        if first is None:
            return ws
        ident, auth_id = first
    # deflate: frames go through aiohttp, not straight to the transport
    conn, lease = connect(svc, guard, ws, None if ws.compress else request.transport, ident, device, auth_id)
    try:
        if await open_stream(svc, conn, after, client_epoch):
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await handle_frame(svc, guard, conn, lease, msg.data)
                elif msg.type is WSMsgType.BINARY:
                    refuse_binary(conn)
    finally:
        await disconnect(svc, conn, lease)
    return ws
