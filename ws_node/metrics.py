"""What a node counts, and how it reads at `/metrics` (docs/operations.md, *Metrics*).

`NodeStats` is plain attributes and fixed-bucket histograms (`common.metrics`): the connection's
writer and the hub add to them per frame without a lock or a label lookup; `families` turns them,
and what the services hold (sockets, subscribed users), into Prometheus metrics at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric

from common.metrics import LATENCY_BUCKETS_S, Histogram, LoopLag, Tally, counter, gauge, labelled
from protocol import CloseCode

QUEUE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
_KNOWN_CLOSE_CODES = frozenset(int(code) for code in CloseCode)


class NodeStats:
    """Counters of one node process since it started."""

    def __init__(self) -> None:
        self.connects = 0
        self.closes = Tally()  # (close code,)
        self.delivered = 0  # frames written to sockets
        self.sent_bytes = 0  # their payload bytes
        self.slow_consumer_closes = 0
        self.resumes = Tally()  # (outcome,): replayed, resync reasons, new
        self.commands = Tally()  # (command type, result: ok or an error code)
        self.rate_limited = Tally()  # (limit,): connections, commands, devices
        self.delivery_lag = Histogram(LATENCY_BUCKETS_S)
        self.send_queue = Histogram(QUEUE_BUCKETS)
        self.loop_lag = LoopLag()

    def closed(self, code: int | None) -> None:
        # Clients may close with any code from 1000 to 4999: only Chorus's own are labels.
        self.closes[str(code) if code in _KNOWN_CLOSE_CODES else "other",] += 1

    def published(self, payload: str) -> None:
        """A fanned-out event's delivery lag: from its publish (`ts`, the last member of every
        event frame, `protocol.events.event_body`) to now; anything else is not an event."""
        start = payload.rfind('"ts":')
        if start < 0:
            return
        try:
            ts_ms = int(payload[start + 5:-1])
        except ValueError:
            return
        self.delivery_lag.observe(max(0.0, time.time() - ts_ms / 1000))


def families(stats: NodeStats, *, sockets: int, users: int, pubsub_reconnects: int) -> Iterator[Metric]:
    yield gauge("chorus_ws_connections", "WebSockets open on this node", sockets)
    yield counter("chorus_ws_connects", "WebSockets accepted (upgraded)", stats.connects)
    yield labelled(CounterMetricFamily, "chorus_ws_closes", "WebSockets closed, by close code (other: a "
                   "code a client chose)", ["code"], stats.closes)
    yield gauge("chorus_subscribed_users", "Users whose channel this node subscribes (a local socket each)",
                users)
    yield counter("chorus_events_delivered", "Frames written to sockets", stats.delivered)
    yield counter("chorus_frames_sent_bytes", "Payload bytes of the frames written to sockets",
                  stats.sent_bytes)
    yield stats.delivery_lag.family("chorus_delivery_lag_seconds",
                                    "From an event's publish to this node fanning it out")
    yield stats.send_queue.family("chorus_send_queue_frames",
                                  "Frames queued behind a socket that could not take them at once")
    yield counter("chorus_slow_consumer_closes", "Sockets closed because they could not keep up (4008)",
                  stats.slow_consumer_closes)
    yield labelled(CounterMetricFamily, "chorus_resumes", "Sockets opened with a position (`after`): "
                   "replayed from history, or resynced and why; new: no position", ["outcome"], stats.resumes)
    yield counter("chorus_pubsub_reconnects", "Times the Pub/Sub connection was opened again",
                  pubsub_reconnects)
    yield labelled(CounterMetricFamily, "chorus_commands", "Client commands, by type and result (ok or the "
                   "error code)", ["type", "result"], stats.commands)
    yield labelled(CounterMetricFamily, "chorus_rate_limited", "Refused by a limit: connections (429), "
                   "commands (rate_limited), devices (4029), rest (429)", ["limit"], stats.rate_limited)
    yield from stats.loop_lag.families()

