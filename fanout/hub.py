"""`Hub`: one Pub/Sub connection per node process, fanning users' frames out to local sockets.

Design (after centrifuge's hub/node, avoiding encode/broadcaster's race): the local registry is
mutated before the first await; the broker is touched only on a user's 0->1 and 1->0 transitions,
serialised per user, and a subscribe counts only once Redis confirms it, so a history read that
follows can never miss an event published in between. Delivery into a subscriber never awaits.
After the Pub/Sub connection is lost, every channel held is subscribed again and, as each is
confirmed, its subscribers are told to `resume()` (catch up from history): Pub/Sub is at-most-once,
the history is not.

A connection can also go deaf while its TCP looks fine (python-socketio and Channels users have
lost a day of messages that way). So the hub publishes a canary to a channel of its own every
`canary_interval_s` (one per shard on a Redis Cluster, `Broker.canary_channels`, as the subscriber
holds a connection per shard); when one has not come back within `canary_timeout_s`, the hub reports itself
unhealthy (the node's /readyz turns 503), drops the connection and subscribes everything again
on a new one, and is healthy again once a canary comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from common.backoff import delays_s
from common.redis_client import TRANSIENT, as_text
from fanout.broker import Broker, PubSub
from fanout.recovery import frame_seq

log = logging.getLogger(__name__)


class Subscriber(Protocol):
    """A local receiver of one user's frames (a WebSocket connection)."""

    user: str

    def deliver(self, seq: int, frame: str) -> None:
        """Take one published frame (`seq` is `fanout.recovery.UNSEQUENCED` for one published
        outside the stream, as presence is); must not block or await."""

    def resume(self) -> None:
        """Pub/Sub delivery may have missed frames: catch up from history."""


class _UserLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0  # holding or waiting


class Unavailable(Exception):
    """The hub could not subscribe (Redis unreachable)."""


class Hub:
    """Per-user Pub/Sub fan-out for one node process."""

    def __init__(
        self, broker: Broker, *, subscribe_timeout_s: float = 5.0, canary_interval_s: float = 1.0,
        canary_timeout_s: float = 3.0, observe: Callable[[str], None] | None = None,
    ) -> None:
        """`observe`: called with every message fanned out, once (not per subscriber), from the
        read loop, so it must be cheap (the node measures delivery lag with it)."""
        self._broker = broker
        self._observe = observe
        self.reconnects = 0  # times the Pub/Sub connection was opened again after the first
        self._subscribe_timeout_s = subscribe_timeout_s
        self._canary_interval_s = canary_interval_s
        self._canary_timeout_s = canary_timeout_s
        self._name = secrets.token_hex(8)
        self._canary_channels: frozenset[str] = frozenset()  # as of the last connect
        self._canary_numbers = itertools.count(1)
        # (canary channel, number) -> monotonic time sent
        self._canaries_unheard: dict[tuple[str, int], float] = {}
        self._deaf = False
        self._redial = False
        self._subs: dict[str, set[Subscriber]] = {}
        self._locks: dict[str, _UserLock] = {}
        self._users_by_channel: dict[str, str] = {}
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._pubsub: PubSub | None = None
        self._task: asyncio.Task[None] | None = None
        self._canary_task: asyncio.Task[None] | None = None
        self.connected = False
        self._connected_event = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="hub-pubsub")
        self._canary_task = asyncio.create_task(self._canaries(), name="hub-canary")

    async def close(self) -> None:
        for task in (self._task, self._canary_task):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._pubsub is not None:
            await self._pubsub.aclose()

    @property
    def healthy(self) -> bool:
        """Connected, and the last canary came back: delivery through this node works."""
        return self.connected and not self._deaf

    async def wait_connected(self, timeout_s: float) -> None:
        """Wait until the Pub/Sub connection is up (raises TimeoutError)."""
        await asyncio.wait_for(self._connected_event.wait(), timeout_s)

    @property
    def users(self) -> int:
        return len(self._users_by_channel)

    async def attach(self, sub: Subscriber) -> None:
        """Register `sub`; subscribe the user's channel if it is the user's first local socket.
        Raises `Unavailable` (and leaves nothing registered) when Redis does not confirm in time."""
        user = sub.user
        self._subs.setdefault(user, set()).add(sub)
        channel = self._broker.channel(user)
        async with self._serialised(user):
            if channel in self._users_by_channel or sub not in self._subs.get(user, ()):
                return
            confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._confirmations[channel] = confirmed
            self._users_by_channel[channel] = user
            try:
                if self._pubsub is not None and self.connected:
                    try:
                        await self._pubsub.subscribe(channel)
                    except TRANSIENT:
                        pass  # the reconnect loop subscribes every channel held, and confirms it
                await asyncio.wait_for(asyncio.shield(confirmed), self._subscribe_timeout_s)
            except (TimeoutError, *TRANSIENT) as exc:
                self._users_by_channel.pop(channel, None)
                self._subs.get(user, set()).discard(sub)
                if self._pubsub is not None and self.connected:
                    # The subscribe may still be confirmed later: don't leave it behind untracked.
                    with contextlib.suppress(*TRANSIENT):
                        await self._pubsub.unsubscribe(channel)
                raise Unavailable(f"subscribe {channel}: {exc!r}") from exc
            finally:
                self._confirmations.pop(channel, None)

    async def detach(self, sub: Subscriber) -> None:
        """Unregister `sub`; unsubscribe the user's channel after their last local socket."""
        user = sub.user
        subs = self._subs.get(user)
        if subs is None:
            return
        subs.discard(sub)
        if subs:
            return
        async with self._serialised(user):
            if self._subs.get(user):
                return  # a socket of the user attached meanwhile
            self._subs.pop(user, None)
            channel = self._broker.channel(user)
            if self._users_by_channel.pop(channel, None) and self._pubsub is not None and self.connected:
                try:
                    await self._pubsub.unsubscribe(channel)
                except TRANSIENT:
                    pass  # the reconnect loop only resubscribes channels still held

    @contextlib.asynccontextmanager
    async def _serialised(self, user: str) -> AsyncIterator[None]:
        """One attach or detach of `user` at a time. The lock lives only while someone holds or
        awaits it, so an idle user costs no lock."""
        entry = self._locks.get(user)
        if entry is None:
            entry = self._locks[user] = _UserLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[user]

    async def _run(self) -> None:
        delays = delays_s(base_s=0.1, cap_s=2.0)
        opened = 0
        while True:
            pubsub = self._broker.pubsub()
            try:
                await pubsub.ping()  # connects: a dead Redis fails here, not in the loop below
                self._pubsub = pubsub
                self.reconnects, opened = opened, opened + 1
                self.connected = True
                self._connected_event.set()
                channels = list(self._users_by_channel)
                self._canaries_unheard.clear()
                self._canary_channels = frozenset(self._broker.canary_channels(self._name))
                dispatch = getattr(pubsub, "dispatch", None)
                if dispatch is not None:  # messages handled as they are read (fanout.resp_pubsub)
                    dispatch(self._handle)
                await pubsub.subscribe(*self._canary_channels, *channels)
                delays = delays_s(base_s=0.1, cap_s=2.0)
                log.info("pubsub connected; %d channels subscribed again", len(channels))
                while not self._redial:
                    message = await pubsub.get_message(timeout=min(1.0, self._canary_interval_s))
                    if message is not None:
                        self._handle(message)
                log.warning("pubsub connection is deaf (canary lost); reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("pubsub connection lost: %r", exc)
            finally:
                self._redial = False
                self.connected = False
                self._connected_event.clear()
                self._pubsub = None
                await asyncio.gather(pubsub.aclose(), return_exceptions=True)
            await asyncio.sleep(next(delays))

    async def _canaries(self) -> None:
        """Publish a canary every interval; a canary unheard for the timeout means deaf."""
        while True:
            await asyncio.sleep(self._canary_interval_s)
            if not self.connected:
                continue
            now = time.monotonic()
            if self._canaries_unheard and now - min(self._canaries_unheard.values()) > self._canary_timeout_s:
                self._deaf = True
                self._redial = True
                self._canaries_unheard.clear()
                continue
            number = next(self._canary_numbers)
            for channel in self._canary_channels:
                self._canaries_unheard[channel, number] = now
                with contextlib.suppress(*TRANSIENT):
                    await self._broker.signal(channel, str(number))

    def _heard_canary(self, channel: str, number: int) -> None:
        for sent in [key for key in self._canaries_unheard if key[0] == channel and key[1] <= number]:
            del self._canaries_unheard[sent]
        self._deaf = False

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        channel = as_text(message["channel"])
        if channel in self._canary_channels:
            if kind == "message":
                self._heard_canary(channel, int(as_text(message["data"])))
            return
        if kind == "message":
            data = as_text(message["data"])
            user = self._users_by_channel.get(channel)
            if user is None:
                return
            seq = frame_seq(data)
            if self._observe is not None:
                self._observe(data)
            for sub in list(self._subs.get(user, ())):
                sub.deliver(seq, data)
        elif kind == "subscribe":
            confirmed = self._confirmations.get(channel)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
                return
            # A subscription renewed after a reconnect: frames published meanwhile were lost here.
            user = self._users_by_channel.get(channel)
            for sub in list(self._subs.get(user, ())) if user else ():
                sub.resume()

