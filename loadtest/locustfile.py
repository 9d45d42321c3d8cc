"""Locust load for Chorus: each Locust user is one device holding a WebSocket and chatting.

    AUTH_JWT_SECRET=$(openssl rand -hex 32) python -m loadtest.cluster          # note the nginx port
    CHORUS_TOKEN_SECRET=<the same secret> locust -f loadtest/locustfile.py --headless \\
        -u 1000 -r 100 -t 60s --host ws://127.0.0.1:PORT

(see docs/performance.md). The WebSocket is `websocket-client`, which Locust's gevent monkey
patching makes cooperative; one greenlet per device reads frames, the task sends. What Locust
reports, all as request type ``WS``:

    connect        open the socket until `hello` (failure: refused, 401, no hello in 10 s)
    ack            `send` until its `ack` (failure: an `error` reply or no ack in 30 s)
    first token    `send` until the first `token` event of its run
    answer         `send` until the run's end event (failure: `run.failed` / `run.cancelled`)
    delivery       publisher's `ts` in each event to its arrival here (ms; same clock on loopback),
                   one entry per event received, so its count is the events delivered

Environment:

    CHORUS_TOKEN_SECRET       HS256 secret the nodes verify (AUTH_JWT_SECRET); required
    CHORUS_DEVICES_PER_USER   devices sharing one Chorus user (default 1): >1 multiplies fan-out
    CHORUS_SEND_EVERY_S       mean seconds between one device's sends (default 30)
    CHORUS_TEXT               the message text (default asks for a short answer)

A device whose socket drops reconnects on its next task with `after`/`epoch`, as the reference
client does.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from typing import Any

import gevent
import jwt
import websocket
from gevent.event import AsyncResult
from locust import User, between, events, task

from protocol import END_EVENTS, Event, FrameType

_DEVICES_PER_USER = int(os.environ.get("CHORUS_DEVICES_PER_USER", "1"))
_SEND_EVERY_S = float(os.environ.get("CHORUS_SEND_EVERY_S", "30"))
_TEXT = os.environ.get("CHORUS_TEXT", "Load test: please answer briefly.")
_CONNECT_TIMEOUT_S = 10.0
_ACK_TIMEOUT_S = 30.0
_numbers = itertools.count()
_run_id = uuid.uuid4().hex[:8]  # keeps users of two locust runs apart


def _secret() -> str:
    secret = os.environ.get("CHORUS_TOKEN_SECRET", "")
    if len(secret) < 16:
        raise RuntimeError("CHORUS_TOKEN_SECRET: set it to the cluster's AUTH_JWT_SECRET (16+ characters)")
    return secret


class ChorusDevice(User):
    """One device: a socket, a send every ~CHORUS_SEND_EVERY_S seconds, latencies as request events."""

    wait_time = between(0.5 * _SEND_EVERY_S, 1.5 * _SEND_EVERY_S)

    def on_start(self) -> None:
        number = next(_numbers)
        self.chat_user = f"locust-{_run_id}-{number // _DEVICES_PER_USER}"
        self.device = f"d{number % _DEVICES_PER_USER}"
        claims = {"sub": self.chat_user, "exp": int(time.time()) + 24 * 3600}
        self.token = jwt.encode(claims, _secret(), "HS256")
        self.ws: websocket.WebSocket | None = None
        self.reader: gevent.Greenlet | None = None
        self.epoch: str | None = None
        self.last_seq: int | None = None
        self.acks: dict[str, tuple[AsyncResult, float]] = {}  # command id -> (reply, sent at)
        self.runs: dict[str, float] = {}  # run -> when its send went out (perf_counter)
        self.first_token_seen: set[str] = set()
        # First token of runs not (yet) known, while a send awaits its ack: the worker may start
        # streaming before the node's ack reaches us.
        self.early_tokens: dict[str, float] = {}
        self._connect()
        # Spread the first sends over one interval, so -r 100 does not mean 100 sends per second.
        gevent.sleep(self.wait_time())

    def on_stop(self) -> None:
        if self.reader is not None:
            self.reader.kill(block=False)
        if self.ws is not None:
            self.ws.close()

    # Socket

    def _url(self) -> str:
        base = (self.host or "").rstrip("/")
        base = base if base.endswith("/ws") else f"{base}/ws"
        url = f"{base}?access_token={self.token}&device={self.device}"
        if self.last_seq is not None and self.epoch:
            url += f"&after={self.last_seq}&epoch={self.epoch}"
        return url

    def _connect(self) -> bool:
        started = time.perf_counter()
        try:
            ws = websocket.create_connection(self._url(), timeout=_CONNECT_TIMEOUT_S)
            hello = json.loads(ws.recv())
            if hello.get("type") != FrameType.HELLO:
                raise ConnectionError(f"first frame was {hello.get('type')!r}, not hello")
        except Exception as exc:
            self._fire("connect", started, exc)
            return False
        ws.settimeout(None)  # the reader blocks (cooperatively) until a frame or a close
        if self.last_seq is None:
            self.last_seq = hello["seq"]
        self.epoch = self.epoch or hello["epoch"]
        self.ws = ws
        self.reader = gevent.spawn(self._read, ws)
        self._fire("connect", started)
        return True

    def _read(self, ws: websocket.WebSocket) -> None:
        try:
            while True:
                raw = ws.recv()
                if not raw:
                    break
                self._on_frame(json.loads(raw))
        except (websocket.WebSocketException, OSError):
            pass
        finally:
            if self.ws is ws:
                self.ws = None
            for pending, _ in self.acks.values():
                pending.set_exception(ConnectionError("socket closed before the ack"))
            self.acks.clear()

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == FrameType.EVENT:
            seq = frame["seq"]
            if self.last_seq is not None and seq <= self.last_seq:
                return  # a duplicate after a reconnect overlap
            self.last_seq = seq
            text = (frame.get("data") or {}).get("text") or ""
            self._fire_ms("delivery", time.time() * 1000 - frame["ts"], len(text))
            run = frame.get("run")
            if run in self.runs:
                self._on_run_event(run, frame)
            elif run and self.acks and frame["event"] == Event.TOKEN:
                self.early_tokens.setdefault(run, time.perf_counter())
        elif kind == FrameType.RESYNC:
            self.last_seq, self.epoch = frame["seq"], frame["epoch"]
        elif kind in (FrameType.ACK, FrameType.ERROR) and frame.get("id") in self.acks:
            reply, sent_at = self.acks.pop(frame["id"])
            run = frame.get("run")
            if kind == FrameType.ACK and run:
                # Registered here, not in the task: the frames after the ack are read before the
                # task greenlet wakes up.
                self.runs[run] = sent_at
                first = self.early_tokens.pop(run, None)
                if first is not None:
                    self.first_token_seen.add(run)
                    self._fire_ms("first token", (first - sent_at) * 1000, 0)
            if not self.acks:
                self.early_tokens.clear()
            reply.set(frame)

    def _on_run_event(self, run: str, frame: dict[str, Any]) -> None:
        sent_at = self.runs[run]
        event = frame["event"]
        if event == Event.TOKEN and run not in self.first_token_seen:
            self.first_token_seen.add(run)
            self._fire("first token", sent_at)
        elif event in END_EVENTS:
            del self.runs[run]
            self.first_token_seen.discard(run)
            failure = None if event == Event.RUN_COMPLETED else RuntimeError(f"{event}: {frame['data']}")
            self._fire("answer", sent_at, failure, len(frame["data"].get("text", "")))

    # Load

    @task
    def send(self) -> None:
        if self.ws is None and not self._connect():
            return
        assert self.ws is not None
        command_id = uuid.uuid4().hex
        reply: AsyncResult = AsyncResult()
        started = time.perf_counter()
        self.acks[command_id] = (reply, started)
        try:
            self.ws.send(json.dumps({"type": FrameType.SEND, "id": command_id, "text": _TEXT}))
            frame = reply.get(timeout=_ACK_TIMEOUT_S)
        except Exception as exc:
            self.acks.pop(command_id, None)
            self._fire("ack", started, exc)
            return
        if frame["type"] == FrameType.ERROR:
            self._fire("ack", started, RuntimeError(f"{frame.get('code')}: {frame.get('message')}"))
            return
        self._fire("ack", started)

    # Reporting

    def _fire(
        self, name: str, started: float, exception: BaseException | None = None, length: int = 0
    ) -> None:
        self._fire_ms(name, (time.perf_counter() - started) * 1000, length, exception)

    def _fire_ms(self, name: str, ms: float, length: int, exception: BaseException | None = None) -> None:
        events.request.fire(  # type: ignore[no-untyped-call]
            request_type="WS", name=name, response_time=ms, response_length=length,
            exception=exception, context={"user": self.chat_user},
        )
