"""The node's aiohttp application: `/ws`, REST, health, and the drain on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from aiohttp import WSMsgType, web
from prometheus_client.core import Metric
from redis.asyncio import Redis

import protocol
from common import logs, metrics, redis_client
from common.collector import Collector
from common.keys import Keys
from common.redis_client import TRANSIENT
from fanout.hub import Hub
from fanout.hub import Unavailable as HubUnavailable
from fanout.redis_broker import RedisBroker
from persistence.store import Store
from persistence.store import Unavailable as StoreUnavailable
from protocol import Ack, CloseCode, Error, ErrorCode, ProtocolError, Reconnect, encode
from runs.agents import AgentDirectory
from runs.lifecycle import Runs
from runs.queue import RedisRunQueue
from ws_node import admin, commands, http_runs, limits, presence, rest
from ws_node import metrics as node_metrics
from ws_node import web as chat_page
from ws_node.auth import (
    IDENTITY,
    AuthUnavailable,
    Identity,
    JwksKeys,
    TokenLease,
    Unauthorized,
    Verifier,
    origin_allowed,
    token_of,
    ws_query,
)
from ws_node.connection import Connection
from ws_node.limits import LocalBucket, Rate, RedisBuckets
from ws_node.metrics import NodeStats
from ws_node.presence import Presences
from ws_node.services import ADMISSION, SERVICES, Admission, Services, answer_within
from ws_node.settings import NodeSettings

log = logging.getLogger(__name__)
# Redis connections of a node when REDIS_POOL_SIZE is 0: each socket or command holds one only
# for the duration of a command, so a burst of connects waits briefly instead of failing.
NODE_POOL_SIZE = 256
PRESENCE_TICK_S = 0.1  # a slice of the sockets' presence is refreshed this often


async def ws_handler(request: web.Request) -> web.StreamResponse:
    """One device's socket, counted from the first byte (a drain waits for sockets still opening)."""
    svc = request.app[SERVICES]
    svc.sockets += 1
    svc.idle.clear()
    started = asyncio.get_running_loop().time()
    ws: web.StreamResponse | None = None
    try:
        ws = await _serve_socket(request)
        return ws
    finally:
        _release(request, ws)
        svc.sockets -= 1
        if svc.sockets == 0:
            svc.idle.set()
        if isinstance(ws, web.WebSocketResponse) and ws.prepared:
            svc.stats.closed(ws.close_code)
            duration_s = round(asyncio.get_running_loop().time() - started, 3)
            log.info("socket closed", extra={"code": ws.close_code, "duration_s": duration_s})


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
    device, after, client_epoch, ident = await _admit(request, svc, guard)

    ws = web.WebSocketResponse(heartbeat=settings.heartbeat_s, max_msg_size=settings.max_frame_bytes)
    await ws.prepare(request)
    svc.stats.connects += 1
    auth_id = None
    if ident is None:
        first = await _first_frame_auth(ws, guard.verifier, settings)
        if first is None:
            return ws
        ident, auth_id = first
    logs.bind(user=ident.user, device=device)  # on every line about this socket, its writer's too
    conn = Connection(ws, user=ident.user, device=device, broker=svc.broker,
                      queue_max_frames=settings.queue_max_frames, runs_in_flight=svc.store.runs_in_flight,
                      stats=svc.stats,
                      merged_token_max_chars=settings.merged_token_max_chars,
                      transport=None if ws.compress else request.transport)  # deflate: through aiohttp
    lease = TokenLease(guard.verifier, ident, on_expire=lambda: conn.close(
        CloseCode.UNAUTHORIZED, "token expired; refresh it and reconnect"))
    lease.start()
    if auth_id is not None:
        conn.send(encode(Ack(auth_id, expires_at=int(ident.expires_at))))
    svc.connections.add(conn)
    try:
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
                return ws  # the close frame goes out as the socket is finished below
            await conn.open(after=after, client_epoch=client_epoch, node=settings.node_id,
                            heartbeat_s=settings.heartbeat_s, devices=devices)
            log.info("socket open", extra={"after": after})
            if svc.draining:  # it opened while the node began to drain: send it on at once
                _send_elsewhere(conn)
        except (HubUnavailable, *TRANSIENT) as exc:
            log.warning("cannot serve %s/%s: %r", conn.user, conn.device, exc)
            conn.close(CloseCode.TRY_AGAIN_LATER, "stream unavailable; reconnect later")
        else:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    await handle_frame(svc, guard, conn, lease, msg.data)
                elif msg.type is WSMsgType.BINARY:
                    conn.send(encode(Error(ErrorCode.BAD_REQUEST, "binary frames are not supported")))
    finally:
        lease.stop()
        svc.connections.discard(conn)
        conn.close(CloseCode.NORMAL, "bye")
        await asyncio.gather(_detach(svc, conn), return_exceptions=True)
        await conn.finish(timeout_s=5)
    return ws


async def _admit(
    request: web.Request, svc: Services, guard: Admission
) -> tuple[str, int | None, str | None, Identity | None]:
    """Everything a client can be refused before the upgrade is refused here, with an HTTP status
    (503 draining or keys unavailable, 403 origin, 429 rate, 400 parameters, 401 token); after the
    upgrade, with a close code (docs/security.md). The identity is None for ``?auth=frame``."""
    settings = svc.settings
    if svc.draining:
        raise web.HTTPServiceUnavailable(text="draining")
    if not origin_allowed(request.headers.get("Origin"), host=request.headers.get("Host"),
                          allowed=settings.allowed_origins, dev=settings.dev):
        raise web.HTTPForbidden(text="origin not allowed")
    admitted = guard.connections.take()
    if not admitted.allowed:
        svc.stats.rate_limited["connections",] += 1
        retry_s = max(1, math.ceil(admitted.retry_after_ms / 1000))
        raise web.HTTPTooManyRequests(text="too many new connections; retry later",
                                      headers={"Retry-After": str(retry_s)})
    query = ws_query(request)
    device, after, epoch = _position(query)
    token = token_of(request, query)
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
    ws: web.WebSocketResponse, verifier: Verifier, settings: NodeSettings
) -> tuple[Identity, str | None] | None:
    """Wait for the auth frame of a socket opened with ``?auth=frame``; on anything else close
    with 4001 (1013 when the keys cannot be fetched) and return None. The handler is the only
    task touching the socket here: no writer exists yet."""
    try:
        msg = await ws.receive(timeout=settings.auth_frame_timeout_s)
    except TimeoutError:
        await ws.close(code=CloseCode.UNAUTHORIZED, message=b"no auth frame in time")
        return None
    if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
        return None
    cmd = None
    if msg.type is WSMsgType.TEXT:
        with contextlib.suppress(ProtocolError):
            cmd = protocol.parse_command(msg.data, max_text_chars=settings.max_text_chars)
    if not isinstance(cmd, protocol.Auth):
        await ws.close(code=CloseCode.UNAUTHORIZED, message=b"the first frame must be an auth frame")
        return None
    try:
        return await verifier.verify(cmd.token), cmd.id
    except Unauthorized:
        await ws.close(code=CloseCode.UNAUTHORIZED, message=b"invalid token")
    except AuthUnavailable:
        await ws.close(code=CloseCode.TRY_AGAIN_LATER, message=b"cannot verify tokens right now")
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


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Verify the token of every REST request once, under the full policy (JWKS included), and
    leave the identity on the request for the REST handlers (`ws_node.rest`)."""
    if request.path.startswith("/v1/"):
        token = token_of(request)
        if token is not None:
            try:
                request[IDENTITY] = await request.app[ADMISSION].verifier.verify(token)
            except Unauthorized:
                pass  # the handler answers 401
            except AuthUnavailable:
                return rest.error_response(503, "unavailable", "cannot verify tokens right now")
    response: web.StreamResponse = await handler(request)
    return response


async def healthz(request: web.Request) -> web.Response:
    return rest.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when not draining, Pub/Sub is connected, and Redis and Postgres answer."""
    svc = request.app[SERVICES]
    checks = {"draining": svc.draining, "pubsub": svc.hub.healthy, "redis": False, "postgres": False}
    checks["redis"], checks["postgres"] = await answer_within(2.0, svc.redis.ping(), svc.store.ping())
    ready = checks["pubsub"] and checks["redis"] and checks["postgres"] and not checks["draining"]
    return rest.json_response({"ready": ready, "node": svc.settings.node_id, **checks}, 200 if ready else 503)


async def _presence_refresher(svc: Services) -> None:
    """Refresh the presence of this node's devices, a slice every `PRESENCE_TICK_S` rather than
    all of them every `presence.REFRESH_S`: in one go it stalled the loop 56-68 ms at 2,000 sockets
    and 559 ms at 15,000, every delivery's latency with it, and a slice a second (500 sockets at
    15,000) still held it 20-30 ms (issue 14). Each socket's slice is fixed by its serial, so each
    is refreshed once per `REFRESH_S`; the slices are dealt once per round, not looked for among
    all the sockets every tick."""
    ticks = max(1, round(presence.REFRESH_S / PRESENCE_TICK_S))
    while True:
        slices: list[list[Connection]] = [[] for _ in range(ticks)]
        for conn in svc.connections:
            slices[conn.serial % ticks].append(conn)
        for due in slices:
            await asyncio.sleep(presence.REFRESH_S / ticks)
            sockets = [(c.user, c.device, socket_id(c)) for c in due if c in svc.connections]
            if not sockets:
                continue
            try:
                await svc.presence.refresh(sockets)
            except Exception as exc:
                log.warning("presence refresh failed: %r", exc)


def build_services_ctx(settings: NodeSettings):  # type: ignore[no-untyped-def]
    async def services_ctx(app: web.Application) -> AsyncIterator[None]:
        redis = redis_client.client(settings, socket_timeout_s=5,
                                    pool_size=settings.redis_pool_size or NODE_POOL_SIZE)
        keys = Keys(settings.redis_prefix)
        store = await Store.connect_when_ready(settings.database_url,
                                               statement_cache_size=settings.database_statement_cache_size)
        broker = RedisBroker(redis, keys, history_max=settings.history_max, ttl_s=settings.history_ttl_s)
        stats = NodeStats()
        hub = Hub(broker, observe=stats.published)
        agents = AgentDirectory(redis, keys)
        runs = Runs(store, broker, RedisRunQueue(redis, keys),
                    agents=agents, max_in_flight=settings.max_runs_in_flight,
                    max_queue_depth=settings.max_queue_depth, max_queue_age_s=settings.max_queue_age_s)
        presences = Presences(redis, keys, broker.channel, node=settings.node_id,
                              debounce_s=settings.presence_debounce_s, scripts=broker.scripts)
        svc = Services(settings=settings, redis=redis, keys=keys, broker=broker, hub=hub, store=store,
                       runs=runs, agents=agents, presence=presences, stats=stats)
        app[SERVICES] = svc
        app[ADMISSION] = build_admission(settings, redis, keys)
        await hub.start()
        stats.loop_lag.start()
        # Held: every socket whose handler still runs (opening, open or closing): a closing
        # socket holds its memory until its handler ends, and only then counts as closed.
        collector = Collector(every_s=settings.gc_freeze_s, held=lambda: svc.sockets,
                              closed=lambda: sum(stats.closes.values()))
        collector.start()
        refresher = asyncio.create_task(_presence_refresher(svc))
        yield
        refresher.cancel()
        await collector.close()
        await presences.close()
        await stats.loop_lag.close()
        await hub.close()
        await broker.aclose()
        await store.close()
        await redis.aclose()

    return services_ctx


def build_admission(settings: NodeSettings, redis: Redis, keys: Keys) -> Admission:
    jwks = None
    if settings.jwks_url:
        jwks = JwksKeys(settings.jwks_url, cache_s=settings.jwks_cache_s, cooldown_s=settings.jwks_cooldown_s)
    verifier = Verifier(algorithms=settings.jwt_algorithms, secret=settings.jwt_secret,
                        public_key=settings.jwt_public_key, jwks=jwks, audience=settings.jwt_audience,
                        issuer=settings.jwt_issuer, leeway_s=settings.jwt_leeway_s,
                        admin_claim=settings.admin_claim, admin_value=settings.admin_value)
    return Admission(
        verifier=verifier,
        connections=LocalBucket(Rate(settings.connections_per_s, settings.connections_burst)),
        commands=RedisBuckets(redis, keys, Rate(settings.commands_per_s, settings.commands_burst)),
        rest=RedisBuckets(redis, keys, Rate(settings.rest_per_s, settings.rest_burst), key=keys.rest_bucket),
    )


def create_app(settings: NodeSettings) -> web.Application:
    app = web.Application(middlewares=[rest.errors_middleware, auth_middleware, rest.rate_limit_middleware],
                          client_max_size=settings.max_frame_bytes)
    app.cleanup_ctx.append(build_services_ctx(settings))
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    rest.add_routes(app)
    http_runs.add_routes(app)
    admin.setup(app)
    chat_page.add_routes(app, settings)
    return app


def create_internal_app(main: web.Application) -> web.Application:
    """Health and `/metrics`, on a port that is never exposed publicly."""
    internal = web.Application()

    async def share(app: web.Application) -> AsyncIterator[None]:
        app[SERVICES] = main[SERVICES]
        yield

    def collect() -> Iterator[Metric]:
        svc = main[SERVICES]
        return node_metrics.families(svc.stats, sockets=len(svc.connections), users=svc.hub.users,
                                     pubsub_reconnects=svc.hub.reconnects)

    internal.cleanup_ctx.append(share)
    internal.router.add_get("/healthz", healthz)
    internal.router.add_get("/readyz", readyz)
    metrics.serve(internal, collect)
    return internal


def _send_elsewhere(conn: Connection) -> None:
    conn.send(encode(Reconnect(after_ms=0)))
    conn.close(CloseCode.SERVICE_RESTART, "node draining; reconnect")


async def drain(svc: Services) -> None:
    """Turn not-ready, then tell every socket to reconnect elsewhere, spread over the drain
    window so the other nodes are not hit by all of them at once. Sockets still opening when
    the drain began are sent on as soon as they are open (ws_handler checks `draining`)."""
    svc.draining = True
    connections = list(svc.connections)
    window_s = svc.settings.drain_s
    batches = max(1, min(len(connections), int(window_s * 10)))
    for index in range(batches if connections else 0):
        for conn in connections[index::batches]:
            _send_elsewhere(conn)
        await asyncio.sleep(window_s / batches)
    for conn in list(svc.connections):  # opened during the window
        _send_elsewhere(conn)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(svc.idle.wait(), 5)
