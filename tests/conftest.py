"""Shared fixtures: real Redis and Postgres servers, started once per session on free ports."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fanout.keys import Keys
from loadtest.procs import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
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
