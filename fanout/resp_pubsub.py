"""`RespPubSub`: a lean Redis Pub/Sub connection for the hub's read loop.

redis-py's `PubSub.get_message` parses one message per call, each under its own timeout, retry
wrapper and health check: py-spy put 57% of a node's CPU there at 10k deliveries/s (issue 14).
Here the socket is an `asyncio.Protocol`: every read is fed to one hiredis `Reader`, which parses
all the replies it holds in one go into a deque; `get_message` then only pops (it waits only when
the deque is empty). Same message shape as redis-py's (dicts with `type`, `channel`, `data`), so
the hub does not know which one it holds.

Plain `redis://` and `unix://` URLs (with a username/password, `fanout.resp`); `rediss://` keeps
redis-py's connection (`fanout.redis_broker.RedisBroker.pubsub` chooses). Pub/Sub channels do not
depend on the database number, so no SELECT is sent.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any, cast

import hiredis
from redis.asyncio.connection import parse_url

from fanout import resp
from fanout.resp import command as _command

# What the hub reads as messages, by the kind Redis pushes: sharded Pub/Sub's (`sharded`) read
# like the classic ones.
_PUSHED = {"message": "message", "subscribe": "subscribe", "unsubscribe": "unsubscribe",
           "smessage": "message", "ssubscribe": "subscribe", "sunsubscribe": "unsubscribe"}


class Waker:
    """What a reader waits on until something arrives (`wake`) or `timeout` passes, or sooner.

    A bare future and a timer, not asyncio.wait_for: on Python 3.11, wait_for swallows a
    cancellation that lands as the future completes, and the hub's read loop then never ends (a
    hang in Hub.close, seen under load). The timer outlives the wait that set it and serves the
    next ones (a wait may so end early, with nothing arrived, which a reader takes as a timeout):
    one timer set and cancelled per message was a tenth of the read loop's cost (issue 14)."""

    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0

    async def wait(self, timeout: float | None) -> None:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        if timeout is not None:
            due = loop.time() + timeout
            if self._timer is not None and self._timer_due > due:
                self._timer.cancel()
                self._timer = None
            if self._timer is None:
                self._timer, self._timer_due = loop.call_at(due, self._expired), due
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _expired(self) -> None:
        self._timer = None
        self.wake()

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


# Messages handed to the hub in one turn of the loop. One read brings up to 256 KB (uvloop's
# buffer): ~1,700 small messages, 40-70 ms of a node's loop at once when 7,500 devices of a node
# that drained went offline together (S1, issue 14); the rest wait a turn, with reading paused.
DISPATCH_PER_TURN = 256


class RespPubSub(asyncio.Protocol):
    """One subscriber connection (see `fanout.broker.PubSub`); connects on `ping()`."""

    def __init__(self, params: dict[str, Any], *, sharded: bool = False,
                 sink: collections.deque[dict[str, Any]] | None = None,
                 on_push: Callable[[], None] | None = None) -> None:
        """`params`: `host` and `port`, or `path` (a unix socket); `username`, `password`.
        `sharded`: subscribe with SSUBSCRIBE (Redis Cluster's sharded Pub/Sub). `sink`: the deque
        messages go to (one several connections share, `fanout.cluster_pubsub`), `on_push` called
        after each read that brought some, and when the connection is lost."""
        self._params = params
        self._subscribe, self._unsubscribe = ("SSUBSCRIBE", "SUNSUBSCRIBE") if sharded else ("SUBSCRIBE",
                                                                                                "UNSUBSCRIBE")
        self._on_push = on_push
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace")
        self._messages: collections.deque[dict[str, Any]] = collections.deque() if sink is None else sink
        self._replies: collections.deque[asyncio.Future[Any]] = collections.deque()  # AUTH, PING
        self._transport: asyncio.Transport | None = None
        self._unsent: list[bytes] = []  # this loop iteration's commands, written together at its end
        self._dispatch: Callable[[dict[str, Any]], None] | None = None  # see `dispatch`
        self._waker = Waker()
        self._lost: Exception | None = None
        self._paused = False  # reading, until the messages of a burst already read are handed on

    @classmethod
    def from_url(cls, url: str) -> RespPubSub:
        return cls(dict(parse_url(url)))

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have the same methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        self._read()

    def _read(self) -> None:
        """Take the replies the reader holds: messages are handed to the hub (at most
        `DISPATCH_PER_TURN` in this turn of the loop; reading pauses until the next) or queued."""
        if self._lost is not None:
            return  # what a lost connection left unread is the hub's catch-up's to bring
        budget = DISPATCH_PER_TURN
        while (reply := self._reader.gets()) is not False:
            if isinstance(reply, list) and len(reply) == 3 and reply[0] in _PUSHED:
                message = {"type": _PUSHED[reply[0]], "channel": reply[1], "data": reply[2]}
                if self._dispatch is None:
                    self._messages.append(message)
                    continue
                if not self._dispatched(message):
                    return
                budget -= 1
                if budget == 0:
                    self._pause()
                    return
            elif self._replies:
                future = self._replies.popleft()
                if not future.done():
                    future.set_result(reply)
        if self._paused:
            self._paused = False
            if self._transport is not None and self._lost is None:
                self._transport.resume_reading()
        if self._dispatch is not None:
            return  # nothing queued: the reader sleeps on (replies wake their own futures)
        self._wake()
        if self._on_push is not None:
            self._on_push()

    def _pause(self) -> None:
        """A burst: the rest of what was read waits a turn of the loop, and so does reading."""
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        asyncio.get_running_loop().call_soon(self._read)

    def dispatch(self, handle: Callable[[dict[str, Any]], None]) -> None:
        """From now on hand each message to `handle` as it is read, in this connection's turn of
        the loop, instead of queueing it for `get_message` (which then only waits, to raise when
        the connection is lost). The raw probe's way: the hub's task woke up for every read, most
        of a node's CPU per delivery beyond the write itself at paced rates (issue 14). An error in
        `handle` ends the connection, as it ended the reader's loop before."""
        self._dispatch = handle
        while self._messages:
            if not self._dispatched(self._messages.popleft()):
                return

    def _dispatched(self, message: dict[str, Any]) -> bool:
        assert self._dispatch is not None
        try:
            self._dispatch(message)
        except Exception as exc:
            self._lost = self._lost or exc
            if self._transport is not None:
                self._transport.close()
            self._wake()
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionError("redis pubsub connection closed")
        for future in self._replies:
            if not future.done():
                future.set_exception(ConnectionError(f"redis pubsub connection lost: {self._lost!r}"))
        self._replies.clear()
        self._wake()
        if self._on_push is not None:
            self._on_push()

    def _wake(self) -> None:
        self._waker.wake()

    # fanout.broker.PubSub

    async def ping(self) -> Any:
        """Connect (and authenticate) if not connected yet, then round-trip a PING."""
        if self._transport is None:
            await self._connect()
        return await self._request(_command("PING"))

    async def subscribe(self, *channels: str) -> None:
        self._write(_command(self._subscribe, *channels))

    async def unsubscribe(self, *channels: str) -> None:
        self._write(_command(self._unsubscribe, *channels))

    @property
    def lost(self) -> Exception | None:
        """Why the connection ended, once it did."""
        return self._lost

    async def get_message(self, *, timeout: float | None = 0.0) -> dict[str, Any] | None:  # noqa: ASYNC109
        if not self._messages:
            self._check()
            await self._waker.wait(timeout)
            if not self._messages:
                self._check()
                return None
        return self._messages.popleft()

    async def aclose(self) -> None:
        self._waker.close()
        if self._transport is not None:
            self._transport.close()
        self._lost = self._lost or ConnectionError("redis pubsub connection closed")

    # internals

    async def _connect(self) -> None:
        await resp.connect(self, self._params, self._request, select=False)

    async def _request(self, command: bytes) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies.append(future)
        self._write(command)
        async with asyncio.timeout(resp.CONNECT_TIMEOUT_S):
            return await future

    def _write(self, command: bytes) -> None:
        """Send `command` with the others of this loop iteration in one write: as 15,000 sockets
        opened or closed, one SUBSCRIBE or UNSUBSCRIBE write each was 8% of a node's CPU (issue 14)."""
        self._check()
        if not self._unsent:
            asyncio.get_running_loop().call_soon(self._flush)
        self._unsent.append(command)

    def _flush(self) -> None:
        unsent, self._unsent = self._unsent, []
        if self._transport is not None and self._lost is None:
            self._transport.write(b"".join(unsent))

    def _check(self) -> None:
        if self._lost is not None:
            raise ConnectionError(f"redis pubsub connection lost: {self._lost!r}")
        if self._transport is None:
            raise ConnectionError("redis pubsub connection not open")
