"""The JavaScript SDK (clients/js): generated types current, `tsc` clean, its unit tests, and its live
tests against the session's real cluster.

The live tests are Node's (clients/js/test/live/cluster.test.js, under ``node --test``); this module
hands them the cluster's URLs and JWT secret in environment variables and serves one control
endpoint, ``POST /kill {"node": "node-a"}``, which SIGKILLs that node and answers once it is dead,
so the Node side can kill a node at the moment it chooses (mid-answer), and ``POST /restart``, which
brings every killed node back and answers once it is ready. Whatever the Node side leaves killed is
restarted afterwards too: the cluster is the session's.

The one dev dependency (typescript, pinned in package-lock.json) is installed with ``npm ci`` when
missing; everything else needs only ``node`` (20+).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from common.process import free_port
from loadtest.cluster import LocalCluster
from loadtest.procs import REPO_ROOT
from protocol import shown_text
from tests.support import node_ws

JS_DIR = REPO_ROOT / "clients" / "js"
TSC = JS_DIR / "node_modules" / "typescript" / "bin" / "tsc"
NPM_CI_TIMEOUT_S = 300
TOOL_TIMEOUT_S = 120  # tsc, the unit tests, the generator
LIVE_TIMEOUT_S = 280  # the live tests' own per-test timeouts add up to 270 s at worst
NODE_MIN_MAJOR = 20

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="node (20+) is not installed")


def node_major() -> int:
    version = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=10, check=True).stdout
    match = re.match(r"v(\d+)\.", version)
    assert match, version
    return int(match[1])


def websocket_flags() -> list[str]:
    """Node 20 and 21 have the global WebSocket behind a flag; 22 and later have it by default."""
    return ["--experimental-websocket"] if node_major() < 22 else []


def run(argv: Sequence[str], *, timeout_s: float = TOOL_TIMEOUT_S) -> str:
    """Run a tool in clients/js; fail the test with its output unless it exits 0."""
    done = subprocess.run(list(argv), cwd=JS_DIR, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "NO_COLOR": "1"})
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(argv)} exited {done.returncode}:\n{output}"
    return output


@pytest.fixture(scope="session")
def js_package() -> Path:
    """clients/js with its dev dependency installed (``npm ci`` from the lock file when missing)."""
    assert node_major() >= NODE_MIN_MAJOR, f"the SDK needs Node {NODE_MIN_MAJOR}+"
    if not TSC.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed (needed once, to install typescript)")
        run([npm, "ci", "--no-audit", "--no-fund"], timeout_s=NPM_CI_TIMEOUT_S)
    return JS_DIR


def test_generated_protocol_types_are_current() -> None:
    """src/protocol.d.ts and src/vocabulary.js are what scripts/generate.js makes of the schema."""
    run(["node", "scripts/generate.js", "--check"])


def test_shown_text_is_protocol_text_in_both_languages() -> None:
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("", "token", {"text": "Hel"}), ("Hel", "token", {"text": "lo é😀"}), ("x", "token", {"text": ""}),
        ("partial", "run.started", {"message": "m", "attempt": 2, "worker": "w"}),
        ("partial", "run.resumed", {"text": "whole", "attempt": 1}),
        ("kept", "tool.started", {"call": "c", "name": "n", "arguments": {}}),
        ("kept", "run.completed", {"message": "m", "text": "other"}), ("kept", "future.event", {"text": "no"}),
    ]
    script = ("import {shownText} from './src/text.js';"
              "const cases = JSON.parse(process.argv[1]);"
              "console.log(JSON.stringify(cases.map(([t, e, d]) => shownText(t, e, d))));")
    shown = json.loads(run(["node", "--input-type=module", "-e", script, json.dumps(cases)]))
    assert shown == [shown_text(text, event, data) for text, event, data in cases]


def test_sdk_type_checks(js_package: Path) -> None:
    """``tsc --checkJs --strict`` over the SDK, against the generated protocol types."""
    run(["node", str(TSC), "-p", "tsconfig.json"])


def test_shipped_types_build(js_package: Path, tmp_path: Path) -> None:
    run(["node", "scripts/build-types.js", str(tmp_path)])
    index = (tmp_path / "index.d.ts").read_text()
    assert "export class ChorusClient" in (tmp_path / "client.d.ts").read_text()
    assert "ChorusClient" in index and (tmp_path / "protocol.d.ts").exists()


def test_unit_tests() -> None:
    files = sorted(str(p.relative_to(JS_DIR)) for p in (JS_DIR / "test").glob("*.test.js"))
    assert files
    output = run(["node", "--test", "--test-reporter=spec", *files])
    assert "fail 0" in output, output


@pytest.fixture
async def control(cluster: LocalCluster) -> AsyncIterator[str]:
    """A local HTTP endpoint the Node tests call to SIGKILL a node; restarts what it killed after."""
    killed: list[int] = []
    names = [f"node-{chr(ord('a') + index)}" for index in range(len(cluster.nodes))]

    async def kill(request: web.Request) -> web.Response:
        name = (await request.json()).get("node")
        if name not in names:
            return web.json_response({"error": f"no node {name!r}"}, status=400)
        index = names.index(name)
        await asyncio.to_thread(cluster.nodes[index].kill)  # returns once the process is reaped
        killed.append(index)
        return web.json_response({"killed": name})

    async def restart(request: web.Request) -> web.Response:
        while killed:
            await asyncio.to_thread(cluster.start_node, killed.pop())  # returns once /readyz answers
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/kill", kill)
    app.router.add_post("/restart", restart)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        while killed:
            await asyncio.to_thread(cluster.start_node, killed.pop())


@pytest.mark.timeout(LIVE_TIMEOUT_S + 30)
async def test_live_against_the_cluster(cluster: LocalCluster, control: str) -> None:
    """Two devices, a reconnect mid-answer, a node killed mid-answer, a resent send: Node's asserts."""
    assert cluster.nginx is not None, "nginx must be installed: the kill test reconnects through it"
    env = {
        **os.environ,
        "NO_COLOR": "1",
        "CHORUS_WS_URL": cluster.ws_url,
        "CHORUS_NODE_URLS": ",".join(node_ws(cluster, index) for index in range(len(cluster.nodes))),
        "CHORUS_JWT_SECRET": cluster.config.jwt_secret,
        "CHORUS_CONTROL_URL": control,
    }
    # The file is run by node itself (node:test runs it in-process and streams its report), so a
    # timeout still shows how far it got; its own process group, so nothing it started outlives it.
    proc = await asyncio.create_subprocess_exec(
        "node", *websocket_flags(), "--test-reporter=spec", "test/live/cluster.test.js",
        cwd=JS_DIR, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdout is not None
    chunks: list[bytes] = []

    async def read_all(stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            chunks.append(chunk)

    try:
        await asyncio.wait_for(asyncio.gather(read_all(proc.stdout), proc.wait()), LIVE_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        pytest.fail(f"node did not finish in {LIVE_TIMEOUT_S}s:\n{b''.join(chunks).decode(errors='replace')}")
    out = b"".join(chunks)
    output = out.decode(errors="replace")
    assert proc.returncode == 0, f"node --test exited {proc.returncode}:\n{output}"
    assert re.search(r"\bpass 4\b", output) and re.search(r"\bfail 0\b", output), output
