"""`FaultProxy`: a TCP proxy on loopback whose network faults a test switches at runtime.

It runs on its own event loop in a background thread, so subprocesses (nodes, workers) can connect
through it while the test's own loop is busy, and a sync fixture can own it for a whole module.

    proxy = FaultProxy(upstream_port=redis.port).start()   # then point REDIS_URL at proxy.url("redis")
    proxy.latency(20)              # every chunk delayed 20 ms, each way
    proxy.blackhole()              # connections stay open but nothing moves, either way
    proxy.refuse()                 # new connections are reset at once; open ones are untouched
    proxy.heal()                   # back to passing bytes; held bytes go through, in order
    proxy.silence_downstream(lambda c: b"SUBSCRIBE" in c.sent)   # a "deaf" connection
    proxy.reset()                  # RST every open connection (SO_LINGER 0)

Faults model the network, not the server: a blackhole *holds* bytes (TCP would retransmit them once
the path heals, so they arrive late, not corrupted), and a connection accepted while blackholed reaches
the upstream only when the path heals. A silenced connection drops the server's bytes for good and is
never un-silenced: a stream with a hole in it could not be trusted again. Every method may be called
from any thread but the proxy's own; the mode methods return once the proxy applies them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

__all__ = ["ConnectionInfo", "FaultProxy", "Mode"]

_CHUNK = 65_536
_QUEUE_CHUNKS = 32  # per direction; a held direction stops reading after this (back-pressure)
_SENT_KEEP = 256 * 1024  # client bytes kept per connection for predicates (the most recent ones)
_CALL_TIMEOUT_S = 10.0
T = TypeVar("T")


class Mode(enum.Enum):
    PASS = "pass"
    LATENCY = "latency"
    BLACKHOLE = "blackhole"
    REFUSE = "refuse"


@dataclass(frozen=True)
class ConnectionInfo:
    """A snapshot of one proxied connection. `sent` holds the most recent client->server bytes
    (up to 256 KiB), enough to recognise e.g. a Redis connection that sent SUBSCRIBE."""

    id: int
    sent: bytes
    sent_total: int
    received_total: int
    silenced: bool
    open: bool
    opened_at: float


Predicate = Callable[[ConnectionInfo], bool]


class _Conn:
    def __init__(self, id_: int, client: asyncio.StreamWriter) -> None:
        self.id = id_
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.sent = bytearray()
        self.sent_total = 0
        self.received_total = 0
        self.silenced = False
        self.open = True
        self.opened_at = time.monotonic()
        self.task: asyncio.Task[None] | None = None

    def record_sent(self, data: bytes) -> None:
        self.sent_total += len(data)
        self.sent += data
        if len(self.sent) > _SENT_KEEP:
            del self.sent[: len(self.sent) - _SENT_KEEP]

    def info(self) -> ConnectionInfo:
        return ConnectionInfo(self.id, bytes(self.sent), self.sent_total, self.received_total,
                              self.silenced, self.open, self.opened_at)

    def close(self, *, rst: bool) -> None:
        """Close both sides: with RST (SO_LINGER 0, unsent bytes dropped) or a FIN after them."""
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            if rst:
                _set_linger_zero(writer)
                writer.transport.abort()
            else:
                writer.transport.close()
        self.open = False


def _set_linger_zero(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class FaultProxy:
    """Listens on 127.0.0.1:`port` (free by default) and forwards to `upstream_host`:`upstream_port`."""

    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = port
        self.accepted = 0
        self._mode = Mode.PASS
        self._latency_s = 0.0
        self._conns: dict[int, _Conn] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None  # cleared while blackholed
        self._wakers: set[Callable[[], None]] = set()
        self._wakers_lock = threading.Lock()

    def url(self, scheme: str, path: str = "", user: str = "") -> str:
        """The proxy's address as a URL, e.g. ``url("redis", "/0")``."""
        return f"{scheme}://{user + '@' if user else ''}127.0.0.1:{self.port}{path}"

    # Lifecycle

    def start(self) -> Self:
        """Bind and serve; returns once the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=f"faultproxy-{self.upstream_port}",
                                        daemon=True)
        self._thread.start()
        self._call(self._serve())
        return self

    def stop(self) -> None:
        """Close the listener and every connection, then end the thread."""
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=_CALL_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()
        self._thread = None
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # Modes: one at a time, applied to open and new connections alike

    @property
    def mode(self) -> Mode:
        return self._mode

    def heal(self) -> None:
        """Pass bytes again (bytes held by a blackhole go through, in order)."""
        self._call(self._set_mode(Mode.PASS, 0.0))

    def latency(self, ms: float) -> None:
        """Deliver every chunk `ms` milliseconds after it arrived, in each direction (order kept)."""
        self._call(self._set_mode(Mode.LATENCY, ms / 1000))

    def blackhole(self) -> None:
        """Keep connections (and accept new ones) but move no byte in either direction until healed."""
        self._call(self._set_mode(Mode.BLACKHOLE, 0.0))

    def refuse(self) -> None:
        """Reset each new connection as soon as it is accepted; open connections carry on."""
        self._call(self._set_mode(Mode.REFUSE, 0.0))

    # Faults aimed at the connections open now

    def silence_downstream(self, predicate: Predicate) -> int:
        """Drop all server->client bytes, from now on, on the open connections matching `predicate`
        (evaluated once, now: connections opened later are not silenced). Returns how many matched."""
        return self._call(self._silence(predicate))

    def reset(self, predicate: Predicate | None = None) -> int:
        """RST (SO_LINGER 0) both sides of every open connection, or of those matching `predicate`.
        Returns how many were reset. The mode is unchanged: new connections follow it."""
        return self._call(self._reset(predicate))

    # Observation

    def connections(self, *, open_only: bool = True) -> list[ConnectionInfo]:
        """Snapshots of the proxied connections (oldest first)."""
        return self._call(self._snapshot(open_only))

    async def wait_until(self, condition: Callable[[list[ConnectionInfo]], bool], timeout_s: float,
                         what: str) -> list[ConnectionInfo]:
        """Wait (from any event loop) until `condition(open connections)` holds; woken by every change
        the proxy sees (connections opening or closing, bytes sent upstream). Returns the snapshot
        that satisfied it; raises TimeoutError naming `what`."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def waker() -> None:
            with contextlib.suppress(RuntimeError):  # the waiting loop is already gone
                loop.call_soon_threadsafe(changed.set)

        with self._wakers_lock:
            self._wakers.add(waker)
        try:
            deadline = loop.time() + timeout_s
            while True:
                changed.clear()
                snapshot = self.connections()
                if condition(snapshot):
                    return snapshot
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError(f"proxy :{self.port}: no {what} within {timeout_s}s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), remaining)
        finally:
            with self._wakers_lock:
                self._wakers.discard(waker)

    # Inside the proxy's loop

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            raise RuntimeError("FaultProxy is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CALL_TIMEOUT_S)

    def _wake(self) -> None:
        with self._wakers_lock:
            wakers = list(self._wakers)
        for waker in wakers:
            waker()

    async def _serve(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            conn.close(rst=False)
        tasks = [c.task for c in self._conns.values() if c.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _set_mode(self, mode: Mode, latency_s: float) -> None:
        assert self._flowing is not None
        self._mode, self._latency_s = mode, latency_s
        if mode is Mode.BLACKHOLE:
            self._flowing.clear()
        else:
            self._flowing.set()

    async def _silence(self, predicate: Predicate) -> int:
        matched = [c for c in self._conns.values() if c.open and predicate(c.info())]
        for conn in matched:
            conn.silenced = True
        return len(matched)

    async def _reset(self, predicate: Predicate | None) -> int:
        matched = [c for c in self._conns.values() if c.open and (predicate is None or predicate(c.info()))]
        for conn in matched:
            conn.close(rst=True)
        self._wake()
        return len(matched)

    async def _snapshot(self, open_only: bool) -> list[ConnectionInfo]:
        return [c.info() for c in self._conns.values() if c.open or not open_only]

    async def _accept(self, reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = _Conn(self.accepted, client)
        if self._mode is Mode.REFUSE:
            conn.close(rst=True)
            return
        self._conns[conn.id] = conn
        # A task of our own, not the server's handler task: shutdown cancels it, and asyncio's
        # handler callback would log a cancelled handler task as an error.
        conn.task = asyncio.create_task(self._serve_conn(conn, reader))
        self._wake()

    async def _serve_conn(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        try:
            await self._proxy(conn, reader)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            conn.close(rst=False)
            self._wake()
            # Keep closed connections for `connections(open_only=False)`, but not without bound.
            if len(self._conns) > 1000:
                for old in [c for c in self._conns.values() if not c.open][:500]:
                    self._conns.pop(old.id, None)

    async def _proxy(self, conn: _Conn, client_reader: asyncio.StreamReader) -> None:
        assert self._flowing is not None
        upstream_bytes: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_QUEUE_CHUNKS)
        reading_client = asyncio.create_task(self._read(client_reader, upstream_bytes, conn, upstream=True))
        try:
            # A connection accepted across a blackhole reaches the server once the path heals.
            await self._flowing.wait()
            try:
                upstream_reader, conn.upstream = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port)
            except OSError:
                conn.close(rst=True)  # the server is down: the client sees its connection reset
                return
            if not conn.open:  # reset while connecting
                conn.upstream.transport.abort()
                return
            client_bytes: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_QUEUE_CHUNKS)
            pumps = [
                reading_client,
                asyncio.create_task(self._write(upstream_bytes, conn.upstream, conn, downstream=False)),
                asyncio.create_task(self._read(upstream_reader, client_bytes, conn, upstream=False)),
                asyncio.create_task(self._write(client_bytes, conn.client, conn, downstream=True)),
            ]
            try:
                # Either side closing (or failing) ends the connection on both sides.
                await asyncio.wait(pumps[1:], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in pumps:
                    task.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            reading_client.cancel()
            await asyncio.gather(reading_client, return_exceptions=True)

    async def _read(self, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]],
                    conn: _Conn, *, upstream: bool) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await reader.read(_CHUNK)
                if upstream:
                    conn.record_sent(data)
                    self._wake()
                else:
                    conn.received_total += len(data)
                await queue.put((loop.time() + self._latency_s, data))
                if not data:
                    return  # EOF travels through the queue like data, so it is held and delayed too
        except OSError:
            await queue.put((loop.time(), b""))

    async def _write(self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter,
                     conn: _Conn, *, downstream: bool) -> None:
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            await self._flowing.wait()
            delay_s = due - loop.time()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
                await self._flowing.wait()  # a blackhole that began during the delay holds it too
            if not data:
                return
            if downstream and conn.silenced:
                continue
            writer.write(data)
            await writer.drain()
