"""A load-generator process of S1/S2: holds a share of the devices and notes every event's arrival.

    python -m loadtest.scenarios.loadgen      # driven by loadtest.scenarios.common.LoadGen

One command per stdin line (JSON), one reply per stdout line:

    {"op": "open", "sockets": [Device, ...], "concurrency": 50}
                      -> {"op": "opened", "ok", "refused", "errors", "s"}
    {"op": "count"}   -> {"op": "count", "arrivals"}
    {"op": "take"}    -> {"op": "taken", "keys", "latency_ms", "misrouted", "closed", "last_at"}
                         (and forgets them)
    {"op": "close"}   -> {"op": "closed"}, then exits

A Device is ``{"kind": "chorus"|"sio"|"ws", "url", "user", "slot": 0|1, "auth": {..}|null}``. An
arrival is recorded as key ``2 * n + slot`` (so each device's copy of event ``n`` counts apart) and
``now - t`` in milliseconds (``t``: the publisher's wall clock inside the event; one machine, one
clock); an event for another user than the socket's counts as misrouted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
import time
from array import array
from typing import Any

import aiohttp
import orjson

from loadtest.fanout_bench import _open as open_chorus
from loadtest.scenarios import eio

OPEN_ATTEMPTS = 5
OPEN_TIMEOUT_S = 20


class Arrivals:
    def __init__(self) -> None:
        self.keys = array("q")
        self.latency_ms = array("d")
        self.misrouted = 0
        self.closed = 0
        self.last_at = 0.0

    def take(self) -> dict[str, Any]:
        """The arrivals so far, as a reply; then forget them (the readers keep this object)."""
        taken = {"op": "taken", "keys": self.keys.tolist(), "latency_ms": self.latency_ms.tolist(),
                 "misrouted": self.misrouted, "closed": self.closed, "last_at": self.last_at}
        self.keys, self.latency_ms, self.misrouted = array("q"), array("d"), 0
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


async def _open(session: aiohttp.ClientSession, device: dict[str, Any]) -> aiohttp.ClientWebSocketResponse:
    if device["kind"] == "chorus":
        return await open_chorus(session, device["url"])  # waits for the hello, retries
    for attempt in itertools.count():
        try:
            if device["kind"] == "sio":
                return await _open_sio(session, device)
            return await session.ws_connect(device["url"], heartbeat=None, max_msg_size=0)
        except (aiohttp.ClientError, TimeoutError, RuntimeError):
            if attempt + 1 >= OPEN_ATTEMPTS:
                raise
            await asyncio.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


async def _read(ws: aiohttp.ClientWebSocketResponse, device: dict[str, Any], arrivals: Arrivals) -> None:
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
                    arrivals.note(frame["data"], slot, user)
            elif data == "2":
                await ws.send_str(eio.PONG)
            else:
                event = eio.event_payload(data, loads)
                if event is not None:
                    arrivals.note(event, slot, user)
    finally:
        arrivals.closed += 1


class Generator:
    def __init__(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []
        self.readers: list[asyncio.Task[None]] = []
        self.arrivals = Arrivals()

    async def open(self, devices: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
        slots = asyncio.Semaphore(concurrency)
        errors: list[str] = []

        async def one(device: dict[str, Any]) -> None:
            async with slots:
                try:
                    ws = await _open(self.session, device)
                except Exception as exc:
                    errors.append(f"{device['url'].split('?')[0]}: {exc!r}")
                    return
            self.sockets.append(ws)
            self.readers.append(asyncio.create_task(_read(ws, device, self.arrivals)))

        began = time.monotonic()
        await asyncio.gather(*(one(d) for d in devices))
        return {"op": "opened", "ok": len(devices) - len(errors), "refused": len(errors),
                "errors": errors[:5], "s": time.monotonic() - began}

    def take(self) -> dict[str, Any]:
        return self.arrivals.take()

    async def close(self) -> None:
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)
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
