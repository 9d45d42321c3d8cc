"""Tracing with OpenTelemetry, configured the standard way (docs/operations.md, *Traces*).

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set: then
spans go to that OTLP endpoint over `http/protobuf` or `grpc` (`OTEL_EXPORTER_OTLP_PROTOCOL`), in
batches. The SDK reads the other standard variables itself (`OTEL_TRACES_SAMPLER`,
`OTEL_BSP_SCHEDULE_DELAY`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`, ...);
`service.name` is `OTEL_SERVICE_NAME` or the process's default (`chorus-node`, `chorus-worker`).
With tracing on, Redis commands and Postgres queries get spans of their own (the redis and
asyncpg instrumentations); off, the OpenTelemetry API is a no-op and nothing here costs a thing.

The trace of a send: the node's `chorus.send` span, then (the W3C trace context travels in the
run's job, `carrier`/`extracted`) the worker's `chorus.run` and its children: the model call, each
tool call, each publish. A WebSocket is never a span: it lives for hours.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.export import SpanExporter

PROTOCOLS = ("http/protobuf", "grpc")


class _Tracing:
    provider: object | None = None


def configure(default_service: str, env: Mapping[str, str] = os.environ) -> bool:
    """Install the SDK's tracer provider when an OTLP endpoint is configured; whether it did.
    Raises ValueError for an OTLP protocol it cannot speak (the process stops at start)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if not (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return False
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip()
    if protocol not in PROTOCOLS:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter = _exporter(protocol)
    resource = Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or default_service})
    provider = TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER(_ARG)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    RedisInstrumentor().instrument(tracer_provider=provider)
    AsyncPGInstrumentor().instrument(tracer_provider=provider)  # type: ignore[no-untyped-call]
    _Tracing.provider = provider
    return True


def _exporter(protocol: str) -> SpanExporter:
    """The OTLP span exporter for `protocol`; it reads its endpoint, headers and timeout from the
    standard variables."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()


def shutdown() -> None:
    """Export the spans still batched (at exit)."""
    provider = _Tracing.provider
    if provider is not None:
        provider.shutdown()  # type: ignore[attr-defined]
        _Tracing.provider = None


def carrier() -> dict[str, str]:
    """The current trace context as W3C headers (`traceparent`, `tracestate`), for a job; empty
    when nothing is traced."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


def extracted(headers: Mapping[str, str]) -> Context:
    """The context a job's `carrier()` headers name, to start its spans under."""
    return propagate.extract(dict(headers))
