"""The node's aiohttp application: `/ws` (`ws_node.sockets`, `wire_session`, `aiohttp_socket`), REST, health,
and the drain on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from aiohttp import web
from prometheus_client.core import Metric
from redis.asyncio import Redis

from common import metrics, redis_client
from common.collector import Collector
from common.keys import Keys
from fanout.hub import Hub
from fanout.redis_broker import RedisBroker
from persistence.store import Store
from runs.agents import AgentDirectory
from runs.lifecycle import Runs
from runs.queue import RedisRunQueue
from ws_node import admin, aiohttp_socket, http_runs, presence, rest, sockets, wire_session
from ws_node import metrics as node_metrics
from ws_node import web as chat_page
from ws_node.auth import (
    IDENTITY,
    AuthUnavailable,
    JwksKeys,
    Unauthorized,
    Verifier,
    token_of,
)
from ws_node.connection import Connection
from ws_node.lean import Front, Heartbeats
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
            sockets = [(c.user, c.device, sockets.socket_id(c)) for c in due if c in svc.connections]
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
                       runs=runs, agents=agents, presence=presences, stats=stats,
                       heartbeats=Heartbeats(settings.heartbeat_s))
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
        svc.heartbeats.close()
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
    app.router.add_get("/ws", aiohttp_socket.ws_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    rest.add_routes(app)
    http_runs.add_routes(app)
    admin.setup(app)
    chat_page.add_routes(app, settings)
    return app


async def listen(app: web.Application, settings: NodeSettings) -> tuple[web.AppRunner, asyncio.Server | None]:
    """Serve `app` on the node's port: `/ws` upgrades by `ws_node.lean` (`LEAN_SOCKETS`; those
    offering compression by aiohttp when `WS_COMPRESSION` accepts it), the rest by aiohttp. The
    server returned is lean's, to close after the drain."""
    # aiohttp rounds every timeout of 5 s or more up to a whole second, to wake less often; with
    # the sockets' 25 s heartbeats that fired every socket due in a second at once (600 pings at
    # 15,000 sockets, a 30-50 ms stall each second): unrounded, they stay spread as the sockets are.
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2,
                           timeout_ceil_threshold=math.inf)
    await runner.setup()
    if not settings.lean_sockets:
        await web.TCPSite(runner, settings.host, settings.port, backlog=4096, reuse_address=True).start()
        return runner, None
    http, upgrade = runner.server, functools.partial(wire_session.WireSession.start, app)
    assert http is not None
    compression = settings.ws_compression
    server = await asyncio.get_running_loop().create_server(
        lambda: Front(http, upgrade, compression=compression), settings.host, settings.port, backlog=4096,
        reuse_address=True)
    return runner, server


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


async def drain(svc: Services) -> None:
    """Turn not-ready, then tell every socket to reconnect elsewhere, spread over the drain
    window so the other nodes are not hit by all of them at once. Sockets still opening when
    the drain began are sent on as soon as they are open (`sockets.open_stream` checks `draining`)."""
    svc.draining = True
    lag, began = svc.stats.loop_lag, time.monotonic()
    mark = lag.mark()
    connections = list(svc.connections)
    window_s = svc.settings.drain_s
    batches = max(1, min(len(connections), int(window_s * 10)))
    for index in range(batches if connections else 0):
        for conn in connections[index::batches]:
            sockets.send_elsewhere(conn)
        await asyncio.sleep(window_s / batches)
    for conn in list(svc.connections):  # opened during the window
        sockets.send_elsewhere(conn)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(svc.idle.wait(), 5)
    stalls = lag.stalls_since(mark)
    log.info("drained %d sockets in %.1f s; the event loop ran late by over %g ms %d times in %d ticks "
             "(the worst <= %g ms), %d by its own work (the worst <= %g ms)", len(connections),
             time.monotonic() - began, metrics.STALL_S * 1000, stalls.over, stalls.ticks,
             stalls.worst_le_s * 1000, stalls.busy_over, stalls.busy_worst_le_s * 1000,
             extra={"drained": len(connections), "stall_ticks": stalls.ticks, "stalls_over_20ms": stalls.over,
                    "worst_stall_le_s": stalls.worst_le_s, "busy_stalls_over_20ms": stalls.busy_over,
                    "worst_busy_stall_le_s": stalls.busy_worst_le_s, "left": len(svc.connections)})
