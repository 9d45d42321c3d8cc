"""Logs: JSON lines with the process and whom they are about; and a cluster's logs, after a whole
conversation (token in the URL, a renewal, a send, REST), hold no token, secret or message text."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from chorus_client.testing import RecordingClient as ChorusClient
from opentelemetry.sdk.trace import TracerProvider

from common import logs
from loadtest.cluster import ClusterConfig, LocalCluster
from protocol import Event
from tests.fake_llm import FakeLLM
from tests.support import unique


def record(message: str, **extra: Any) -> logging.LogRecord:
    made = logging.makeLogRecord({"name": "chorus.test", "levelname": "INFO", "levelno": logging.INFO,
                                  "msg": message, "args": ()})
    made.__dict__.update(extra)
    return made


def test_a_json_line_has_the_process_the_bound_fields_the_extras_and_the_trace() -> None:
    formatter = logs.JsonFormatter("ws_node", "node-a")
    tracer = TracerProvider().get_tracer("t")

    async def in_a_task() -> dict[str, Any]:
        logs.bind(user="u_1", device="phone")
        with tracer.start_as_current_span("s") as span:
            line = json.loads(formatter.format(record("socket closed", code=1000, duration_s=1.5)))
            assert line["trace_id"] == f"{span.get_span_context().trace_id:032x}"
        return line  # type: ignore[no-any-return]

    line = asyncio.run(in_a_task())
    assert {k: line[k] for k in ("level", "logger", "message", "service", "instance", "user", "device",
                                 "code", "duration_s")} == {
        "level": "info", "logger": "chorus.test", "message": "socket closed", "service": "ws_node",
        "instance": "node-a", "user": "u_1", "device": "phone", "code": 1000, "duration_s": 1.5}
    assert line["ts"].endswith("Z")
    # Fields bound in a task stay in it.
    assert "user" not in json.loads(formatter.format(record("elsewhere")))


def test_an_exception_is_one_line_and_text_format_shows_bound_fields() -> None:
    formatter = logs.JsonFormatter("agent_worker", "w-1")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = record("run crashed", exc_info=sys.exc_info())
    line = formatter.format(failed)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exception"]
    with logs.bound(run="r_1"):
        assert logs.TextFormatter().format(record("run ended")).endswith("run ended run=r_1")


@pytest.mark.timeout(120)
async def test_a_clusters_logs_hold_no_token_secret_or_message_text(
    tmp_path: Path, fake_llm: FakeLLM, http: aiohttp.ClientSession
) -> None:
    secret = secrets.token_hex(32)
    config = ClusterConfig(nodes=1, workers=1, nginx=False, jwt_secret=secret,
                           env={"LLM_BASE_URL": fake_llm.base_url, "LOG_LEVEL": "INFO"})
    text = f"my private words {secrets.token_hex(8)}"
    user = unique("logs")
    with LocalCluster(tmp_path / "logged", config) as cluster:
        token, renewal = cluster.token(user), cluster.token(user, ttl_s=7200)
        device = ChorusClient(cluster.ws_url, token, device="phone")  # the token in the URL
        await device.connect()
        try:
            await device.auth(renewal)
            ack = await device.send(f"[[tokens:5]] {text}")
            end = await device.wait_run_end(ack["run"], 30)
            assert end["event"] == Event.RUN_COMPLETED
            url = f"{cluster.http_url}/v1/conversations/{ack['conversation']}/messages"
            async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
                assert response.status == 200
                assert text in await response.text()
        finally:
            await device.close()
    # The processes are stopped: their logs are complete.
    lines = {path.name: path.read_text() for path in (tmp_path / "logged").glob("*.log")}
    for name, content in lines.items():
        for leaked in (token, renewal, secret, text, text.split()[-1]):
            assert leaked not in content, f"{name} logs {leaked!r}"

    node = [json.loads(line) for line in lines["node-a.log"].splitlines() if line.startswith("{")]
    assert node and all(line["service"] == "ws_node" and line["instance"] == "node-a" for line in node)
    opened = [line for line in node if line["message"] == "socket open" and line.get("user") == user]
    closed = [line for line in node if line["message"] == "socket closed" and line.get("user") == user]
    assert [line["device"] for line in opened] == ["phone"]
    assert [(line["device"], line["code"]) for line in closed] == [("phone", 1000)]
    assert closed[0]["duration_s"] > 0
    worker = [json.loads(line) for line in lines["worker-1.log"].splitlines() if line.startswith("{")]
    ended = [line for line in worker if line["message"] == "run ended" and line.get("run") == ack["run"]]
    assert len(ended) == 1 and ended[0]["status"] == "completed" and ended[0]["user"] == user
