"""The node's aiohttp application: `/ws`, REST, health, and the drain on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

from aiohttp import WSMsgType, web
from redis.asyncio import Redis

from fanout.hub import Hub
from fanout.hub import Unavailable as HubUnavailable
from fanout.keys import Keys
from fanout.stream import TRANSIENT, UserStream
from persistence.store import Store
from persistence.store import Unavailable as StoreUnavailable
from ws_node import commands, presence, protocol, rest
from ws_node.auth import Unauthorized, authenticate
from ws_node.connection import Connection
from ws_node.protocol import CloseCode, ErrorCode, ProtocolError
from ws_node.services import SERVICES, Services
from ws_node.settings import NodeSettings

log = logging.getLogger(__name__)


async def ws_handler(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    settings = svc.settings
    if svc.draining:
        raise web.HTTPServiceUnavailable(text="draining")
    try:
        ident = authenticate(request, settings.jwt_secret)
    except Unauthorized:
        raise web.HTTPUnauthorized(text="missing or invalid token") from None
    device = request.query.get("device") or f"d_{secrets.token_hex(6)}"
    after_raw, client_epoch = request.query.get("after"), request.query.get("epoch") or None
    if len(device) > 128 or (after_raw is not None and not after_raw.isdigit()):
        raise web.HTTPBadRequest(text="device must be at most 128 characters; after a non-negative integer")

    ws = web.WebSocketResponse(heartbeat=settings.heartbeat_s, max_msg_size=settings.max_frame_bytes)
    await ws.prepare(request)
    conn = Connection(ws, user=ident.user, device=device, stream=svc.stream,
                      queue_max_frames=settings.queue_max_frames, runs_in_flight=svc.store.runs_in_flight)
    writer = asyncio.create_task(conn.writer(), name=f"writer-{ident.user}-{device}")
    svc.connections.add(conn)
    svc.idle.clear()
    try:
        try:
            await svc.hub.attach(conn)
            after = int(after_raw) if after_raw is not None else None
            await conn.open(after=after, client_epoch=client_epoch, node=settings.node_id,
                            heartbeat_s=settings.heartbeat_s)
            await presence.mark_online(svc.redis, svc.keys, [(conn.user, conn.device)], settings.node_id)
        except (HubUnavailable, *TRANSIENT) as exc:
            log.warning("cannot serve %s/%s: %r", conn.user, conn.device, exc)
            conn.close(CloseCode.TRY_AGAIN_LATER, "stream unavailable; reconnect later")
        else:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await handle_frame(svc, conn, msg.data)
                elif msg.type is WSMsgType.BINARY:
                    conn.send(protocol.error(ErrorCode.BAD_REQUEST, "binary frames are not supported"))
    finally:
        svc.connections.discard(conn)
        if not svc.connections:
            svc.idle.set()
        conn.close(CloseCode.NORMAL, "bye")
        await asyncio.gather(_detach(svc, conn), return_exceptions=True)
        try:
            await asyncio.wait_for(writer, timeout=5)
        except TimeoutError:
            writer.cancel()
    return ws


async def _detach(svc: Services, conn: Connection) -> None:
    await svc.hub.detach(conn)
    await presence.mark_offline(svc.redis, svc.keys, conn.user, conn.device, svc.settings.node_id)


async def handle_frame(svc: Services, conn: Connection, raw: str) -> None:
    """Serve one client frame. Nothing a client sends may end the socket or the node."""
    cmd_id = None
    try:
        cmd = protocol.parse_command(raw, max_text_chars=svc.settings.max_text_chars)
        cmd_id = cmd.id
        reply = await commands.execute(svc, conn, cmd)
    except ProtocolError as exc:
        reply = protocol.error(exc.code, exc.message, exc.id)
    except (StoreUnavailable, *TRANSIENT) as exc:
        log.warning("command from %s failed: %r", conn.user, exc)
        reply = protocol.error(ErrorCode.UNAVAILABLE, "storage unavailable; retry with the same id", cmd_id)
    except Exception:
        log.exception("command from %s failed", conn.user)
        reply = protocol.error(ErrorCode.INTERNAL, "internal error; retry with the same id", cmd_id)
    if cmd_id is not None or reply.startswith('{"type":"error"'):
        conn.send(reply)


async def healthz(request: web.Request) -> web.Response:
    return rest.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when not draining, Pub/Sub is connected, and Redis and Postgres answer."""
    svc = request.app[SERVICES]
    checks = {"draining": svc.draining, "pubsub": svc.hub.healthy, "redis": False, "postgres": False}
    try:
        checks["redis"] = bool(await asyncio.wait_for(svc.redis.ping(), 2))
    except Exception:
        pass
    try:
        await asyncio.wait_for(svc.store.ping(), 2)
        checks["postgres"] = True
    except Exception:
        pass
    ready = checks["pubsub"] and checks["redis"] and checks["postgres"] and not checks["draining"]
    return rest.json_response({"ready": ready, "node": svc.settings.node_id, **checks}, 200 if ready else 503)


async def _presence_refresher(svc: Services) -> None:
    while True:
        await asyncio.sleep(presence.REFRESH_S)
        try:
            await presence.mark_online(
                svc.redis, svc.keys, [(c.user, c.device) for c in svc.connections], svc.settings.node_id
            )
        except Exception as exc:
            log.warning("presence refresh failed: %r", exc)


def build_services_ctx(settings: NodeSettings):  # type: ignore[no-untyped-def]
    async def services_ctx(app: web.Application) -> AsyncIterator[None]:
        redis = Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=5,
                               socket_connect_timeout=3, health_check_interval=15)
        keys = Keys(settings.redis_prefix)
        store = await _connect_store(settings.database_url)
        hub = Hub(redis, keys)
        stream = UserStream(redis, keys, history_max=settings.history_max, ttl_s=settings.history_ttl_s)
        svc = Services(settings=settings, redis=redis, keys=keys, stream=stream, hub=hub, store=store)
        app[SERVICES] = svc
        await hub.start()
        refresher = asyncio.create_task(_presence_refresher(svc))
        yield
        refresher.cancel()
        await hub.close()
        await store.close()
        await redis.aclose()

    return services_ctx


async def _connect_store(database_url: str) -> Store:
    # Postgres may come up after the node: keep trying rather than crash-looping.
    from fanout.backoff import delays_s

    for delay_s in delays_s(base_s=0.2, cap_s=3.0):
        try:
            return await Store.connect(database_url)
        except (OSError, StoreUnavailable, TimeoutError) as exc:
            log.warning("postgres not reachable yet (%r); retrying", exc)
            await asyncio.sleep(delay_s)
        except Exception as exc:
            if "CannotConnectNow" in type(exc).__name__:
                await asyncio.sleep(delay_s)
                continue
            raise
    raise AssertionError("unreachable")


def create_app(settings: NodeSettings) -> web.Application:
    app = web.Application(middlewares=[rest.errors_middleware], client_max_size=settings.max_frame_bytes)
    app.cleanup_ctx.append(build_services_ctx(settings))
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    rest.add_routes(app)
    return app


def create_internal_app(main: web.Application) -> web.Application:
    """Health on a port that is never exposed publicly (metrics join it later)."""
    internal = web.Application()

    async def share(app: web.Application) -> AsyncIterator[None]:
        app[SERVICES] = main[SERVICES]
        yield

    internal.cleanup_ctx.append(share)
    internal.router.add_get("/healthz", healthz)
    internal.router.add_get("/readyz", readyz)
    return internal


async def drain(svc: Services) -> None:
    """Turn not-ready, then tell every socket to reconnect elsewhere, spread over the drain
    window so the other nodes are not hit by all of them at once."""
    svc.draining = True
    connections = list(svc.connections)
    if not connections:
        return
    window_s = svc.settings.drain_s
    batches = max(1, min(len(connections), int(window_s * 10)))
    for index in range(batches):
        for conn in connections[index::batches]:
            conn.send(protocol.reconnect(after_ms=0))
            conn.close(CloseCode.SERVICE_RESTART, "node draining; reconnect")
        await asyncio.sleep(window_s / batches)
    if svc.connections:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(svc.idle.wait(), 5)
