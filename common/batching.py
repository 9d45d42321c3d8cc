"""What callers ask in one turn of the event loop, handed on together at its end.

`TurnQueue` is the skeleton: the first ask of a turn schedules the hand-over (`call_soon`), a full
queue goes at once, and the receiver answers each caller's future. Two users:
- `Coalesced`: the lookups of a turn answered by one call for all their keys. When many sockets
  open at once, each asked Postgres for its user's runs in flight, one query and one round trip
  each: a fifth of a node's CPU while sockets opened (issue 14, a py-spy profile of S1's opening).
  Asked through `Coalesced`, the users asked in one turn are read in one query (DataLoader's
  batching, per loop turn).
- `fanout.publish_batch.PublishBatch`: a turn's publishes as one call of the publish script.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T")
R = TypeVar("R")


class TurnQueue(Generic[T, R]):
    def __init__(self, send: Callable[[list[T], list[asyncio.Future[R]]], object], *, most: int) -> None:
        """`send(items, futures)`: the items asked, in order, and their callers' futures, which it
        answers (`settle`); at most `most` at once."""
        self._send = send
        self.most = most
        self._items: list[T] = []
        self._futures: list[asyncio.Future[R]] = []

    def add(self, item: T) -> asyncio.Future[R]:
        """Queue `item`; the future of its answer."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        if not self._futures:
            loop.call_soon(self._flush)
        self._items.append(item)
        self._futures.append(future)
        if len(self._futures) >= self.most:
            self._flush()
        return future

    def _flush(self) -> None:
        if not self._futures:
            return  # sent when it filled up
        items, futures = self._items, self._futures
        self._items, self._futures = [], []
        self._send(items, futures)


def settle(futures: list[asyncio.Future[R]], answers: Iterable[R | BaseException]) -> None:
    """Answer each future with its answer (an exception is raised to its caller); a caller that
    gave up (its future cancelled) is skipped."""
    for future, answer in zip(futures, answers, strict=True):
        if future.done():
            continue
        if isinstance(answer, BaseException):
            future.set_exception(answer)
        else:
            future.set_result(answer)


class Coalesced(Generic[K, V]):
    def __init__(self, fetch: Callable[[list[K]], Awaitable[Mapping[K, V]]], *, missing: Callable[[], V],
                 max_keys: int = 256) -> None:
        """`fetch`: the values of many keys (a key it leaves out gets `missing()`); at most
        `max_keys` asks a call (a key asked twice is fetched once)."""
        self._fetch = fetch
        self._missing = missing
        self._queue: TurnQueue[K, V] = TurnQueue(self._send, most=max_keys)
        self._calls: set[asyncio.Task[None]] = set()

    async def get(self, key: K) -> V:
        """`key`'s value, fetched with the other keys asked in this loop turn; `fetch`'s error
        when it fails."""
        return await self._queue.add(key)

    def _send(self, keys: list[K], futures: list[asyncio.Future[V]]) -> None:
        # A context of its own: the call is no one caller's (their log fields stay theirs).
        loop = asyncio.get_running_loop()
        call = loop.create_task(self._answer(keys, futures), context=contextvars.Context())
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)

    async def _answer(self, keys: list[K], futures: list[asyncio.Future[V]]) -> None:
        try:
            values = await self._fetch(list(dict.fromkeys(keys)))
        except Exception as exc:
            settle(futures, [exc] * len(futures))
            return
        except asyncio.CancelledError:  # the process is stopping
            for future in futures:
                future.cancel()
            raise
        settle(futures, [values[key] if key in values else self._missing() for key in keys])
