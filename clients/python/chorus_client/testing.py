"""What tests of a Chorus server need from a client, on top of `ChorusClient`: a device that keeps
every frame it received (`frames`) and every event its seq gate accepted (`events`), in order, so a
test can compare devices event by event, and counts what a correct server never causes (`gaps`,
`duplicates`). Its commands go out once and raise ChorusError on an error reply (a test of the
server wants to see `unavailable`, not have it retried), and its token goes in the URL unless
`first_frame_token`. Memory grows with every frame: for tests, soaks and benchmarks, not for apps.

    device = RecordingClient(url, token, device="phone")
    await device.connect()
    ack = await device.send("hello")
    end = await device.wait_run_end(ack["run"])
    assert device.run_text(ack["run"]) == end["data"]["text"] and not device.gaps
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from chorus_client.client import ChorusClient
from chorus_client.errors import ChorusError
from chorus_client.events import Connected, Disconnected, EventReceived, FrameReceived, SeqGap
from chorus_client.gate import Position
from chorus_client.policy import Backoff
from protocol import END_EVENTS, Event, FrameType, shown_text
from protocol.frames import to_json

ClientError = ChorusError  # the error of a command's `error` reply: `code`, `frame`

# The events that change a run's shown text (see protocol.text); the others leave `shown` as is.
_TEXT_EVENTS = frozenset({Event.RUN_STARTED, Event.TOKEN, Event.RUN_RESUMED})


class RecordingClient:
    """One device of one user, recording. `client` is the `ChorusClient` underneath (reconnecting
    with backoff unless `auto_reconnect` is False, resuming with after/epoch, renewing nothing: the
    token is fixed, replaced by `auth`)."""

    def __init__(self, url: str, token: str, *, device: str | None = None, auto_reconnect: bool = True,
                 max_backoff_s: float = 2.0, session: aiohttp.ClientSession | None = None,
                 first_frame_token: bool = False) -> None:
        self.client = ChorusClient(
            url, token, device=device, auth="frame" if first_frame_token else "query", session=session,
            reconnect=auto_reconnect, backoff=Backoff(max_s=max_backoff_s), heartbeat_s=None,
            too_many_devices_retry_s=None, reload_on_resync=False)
        self.token = token
        self.hello: dict[str, Any] | None = None  # the last `hello`, as received
        self.frames: list[dict[str, Any]] = []  # every frame, as received
        self.events: list[dict[str, Any]] = []  # every event the seq gate accepted, in order
        self.shown: dict[str, str] = {}  # run -> its text as displayed (see `_show`)
        self.gaps: list[tuple[int, int]] = []  # (last seq accepted, seq of the event after the gap)
        self.close_codes: list[int] = []  # one per socket that said hello and closed
        self._ends: dict[str, dict[str, Any]] = {}  # run -> its (first) end event
        self._live = False
        self.client.on(FrameReceived, lambda e: self.record(dict(e.frame)))
        self.client.on(EventReceived, lambda e: self._accept(dict(e.frame)))
        self.client.on(SeqGap, lambda e: self.gaps.append((e.after, e.seq)))
        self.client.on(Connected, self._connected)
        self.client.on(Disconnected, self._disconnected)

    # Where the device is

    @property
    def device(self) -> str | None:
        return self.client.device

    @property
    def url(self) -> str:
        return str(self.client.url)

    @url.setter
    def url(self, url: str) -> None:
        """The next connect goes there (e.g. another node)."""
        self.client.url = url

    @property
    def last_seq(self) -> int | None:
        position = self.client.position
        return position.after if position else None

    @last_seq.setter
    def last_seq(self, seq: int) -> None:
        """Claim a position before connecting (to test resuming from it)."""
        self.client.position = Position(seq, self.epoch)

    @property
    def epoch(self) -> str | None:
        position = self.client.position
        return position.epoch if position else None

    @epoch.setter
    def epoch(self, epoch: str | None) -> None:
        assert self.last_seq is not None, "set last_seq first"
        self.client.position = Position(self.last_seq, epoch)

    @property
    def connects(self) -> int:
        return self.client.stats.connects

    @property
    def duplicates(self) -> int:
        return self.client.stats.duplicates

    # Connecting

    async def connect(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """Open the socket (resuming if this device saw events before); returns the hello."""
        await asyncio.wait_for(self.client.connect(), timeout_s)
        assert self.hello is not None
        return self.hello

    async def close(self) -> None:
        await self.client.close()

    async def drop(self) -> None:
        """Close the socket without reconnecting, keeping the position (`connect` resumes)."""
        await self.client.close()

    # Commands: once each, an error reply raises ClientError

    async def request(self, frame: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
        return await self.client.request(frame, timeout_s=timeout_s)

    async def send(self, text: str, *, conversation: str | None = None, id: str | None = None,
                   timeout_s: float = 10.0, **extra: Any) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": FrameType.SEND, "text": text, **extra}
        if conversation:
            frame["conversation"] = conversation
        if id:
            frame["id"] = id
        return await self.request(frame, timeout_s)

    async def cancel(self, run: str, timeout_s: float = 10.0) -> dict[str, Any]:
        return await self.request({"type": FrameType.CANCEL, "run": run}, timeout_s)

    async def respond(self, run: str, request: str, text: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """Answer a run's question (`run.input_required`)."""
        return await self.request({"type": FrameType.RESPOND, "run": run, "request": request, "text": text},
                                  timeout_s)

    async def ping(self, timeout_s: float = 10.0) -> dict[str, Any]:
        return await self.request({"type": FrameType.PING}, timeout_s)

    async def auth(self, token: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """Hand the server a fresh token; later reconnects use it too."""
        ack = to_json(await self.client.auth(token, timeout_s=timeout_s))
        self.token = token
        return ack

    # Waiting and reading

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
        """Until `predicate()` holds (checked after every frame and close); TimeoutError after `timeout_s`."""
        await self.client.wait_for(predicate, timeout_s)

    async def wait_run_end(self, run: str, timeout_s: float = 30.0) -> dict[str, Any]:
        await self.wait_for(lambda: run in self._ends, timeout_s)
        return self._ends[run]

    def run_end(self, run: str) -> dict[str, Any] | None:
        return self._ends.get(run)

    def run_text(self, run: str) -> str:
        """The run's answer as this device shows it (see `_show`)."""
        return self.shown.get(run, "")

    def seqs(self) -> list[int]:
        """Every seq this device accepted, merged frames counted for each seq they cover."""
        return [s for e in self.events for s in range(e.get("seq_from", e["seq"]), e["seq"] + 1)]

    def record(self, frame: dict[str, Any]) -> None:
        """Keep `frame`, received just now (before the client applies it). Override to watch
        frames as they come (and call this)."""
        self.frames.append(frame)
        if frame.get("type") == FrameType.HELLO:
            self.hello = frame
        elif frame.get("type") == FrameType.SNAPSHOT:
            for run in frame.get("runs") or ():
                self.shown[run["run"]] = run["text"]

    def _accept(self, frame: dict[str, Any]) -> None:
        self.events.append(frame)
        if frame["event"] in END_EVENTS:
            self._ends.setdefault(frame["run"], frame)
        self._show(frame)

    def _show(self, frame: dict[str, Any]) -> None:
        """Keep each run's text as a client displays it, independently of the client's store: a
        `snapshot` sets it, then each event goes through `protocol.shown_text` (`run.started`
        clears it, `run.resumed` replaces it, tokens append to it; an end event leaves it, so a
        test can compare the streamed text with the end event's)."""
        if frame["event"] in _TEXT_EVENTS and frame.get("run"):
            run = frame["run"]
            self.shown[run] = shown_text(self.shown.get(run, ""), frame["event"], frame["data"])

    def _connected(self, event: Connected) -> None:
        self._live = True

    def _disconnected(self, event: Disconnected) -> None:
        if self._live:
            self.close_codes.append(event.code)
        self._live = False
