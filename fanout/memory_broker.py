"""`MemoryBroker`: users' streams and Pub/Sub in this process, for fast tests (no Redis).

It keeps the contract of `fanout.broker.Broker` that callers rely on: one seq per publish in
order, a capped history, producer dedupe, fences, an epoch per history, and Pub/Sub that only
reaches subscribers whose subscribe was confirmed. `drop_connections()` makes every subscriber
connection fail, as a Redis restart does, so reconnect paths can be tested too.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fanout.broker import Fenced, Lost, Position, PublishResult


@dataclass
class _Stream:
    epoch: str = field(default_factory=lambda: secrets.token_hex(4))
    seq: int = 0
    history: deque[tuple[int, str]] = field(default_factory=deque)
    producers: dict[str, tuple[int, int]] = field(default_factory=dict)  # producer -> (pseq, seq)
    fences: set[str] = field(default_factory=set)


class MemoryPubSub:
    """One subscriber connection of a `MemoryBroker`."""

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker
        self._messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.channels: set[str] = set()
        self.closed = False

    def _put(self, message: dict[str, Any] | None) -> None:
        self._messages.put_nowait(message)

    def _check(self) -> None:
        if self.closed:
            raise ConnectionError("memory pubsub connection closed")

    async def ping(self) -> bool:
        self._check()
        self._broker._connections.add(self)
        return True

    async def subscribe(self, *channels: str) -> None:
        self._check()
        self._broker._connections.add(self)
        for channel in channels:
            self.channels.add(channel)
            self._put({"type": "subscribe", "channel": channel, "data": len(self.channels)})

    async def unsubscribe(self, *channels: str) -> None:
        self._check()
        for channel in channels:
            self.channels.discard(channel)
            self._put({"type": "unsubscribe", "channel": channel, "data": len(self.channels)})

    async def get_message(self, *, timeout: float | None = 0.0) -> dict[str, Any] | None:  # noqa: ASYNC109
        self._check()
        try:
            async with asyncio.timeout(timeout):  # not wait_for: see fanout.resp_pubsub
                message = await self._messages.get()
        except TimeoutError:
            return None
        if message is None:
            self._check()  # woken by a dropped connection
        return message

    async def aclose(self) -> None:
        self.closed = True
        self._broker._connections.discard(self)
        self._put(None)


class MemoryBroker:
    """`fanout.broker.Broker` in memory; `history_max` caps each user's history exactly."""

    def __init__(self, *, history_max: int = 10_000) -> None:
        self.history_max = history_max
        self._streams: dict[str, _Stream] = {}
        self._connections: set[MemoryPubSub] = set()

    def _stream(self, user: str) -> _Stream:
        stream = self._streams.get(user)
        if stream is None:
            stream = self._streams[user] = _Stream()
        return stream

    async def publish(
        self, user: str, payload: str, *, producer: str = "", pseq: int = 0, fence: str | None = None,
        pass_fence: bool = False, producer_epoch: str = "", follows: tuple[str, int] | None = None,
    ) -> PublishResult:
        stream = self._stream(user)
        if producer:
            last = stream.producers.get(producer)
            if last is not None and pseq <= last[0]:
                return PublishResult(seq=last[1], epoch=stream.epoch, duplicate=True)
        if follows is not None and stream.producers.get(follows[0], (0, 0))[0] < follows[1]:
            raise Lost(follows)
        if fence is not None and not pass_fence and fence in stream.fences:
            raise Fenced(fence)
        stream.seq += 1
        frame = f'{{"seq":{stream.seq},{payload[1:]}'
        stream.history.append((stream.seq, frame))
        while len(stream.history) > self.history_max:
            stream.history.popleft()
        if producer:
            stream.producers[producer] = (pseq, stream.seq)
        self._fan_out(self.channel(user), frame)
        return PublishResult(seq=stream.seq, epoch=stream.epoch, duplicate=False)

    async def position(self, user: str) -> Position:
        stream = self._stream(user)
        first = stream.history[0][0] if stream.history else 0
        return Position(epoch=stream.epoch, seq=stream.seq, first_seq=first)

    async def read_after(self, user: str, after: int, *, upto: int) -> list[str] | None:
        frames = [(seq, frame) for seq, frame in self._stream(user).history if seq > after]
        if upto > after and (not frames or frames[0][0] != after + 1):
            return None
        return [frame for _, frame in frames]

    async def fence(self, user: str, tag: str) -> None:
        self._stream(user).fences.add(tag)

    async def is_fenced(self, user: str, tag: str) -> bool:
        return tag in self._stream(user).fences

    def channel(self, user: str) -> str:
        return f"ch:{user}"

    def canary_channels(self, hub: str) -> list[str]:
        return [f"canary:{hub}"]

    def pubsub(self) -> MemoryPubSub:
        return MemoryPubSub(self)

    async def signal(self, channel: str, data: str) -> None:
        self._fan_out(channel, data)

    def _fan_out(self, channel: str, data: str) -> None:
        for connection in list(self._connections):
            if channel in connection.channels:
                connection._put({"type": "message", "channel": channel, "data": data})

    def drop_connections(self) -> None:
        """Fail every subscriber connection (what a broker restart does to them)."""
        for connection in list(self._connections):
            connection.closed = True
            with contextlib.suppress(asyncio.QueueFull):
                connection._put(None)
        self._connections.clear()
