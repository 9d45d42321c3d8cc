"""The one way Chorus opens a Redis client (nodes and workers alike), and what its errors mean."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from common.config import SharedSettings

# Errors that mean Redis is unreachable right now (restarting, loading, network; on a Redis Cluster,
# a failover in progress (CLUSTERDOWN, or a slot map read mid-failover that leaves a slot without
# an owner), a slot being resharded whose keys are half moved, which a multi-key script cannot run
# on (TRYAGAIN), or redirections that did not settle within redis-py's 16 tries (ClusterError)):
# the operation may or may not have run, so only what is safe to repeat is retried on them.
TRANSIENT = (redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.BusyLoadingError, OSError,
             redis_errors.TryAgainError, redis_errors.ClusterDownError, redis_errors.SlotNotCoveredError,
             redis_errors.ClusterError)


class PoolExhausted(Exception):
    """No pooled Redis connection came free within the wait: the pool is too small for the load
    (`REDIS_POOL_SIZE`). Deliberately not a `redis.ConnectionError`, so it is never retried as a
    Redis outage (a worker once retried a publish 1,450 times on the pool's old error)."""


class WaitingPool(BlockingConnectionPool):
    """A pool that makes a command wait for a free connection instead of failing at once."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Connection:
        try:
            connection: Connection = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except redis_errors.ConnectionError as exc:
            if isinstance(exc.__cause__, asyncio.TimeoutError):
                raise PoolExhausted(f"no Redis connection free within {self.timeout}s of "
                                    f"{self.max_connections}; raise REDIS_POOL_SIZE") from exc
            raise
        return connection


class _ResetAware(Connection):
    """A cluster node's connection (plain or TLS, mixed in first) on which writing to a connection
    its node reset is the `ConnectionError` it is, so the cluster client reads the topology again
    and retries. Under uvloop that write raises a bare RuntimeError ("the handler is closed"; the
    plain client retries those itself), or, when the connection was closed while it connected,
    an AttributeError on its stream writer, by then None."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except (RuntimeError, AttributeError) as exc:  # the base class has closed the connection
            if isinstance(exc, AttributeError) and exc.obj is not None:
                raise
            reset = f"{self.host}:{self.port} reset the connection: {exc}"
            raise redis_errors.ConnectionError(reset) from exc


_RESET_AWARE: dict[type[Connection], type[Connection]] = {
    Connection: _ResetAware, SSLConnection: type("_ResetAwareTLS", (_ResetAware, SSLConnection), {})}


class _Cluster(RedisCluster):
    """redis-py's cluster client, whose errors during a failover are all transient ones: a node
    that reset its connection (`_ResetAware`), and no node reachable while the topology is read
    again (a `RedisClusterException`, now a `ConnectionError`). Both came out of a worker
    mid-answer when a primary was killed (tests/test_redis_cluster.py).

    A command waits up to `pool_wait_s` for a free connection to its node, as `WaitingPool`'s do,
    then fails with `PoolExhausted`: redis-py refuses at once (`MaxConnectionsError`, a
    `ConnectionError` that Chorus would retry as Redis being away)."""

    pool_wait_s = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # redis-py takes no connection class for a cluster: the nodes found later are made from
        # these arguments, the seed nodes already were.
        base = self.connection_kwargs["connection_class"]
        aware = _RESET_AWARE[base] if base in _RESET_AWARE else base
        self.connection_kwargs["connection_class"] = aware
        for node in self.startup_nodes:
            node.connection_class = aware

    async def initialize(self, *args: Any, **kwargs: Any) -> RedisCluster:
        try:
            return await super().initialize(*args, **kwargs)
        except redis_errors.RedisClusterException as exc:
            raise redis_errors.ConnectionError(str(exc)) from exc

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        deadline, pause_s = loop.time() + self.pool_wait_s, 0.002
        while True:
            try:
                return await super().execute_command(*args, **kwargs)
            except redis_errors.MaxConnectionsError as exc:  # refused before anything was sent
                if loop.time() >= deadline:
                    raise PoolExhausted(f"no Redis connection to a node free within {self.pool_wait_s}s "
                                        f"of {self.connection_kwargs['max_connections']}; raise "
                                        "REDIS_POOL_SIZE") from exc
            # redis-py's cluster nodes have nothing to wait on: poll, backing off to 50 ms
            await asyncio.sleep(min(pause_s, max(0.0, deadline - loop.time())))
            pause_s = min(pause_s * 2, 0.05)


def connect(url: str, *, socket_timeout_s: float, pool_size: int, pool_wait_s: float, cluster: bool = False,
            sentinels: Sequence[str] = (), sentinel_master: str = "chorus") -> Redis:
    """A client with decoded responses over a pool of at most `pool_size` connections, in which a
    command waits up to `pool_wait_s` for a free connection (`PoolExhausted` after that).

    `cluster`: `url` names one node of a Redis Cluster; the client is redis-py's `RedisCluster`
    (at most `pool_size` connections per node), which routes each command to the node owning its
    keys' slot and follows MOVED and failovers. It has the commands of `Redis` that Chorus uses, and
    is typed as one (`is_cluster` tells them apart).

    `sentinels` (``host:port``): the primary is the one these Redis Sentinels name `sentinel_master`,
    asked again on every new connection, so a failover is followed (`url` gives the credentials
    and the database); the pool then fails a command at once when full instead of waiting.

    Under uvloop, the first command on a pooled connection that Redis reset (a restart, a proxy
    RST) fails with a bare RuntimeError ("the handler is closed") before any byte is sent; one
    immediate retry on a fresh connection is safe and turns it into a non-event
    (tests/test_faults.py, the reset scenario).
    """
    retry = Retry(NoBackoff(), 1, supported_errors=(RuntimeError,))  # type: ignore[arg-type]
    if cluster:
        if sentinels:
            raise ValueError("a Redis Cluster has no Sentinels: set REDIS_CLUSTER or REDIS_SENTINELS")
        client = cast(_Cluster, _Cluster.from_url(url, decode_responses=True, socket_timeout=socket_timeout_s,
                                                  socket_connect_timeout=3, max_connections=pool_size))
        client.pool_wait_s = pool_wait_s
        return cast(Redis, client)
    if sentinels:
        credentials: dict[str, Any] = {key: value for key, value in parse_url(url).items()
                                       if key in ("username", "password", "db")}
        watchers = [(host, int(port)) for host, _, port in (item.rpartition(":") for item in sentinels)]
        sentinel = Sentinel(watchers, socket_timeout=socket_timeout_s, socket_connect_timeout=3)  # type: ignore[no-untyped-call]
        primary: Redis = sentinel.master_for(
            sentinel_master, decode_responses=True, socket_timeout=socket_timeout_s, socket_connect_timeout=3,
            health_check_interval=15, retry=retry, max_connections=pool_size, **credentials)
        return primary
    pool = WaitingPool.from_url(url, decode_responses=True, socket_timeout=socket_timeout_s,
                                socket_connect_timeout=3, health_check_interval=15, retry=retry,
                                max_connections=pool_size, timeout=pool_wait_s)
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes it too


def client(settings: SharedSettings, *, socket_timeout_s: float, pool_size: int) -> Redis:
    """`connect` as the Redis settings say (`REDIS_URL`, `REDIS_CLUSTER`, `REDIS_SENTINELS`, ...)."""
    return connect(settings.redis_url, socket_timeout_s=socket_timeout_s, pool_size=pool_size,
                   pool_wait_s=settings.redis_pool_wait_s, cluster=settings.redis_cluster,
                   sentinels=settings.redis_sentinels, sentinel_master=settings.redis_sentinel_master)


def is_cluster(redis: Redis) -> bool:
    """Whether `redis` is a Redis Cluster client (`connect(..., cluster=True)`)."""
    return isinstance(redis, RedisCluster)


def is_sentinel(redis: Redis) -> bool:
    """Whether `redis` finds its primary through Sentinels (`connect(..., sentinels=...)`)."""
    return not is_cluster(redis) and isinstance(redis.connection_pool, SentinelConnectionPool)


def script_for(redis: Redis, script: str) -> str:
    """A Lua script's text for `redis`: on a Redis Cluster its publishes go over sharded Pub/Sub
    (`SPUBLISH`, to the shard owning the channel's slot, which must be the script's keys' slot)."""
    return script.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',") if is_cluster(redis) else script


def as_text(value: str | bytes) -> str:
    """A Redis reply as text, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value
