"""`WORKER_PROCESSES` > 1: one worker process per core, under one supervisor.

A worker runs its graph, model client and token coalescing in one Python process, so it uses one
core however many runs it holds (issue 15 measured 0.96-0.99 of a core with the second idle). The
supervisor starts `processes` workers (`python -m agent_worker` with `WORKER_PROCESSES=1`), each a
consumer of its own (`<NODE_ID>-<i>`) in the runs group, restarts one that dies (its runs are
reclaimed like any dead worker's), and on SIGTERM passes the signal on and waits for them to drain.
Its `INTERNAL_PORT` answers for all of them: `/healthz` while every child is alive, `/readyz` when
every child is ready (each child's own health server listens on a port of the supervisor's choosing),
and `/metrics` serves every child's metrics, each sample labelled with its `process` (0, 1, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from agent_worker.settings import WorkerSettings
from common.process import free_port

log = logging.getLogger(__name__)
RESTART_DELAY_S = 1.0


class Supervisor:
    def __init__(self, settings: WorkerSettings, processes: int) -> None:
        self.settings = settings
        self.processes = processes
        self.ports = [free_port() for _ in range(processes)]
        self.children: list[asyncio.subprocess.Process | None] = [None] * processes
        self.stopping = asyncio.Event()

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        env = {**os.environ, "WORKER_PROCESSES": "1", "NODE_ID": f"{self.settings.worker_id}-{index}",
               "INTERNAL_PORT": str(self.ports[index])}
        child = await asyncio.create_subprocess_exec(sys.executable, "-m", "agent_worker", env=env)
        log.info("worker process %d started (pid %d)", index, child.pid)
        return child

    async def _keep(self, index: int) -> None:
        """Run child `index` until the supervisor stops, starting it again whenever it exits."""
        while not self.stopping.is_set():
            child = self.children[index] = await self._spawn(index)
            code = await child.wait()
            if not self.stopping.is_set():
                log.warning("worker process %d exited with %s; starting it again", index, code)
                await asyncio.sleep(RESTART_DELAY_S)

    async def _ready(self, session: aiohttp.ClientSession, index: int) -> bool:
        try:
            async with session.get(f"http://127.0.0.1:{self.ports[index]}/readyz") as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _scrape(self, session: aiohttp.ClientSession, index: int) -> str:
        try:
            async with session.get(f"http://127.0.0.1:{self.ports[index]}/metrics") as response:
                return await response.text() if response.status == 200 else ""
        except (aiohttp.ClientError, TimeoutError):
            return ""  # a child starting again: its series are absent from this scrape

    async def _metrics(self, session: aiohttp.ClientSession) -> bytes:
        texts = await asyncio.gather(*(self._scrape(session, i) for i in range(self.processes)))
        merged: dict[str, Metric] = {}
        for index, text in enumerate(texts):
            for family in text_string_to_metric_families(text):
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "process": str(index)}, sample.value,
                                    sample.timestamp, sample.exemplar)
        return generate_latest(_Families(list(merged.values())))

    def _alive(self) -> list[bool]:
        return [c is not None and c.returncode is None for c in self.children]

    async def _health(self, port: int) -> web.AppRunner:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))

        async def healthz(request: web.Request) -> web.Response:
            alive = self._alive()
            return web.json_response({"status": "ok" if all(alive) else "degraded", "alive": alive},
                                     status=200 if all(alive) else 503)

        async def readyz(request: web.Request) -> web.Response:
            ready = await asyncio.gather(*(self._ready(session, i) for i in range(self.processes)))
            return web.json_response({"ready": all(ready), "processes": ready},
                                     status=200 if all(ready) else 503)

        async def metrics(request: web.Request) -> web.Response:
            body = await self._metrics(session)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def close_session(app: web.Application) -> None:
            await session.close()

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics)
        app.on_cleanup.append(close_session)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "0.0.0.0", port).start()
        return runner

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        health = await self._health(self.settings.internal_port) if self.settings.internal_port else None
        keepers = [asyncio.create_task(self._keep(i)) for i in range(self.processes)]
        await self.stopping.wait()
        log.info("stopping %d worker processes", self.processes)
        for child in self.children:
            if child is not None and child.returncode is None:
                child.send_signal(signal.SIGTERM)  # each drains its runs (WORKER_DRAIN_SECONDS)
        _, late = await asyncio.wait(keepers, timeout=self.settings.drain_s + 5)
        for child in self.children:
            if child is not None and child.returncode is None:
                child.kill()
        for task in late:
            task.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        if health is not None:
            await health.cleanup()


class _Families:
    """What `generate_latest` reads: something with `collect()`."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


async def supervise(settings: WorkerSettings) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        await Supervisor(settings, settings.processes).run()
