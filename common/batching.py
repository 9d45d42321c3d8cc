"""`Coalesced`: the lookups of one loop turn answered by one call for all their keys.

When many sockets open at once, each asked Postgres for its user's runs in flight, one query and
one round trip each: a fifth of a node's CPU while sockets opened (issue 14, a py-spy profile of
S1's opening). Asked through `Coalesced`, the users asked in one turn of the loop are read in one
query (DataLoader's batching, per loop turn).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Coalesced(Generic[K, V]):
    def __init__(self, fetch: Callable[[list[K]], Awaitable[Mapping[K, V]]], *, missing: Callable[[], V],
                 max_keys: int = 256) -> None:
        """`fetch`: the values of many keys (a key it leaves out gets `missing()`); at most
        `max_keys` keys a call."""
        self._fetch = fetch
        self._missing = missing
        self.max_keys = max_keys
        self._waiting: dict[K, list[asyncio.Future[V]]] = {}
        self._calls: set[asyncio.Task[None]] = set()

    async def get(self, key: K) -> V:
        """`key`'s value, fetched with the other keys asked in this loop turn; `fetch`'s error
        when it fails."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[V] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._send)
        self._waiting.setdefault(key, []).append(future)
        if len(self._waiting) >= self.max_keys:
            self._send()
        return await future

    def _send(self) -> None:
        if not self._waiting:
            return  # sent when it filled up
        waiting, self._waiting = self._waiting, {}
        # A context of its own: the call is no one caller's (their log fields stay theirs).
        call = asyncio.get_running_loop().create_task(self._answer(waiting), context=contextvars.Context())
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)

    async def _answer(self, waiting: dict[K, list[asyncio.Future[V]]]) -> None:
        try:
            values = await self._fetch(list(waiting))
        except Exception as exc:
            for futures in waiting.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
            return
        except asyncio.CancelledError:  # the process is stopping
            for futures in waiting.values():
                for future in futures:
                    future.cancel()
            raise
        for key, futures in waiting.items():
            value = values[key] if key in values else self._missing()
            for future in futures:
                if not future.done():
                    future.set_result(value)
