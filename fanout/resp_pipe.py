"""`RespPipe`: one Redis connection that pipelines every caller's commands, for the publish script.

Through redis-py each publish took a pooled connection (a lock, a timeout, observability hooks),
wrote one command and waited for its reply alone: 50-60 µs of a worker's CPU per publish, and one
publisher process topped out near 4,500 events/s (issue 14). Here callers only queue their
command: the commands of one loop iteration go out in one write, every read is parsed at once by
a hiredis `Reader`, and replies resolve the callers' futures in order (Redis answers a connection's
commands in the order sent). Redis itself then reads many commands per syscall too.

Errors are redis-py's, so callers keep their handling: a reply error is redis-py's exception for
it (`BusyLoadingError` while Redis loads its data, `NoScriptError`, else `ResponseError`), a lost
connection fails every command in flight with `ConnectionError` and the next call connects
again, and a reply later than `timeout_s` (a Redis that stopped answering) closes the connection
the same way, with `TimeoutError`. A command may have run when its connection was lost: callers
retry only what is safe to repeat (the publish script is, by its producer dedupe).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, cast

import hiredis
from redis import exceptions as redis_errors
from redis._parsers.base import BaseParser
from redis.asyncio.connection import parse_url

from fanout import resp


def error(reply: hiredis.ReplyError | str) -> redis_errors.RedisError:
    """redis-py's exception for an error reply: LOADING (a restarting Redis) is a
    BusyLoadingError, which callers retry as an outage, NOSCRIPT a NoScriptError, READONLY a
    ReadOnlyError..."""
    return cast(redis_errors.RedisError, BaseParser.parse_error(str(reply)))  # type: ignore[no-untyped-call]


class RespPipe(asyncio.Protocol):
    def __init__(self, params: dict[str, Any], *, timeout_s: float = 10.0) -> None:
        """`params`: `host` and `port`, or `path`; `username`, `password`, `db` (parse_url's)."""
        self._params = params
        self.timeout_s = timeout_s
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace")
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 10.0) -> RespPipe:
        return cls(dict(parse_url(url)), timeout_s=timeout_s)

    async def execute(self, *parts: str | bytes | int) -> Any:
        """Send one command (pipelined with the others of this loop iteration); its reply."""
        await self.ready()
        reply = await self.send(*parts)
        if isinstance(reply, hiredis.ReplyError):
            raise error(reply)
        return reply

    async def ready(self) -> None:
        """Connect, if the pipe is not connected."""
        if self._transport is None or self._transport.is_closing():
            await self._connect()

    def send(self, *parts: str | bytes | int) -> asyncio.Future[Any]:
        """Queue one command; the future of its reply, a `hiredis.ReplyError` for an error reply
        (`error` makes it redis-py's exception). For callers that answer in a callback; others
        use `execute`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((future, loop.time()))
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(resp.command(*parts))
        return future

    async def evalsha(self, sha: str, script: str, keys: list[str], args: list[str | int]) -> Any:
        """Run a Lua script by its sha, loading it (EVAL) when this Redis does not have it."""
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except redis_errors.NoScriptError:
            return await self.execute("EVAL", script, len(keys), *keys, *args)

    async def aclose(self) -> None:
        self._closed = True
        if self._transport is not None:
            self._transport.close()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        waiting = self._waiting
        while (reply := self._reader.gets()) is not False:
            if not waiting:
                break  # a reply nobody asked for: the connection is out of step
            future, _ = waiting.popleft()
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(redis_errors.ConnectionError(f"redis connection lost: {exc!r}" if exc else
                                                "redis connection closed"))

    # internals

    def _flush(self) -> None:
        out, self._out = self._out, []
        transport = self._transport
        if transport is None or transport.is_closing():
            self._fail(redis_errors.ConnectionError("redis connection closed"))
            return
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(self.timeout_s, self._check_late)
        try:
            transport.write(b"".join(out))
        except Exception as exc:  # uvloop: a bare RuntimeError on a connection Redis reset
            self._fail(redis_errors.ConnectionError(f"redis connection lost: {exc!r}"))
            transport.abort()

    def _check_late(self) -> None:
        """One timer for the whole pipe: the oldest command still unanswered after `timeout_s`
        means Redis stopped answering; close, failing everything in flight."""
        self._watchdog = None
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        oldest_s = loop.time() - self._waiting[0][1]
        if oldest_s >= self.timeout_s:
            transport = self._transport
            self._fail(redis_errors.TimeoutError(f"no reply from redis within {self.timeout_s}s"))
            if transport is not None:
                transport.abort()  # its late replies must not answer the next commands
        else:
            self._watchdog = loop.call_later(self.timeout_s - oldest_s, self._check_late)

    def _fail(self, error: Exception) -> None:
        self._transport = None
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace")
        waiting, self._waiting = self._waiting, collections.deque()
        self._out = []
        for future, _ in waiting:
            if not future.done():
                future.set_exception(error)

    async def _connect(self) -> None:
        """One connection attempt at a time, shared by every caller that finds the pipe closed."""
        if self._closed:
            raise redis_errors.ConnectionError("redis pipe closed")
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
        await asyncio.shield(self._connecting)

    async def _open(self) -> None:
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace")
        try:
            await resp.connect(self, self._params, self._handshake, select=True)
        except (OSError, TimeoutError) as exc:
            if self._transport is not None:
                self._transport.abort()
            self._transport = None
            raise redis_errors.ConnectionError(f"cannot connect to redis: {exc!r}") from exc

    async def _handshake(self, command: bytes) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append((future, asyncio.get_running_loop().time()))
        assert self._transport is not None
        self._transport.write(command)
        return await future
