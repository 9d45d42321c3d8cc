"""The agent registry: the agents the workers serve, as they advertise them in Redis (written by
workers, read by nodes, which hold no agent config)."""

from __future__ import annotations

from typing import Any

import orjson
from redis.asyncio import Redis

from common.keys import Keys

DEFAULT = "default"
TTL_S = 300  # a registry no worker refreshed for this long is gone (workers refresh every TTL_S/3)


class UnknownAgent(Exception):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown agent {name!r} (known: {', '.join(known)})")


async def advertise(redis: Redis, keys: Keys, described: list[dict[str, Any]]) -> None:
    """Tell the nodes which agents exist (name, description, model, tools)."""
    await redis.set(keys.agents, orjson.dumps(described), ex=TTL_S)


async def advertised(redis: Redis, keys: Keys) -> list[dict[str, Any]] | None:
    """The workers' agents (name, description, model, tools), or None when no worker said yet."""
    raw = await redis.get(keys.agents)
    return None if raw is None else list(orjson.loads(raw))


async def check(redis: Redis, keys: Keys, name: str) -> None:
    """Raise UnknownAgent unless a worker serves `name` (only `default` before any worker spoke)."""
    agents = await advertised(redis, keys)
    known = [a["name"] for a in agents] if agents is not None else [DEFAULT]
    if name not in known:
        raise UnknownAgent(name, known)
