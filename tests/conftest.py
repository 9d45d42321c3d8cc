"""Shared fixtures: real Redis and Postgres servers, started once per session on free ports.

Plain helpers shared by the test modules are in tests/support.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import aiohttp
import pytest

from common.keys import Keys
from loadtest.cluster import ClusterConfig, LocalCluster
from loadtest.procs import PostgresServer, RedisClusterServer, RedisServer
from tests.fake_llm import FakeLLM
from tests.support import PRESENCE_DEBOUNCE_S

LOG_LINES = 40  # of each process's log, under a failed test that ran against a cluster


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A Postgres of the test module's own, for tests that migrate, downgrade or proxy it."""
    server = PostgresServer(tmp_path_factory.mktemp("postgres"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def keys() -> Keys:
    """A key prefix of the test's own, so tests share a Redis without seeing each other."""
    return Keys(prefix=f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own, for tests that stop or restart it."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fake_llm() -> Iterator[FakeLLM]:
    """The OpenAI-compatible streaming server: the one fake, at the LLM seam."""
    with FakeLLM(token_delay_s=0.005) as llm:
        yield llm


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLM) -> Iterator[LocalCluster]:
    """Redis, Postgres, two nodes, one worker (ChatOpenAI against the fake LLM) and nginx."""
    config = ClusterConfig(nodes=2, workers=1, nginx=True, env={"LLM_BASE_URL": fake_llm.base_url,
                                                                   "LLM_API_KEY": "test-key",
                                                                   "PRESENCE_DEBOUNCE_SECONDS": str(PRESENCE_DEBOUNCE_S)})
    with LocalCluster(tmp_path_factory.mktemp("cluster"), config) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for REST calls and WebSockets of the test's own, closed after it."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that ran against a cluster reports what its processes said, but for their
    info lines: CI keeps no temp dirs, and a failure under load is often not seen again on a quiet
    machine."""
    report: pytest.TestReport = yield
    if report.failed and call.when == "call":
        for value in getattr(item, "funcargs", {}).values():
            workdir = (value.workdir if isinstance(value, LocalCluster)
                       else value.root.parent if isinstance(value, RedisClusterServer) else None)
            for log in sorted(workdir.glob("*.log")) if workdir else ():
                lines = [line[:400] for line in log.read_text(errors="replace").splitlines()
                         if '"level":"info"' not in line]
                if lines:
                    report.sections.append((f"{log.name} (last {LOG_LINES} lines, no info)",
                                            "\n".join(lines[-LOG_LINES:])))
    return report
