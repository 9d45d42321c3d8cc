"""`ClusterPubSub`: the hub's subscriber connection over a Redis Cluster's sharded Pub/Sub.

Classic Pub/Sub in a cluster sends every publish to every node (socket.io-redis-adapter#491); a
sharded one (`SPUBLISH`/`SSUBSCRIBE`, Redis 7) reaches only the shard owning the channel's slot,
and a user's channel shares the user's hash tag (`fanout.keys`), so it lives on the user's shard.
This is one lean `RespPubSub` per primary, all feeding one deque; to the hub it is one connection
(`fanout.broker.PubSub`):

- `ping()` reads the cluster's slots afresh and connects to every primary;
- `subscribe` sends each channel's SSUBSCRIBE to the primary owning its slot;
- a connection lost (a primary died, a failover), or a channel the server unsubscribed on its own
  (its slot moved: Redis pushes `sunsubscribe`), makes `get_message` raise ConnectionError: the
  hub then connects again, and subscribes everything again on the new owners, and devices that
  missed frames in between read them from history, as after any Pub/Sub reconnect.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from redis.asyncio import RedisCluster

from fanout.resp_pubsub import RespPubSub, Waker


class ClusterPubSub:
    """Sharded Pub/Sub across a cluster's primaries (see the module docstring)."""

    def __init__(self, cluster: RedisCluster, params: dict[str, Any]) -> None:
        """`params`: the connection parameters every node shares (`username`, `password`)."""
        self._cluster = cluster
        self._params = {key: params[key] for key in ("username", "password") if params.get(key)}
        self._messages: collections.deque[dict[str, Any]] = collections.deque()
        self._shards: dict[str, RespPubSub] = {}  # "host:port" -> its connection
        self._leaving: collections.Counter[str] = collections.Counter()  # unsubscribes asked, not confirmed
        self._moved: str | None = None  # a channel the server unsubscribed by itself
        self._waker = Waker()

    async def ping(self) -> Any:
        if not self._shards:
            await self._cluster.initialize()  # once per client: its command table too
            await self._cluster.nodes_manager.initialize()  # the slots as they are now
            for node in self._cluster.get_primaries():
                self._shards[node.name] = RespPubSub({**self._params, "host": node.host, "port": node.port},
                                                     sharded=True, sink=self._messages, on_push=self._wake)
        replies = await asyncio.gather(*(shard.ping() for shard in self._shards.values()))
        return replies[0] if replies else None

    async def subscribe(self, *channels: str) -> None:
        for shard, in_slot in self._by_slot(channels):
            await shard.subscribe(*in_slot)

    async def unsubscribe(self, *channels: str) -> None:
        self._leaving.update(channels)
        for shard, in_slot in self._by_slot(channels):
            await shard.unsubscribe(*in_slot)

    async def get_message(self, *, timeout: float | None = 0.0) -> dict[str, Any] | None:  # noqa: ASYNC109
        if not self._messages:
            self._check()
            await self._waker.wait(timeout)
            if not self._messages:
                self._check()
                return None
        message = self._messages.popleft()
        if message["type"] == "unsubscribe":
            channel = message["channel"]
            if self._leaving[channel] > 0:
                self._leaving[channel] -= 1
                if not self._leaving[channel]:
                    del self._leaving[channel]
            else:
                self._moved = channel  # not ours: its slot moved to another shard
                self._check()
        return message

    async def aclose(self) -> None:
        self._waker.close()
        await asyncio.gather(*(shard.aclose() for shard in self._shards.values()))

    def _by_slot(self, channels: tuple[str, ...]) -> list[tuple[RespPubSub, list[str]]]:
        """The channels grouped by slot, with the connection to the slot's primary: one SSUBSCRIBE
        may name several channels only of one slot (else CROSSSLOT)."""
        grouped: dict[int, list[str]] = {}
        for channel in channels:
            grouped.setdefault(self._cluster.keyslot(channel), []).append(channel)
        out = []
        for in_slot in grouped.values():
            node = self._cluster.get_node_from_key(in_slot[0])
            shard = self._shards.get(node.name) if node is not None else None
            if shard is None:  # a primary this connection does not know: the cluster changed
                raise ConnectionError(f"no connection to the shard of {in_slot[0]} (the cluster changed)")
            out.append((shard, in_slot))
        return out

    def _check(self) -> None:
        if self._moved is not None:
            raise ConnectionError(f"channel {self._moved} moved to another shard; subscribing again")
        for name, shard in self._shards.items():
            if shard.lost is not None:
                raise ConnectionError(f"sharded pubsub connection to {name} lost: {shard.lost!r}")

    def _wake(self) -> None:
        self._waker.wake()
