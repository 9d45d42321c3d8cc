"""`ClusterPipes`: a `RespPipe` per primary of a Redis Cluster, for the publish and position scripts.

Through redis-py's cluster client each publish took its own round trip on a pooled connection, and
cost a primary about 5x a pipelined one (docs/performance.md, the shard benchmark). Here a script
goes down the pipelining connection of the primary that redis-py's slot map names for its first
key (all of a user's keys share one slot), batched with the other commands of the loop iteration.

The slot map stays redis-py's: when it is wrong (the slot moved: MOVED or ASK; its primary died
or is failing over: a lost connection, CLUSTERDOWN, TRYAGAIN), the command is done again through
redis-py's client, which follows the redirection or reads the slots afresh, and so corrects the
map the next command is routed by. Doing it again is what callers already do on these errors
(the publish script dedupes a producer's repeats), and errors redis-py then gives are its own.
"""

from __future__ import annotations

from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import RedisCluster

from common.redis_client import TRANSIENT
from fanout.resp_pipe import RespPipe

# The replies that say the slot map was wrong or is changing: the command goes through redis-py.
_REROUTE = (redis_errors.MovedError, redis_errors.AskError, *TRANSIENT)


class ClusterPipes:
    def __init__(self, cluster: RedisCluster, *, timeout_s: float) -> None:
        self._cluster = cluster
        kwargs = cluster.connection_kwargs
        self._params = {key: kwargs[key] for key in ("username", "password") if kwargs.get(key)}
        self._timeout_s = timeout_s
        self._pipes: dict[str, RespPipe] = {}  # "host:port" -> the pipe to that node

    async def evalsha(self, sha: str, script: str, keys: list[str], args: list[str | int]) -> Any:
        """Run a Lua script on the primary of `keys`' slot (see the module docstring)."""
        pipe = self.pipe_for(keys[0])
        if pipe is not None:
            try:
                return await pipe.evalsha(sha, script, keys, args)
            except _REROUTE:
                pass
        return await self._cluster.eval(script, len(keys), *keys, *args)

    async def aclose(self) -> None:
        for pipe in self._pipes.values():
            await pipe.aclose()

    def pipe_for(self, key: str) -> RespPipe | None:
        """The pipe to the primary redis-py's slot map names for `key`; None before redis-py has
        read the map (its first command does)."""
        try:
            node = self._cluster.get_node_from_key(key)
        except redis_errors.SlotNotCoveredError:
            return None
        if node is None:
            return None
        pipe = self._pipes.get(node.name)
        if pipe is None:
            pipe = self._pipes[node.name] = RespPipe({**self._params, "host": node.host, "port": node.port},
                                                     timeout_s=self._timeout_s)
        return pipe
