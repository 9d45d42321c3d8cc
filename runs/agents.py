"""The agent directory: which agents exist and which have a live worker, as the workers advertise
them in Redis (written by workers, read by nodes, which hold no agent config).

Runs are routed to *pools*: a pool is an agent, or one version of it (``name@version``), and has
a stream of its own in the run queue (`runs.queue`). A worker serves the pools `WORKER_AGENTS`
names. When a run is queued, `AgentDirectory.route` picks the pool: among the agent's versions
that have a live worker, by their `weight` (a canary takes its share of runs while a worker of
its version is up); an agent with no live worker is refused at once (`AgentUnavailable`), not
queued for nobody.

Two sources, both in Redis: `Keys.agents`, a hash pool -> JSON entry (name, version, weight,
description, model, tools, expires_at ms) each worker rewrites every `TTL_S`/3 for the pools it
serves; and the workers' heartbeats (`Keys.workers`, `common.heartbeat`), whose `agents` lists
the pools each live worker serves. A directory no worker wrote yet knows only `default`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from common.backoff import retrying
from common.heartbeat import heartbeats
from common.keys import Keys
from common.redis_client import TRANSIENT

DEFAULT = "default"
TTL_S = 300  # an entry no worker refreshed for this long is gone (workers refresh every TTL_S/3)
ROUTES_FRESH_S = 1.0  # how long a node reuses what it read of the directory (a send reads none)
READ_RETRY_S = 10.0


def pool_of(name: str, version: str | None) -> str:
    """The pool (queue stream) of an agent's version: ``name``, or ``name@version``."""
    return name if version is None else f"{name}@{version}"


def parse_pool(pool: str) -> tuple[str, str | None]:
    """The agent name and version (None: unversioned) of a pool."""
    name, _, version = pool.partition("@")
    return name, version or None


class UnknownAgent(LookupError):
    """No agent has this name; the message lists the known ones."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown agent {name!r} (known: {', '.join(known)})")
        self.name = name
        self.known = tuple(known)


class AgentUnavailable(LookupError):
    """The agent exists but no live worker serves it (any version with a weight): a run queued now
    would wait for nobody."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no worker is serving agent {name!r} right now; retry later")
        self.name = name


@dataclass(frozen=True)
class Route:
    """A pool a run of `name` may go to, with its share (`weight`) and whether a worker serves it."""

    name: str
    pool: str
    version: str | None
    weight: float
    live: bool


def choose(routes: Sequence[Route], name: str, *, rng: random.Random | None = None) -> Route:
    """The pool for one run of agent `name`: a live version, drawn by weight. Raises `UnknownAgent`
    when no route has that name, `AgentUnavailable` when none of its versions can take a run."""
    mine = [r for r in routes if r.name == name]
    if not mine:
        raise UnknownAgent(name, sorted({r.name for r in routes}))
    open_ = [r for r in mine if r.live and r.weight > 0]
    if not open_:
        raise AgentUnavailable(name)
    if len(open_) == 1:
        return open_[0]
    return (rng or random).choices(open_, weights=[r.weight for r in open_])[0]


class AgentDirectory:
    def __init__(self, redis: Redis, keys: Keys, *, fresh_s: float = ROUTES_FRESH_S) -> None:
        self.redis = redis
        self.keys = keys
        self.fresh_s = fresh_s
        self._routes: list[Route] = []
        self._read_at = -float("inf")

    async def advertise(self, described: Sequence[dict[str, Any]]) -> None:
        """Tell the nodes about the pools this worker serves: each entry has ``pool``, ``name``,
        ``version``, ``weight`` and what GET /v1/agents shows (description, model, tools)."""
        expires_at = int((time.time() + TTL_S) * 1000)
        entries = {entry["pool"]: orjson.dumps({**entry, "expires_at": expires_at}) for entry in described}
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.agents, mapping=entries)
            pipe.expire(self.keys.agents, TTL_S)
            await pipe.execute()

    async def advertised(self) -> list[dict[str, Any]] | None:
        """Each agent with its versions (pool, version, weight, live), for GET /v1/agents; None when
        no worker said anything yet."""
        entries, live = await self._read()
        if not entries:
            return None
        agents: dict[str, dict[str, Any]] = {}
        for entry in entries:
            version = {"version": entry.get("version"), "weight": entry.get("weight", 1),
                       "live": entry["pool"] in live}
            agent = agents.setdefault(entry["name"], {
                key: value for key, value in entry.items() if key not in {"pool", "version", "weight"}})
            agent.setdefault("versions", []).append(version)
        for agent in agents.values():
            agent["available"] = any(v["live"] and v["weight"] > 0 for v in agent["versions"])
        return list(agents.values())

    async def check(self, name: str) -> None:
        """Raise `UnknownAgent` unless the agent exists (only `default` before any worker spoke)."""
        routes = await self.routes()
        if name not in {r.name for r in routes}:
            raise UnknownAgent(name, sorted({r.name for r in routes}))

    async def route(self, name: str) -> Route:
        """The pool for a new run of agent `name` (see `choose`)."""
        return choose(await self.routes(), name)

    async def routes(self) -> list[Route]:
        """Every pool, read at most every `fresh_s` (a burst of sends reads Redis once). Before any
        worker advertised, only `default` exists, assumed live: its runs wait for the first worker."""
        now = time.monotonic()
        if now - self._read_at >= self.fresh_s:
            # Read on a send's path: a connection Redis reset is retried, as a publish is.
            entries, live = await retrying(self._read, retry_on=TRANSIENT, deadline_s=READ_RETRY_S,
                                           what="reading the agent directory")
            self._routes = [Route(e["name"], e["pool"], e.get("version"), float(e.get("weight", 1)),
                                  e["pool"] in live) for e in entries]
            self._read_at = now
        return self._routes or [Route(DEFAULT, DEFAULT, None, 1.0, True)]

    async def _read(self) -> tuple[list[dict[str, Any]], set[str]]:
        raw: dict[Any, Any] = await self.redis.hgetall(self.keys.agents)
        now_ms = time.time() * 1000
        entries = [entry for entry in (orjson.loads(value) for _, value in sorted(raw.items()))
                   if entry.pop("expires_at", 0) > now_ms]
        live = {pool for record in await heartbeats(self.redis, self.keys.workers)
                for pool in record.get("agents", ())}
        return entries, live
