"""What a node's handlers share: settings, clients and the hub, held as one typed app key."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass, field

from aiohttp import web
from redis.asyncio import Redis

from common.keys import Keys
from fanout.hub import Hub
from fanout.redis_broker import RedisBroker
from persistence.store import Store
from runs.agents import AgentDirectory
from runs.lifecycle import Runs
from ws_node.auth import Verifier
from ws_node.connection import Connection
from ws_node.lean import Heartbeats, Paced
from ws_node.limits import LocalBucket, RedisBuckets
from ws_node.metrics import NodeStats
from ws_node.presence import Presences
from ws_node.settings import NodeSettings


@dataclass
class Services:
    settings: NodeSettings
    redis: Redis
    keys: Keys
    broker: RedisBroker
    hub: Hub
    store: Store
    runs: Runs
    agents: AgentDirectory
    presence: Presences
    heartbeats: Heartbeats  # of the sockets `ws_node.lean` serves
    openings: Paced = field(default_factory=lambda: Paced(per_turn=16))  # theirs, as they open
    teardowns: Paced = field(default_factory=Paced)  # and as they end
    stats: NodeStats = field(default_factory=NodeStats)
    connections: set[Connection] = field(default_factory=set)
    draining: bool = False
    sockets: int = 0  # WebSocket requests in progress, from handshake to close
    idle: asyncio.Event = field(default_factory=lambda: _set(asyncio.Event()))  # set while sockets == 0


def _set(event: asyncio.Event) -> asyncio.Event:
    event.set()
    return event


SERVICES = web.AppKey("services", Services)


@dataclass
class Admission:
    """Who gets in and how often: the token verifier and the node's rate limits."""

    verifier: Verifier
    connections: LocalBucket
    commands: RedisBuckets
    rest: RedisBuckets  # authenticated REST requests per user (`ws_node.rest.rate_limit_middleware`)


ADMISSION = web.AppKey("admission", Admission)


async def answer_within(timeout_s: float, *probes: Awaitable[object]) -> list[bool]:
    """Which probes succeed within `timeout_s`, run together. A probe still running then is
    cancelled but not awaited: cancelling an asyncpg query on a dead network path can take until
    its command timeout, and readiness must answer in time (tests/test_faults.py)."""
    tasks = [asyncio.ensure_future(probe) for probe in probes]
    await asyncio.wait(tasks, timeout=timeout_s)
    results = []
    for task in tasks:
        ok = task.done() and not task.cancelled() and task.exception() is None
        if not task.done():
            task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieve, don't log
        results.append(ok)
    return results
