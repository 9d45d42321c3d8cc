"""What a worker counts, and how it reads at `/metrics` (docs/operations.md, *Metrics*).

Per run and per model call, not per token, except `tokens` (a plain integer). The queue's depth is
read from Redis every `QUEUE_EVERY_S` by the worker (`Worker._watch_queue`), since a scrape must
not wait on Redis. With `WORKER_PROCESSES` > 1 the supervisor serves every process's metrics
with a `process` label (`agent_worker.supervisor`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from common.config import redact_url
from common.metrics import (
    LATENCY_BUCKETS_S,
    RUN_BUCKETS_S,
    Histogram,
    LoopLag,
    Tally,
    counter,
    gauge,
    labelled,
)
from runs.queue import Backlog

QUEUE_EVERY_S = 5.0


class WorkerStats:
    """Counters of one worker process since it started."""

    def __init__(self) -> None:
        self.runs = Tally()  # (agent, outcome: completed, cancelled, failed)
        self.run_duration = Histogram(RUN_BUCKETS_S)  # claimed -> ended
        self.first_token = Histogram(LATENCY_BUCKETS_S)  # claimed -> first token published
        self.send_to_first_token = Histogram(LATENCY_BUCKETS_S)  # queued by the node -> first token
        self.queue_wait = Histogram(LATENCY_BUCKETS_S)  # queued by the node -> claimed here
        self.tokens = 0  # model text chunks streamed to devices
        self.reclaimed = 0
        self.dead_lettered = 0
        self.requeued = 0  # runs whose job was lost, queued again by the sweep
        self.llm_requests = Tally()  # (model, result: ok or the failure code)
        self.pauses = 0  # runs this process paused for a person's answer (they then hold no worker)
        self.paused = 0  # runs paused now, all workers' (read every QUEUE_EVERY_S)
        self.backlog = Backlog(depth=0, oldest_s=0.0)
        self.loop_lag = LoopLag()

    def llm_request(self, endpoint: str, result: str) -> None:
        """One model call ended (`endpoint`: `agent_worker.resilience.endpoint_key`)."""
        self.llm_requests[endpoint.rsplit("#", 1)[-1], result] += 1


def families(stats: WorkerStats, *, slots: int, running: int,
             breakers: Callable[[], Mapping[str, str]]) -> Iterator[Metric]:
    yield labelled(CounterMetricFamily, "chorus_runs", "Runs ended here, by agent and outcome",
                   ["agent", "outcome"], stats.runs)
    yield stats.run_duration.family("chorus_run_duration_seconds", "From claiming a run to its end")
    yield stats.first_token.family("chorus_run_first_token_seconds",
                                   "From claiming a run to publishing its first token")
    yield stats.send_to_first_token.family("chorus_send_first_token_seconds",
                                           "From the node queueing a run to its first token published")
    yield stats.queue_wait.family("chorus_run_queue_wait_seconds",
                                  "From the node queueing a run to a worker claiming it")
    yield counter("chorus_tokens_streamed", "Model text chunks streamed to devices", stats.tokens)
    yield gauge("chorus_worker_slots", "Runs this process may hold at once (WORKER_CONCURRENCY)", slots)
    yield gauge("chorus_runs_running", "Runs this process holds now", running)
    yield gauge("chorus_runs_paused", "Runs waiting for a person's answer, holding no worker (all workers; "
                f"read every {QUEUE_EVERY_S:g} s)", stats.paused)
    yield counter("chorus_run_pauses", "Times a run paused here for a person's answer", stats.pauses)
    yield gauge("chorus_run_queue_depth", "Runs waiting for a worker in this worker's pools (WORKER_AGENTS; "
                f"read every {QUEUE_EVERY_S:g} s)", stats.backlog.depth)
    yield gauge("chorus_run_queue_oldest_seconds", "How long the oldest waiting run has waited",
                stats.backlog.oldest_s)
    yield gauge("chorus_run_queue_pending", "Runs of this worker's pools taken by workers and not finished",
                stats.backlog.taken)
    yield counter("chorus_runs_reclaimed", "Runs taken over from a worker that stopped renewing them",
                  stats.reclaimed)
    yield counter("chorus_runs_dead_lettered", "Runs given up after RUN_MAX_DELIVERIES", stats.dead_lettered)
    yield counter("chorus_runs_requeued", "Runs queued again because their job was lost", stats.requeued)
    yield labelled(CounterMetricFamily, "chorus_llm_requests", "Model calls, by model and result (ok or "
                   "the failure code)", ["model", "result"], stats.llm_requests)
    yield labelled(GaugeMetricFamily, "chorus_llm_circuit_open", "1 while the endpoint's circuit breaker "
                   "is open (half-open counts as open)", ["endpoint"],
                   {(redact_url(key),): float(state != "closed") for key, state in breakers().items()})
    yield from stats.loop_lag.families()
