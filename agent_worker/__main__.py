"""`python -m agent_worker`: serve runs until SIGTERM/SIGINT, then drain and exit."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence

from aiohttp import web
from redis.asyncio import Redis

from agent_worker.graph import build_graph, stream_answer
from agent_worker.model import ModelConfig, build_chat_model
from agent_worker.settings import WorkerSettings
from agent_worker.worker import Worker
from fanout.backoff import delays_s
from fanout.config import SettingError
from fanout.keys import Keys
from fanout.stream import UserStream
from persistence.store import Store

log = logging.getLogger("agent_worker")


async def _connect_store(url: str) -> Store:
    for delay_s in delays_s(base_s=0.2, cap_s=3.0):
        try:
            return await Store.connect(url, max_size=20)
        except Exception as exc:
            log.warning("postgres not reachable yet (%r); retrying", exc)
            await asyncio.sleep(delay_s)
    raise AssertionError("unreachable")


async def _health(worker: Worker, port: int) -> web.AppRunner:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(worker.redis.ping(), 2)
            await asyncio.wait_for(worker.store.ping(), 2)
        except Exception as exc:
            return web.json_response({"ready": False, "error": type(exc).__name__}, status=503)
        return web.json_response({"ready": True, "running": len(worker.running)})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def serve(settings: WorkerSettings) -> None:
    redis = Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=10,
                           socket_connect_timeout=3, health_check_interval=15)
    keys = Keys(settings.redis_prefix)
    store = await _connect_store(settings.database_url)
    stream = UserStream(redis, keys, history_max=settings.history_max, ttl_s=settings.history_ttl_s)
    model = build_chat_model(ModelConfig(base_url=settings.llm_base_url, api_key=settings.llm_api_key,
                                         model=settings.llm_model, timeout_s=settings.llm_timeout_s))
    graph = build_graph(model, system_prompt=settings.system_prompt)

    def answer(history: Sequence[tuple[str, str]]) -> AsyncIterator[str]:
        return stream_answer(graph, history)

    worker = Worker(settings=settings, redis=redis, keys=keys, store=store, stream=stream, answer=answer)
    health = await _health(worker, settings.internal_port) if settings.internal_port else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker %s serving (model: %s)", settings.worker_id,
             settings.llm_model if settings.llm_base_url else "built-in offline demo")
    await worker.run(stop)
    if health is not None:
        await health.cleanup()
    await store.close()
    await redis.aclose()


def main() -> int:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = WorkerSettings.from_env(os.environ)
    except SettingError as exc:
        print(f"agent_worker: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
