"""WORKER_PROCESSES: one supervisor, a worker process per core, each a consumer of its own."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from chorus_client.testing import RecordingClient as ChorusClient
from prometheus_client.parser import text_string_to_metric_families

from loadtest.cluster import ClusterConfig, LocalCluster
from loadtest.procs import Proc, free_port, wait_http_ok
from protocol import Event
from tests.fake_llm import FakeLLM
from tests.support import unique


@pytest.fixture(scope="module")
def workerless(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path_factory.mktemp("workerless"), ClusterConfig(nodes=1, workers=0, nginx=False)) as cluster:
        yield cluster


def readiness(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
        body: dict[str, object] = json.loads(response.read())
        return body


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def poll_until(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def children(proc: Proc) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children() if p.is_running()]


@pytest.mark.timeout(120)
async def test_two_worker_processes_share_the_runs_and_one_that_dies_comes_back(
    workerless: LocalCluster, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    port = free_port()
    supervisor = Proc("multi", [sys.executable, "-m", "agent_worker"], workdir=tmp_path, env={
        "REDIS_URL": workerless.redis_url, "DATABASE_URL": workerless.database_url,
        "LLM_BASE_URL": fake_llm.base_url, "NODE_ID": "multi", "WORKER_PROCESSES": "2",
        "WORKER_CONCURRENCY": "4", "INTERNAL_PORT": str(port), "WORKER_DRAIN_SECONDS": "2",
    })
    supervisor.start()
    try:
        await asyncio.to_thread(wait_http_ok, f"http://127.0.0.1:{port}/readyz", 60, proc=supervisor)
        assert readiness(port) == {"ready": True, "processes": [True, True]}
        assert len(children(supervisor)) == 2
        # One scrape of the supervisor's port has every process's metrics, told apart by `process`.
        samples = [s for f in text_string_to_metric_families(await asyncio.to_thread(metrics, port))
                   for s in f.samples]
        assert {s.labels["process"]: s.value for s in samples if s.name == "chorus_worker_slots"} == {
            "0": 4, "1": 4}

        device = ChorusClient(workerless.ws_url, workerless.token(unique("alice")), device="phone")
        await device.connect()
        try:
            acks = await asyncio.gather(*(device.send(f"[[tokens:30]] [[slow:0.02]] q{n}") for n in range(8)))
            ends = [await device.wait_run_end(ack["run"], 60) for ack in acks]
            assert all(end["event"] == Event.RUN_COMPLETED for end in ends)
            workers = {e["data"]["worker"] for e in device.events if e["event"] == Event.RUN_STARTED}
            assert workers == {"multi-0", "multi-1"}, "8 runs at once need both processes' 4 slots"
        finally:
            await device.close()

        victim = children(supervisor)[0]
        victim.kill()
        await asyncio.to_thread(victim.wait, 10)

        def restarted() -> bool:
            now = children(supervisor)
            return len(now) == 2 and victim.pid not in [p.pid for p in now]

        # No event tells this test process of another's child: poll, bounded (RESTART_DELAY_S is 1 s).
        await asyncio.to_thread(poll_until, restarted, 15)
        await asyncio.to_thread(wait_http_ok, f"http://127.0.0.1:{port}/readyz", 60, proc=supervisor)

        survivors = children(supervisor)
        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(supervisor.wait, 20) == 0
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in survivors)
    finally:
        supervisor.stop()
