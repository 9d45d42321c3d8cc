"""The agent directory: the agents the workers serve, as they advertise them in Redis (written by
workers, read by nodes, which hold no agent config)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
from redis.asyncio import Redis

from common.keys import Keys

DEFAULT = "default"
TTL_S = 300  # a directory no worker refreshed for this long is gone (workers refresh every TTL_S/3)


class UnknownAgent(LookupError):
    """No agent has this name; the message lists the known ones."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown agent {name!r} (known: {', '.join(known)})")
        self.name = name
        self.known = tuple(known)


class AgentDirectory:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def advertise(self, described: list[dict[str, Any]]) -> None:
        """Tell the nodes which agents exist (name, description, model, tools)."""
        await self.redis.set(self.keys.agents, orjson.dumps(described), ex=TTL_S)

    async def advertised(self) -> list[dict[str, Any]] | None:
        """The workers' agents (name, description, model, tools), or None when no worker said yet."""
        raw = await self.redis.get(self.keys.agents)
        return None if raw is None else list(orjson.loads(raw))

    async def check(self, name: str) -> None:
        """Raise UnknownAgent unless a worker serves `name` (only `default` before any worker spoke)."""
        agents = await self.advertised()
        known = [a["name"] for a in agents] if agents is not None else [DEFAULT]
        if name not in known:
            raise UnknownAgent(name, known)
