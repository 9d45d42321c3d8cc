"""A finished socket is freed by reference counts, not left for the cyclic collector: a node
freezes what it holds out of the collector's passes and makes a full pass rarely, so a closed
socket in a reference cycle stays in memory until one (issue 14: under churn, a ~1 s pass every
15-20 s). A node served in this process, with the collector off, so that whatever a closed socket
leaves in a cycle is still to be seen among the live objects."""

from __future__ import annotations

import asyncio
import gc
import os
import weakref

import aiohttp
import pytest
from aiohttp import web

from loadtest.churn_bench import close_socket
from loadtest.cluster import LocalCluster
from loadtest.procs import free_port
from ws_node.app import create_app, listen
from ws_node.lean import WireSocket
from ws_node.services import SERVICES
from ws_node.settings import NodeSettings


def freed_when_all_go(kind: type[object]) -> asyncio.Event:
    """Set once every server-side socket (of `kind`) alive now has been freed."""
    freed = asyncio.Event()
    loop = asyncio.get_running_loop()
    alive = [o for o in gc.get_objects() if isinstance(o, kind)]
    left = {"n": len(alive)}

    def gone() -> None:
        left["n"] -= 1
        if left["n"] == 0:
            loop.call_soon_threadsafe(freed.set)

    for ws in alive:
        weakref.finalize(ws, gone)
    assert len(alive) == 20, len(alive)
    return freed


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "aiohttp"])
@pytest.mark.parametrize("aborted", [False, True], ids=["closed", "aborted"])
async def test_a_finished_socket_leaves_no_cycle(cluster: LocalCluster, aborted: bool, lean: bool) -> None:
    port = free_port()
    settings = NodeSettings.from_env({
        **os.environ, "REDIS_URL": cluster.redis_url, "DATABASE_URL": cluster.database_url,
        "AUTH_JWT_SECRET": cluster.config.jwt_secret, "NODE_ID": "in-process", "PORT": str(port),
        "HOST": "127.0.0.1", "INTERNAL_PORT": "0", "GC_FREEZE_SECONDS": "0", "NEW_CONNECTIONS_PER_SECOND": "0",
        "LEAN_SOCKETS": str(lean).lower()})
    app = create_app(settings)
    runner, server = await listen(app, settings)
    gc.disable()  # cycles stay where they can be counted
    try:
        svc = app[SERVICES]
        async with aiohttp.ClientSession() as session:
            sockets = [await session.ws_connect(f"ws://127.0.0.1:{port}/ws?access_token="
                                                f"{cluster.token(f'release-{aborted}-{i}')}&device=d0")
                       for i in range(20)]
            for ws in sockets:
                assert (await ws.receive_json(timeout=10))["type"] == "hello"
            freed = freed_when_all_go(WireSocket if lean else web.WebSocketResponse)
            for ws in sockets:
                await close_socket(ws, abort=aborted)  # aborted: no close frame, the node meets a reset
            await asyncio.wait_for(svc.idle.wait(), 10)  # every handler done
        await asyncio.wait_for(freed.wait(), 10)  # their transports' connection_lost follows
    finally:
        gc.enable()
        if server is not None:
            server.close()
        await runner.cleanup()
        gc.unfreeze()  # the app's collector froze the test process at its start
