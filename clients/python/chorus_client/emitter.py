"""Delivering client events: callbacks, and async iterators with a bounded queue each.

A callback runs inline, in the task that reads the socket, so it sees every event in order and
must not block (an exception is logged, never breaks the stream). A subscription never slows the
reader either: when its consumer falls `maxsize` events behind, the oldest are dropped and an
`Overflowed` event says how many (the store still holds the state they changed). So memory stays
bounded whatever a consumer does.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from chorus_client.events import ClientEvent, Overflowed

log = logging.getLogger("chorus_client")

E = TypeVar("E", bound=ClientEvent)


class Subscription:
    """`async for event in subscription` (or `await subscription.get()`); ends once the client is
    closed and what was queued is read. Use it as a context manager, or call `close()`."""

    def __init__(self, kinds: tuple[type[ClientEvent], ...], maxsize: int,
                 detach: Callable[[Subscription], None]) -> None:
        self.kinds = kinds
        self._queue: deque[ClientEvent] = deque()
        self._maxsize = maxsize
        self._dropped = 0
        self._ready = asyncio.Event()
        self._ended = False
        self._detach = detach

    def put(self, event: ClientEvent) -> None:
        if len(self._queue) >= self._maxsize:
            self._queue.popleft()
            self._dropped += 1
        self._queue.append(event)
        self._ready.set()

    def end(self) -> None:
        self._ended = True
        self._ready.set()

    async def get(self) -> ClientEvent:
        """The next event; raises StopAsyncIteration once ended and drained."""
        while True:
            if self._dropped:
                dropped, self._dropped = self._dropped, 0
                return Overflowed(dropped)
            if self._queue:
                return self._queue.popleft()
            if self._ended:
                raise StopAsyncIteration
            self._ready.clear()
            await self._ready.wait()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> ClientEvent:
        return await self.get()

    def close(self) -> None:
        self._detach(self)
        self.end()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Emitter:
    def __init__(self) -> None:
        self._callbacks: list[tuple[type[ClientEvent], Callable[[ClientEvent], object]]] = []
        self._subscriptions: list[Subscription] = []

    def on(self, kind: type[E], callback: Callable[[E], object]) -> Callable[[], None]:
        """Call `callback` with every event of `kind` (a subclass counts; `ClientEvent`: all of
        them). Returns the function that unsubscribes."""
        entry = (kind, callback)
        self._callbacks.append(entry)  # type: ignore[arg-type]

        def off() -> None:
            if entry in self._callbacks:
                self._callbacks.remove(entry)

        return off

    def subscribe(self, kinds: tuple[type[ClientEvent], ...], maxsize: int) -> Subscription:
        subscription = Subscription(kinds or (ClientEvent,), maxsize, self._detach)
        self._subscriptions.append(subscription)
        return subscription

    def _detach(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    def wants(self, kind: type[ClientEvent]) -> bool:
        """Would an event of `kind` reach anyone? (Spares building events nobody reads.)"""
        return any(issubclass(kind, k) for k, _ in self._callbacks) or any(
            issubclass(kind, k) for s in self._subscriptions for k in s.kinds)

    def emit(self, event: ClientEvent) -> None:
        for kind, callback in list(self._callbacks):
            if isinstance(event, kind):
                try:
                    callback(event)
                except Exception:
                    log.exception("a callback for %s failed", type(event).__name__)
        for subscription in self._subscriptions:
            if isinstance(event, subscription.kinds):
                subscription.put(event)

    def end(self) -> None:
        """The client closed: every subscription ends once drained (and is detached)."""
        ended, self._subscriptions = self._subscriptions, []
        for subscription in ended:
            subscription.end()
