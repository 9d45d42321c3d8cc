"""A load-generator process of S1/S2: holds a share of the devices and notes every event's arrival.

    python -m loadtest.scenarios.loadgen      # driven by loadtest.scenarios.common.LoadGen

One command per stdin line (JSON), one reply per stdout line:

    {"op": "open", "sockets": [Device, ...], "concurrency": 50}
                      -> {"op": "opened", "ok", "refused", "errors", "s"}
    {"op": "count"}   -> {"op": "count", "arrivals"}
    {"op": "take"}    -> {"op": "taken", "keys", "latency_ms", "misrouted", "closed", "last_at",
                          "reconnect_ms", "reconnect_failed", "resyncs"}   (and forgets them)
    {"op": "slow"}    -> {"op": "slow", "sockets", "closed_by_server", "frames"}
    {"op": "close"}   -> {"op": "closed"}, then exits

A Device is ``{"kind": "chorus"|"sio"|"ws", "url", "user", "slot": 0|1, "auth": {..}|null}``, and
optionally ``"fallback": url`` or ``"slow": true``. An arrival is recorded as key ``2 * n + slot``
(so each device's copy of event ``n`` counts apart) and ``now - t`` in milliseconds (``t``: the
publisher's wall clock inside the event; one machine, one clock); an event for another user than
the socket's counts as misrouted.

A device with a ``fallback`` whose socket closes (its server was killed: S4) connects again at
once to that URL, once, and the time from noticing the close to being connected again is noted; a
Chorus device resumes where it was (``after``/``epoch``: the last ``seq`` it saw and its stream's
epoch), the peers have nothing to resume with. A ``slow`` device (S5) is opened and then never
read, like a phone on a stalled network: what the server does with it is seen by ``slow``, which
reads what each holds until a second of quiet and notes whether the server closed it. (Shrinking
its receive buffer instead was tried: it also clamps the TCP window, and the backlog then
trickled out at ~40 KB/s or stopped behind the sender's zero-window probes.)
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from array import array
from typing import Any

import aiohttp
import orjson

from loadtest.fanout_bench import open_with_hello, retried
from loadtest.scenarios import eio

OPEN_ATTEMPTS = 5
RECONNECT_ATTEMPTS = 10  # a storm meets a node's new-connection rate limit: retried, backing off
OPEN_TIMEOUT_S = 20
SLOW_QUIET_S = 1.0

Socket = aiohttp.ClientWebSocketResponse


class Arrivals:
    def __init__(self) -> None:
        self.keys = array("q")
        self.latency_ms = array("d")
        self.misrouted = 0
        self.closed = 0
        self.last_at = 0.0
        self.reconnect_ms = array("d")
        self.reconnect_failed = 0
        self.resyncs = 0

    def take(self) -> dict[str, Any]:
        """The arrivals so far, as a reply; then forget them (the readers keep this object)."""
        taken = {"op": "taken", "keys": self.keys.tolist(), "latency_ms": self.latency_ms.tolist(),
                 "misrouted": self.misrouted, "closed": self.closed, "last_at": self.last_at,
                 "reconnect_ms": self.reconnect_ms.tolist(), "reconnect_failed": self.reconnect_failed,
                 "resyncs": self.resyncs}
        self.keys, self.latency_ms, self.misrouted = array("q"), array("d"), 0
        self.reconnect_ms, self.reconnect_failed, self.resyncs = array("d"), 0, 0
        return taken

    def note(self, event: dict[str, Any], slot: int, user: str) -> None:
        self.last_at = now = time.time()
        self.latency_ms.append((now - event["t"]) * 1000)
        self.keys.append(2 * event["n"] + slot)
        if event["u"] != user:
            self.misrouted += 1


async def _open_sio(session: aiohttp.ClientSession,
                   device: dict[str, Any]) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(device["url"], heartbeat=None, max_msg_size=0)
    try:
        opened = eio.parse((await ws.receive(timeout=OPEN_TIMEOUT_S)).data)
        if opened.kind != "open":
            raise RuntimeError(f"expected the Engine.IO open packet, got {opened}")
        await ws.send_str(eio.connect(device["auth"]))
        while True:
            packet = eio.parse((await ws.receive(timeout=OPEN_TIMEOUT_S)).data)
            if packet.kind == "connected":
                return ws
            if packet.kind == "ping":
                await ws.send_str(eio.PONG)
            elif packet.kind in ("connect_error", "close"):
                raise RuntimeError(f"refused: {packet}")
    except BaseException:
        await ws.close()
        raise


async def _open(session: aiohttp.ClientSession, device: dict[str, Any], *,
                attempts: int = OPEN_ATTEMPTS) -> tuple[Socket, dict[str, Any]]:
    """The device's socket, ready for events, and where a Chorus device's stream is (its hello's
    ``seq`` and ``epoch``; empty for the peers)."""
    if device["kind"] == "chorus":
        ws, hello = await open_with_hello(session, device["url"], attempts=attempts)
        return ws, {"seq": hello["seq"], "epoch": hello["epoch"]}
    if device["kind"] == "sio":
        return await retried(lambda: _open_sio(session, device), attempts), {}
    url = device["url"]
    return await retried(lambda: session.ws_connect(url, heartbeat=None, max_msg_size=0), attempts), {}


async def _read(ws: Socket, device: dict[str, Any], arrivals: Arrivals, position: dict[str, Any]) -> None:
    kind, slot, user, loads = device["kind"], device["slot"], device["user"], orjson.loads
    try:
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            data = msg.data
            if kind == "ws":
                arrivals.note(loads(data), slot, user)
            elif kind == "chorus":
                frame = loads(data)
                if frame.get("type") == "event":
                    position["seq"] = frame["seq"]
                    arrivals.note(frame["data"], slot, user)
                elif frame.get("type") == "resync":  # events it should have got are gone
                    arrivals.resyncs += 1
                    position.update(seq=frame["seq"], epoch=frame["epoch"])
            elif data == "2":
                await ws.send_str(eio.PONG)
            else:
                event = eio.event_payload(data, loads)
                if event is not None:
                    arrivals.note(event, slot, user)
    finally:
        arrivals.closed += 1


def _resuming(url: str, position: dict[str, Any]) -> str:
    return f"{url}&after={position['seq']}&epoch={position['epoch']}" if position else url


async def _drain_slow(ws: Socket) -> tuple[bool, int]:
    """Read what a never-read socket holds: (whether the server had closed it, frames read)."""
    frames = 0
    while True:
        try:
            msg = await ws.receive(timeout=SLOW_QUIET_S)
        except TimeoutError:
            return False, frames
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            return True, frames
        frames += 1


class Generator:
    def __init__(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.sockets: list[Socket] = []
        self.slow: list[Socket] = []
        self.readers: list[asyncio.Task[None]] = []
        self.arrivals = Arrivals()

    async def open(self, devices: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
        slots = asyncio.Semaphore(concurrency)
        errors: list[str] = []

        async def one(device: dict[str, Any]) -> None:
            async with slots:
                try:
                    ws, position = await _open(self.session, device)
                except Exception as exc:
                    errors.append(f"{device['url'].split('?')[0]}: {exc!r}")
                    return
            if device.get("slow"):
                self.slow.append(ws)
                return
            self.sockets.append(ws)
            self.readers.append(asyncio.create_task(self._hold(ws, device, position)))

        began = time.monotonic()
        await asyncio.gather(*(one(d) for d in devices))
        return {"op": "opened", "ok": len(devices) - len(errors), "refused": len(errors),
                "errors": errors[:5], "s": time.monotonic() - began}

    async def _hold(self, ws: Socket, device: dict[str, Any], position: dict[str, Any]) -> None:
        """Read the device's events; when its socket closes and it has a fallback, connect there
        (resuming, for Chorus) and read on."""
        await _read(ws, device, self.arrivals, position)
        if not device.get("fallback"):
            return
        lost = time.monotonic()
        again = {**device, "url": _resuming(device["fallback"], position), "fallback": None}
        try:
            ws, _ = await _open(self.session, again, attempts=RECONNECT_ATTEMPTS)
        except Exception:
            self.arrivals.reconnect_failed += 1
            return
        self.arrivals.reconnect_ms.append((time.monotonic() - lost) * 1000)
        self.sockets.append(ws)
        await _read(ws, again, self.arrivals, position)  # a resumed Chorus device goes on from it

    async def drain_slow(self) -> dict[str, Any]:
        drained = await asyncio.gather(*(_drain_slow(ws) for ws in self.slow))
        return {"op": "slow", "sockets": len(self.slow), "closed_by_server": sum(c for c, _ in drained),
                "frames": sum(f for _, f in drained)}

    def take(self) -> dict[str, Any]:
        return self.arrivals.take()

    async def close(self) -> None:
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        await asyncio.gather(*(ws.close() for ws in self.sockets + self.slow), return_exceptions=True)
        await self.session.close()


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    generator = Generator()

    def reply(message: dict[str, Any]) -> None:
        sys.stdout.buffer.write(orjson.dumps(message) + b"\n")
        sys.stdout.buffer.flush()

    try:
        while line := await reader.readline():
            command = orjson.loads(line)
            op = command["op"]
            if op == "open":
                reply(await generator.open(command["sockets"], command.get("concurrency", 50)))
            elif op == "count":
                reply({"op": "count", "arrivals": len(generator.arrivals.keys)})
            elif op == "take":
                reply(generator.take())
            elif op == "slow":
                reply(await generator.drain_slow())
            elif op == "close":
                break
    finally:
        await generator.close()
        with contextlib.suppress(BrokenPipeError):
            reply({"op": "closed"})


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())
