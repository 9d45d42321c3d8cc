"""`python -m ws_node`: run one node until SIGTERM/SIGINT, then drain and exit."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import math
import os
import signal
import sys

from aiohttp import web

from common import process
from ws_node.app import create_app, create_internal_app, drain
from ws_node.lean import Front
from ws_node.services import SERVICES
from ws_node.settings import NodeSettings
from ws_node.sockets import WireSession

log = logging.getLogger("ws_node")


async def serve(settings: NodeSettings) -> None:
    app = create_app(settings)
    # aiohttp rounds every timeout of 5 s or more up to a whole second, to wake less often; with
    # the sockets' 25 s heartbeats that fired every socket due in a second at once (600 pings at
    # 15,000 sockets, a 30-50 ms stall each second): unrounded, they stay spread as the sockets are.
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2,
                           timeout_ceil_threshold=math.inf)
    await runner.setup()
    loop = asyncio.get_running_loop()
    server: asyncio.Server | None = None
    if settings.lean_sockets:  # `/ws` upgrades without compression by ws_node.lean, the rest by aiohttp
        http, upgrade = runner.server, functools.partial(WireSession.start, app)
        assert http is not None
        server = await loop.create_server(lambda: Front(http, upgrade), settings.host, settings.port,
                                          backlog=4096, reuse_address=True)
    else:
        await web.TCPSite(runner, settings.host, settings.port, backlog=4096, reuse_address=True).start()
    internal_runner = None
    if settings.internal_port:
        internal_runner = web.AppRunner(create_internal_app(app), handle_signals=False, access_log=None)
        await internal_runner.setup()
        await web.TCPSite(internal_runner, settings.host, settings.internal_port).start()
    log.info("node %s listening on :%d", settings.node_id, settings.port)
    # Everything allocated so far (modules, the app) lives as long as the process: keep it out of
    # the cyclic collector's full passes, which otherwise walk it again every time.
    gc.collect()
    gc.freeze()

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining over %.1fs", settings.drain_s)
    await drain(app[SERVICES])
    if server is not None:
        server.close()
    if internal_runner is not None:
        await internal_runner.cleanup()
    await runner.cleanup()


def main() -> int:
    return process.run("ws_node", lambda: NodeSettings.from_env(os.environ), serve,
                       lambda settings: (settings, settings.node_id), service="chorus-node")


if __name__ == "__main__":
    sys.exit(main())
