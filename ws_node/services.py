"""What a node's handlers share: settings, clients and the hub, held as one typed app key."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web
from redis.asyncio import Redis

from common.keys import Keys
from fanout.hub import Hub
from fanout.redis_broker import RedisBroker
from persistence.store import Store
from runs.agents import AgentDirectory
from runs.lifecycle import Runs
from ws_node.connection import Connection
from ws_node.metrics import NodeStats
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
    stats: NodeStats = field(default_factory=NodeStats)
    connections: set[Connection] = field(default_factory=set)
    draining: bool = False
    sockets: int = 0  # WebSocket requests in progress, from handshake to close
    idle: asyncio.Event = field(default_factory=lambda: _set(asyncio.Event()))  # set while sockets == 0


def _set(event: asyncio.Event) -> asyncio.Event:
    event.set()
    return event


SERVICES = web.AppKey("services", Services)
