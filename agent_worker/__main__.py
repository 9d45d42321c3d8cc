"""`python -m agent_worker`: serve runs until SIGTERM/SIGINT, then drain and exit."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any

from aiohttp import web
from langgraph.checkpoint.base import BaseCheckpointSaver
from prometheus_client.core import Metric
from redis.asyncio import Redis

from agent_worker import checkpoints, heartbeat
from agent_worker import metrics as worker_metrics
from agent_worker.agents import AgentRegistry, agents_from_env
from agent_worker.graph import Resumption
from agent_worker.metrics import WorkerStats
from agent_worker.model import ModelConfig
from agent_worker.resilience import BreakerRegistry, RetryPolicy, endpoint_key, resilient
from agent_worker.settings import WorkerSettings
from agent_worker.supervisor import supervise
from agent_worker.worker import AnswerStream, Worker
from common import metrics, process, redis_client
from common.config import SettingError
from common.keys import Keys
from common.redis_client import TRANSIENT
from fanout.redis_broker import RedisBroker
from persistence.store import Store
from runs.agents import TTL_S as AGENTS_TTL_S
from runs.agents import AgentDirectory
from runs.lifecycle import Runs
from runs.queue import RedisRunQueue

log = logging.getLogger("agent_worker")


@dataclasses.dataclass
class Agents:
    """The configured agents, each answering through retries, its breaker and the fallback."""

    primary: AgentRegistry
    fallback: AgentRegistry | None
    policy: RetryPolicy
    breakers: BreakerRegistry
    on_result: Callable[[str, str], None] | None = None  # how each model call ended (metrics)
    pools: tuple[str, ...] = ()  # the pools this worker serves (WORKER_AGENTS)

    @classmethod
    def from_env(cls, env: Mapping[str, str], settings: WorkerSettings) -> Agents:
        primary = AgentRegistry.from_env(env)
        try:
            pools = tuple(primary.serving(settings.serves))
        except ValueError as exc:
            raise SettingError(f"WORKER_AGENTS: {exc}") from None
        fallback = None
        if settings.fallback_base_url:
            fallback_model = ModelConfig(
                base_url=settings.fallback_base_url, api_key=settings.fallback_api_key,
                model=settings.fallback_model or settings.llm_model, timeout_s=settings.llm_timeout_s,
            )
            specs = [dataclasses.replace(s, model=fallback_model) for s in agents_from_env(env)]
            fallback = AgentRegistry(specs, mcp_timeout_s=primary.mcp_timeout_s)
        return cls(primary=primary, fallback=fallback,
                   policy=RetryPolicy(settings.retry_attempts, settings.retry_base_s, settings.retry_cap_s),
                   breakers=BreakerRegistry(settings.breaker_failures, settings.breaker_reset_s), pools=pools)

    def answer(
        self, agent: str, history: Sequence[tuple[str, str]], thread: str, resume: Resumption | None
    ) -> AsyncIterator[object]:
        spec = self.primary.spec(agent)  # UnknownAgent: the run fails with a clear code
        fallback = self.fallback

        def primary(h: Sequence[tuple[str, str]]) -> AsyncIterator[object]:
            return self.primary.answer(spec.pool, h, thread=thread, resume=resume)

        def secondary(h: Sequence[tuple[str, str]]) -> AsyncIterator[object]:
            assert fallback is not None
            return fallback.answer(spec.pool, h, thread=thread, resume=resume)

        fallback_key = None
        if fallback is not None:
            model = fallback.spec(spec.pool).model
            fallback_key = endpoint_key(model.base_url or "demo", model.model)
        wrapped = resilient(
            primary, endpoint=endpoint_key(spec.model.base_url or "demo", spec.model.model),
            policy=self.policy, breakers=self.breakers,
            fallback=secondary if fallback is not None else None, fallback_endpoint=fallback_key,
            on_result=self.on_result,
        )
        return wrapped(history)

    async def forget(self, thread: str) -> None:
        await self.primary.forget(thread)  # the fallback shares the checkpointer (see `serve`)

    def use(self, checkpointer: BaseCheckpointSaver[str]) -> None:
        """Keep the graphs' state within runs in `checkpointer` (set before the first run)."""
        self.primary.checkpointer = checkpointer
        if self.fallback is not None:
            self.fallback.checkpointer = checkpointer

    async def aclose(self) -> None:
        await self.primary.aclose()
        if self.fallback is not None:
            await self.fallback.aclose()


async def _advertise(agents: Agents, directory: AgentDirectory) -> None:
    """Tell the nodes which agents this worker serves (GET /v1/agents, routing sends)."""
    while True:
        try:
            await directory.advertise(await agents.primary.describe(agents.pools))
        except TRANSIENT as exc:
            log.warning("advertising agents failed: %r", exc)
        await asyncio.sleep(AGENTS_TTL_S / 3)


async def _health(worker: Worker, agents: Agents, redis: Redis, port: int) -> web.AppRunner:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(redis.ping(), 2)
            await asyncio.wait_for(worker.store.ping(), 2)
        except Exception as exc:  # any failure means not ready
            return web.json_response({"ready": False, "error": type(exc).__name__}, status=503)
        return web.json_response({"ready": True, "running": len(worker.running)})

    def collect() -> Iterator[Metric]:
        return worker_metrics.families(worker.stats, slots=worker.settings.concurrency,
                                       running=len(worker.running), breakers=agents.breakers.states)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    metrics.serve(app, collect)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def serve(settings: WorkerSettings, agents: Agents) -> None:
    # Each run holds at most one connection at a time; the rest is the loop, maintenance and answers.
    pool_size = settings.redis_pool_size or settings.concurrency + 16
    redis = redis_client.client(settings, socket_timeout_s=10, pool_size=pool_size)
    keys = Keys(settings.redis_prefix)
    store = await Store.connect_when_ready(settings.database_url, max_size=20,
                                           statement_cache_size=settings.database_statement_cache_size)
    broker = RedisBroker(redis, keys, history_max=settings.history_max, ttl_s=settings.history_ttl_s)
    directory = AgentDirectory(redis, keys)
    runs = Runs(store, broker, RedisRunQueue(redis, keys, agents.pools), store_retry_s=settings.store_retry_s,
                agents=directory)
    saved = await checkpoints.connect(settings.database_url,
                                      statement_cache_size=settings.database_statement_cache_size)
    agents.use(saved.saver)
    answer: AnswerStream = agents.answer
    stats = WorkerStats()
    agents.on_result = stats.llm_request
    worker = Worker(settings=settings, runs=runs, answer=answer, forget=agents.forget, stats=stats)
    health = await _health(worker, agents, redis, settings.internal_port) if settings.internal_port else None
    advertise = asyncio.create_task(_advertise(agents, directory))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker %s serving agents %s (default model: %s)", settings.worker_id, ", ".join(agents.pools),
             settings.llm_model if settings.llm_base_url else "built-in offline demo")
    async with heartbeat.beating(redis, keys, worker, agents.pools, stop):
        await worker.run(stop)
    advertise.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await advertise
    if health is not None:
        await health.cleanup()
    await agents.aclose()
    await saved.close()
    await store.close()
    await broker.aclose()
    await redis.aclose()


def main() -> int:
    def configure() -> tuple[WorkerSettings, Agents]:
        settings = WorkerSettings.from_env(os.environ)
        return settings, Agents.from_env(os.environ, settings)

    def start(configured: tuple[WorkerSettings, Agents]) -> Coroutine[Any, Any, None]:
        settings, agents = configured
        return supervise(settings) if settings.processes > 1 else serve(settings, agents)

    def identity(configured: tuple[WorkerSettings, Agents]) -> tuple[WorkerSettings, str]:
        return configured[0], configured[0].worker_id

    return process.run("agent_worker", configure, start, identity, service="chorus-worker")


if __name__ == "__main__":
    sys.exit(main())
