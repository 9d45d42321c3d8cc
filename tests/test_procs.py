"""Smoke tests of loadtest.procs: real redis-server, postgres and nginx processes on loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import redis
from aiohttp import web

from loadtest.procs import (
    REPO_ROOT,
    NginxServer,
    PostgresServer,
    Proc,
    RedisServer,
    free_port,
    nginx_binary,
)

needs_nginx = pytest.mark.skipif(nginx_binary() is None, reason="nginx not installed (apt-get install nginx)")


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_proc_logs_output_and_returns_exit_code(tmp_path: Path) -> None:
    proc = Proc("hello", [sys.executable, "-c", "print('hi there'); raise SystemExit(3)"], workdir=tmp_path)
    proc.start()
    assert proc.wait(timeout_s=10) == 3
    assert not proc.alive
    assert "hi there" in proc.log_text()
    assert (tmp_path / "hello.log").exists()


def test_proc_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    # The marker is assembled at run time: the log's header line already quotes argv.
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('re' + 'ady', flush=True); time.sleep(60)"
    )
    proc = Proc("stubborn", [sys.executable, "-c", code], env={"CHORUS_X": "1"}, workdir=tmp_path)
    proc.start()
    wait_for(lambda: "ready" in proc.log_text(), 10, "the SIGTERM handler")
    started = time.monotonic()
    proc.stop(timeout_s=0.5)
    assert not proc.alive
    assert proc.wait(timeout_s=1) == -9
    assert time.monotonic() - started < 5


def test_redis_restart_keeps_or_drops_data(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        try:
            assert client.ping()
            client.set("k", "v")
            server.restart(keep_data=True)
            assert client.get("k") == b"v"  # the client reconnects to the same port
            server.restart(keep_data=False)
            assert client.get("k") is None
            client.set("k2", "v2")
            server.kill()
            assert not server.proc.alive
            server.start()
            assert client.get("k2") is None  # a crash loses what was never saved
        finally:
            client.close()
    finally:
        server.stop()


async def _select_one(url: str) -> int:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        value: int = await conn.fetchval("select 1")
        return value
    finally:
        await conn.close()


async def test_two_postgres_servers_answer_over_tcp(tmp_path: Path) -> None:
    first, second = PostgresServer(tmp_path / "a"), PostgresServer(tmp_path / "b")
    try:
        await asyncio.gather(asyncio.to_thread(first.start), asyncio.to_thread(second.start))
        assert first.url.startswith(f"postgresql://postgres@127.0.0.1:{first.port}/")
        assert [await _select_one(first.url), await _select_one(second.url)] == [1, 1]
        other = first.create_database("chorus_test_other")
        assert first.create_database("chorus_test_other") == other  # idempotent
        assert await _select_one(other) == 1
        # A crash (postmaster and backends SIGKILLed) must not block the next start.
        await asyncio.to_thread(second.kill)
        await asyncio.to_thread(second.start)
        assert await _select_one(second.url) == 1
    finally:
        await asyncio.gather(asyncio.to_thread(first.stop), asyncio.to_thread(second.stop))
    assert not first.proc.alive and not second.proc.alive


@dataclass
class Upstream:
    """A stand-in ws node: /v1/* answers its name, /ws greets with its name and echoes."""

    name: str
    port: int = field(default_factory=free_port)
    hits: int = 0
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/{tail:.*}", self._rest)
        app.router.add_get("/ws", self._ws)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _rest(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(text=self.name)

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(self.name)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data)
        return ws


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[Upstream, Upstream]]:
    pair = (Upstream("a"), Upstream("b"))
    for upstream in pair:
        await upstream.start()
    yield pair
    for upstream in pair:
        await upstream.stop()


@pytest.fixture
async def nginx(tmp_path: Path, upstreams: tuple[Upstream, Upstream]) -> AsyncIterator[NginxServer]:
    server = NginxServer(tmp_path, [u.port for u in upstreams])
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.stop)
    assert not server.proc.alive


async def _get_names(session: aiohttp.ClientSession, url: str, count: int) -> list[str]:
    names = []
    for _ in range(count):
        async with session.get(url) as response:
            assert response.status == 200, await response.text()
            names.append(await response.text())
    return names


@needs_nginx
async def test_nginx_proxies_rest_and_websocket(
    nginx: NginxServer, upstreams: tuple[Upstream, Upstream]
) -> None:
    secret = "tok-SECRET-9f2c"
    assert "{{" not in nginx.conf_path.read_text()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        names = await _get_names(session, f"{nginx.url}/v1/x?access_token={secret}", 20)
        assert set(names) == {"a", "b"}  # least_conn with idle upstreams spreads
        assert all(u.hits > 0 for u in upstreams)

        async with session.ws_connect(f"{nginx.ws_url}?access_token={secret}") as ws:
            assert await ws.receive_str() in {"a", "b"}
            await ws.send_str("ping")
            assert await ws.receive_str() == "ping"
            await asyncio.to_thread(nginx.reload)
            await ws.send_str("after reload")  # an old worker keeps open sockets while shutting down
            assert await ws.receive_str() == "after reload"
        assert set(await _get_names(session, f"{nginx.url}/v1/y", 4)) == {"a", "b"}

        async with session.get(f"{nginx.url}/not-routed") as response:
            assert response.status == 404

    # The WebSocket line is written when that connection ends, so poll for it.
    await asyncio.to_thread(wait_for, lambda: "GET /ws " in nginx.access_log.read_text(), 10, "/ws log line")
    log = nginx.access_log.read_text()
    assert "GET /v1/x " in log
    assert secret not in log and "access_token" not in log


@needs_nginx
async def test_nginx_set_upstreams_and_skips_dead_node(
    nginx: NginxServer, upstreams: tuple[Upstream, Upstream]
) -> None:
    a, b = upstreams
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await asyncio.to_thread(nginx.set_upstreams, [b.port])
        assert set(await _get_names(session, f"{nginx.url}/v1/only-b", 6)) == {"b"}

        await asyncio.to_thread(nginx.set_upstreams, [a.port, b.port])
        await a.stop()  # refused connects: proxy_next_upstream moves each request on to b
        assert set(await _get_names(session, f"{nginx.url}/v1/failover", 10)) == {"b"}


@needs_nginx
@pytest.mark.skipif(os.geteuid() != 0, reason="the production config uses system paths (/var/run)")
def test_production_config_passes_nginx_t(tmp_path: Path) -> None:
    binary = nginx_binary()
    assert binary is not None
    conf = REPO_ROOT / "nginx" / "nginx.conf"
    result = subprocess.run(
        [binary, "-t", "-p", f"{tmp_path}/", "-c", str(conf), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
