"""`RedisBroker`: users' streams in Redis (one Lua script per publish) and Redis Pub/Sub.

On a Redis Cluster (`common.redis_client.connect(..., cluster=True)`) the same, with sharded Pub/Sub:
the scripts `SPUBLISH` (a user's channel is in the user's slot, as its keys are), the hub
subscribes through `fanout.cluster_pubsub.ClusterPubSub`, and publishes go through redis-py's
cluster client, the scripts down a pipelining connection per primary (`fanout.cluster_pipe`), a
loop turn's publishes to one primary as one call (Redis 7 and later)."""

from __future__ import annotations

import hashlib
import secrets
import time
from importlib import resources
from typing import Any, cast

from redis import exceptions as redis_errors
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import SSLConnection

from common.backoff import retrying
from common.redis_client import TRANSIENT, as_text, is_cluster, is_sentinel, script_for
from fanout.broker import Fenced, Lost, Position, PublishResult, PubSub
from fanout.cluster_pipe import ClusterPipes
from fanout.cluster_pubsub import ClusterPubSub
from fanout.keys import StreamKeys
from fanout.publish_batch import PublishBatch, replies
from fanout.resp_pipe import RespPipe
from fanout.resp_pubsub import RespPubSub

_PUBLISH_LUA = resources.files("fanout").joinpath("publish.lua").read_text()
_POSITION_LUA = resources.files("fanout").joinpath("position.lua").read_text()
# On a Redis Cluster one call carries the publishes of a loop turn bound for one primary, whatever
# their slots: Redis 7's flag for a script whose keys span slots (all on the primary running it;
# their prefixes come as arguments, as declared keys of many slots are refused all the same).
_CROSS_SLOT = "#!lua flags=allow-cross-slot-keys\n"
# What says a call of them did not run: its events are published one by one, through redis-py
# where a slot moved (MOVED, ASK, CROSSSLOT: the keys are no longer all on that primary).
_NOT_RUN = (redis_errors.MovedError, redis_errors.AskError, redis_errors.ClusterCrossSlotError, *TRANSIENT)
_PRE_7 = "Error compiling script"  # a Redis before 7 reading the flag's line: no batches there


# Names tried for the per-shard canaries: 16,384 slots over a few shards, found in a few dozen.
_CANARY_SEARCH = 10_000


def new_epoch() -> str:
    return secrets.token_hex(4)


def _tls(connection_class: type) -> bool:
    """Whether redis-py's connections of this class use TLS (the lean connections do not)."""
    return issubclass(connection_class, SSLConnection)



class RedisBroker:
    """Users' streams in Redis (`fanout.broker.Broker`). Publishes retry through Redis outages
    for up to `retry_for_s`; the producer dedupe in the script makes a repeat harmless."""

    def __init__(
        self,
        redis: Redis,
        keys: StreamKeys,
        *,
        history_max: int = 10_000,
        ttl_s: int = 86_400,
        retry_for_s: float = 30.0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.history_max = history_max
        self.ttl_s = ttl_s
        self.retry_for_s = retry_for_s
        self.cluster = is_cluster(redis)
        self._publish_lua = script_for(redis, _PUBLISH_LUA)
        self._publish = redis.register_script(self._publish_lua)
        self._position = redis.register_script(_POSITION_LUA)
        # Publishes go through one pipelining connection (fanout.resp_pipe): a fifth of redis-py's
        # CPU per publish, many per write; every socket's open reads its position and replay through
        # it too. On a cluster, the scripts go through one per primary (fanout.cluster_pipe). TLS
        # (rediss://) and Sentinels keep redis-py's connections.
        self._pipe: RespPipe | None = None
        self._scripts: RespPipe | ClusterPipes | None = None
        if self._lean(redis):
            params = redis.connection_pool.connection_kwargs
            self._pipe = RespPipe(dict(params), timeout_s=params.get("socket_timeout") or 10.0)
            self._scripts = self._pipe
        elif self.cluster and not _tls(cast(RedisCluster, redis).connection_kwargs["connection_class"]):
            cluster = cast(RedisCluster, redis)
            timeout_s = cluster.connection_kwargs.get("socket_timeout") or 10.0
            self._scripts = ClusterPipes(cluster, timeout_s=timeout_s)
        # On one Redis server, the publishes of a loop turn go as one call of the script; on a
        # cluster, one call for each primary they are bound for.
        self._batch = (PublishBatch(self._pipe, self._publish.sha, self._publish_lua, self._head)
                       if self._pipe is not None else None)
        self._primaries: dict[RespPipe, PublishBatch] | None = (
            {} if isinstance(self._scripts, ClusterPipes) else None)
        self._cross_slot_lua = _CROSS_SLOT + self._publish_lua
        self._cross_slot_sha = hashlib.sha1(self._cross_slot_lua.encode()).hexdigest()

    @property
    def scripts(self) -> RespPipe | ClusterPipes | None:
        """The pipelined connection(s) the broker's scripts go through, for other scripts on the
        same Redis (`evalsha`); None where redis-py's connections are kept (TLS, Sentinels)."""
        return self._scripts

    async def publish(
        self, user: str, payload: str, *, producer: str = "", pseq: int = 0, fence: str | None = None,
        pass_fence: bool = False, producer_epoch: str = "", follows: tuple[str, int] | None = None,
    ) -> PublishResult:
        prefix = self.keys.user_prefix(user)
        options: list[str | int] = []  # publish.lua's per-event options: none for a bare publish
        if producer or fence or follows:
            options = [producer, pseq, fence or "", "1" if pass_fence else "0", producer_epoch,
                       *(follows or ("", 0)), new_epoch()]

        async def once() -> tuple[int, int, str]:
            if self._batch is not None:
                return await self._batch.publish(prefix, payload, options)
            if (batch := self._primary_batch(prefix)) is not None:
                try:
                    return await batch.publish(prefix, payload, options)
                except redis_errors.RedisError as exc:
                    if not self._alone_after(exc):
                        raise
            args = [*self._head(), payload, len(options), *options]
            if self._scripts is not None:
                flat = await self._scripts.evalsha(self._publish.sha, self._publish_lua, [prefix], args)
            else:
                flat = await self._publish(keys=[prefix], args=args)
            reply = replies([as_text(part) if isinstance(part, bytes) else part for part in flat])[0]
            if isinstance(reply, Exception):
                raise reply
            return reply

        status, seq, epoch = await retrying(
            once, retry_on=TRANSIENT, deadline_s=self.retry_for_s, what=f"publish to {user}"
        )
        if status == -1:
            raise Fenced(fence)
        if status == -2:
            raise Lost(follows)
        return PublishResult(seq=int(seq), epoch=as_text(epoch), duplicate=status == 0)

    def _primary_batch(self, prefix: str) -> PublishBatch | None:
        """On a cluster, the batch of the turn's publishes to the primary of `prefix`'s slot; None
        elsewhere, before redis-py has read the slot map, or on a Redis before 7."""
        if self._primaries is None:
            return None
        pipe = cast(ClusterPipes, self._scripts).pipe_for(prefix)
        if pipe is None:
            return None
        batch = self._primaries.get(pipe)
        if batch is None:
            batch = self._primaries[pipe] = PublishBatch(pipe, self._cross_slot_sha, self._cross_slot_lua,
                                                         self._head, keys_as_args=True)
        return batch

    def _alone_after(self, exc: redis_errors.RedisError) -> bool:
        """Whether a publish whose batch failed with `exc` is to be done again alone: the call did
        not run (see `_NOT_RUN`), or one event of it met a key of a slot that moved."""
        if isinstance(exc, _NOT_RUN):
            return True
        if isinstance(exc, redis_errors.ResponseError) and _PRE_7 in str(exc):
            self._primaries = None
            return True
        return isinstance(exc, redis_errors.ResponseError) and "non local key" in str(exc)

    def _head(self) -> list[str | int]:
        """The publish script's first arguments, for one call."""
        return [self.history_max, self.ttl_s, new_epoch()]

    async def position(self, user: str) -> Position:
        """The user's epoch and latest seq (creating the epoch for a new history)."""
        keys = [self.keys.meta(user), self.keys.history(user)]
        args: list[str | int] = [new_epoch(), self.ttl_s]
        reply: Any
        if self._scripts is not None:  # every socket's open asks it: a reconnect storm asks it at once
            reply = await self._scripts.evalsha(self._position.sha, _POSITION_LUA, keys, args)
        else:
            reply = await self._position(keys=keys, args=args)
        epoch, seq, first = reply
        return Position(epoch=as_text(epoch), seq=int(seq), first_seq=int(first))

    async def read_after(self, user: str, after: int, *, upto: int) -> list[str] | None:
        """Frames with `after` < seq (at least through `upto`, the seq the caller knows exists),
        oldest first; None when history no longer reaches back to `after` (trimmed or lost), so
        the caller resyncs instead of replaying with a hole."""
        key, first, count = self.keys.history(user), f"{after + 1}-0", self.history_max + 1000
        entries: list[tuple[Any, Any]]
        if self._pipe is not None:  # entry: [id, [field, value, ...]], the frame under "f"
            flat: list[list[Any]] = await self._pipe.execute("XRANGE", key, first, "+", "COUNT", count)
            entries = [(entry_id, dict(zip(fields[::2], fields[1::2], strict=True)))
                       for entry_id, fields in flat]
        else:
            entries = await self.redis.xrange(key, min=first, max="+", count=count)  # type: ignore[assignment]
        if upto > after and (not entries or int(as_text(entries[0][0]).split("-")[0]) != after + 1):
            return None
        return [as_text(fields["f"]) for _, fields in entries]

    async def fence(self, user: str, tag: str) -> None:
        key = self.keys.fences(user)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, tag, int(time.time() * 1000))
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def is_fenced(self, user: str, tag: str) -> bool:
        return bool(await self.redis.hexists(self.keys.fences(user), tag))

    def channel(self, user: str) -> str:
        return self.keys.channel(user)

    def canary_channels(self, hub: str) -> list[str]:
        if not self.cluster:
            return [self.keys.canary(hub)]
        # One per primary, each named so that its slot is that primary's: a shard whose connection
        # went deaf is noticed like a single Redis's (read after the subscriber's `ping`, which
        # refreshed the slots).
        cluster = cast(RedisCluster, self.redis)
        wanted = {node.name for node in cluster.get_primaries()}
        channels: dict[str, str] = {}
        for number in range(_CANARY_SEARCH):
            if len(channels) == len(wanted):
                break
            channel = self.keys.canary(f"{hub}:{number}")
            node = cluster.get_node_from_key(channel)
            if node is not None and node.name in wanted:
                channels.setdefault(node.name, channel)
        return list(channels.values())

    def pubsub(self) -> PubSub:
        if self.cluster:
            cluster = cast(RedisCluster, self.redis)
            return ClusterPubSub(cluster, cluster.connection_kwargs)
        if not self._lean(self.redis):
            return self.redis.pubsub()  # TLS, Sentinels: redis-py's connection (slower per message)
        return RespPubSub(dict(self.redis.connection_pool.connection_kwargs))

    @staticmethod
    def _lean(redis: Redis) -> bool:
        """Whether the lean connections (`RespPipe`, `RespPubSub`) can reach this Redis: one plain
        server at a fixed address. TLS, a cluster and a primary found through Sentinels keep
        redis-py's (a Sentinel pool asks for the primary's address on every new connection)."""
        if is_cluster(redis) or is_sentinel(redis):
            return False
        return not _tls(redis.connection_pool.connection_class)

    async def aclose(self) -> None:
        """Close the publishing connection (the Redis client is its owner's to close)."""
        if self._scripts is not None:
            await self._scripts.aclose()

    async def signal(self, channel: str, data: str) -> None:
        if self.cluster:
            await self.redis.spublish(channel, data)
        else:
            await self.redis.publish(channel, data)
