"""The reference Chorus client: connects, resumes with its last seq and epoch, drops duplicates.

Used by the tests and by loadtest/. It keeps every event it accepted in order (`events`), so a
test can compare devices, and counts what a correct server never sends (`gaps`, `duplicates`).
On an unexpected close it reconnects with jittered exponential backoff, as any client should.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
from collections.abc import Callable
from typing import Any

import aiohttp

from protocol import END_EVENTS, RECONNECT_CODES, Event, FrameType, shown_text

log = logging.getLogger(__name__)

# The events that change a run's shown text (see protocol.text); the others leave `shown` as is.
_TEXT_EVENTS = frozenset({Event.RUN_STARTED, Event.TOKEN, Event.RUN_RESUMED})


class ClientError(Exception):
    """An `error` frame in reply to a command."""

    def __init__(self, frame: dict[str, Any]) -> None:
        super().__init__(f"{frame.get('code')}: {frame.get('message')}")
        self.frame = frame
        self.code = frame.get("code")


class ChorusClient:
    """One device of one user."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        device: str | None = None,
        auto_reconnect: bool = True,
        max_backoff_s: float = 2.0,
        session: aiohttp.ClientSession | None = None,
        first_frame_token: bool = False,
    ) -> None:
        self.url = url
        self.token = token
        # Send the token as the first frame (``?auth=frame``) instead of in the URL.
        self.first_frame_token = first_frame_token
        self.device = device
        self.auto_reconnect = auto_reconnect
        self.max_backoff_s = max_backoff_s
        self.epoch: str | None = None
        self.last_seq: int | None = None
        self.hello: dict[str, Any] | None = None
        self.events: list[dict[str, Any]] = []
        self.shown: dict[str, str] = {}  # run -> its text as displayed
        self.frames: list[dict[str, Any]] = []
        self.gaps: list[tuple[int, int]] = []
        self.duplicates = 0
        self.connects = 0
        self.close_codes: list[int | None] = []
        self._session = session
        self._own_session = session is None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._changed = asyncio.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self._connected = asyncio.Event()
        self._reconnecting: asyncio.Task[None] | None = None

    # Connection

    def _connect_url(self) -> str:
        params = {"auth": "frame"} if self.first_frame_token else {"access_token": self.token}
        if self.device:
            params["device"] = self.device
        if self.last_seq is not None:
            params["after"] = str(self.last_seq)
            if self.epoch:
                params["epoch"] = self.epoch
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"{self.url}{'&' if '?' in self.url else '?'}{query}"

    async def connect(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Open the socket (resuming if this client saw events before); returns the hello."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        self._connected.clear()
        self.hello = None
        ws = await self._session.ws_connect(
            self._connect_url(),
            timeout=aiohttp.ClientWSTimeout(ws_close=5),
            heartbeat=None,
            autoping=True,
            max_msg_size=0,
        )
        self._ws = ws
        self.connects += 1
        if self.first_frame_token:
            await ws.send_str(json.dumps({"type": FrameType.AUTH, "token": self.token}))
        self._reader = asyncio.create_task(self._read(ws))
        await asyncio.wait_for(self._connected.wait(), timeout_s)
        assert self.hello is not None
        return self.hello

    async def close(self) -> None:
        """Close for good (no reconnect)."""
        self._closed = True
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader, 5)
        if self._own_session and self._session is not None:
            await self._session.close()

    async def drop(self) -> None:
        """Close the socket without reconnecting, keeping the position (to resume later)."""
        auto, self.auto_reconnect = self.auto_reconnect, False
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        self.auto_reconnect = auto

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await self._on_frame(json.loads(msg.data))
        self.close_codes.append(ws.close_code)
        for future in self._replies.values():
            if not future.done():
                future.set_exception(ConnectionError(f"socket closed ({ws.close_code})"))
        self._replies.clear()
        async with self._changed:
            self._changed.notify_all()
        if self.auto_reconnect and not self._closed and ws.close_code in RECONNECT_CODES | {None}:
            self._reconnecting = asyncio.create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        for attempt in itertools.count():
            if self._closed:
                return
            await asyncio.sleep(random.uniform(0, min(self.max_backoff_s, 0.05 * 2**attempt)))
            try:
                await self.connect()
                return
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.debug("reconnect attempt %d failed: %r", attempt, exc)

    async def _on_frame(self, frame: dict[str, Any]) -> None:
        self.frames.append(frame)
        kind = frame.get("type")
        if kind == FrameType.HELLO:
            self.hello = frame
            if self.last_seq is None or self.epoch is None:
                self.last_seq = frame["seq"] if self.last_seq is None else self.last_seq
            self.epoch = frame["epoch"] if self.epoch is None else self.epoch
            self._connected.set()
        elif kind == FrameType.EVENT:
            # Merged tokens (a device that fell behind) cover seq_from..seq in one frame.
            seq, first = frame["seq"], frame.get("seq_from", frame["seq"])
            if self.last_seq is not None and seq <= self.last_seq:
                self.duplicates += 1
            else:
                if self.last_seq is not None and first != self.last_seq + 1:
                    self.gaps.append((self.last_seq, seq))
                self.last_seq = seq
                self.events.append(frame)
                self._show(frame)
        elif kind == FrameType.RESYNC:
            self.last_seq, self.epoch = frame["seq"], frame["epoch"]
        elif kind == FrameType.SNAPSHOT:
            self._show(frame)
        if kind in (FrameType.ACK, FrameType.ERROR, FrameType.PONG) and frame.get("id") in self._replies:
            future = self._replies.pop(frame["id"])
            if not future.done():
                future.set_result(frame)
        async with self._changed:
            self._changed.notify_all()

    # Commands

    async def request(self, frame: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
        """Send a command and wait for its one reply; raises ClientError on an error reply."""
        if "id" not in frame:
            frame = {**frame, "id": f"c{next(self._ids)}-{random.getrandbits(32):x}"}
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[frame["id"]] = future
        assert self._ws is not None
        await self._ws.send_str(json.dumps(frame))
        reply = await asyncio.wait_for(future, timeout_s)
        if reply["type"] == FrameType.ERROR:
            raise ClientError(reply)
        return reply

    async def send(
        self,
        text: str,
        *,
        conversation: str | None = None,
        id: str | None = None,
        timeout_s: float = 10.0,
        **extra: Any,
    ) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": FrameType.SEND, "text": text, **extra}
        if conversation:
            frame["conversation"] = conversation
        if id:
            frame["id"] = id
        return await self.request(frame, timeout_s)

    async def cancel(self, run: str, timeout_s: float = 10.0) -> dict[str, Any]:
        return await self.request({"type": FrameType.CANCEL, "run": run}, timeout_s)

    async def respond(self, run: str, request: str, text: str,
                      timeout_s: float = 10.0) -> dict[str, Any]:
        """Answer a run's question (`run.input_required`)."""
        frame = {"type": FrameType.RESPOND, "run": run, "request": request, "text": text}
        return await self.request(frame, timeout_s)

    async def ping(self, timeout_s: float = 10.0) -> dict[str, Any]:
        return await self.request({"type": FrameType.PING}, timeout_s)

    async def auth(self, token: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """Hand the server a fresh token before the current one expires (the server closes the
        socket with 4001 when it does); later reconnects use it too."""
        reply = await self.request({"type": FrameType.AUTH, "token": token}, timeout_s)
        self.token = token
        return reply

    # Waiting and reading

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout_s)

    async def wait_run_end(self, run: str, timeout_s: float = 30.0) -> dict[str, Any]:
        await self.wait_for(lambda: self.run_end(run) is not None, timeout_s)
        end = self.run_end(run)
        assert end is not None
        return end

    def run_end(self, run: str) -> dict[str, Any] | None:
        for event in self.events:
            if event["run"] == run and event["event"] in END_EVENTS:
                return event
        return None

    def run_text(self, run: str) -> str:
        """The run's answer as this device shows it (see `_show`)."""
        return self.shown.get(run, "")

    def _show(self, frame: dict[str, Any]) -> None:
        """Keep each run's text as a client displays it: a `snapshot` sets it, then each event
        goes through `protocol.shown_text` (`run.started` clears it, `run.resumed` replaces it,
        tokens append to it). Only runs with a text event or in a snapshot get an entry."""
        if frame["type"] == FrameType.SNAPSHOT:
            for run in frame["runs"]:
                self.shown[run["run"]] = run["text"]
            return
        run, name = frame["run"], frame["event"]
        if name in _TEXT_EVENTS:
            self.shown[run] = shown_text(self.shown.get(run, ""), name, frame["data"])

    def seqs(self) -> list[int]:
        """Every seq this device accepted, merged frames counted for each seq they cover."""
        return [s for e in self.events for s in range(e.get("seq_from", e["seq"]), e["seq"] + 1)]
