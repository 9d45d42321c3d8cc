"""`python -m ws_node`: run one node until SIGTERM/SIGINT, then drain and exit."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys

from aiohttp import web

from common import process
from ws_node.app import create_app, create_internal_app, drain, listen
from ws_node.services import SERVICES
from ws_node.settings import NodeSettings

log = logging.getLogger("ws_node")


async def serve(settings: NodeSettings) -> None:
    app = create_app(settings)
    runner, server = await listen(app, settings)
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
    loop = asyncio.get_running_loop()
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
