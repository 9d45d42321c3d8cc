"""Traces: real OTLP receivers (HTTP/protobuf and gRPC) take what real processes export; one send
is one trace, from the node's `chorus.send` to the worker's run, model call and publishes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from chorus_client.testing import RecordingClient as ChorusClient
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from loadtest.cluster import ClusterConfig, LocalCluster
from loadtest.procs import REPO_ROOT, free_port
from protocol import Event
from tests.fake_llm import FakeLLM
from tests.support import WAIT_S, unique


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace: str
    id: str
    parent: str
    attributes: dict[str, Any]


def spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> list[Span]:
    found = []
    for resource_spans in request.resource_spans:
        resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
        for scope in resource_spans.scope_spans:
            for span in scope.spans:
                attributes = {a.key: _value(a.value) for a in span.attributes}
                found.append(Span(resource.get("service.name", ""), span.name, span.trace_id.hex(),
                                  span.span_id.hex(), span.parent_span_id.hex(), attributes))
    return found


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class Received:
    """Spans as they arrive, with a wait for a condition on them."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._changed = asyncio.Condition()

    async def add(self, spans: list[Span]) -> None:
        async with self._changed:
            self.spans.extend(spans)
            self._changed.notify_all()

    async def wait_for(self, predicate: Any, timeout_s: float = WAIT_S) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self.spans)), timeout_s)


@pytest.fixture
async def otlp_http() -> AsyncIterator[tuple[str, Received]]:
    """An OTLP/HTTP receiver (`POST /v1/traces`, protobuf) on a free port of this test's loop."""
    received = Received()

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = trace_service_pb2.ExportTraceServiceRequest.FromString(await request.read())
        await received.add(spans_of(message))
        body = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", received
    await runner.cleanup()


@pytest.fixture
def traced(tmp_path_factory: pytest.TempPathFactory, fake_llm: FakeLLM) -> Iterator[dict[str, str]]:
    """The environment of traced processes; the cluster itself is started by the test (it needs
    the receiver's URL)."""
    yield {"LLM_BASE_URL": fake_llm.base_url, "OTEL_BSP_SCHEDULE_DELAY": "100"}


@pytest.mark.timeout(120)
async def test_one_send_is_one_trace_from_the_node_to_the_workers_run(
    otlp_http: tuple[str, Received], traced: dict[str, str], tmp_path: Path
) -> None:
    endpoint, received = otlp_http
    env = {**traced, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
    config = ClusterConfig(nodes=1, workers=1, nginx=False, env=env)
    with LocalCluster(tmp_path / "traced", config) as cluster:
        device = ChorusClient(cluster.ws_url, cluster.token(unique("traced")), device="phone")
        await device.connect()
        try:
            ack = await device.send("[[tokens:12]] trace me")
            end = await device.wait_run_end(ack["run"], 30)
            assert end["event"] == Event.RUN_COMPLETED
        finally:
            await device.close()

        def complete(spans: list[Span]) -> bool:
            names = {(s.name, s.attributes.get("chorus.run")) for s in spans}
            return {("chorus.send", ack["run"]), ("chorus.run", ack["run"])} <= names and any(
                s.name == "chorus.model" for s in spans)

        await received.wait_for(complete)

    send = next(s for s in received.spans if s.name == "chorus.send" and s.attributes["chorus.run"] == ack["run"])
    run = next(s for s in received.spans if s.name == "chorus.run" and s.attributes["chorus.run"] == ack["run"])
    assert (send.service, run.service) == ("chorus-node", "chorus-worker")
    assert run.trace == send.trace and run.parent == send.id, "the run's span is the send's child"
    trace = [s for s in received.spans if s.trace == send.trace]
    model = next(s for s in trace if s.name == "chorus.model")
    assert model.parent == run.id and model.attributes["chorus.model.chunks"] == 12
    publishes = [s for s in trace if s.name == "chorus.publish"]
    assert {s.attributes["chorus.event"] for s in publishes} >= {"run.started", "token"}
    # The instrumented clients: the send's Postgres and Redis work, in the same trace.
    systems = {s.attributes.get("db.system") or s.attributes.get("db.system.name") for s in trace}
    assert {"postgresql", "redis"} <= systems
    # A socket is never a span (it would last for hours): the node's spans are sends, and Redis
    # and Postgres commands (background ones, presence and the like, are roots of their own).
    node = [s for s in received.spans if s.service == "chorus-node"]
    assert all(s.name == "chorus.send" or s.attributes.get("db.system") or s.attributes.get("db.system.name")
               for s in node), {s.name for s in node}


async def test_spans_go_over_grpc_when_the_protocol_says_so(tmp_path: Path) -> None:
    received: list[Span] = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        async def Export(self, request: Any, context: Any) -> Any:
            received.extend(spans_of(request))
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        script = ("from common import tracing\n"
                  "from opentelemetry import trace\n"
                  "assert tracing.configure('chorus-test')\n"
                  "with trace.get_tracer('t').start_as_current_span('over grpc'):\n"
                  "    pass\n"
                  "tracing.shutdown()\n")
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
               "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_SERVICE_NAME": "grpc-check"}
        done = await asyncio.create_subprocess_exec(sys.executable, "-c", script, env=env, cwd=tmp_path)
        assert await asyncio.wait_for(done.wait(), WAIT_S) == 0
    finally:
        await server.stop(None)
    assert [(s.service, s.name) for s in received] == [("grpc-check", "over grpc")]


def test_an_unknown_otlp_protocol_stops_the_process_at_start() -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json", "REDIS_URL": "redis://127.0.0.1:1",
           "DATABASE_URL": "postgresql://x@127.0.0.1:1/x", "AUTH_JWT_SECRET": "s" * 32}
    done = subprocess.run([sys.executable, "-m", "ws_node"], env=env, capture_output=True, text=True,
                          timeout=WAIT_S, check=False)
    assert done.returncode == 2
    assert "OTEL_EXPORTER_OTLP_PROTOCOL" in done.stderr and "http/json" in done.stderr


def test_without_an_endpoint_nothing_is_configured() -> None:
    from common import tracing

    assert tracing.configure("chorus-test", env={}) is False
    assert tracing.configure("chorus-test", env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318",
                                                 "OTEL_SDK_DISABLED": "true"}) is False
