"""Locust load for Chorus: each Locust user is a PERSON with two devices on different nodes, and the
correctness oracle (`loadtest/oracle.py`) judges every run inside Locust.

A person holds one WebSocket per device (`websocket-client`, made cooperative by Locust's gevent
patching), each with its own reader greenlet that also reconnects it, resuming with `after`/`epoch`,
on the Python client's schedule (`chorus_client.policy`: the close-code and handshake tables, jittered
backoff, a fresh token after 4001; the client itself is asyncio, Locust's users are greenlets, so
the transport here is gevent's). The person's task sends a message from one device (alternating), waits for
the run's end on every device, reads the stored answer over REST, and judges the run: no gap,
duplicate or resync on any device's seq gate; exactly one end event per device; the devices'
transcripts identical; the shown text (`protocol.shown_text`) equal to the end event's text and to
the stored answer. Reported as:

    ORACLE run       one entry per run judged; a failure names the failed checks (gap, duplicate,
                     resync, end, diverged, end text, stored, unverified); details go to the log
    ORACLE stream    a fault on a device's stream that no later run of the person took (at stop)
    WS connect       open a socket until `hello` (each reconnect too)
    WS ack           `send` until its `ack` (retried with the same id across a reconnect)
    WS first token   `send` until the sending device got the run's first `token`
    WS answer        `send` until the sending device got the run's end (`run.failed` and
                     `run.cancelled` are failures)
    WS delivery      publisher's `ts` to arrival, per event accepted (ms; one clock on loopback)
    REST messages    the stored-answer read

Locust exits with 1 when any run failed the oracle (whatever `--exit-code-on-error` says).

Environment:

    CHORUS_TOKEN_SECRET        HS256 secret the nodes verify (the cluster's AUTH_JWT_SECRET); required
    CHORUS_NODE_URLS           comma-separated node URLs, e.g. ws://127.0.0.1:P1,ws://127.0.0.1:P2
                               (`python -m loadtest.cluster` prints the line): device i of the k-th
                               person of a process goes to node (k + i) mod n, so a person's devices
                               are on different nodes. Unset: every device uses --host (nginx).
                               REST goes to the sending device's node.
    CHORUS_DEVICES_PER_PERSON  devices per person (default 2)
    CHORUS_SEND_EVERY_S        mean seconds between a person's runs (default 30); the first send
                               falls uniformly within one such interval
    CHORUS_RUN_TIMEOUT_S       how long a run may take to end on every device (default 120)
    CHORUS_TEXT                the message text (default asks for a short answer)
    CHORUS_USER_PREFIX         Chorus user ids are <prefix>-<uuid4 hex> (default "locust"): unique
                               per person in every process and on every machine

Headless, with reports (the CSV's and the HTML's `ORACLE,run` row counts the runs judged and
failed; the CSV is rewritten every second, so `--json-file` is the exact final figure):

    AUTH_JWT_SECRET=$(openssl rand -hex 32) WORKER_CONCURRENCY=100 python -m loadtest.cluster
    # in another shell, with the same secret and the CHORUS_NODE_URLS line the cluster printed
    CHORUS_TOKEN_SECRET=... CHORUS_NODE_URLS=ws://127.0.0.1:P1/ws,ws://127.0.0.1:P2/ws \
        locust -f loadtest/locustfile.py --headless -u 100 -r 20 -t 5m --stop-timeout 60 \
        --csv out/chorus --html out/chorus.html --json-file out/chorus

`--stop-timeout` lets each person finish (and judge) the run in flight when the time is up.

Distributed: `--processes N` (-1: one per core) forks N workers under a master on this machine; on
several machines run `locust -f loadtest/locustfile.py --master --headless --expect-workers W -u
... --csv ...` on one and `locust -f loadtest/locustfile.py --worker --master-host HOST` on each
other (same environment everywhere). User ids come from uuid4 in each person, so they never
collide across processes or machines. Leave `--stop-timeout` at 0 there: the master waits only
0.5 s for its workers' last stats after the quit, and a worker that first let its persons finish
their runs would report them too late (runs cut off by the stop are not judged, not failed).

File descriptors: one per socket (10,000 for 5,000 persons) plus one per REST call in flight.
Locust raises a soft limit below 10,000 to 10,000 and no further, so raise `ulimit -n` yourself
(this machine's cap is 20,000 per process) or split the persons with `--processes`. A node holds
one descriptor per socket; nginx two per proxied socket, which is why the 10,000-socket run
connects the devices to the nodes directly (CHORUS_NODE_URLS): see docs/performance.md.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import gevent
import jwt
import websocket
from chorus_client.policy import Action, Reconnects, close_action, handshake_action
from gevent.event import AsyncResult
from gevent.event import Event as Signal
from locust import User, between, events, task
from locust.env import Environment

from loadtest.oracle import UNVERIFIED, DeviceLog, Failure, judge
from protocol import END_EVENTS, Event, FrameType, Role

log = logging.getLogger("chorus.locust")

_CONNECT_TIMEOUT_S = 10.0
_ACK_TIMEOUT_S = 30.0
_REST_TIMEOUT_S = 10.0
_N = TypeVar("_N", int, float)


@dataclass(frozen=True)
class LoadSettings:
    """The locustfile's environment, read once at import (each key is named in its error)."""

    secret: str
    node_urls: tuple[str, ...]
    devices: int
    send_every_s: float
    run_timeout_s: float
    text: str
    user_prefix: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> LoadSettings:
        secret = env.get("CHORUS_TOKEN_SECRET", "")
        if len(secret) < 16:
            raise RuntimeError("CHORUS_TOKEN_SECRET: the cluster's AUTH_JWT_SECRET (16+ characters)")
        urls = tuple(_ws_base(u.strip()) for u in env.get("CHORUS_NODE_URLS", "").split(",") if u.strip())
        return cls(
            secret=secret,
            node_urls=urls,
            devices=_number(env, "CHORUS_DEVICES_PER_PERSON", "2", int, low=1),
            send_every_s=_number(env, "CHORUS_SEND_EVERY_S", "30", float, low=0),
            run_timeout_s=_number(env, "CHORUS_RUN_TIMEOUT_S", "120", float, low=1),
            text=env.get("CHORUS_TEXT", "Load test: please answer briefly."),
            user_prefix=env.get("CHORUS_USER_PREFIX", "locust"),
        )


def _number(env: Mapping[str, str], key: str, default: str, kind: Callable[[str], _N], *, low: float) -> _N:
    try:
        value = kind(env.get(key, default))
    except ValueError:
        raise RuntimeError(f"{key}: not a number: {env.get(key)!r}") from None
    if value < low:
        raise RuntimeError(f"{key}: must be at least {low}")
    return value


def _ws_base(url: str) -> str:
    """`ws://host:port` or `.../ws` -> the `/ws` endpoint."""
    url = url.rstrip("/")
    return url if url.endswith("/ws") else f"{url}/ws"


def _rest_base(ws_url: str) -> str:
    """The REST base of the node (or nginx) behind a WebSocket URL."""
    base = ws_url.removesuffix("/ws")
    return "https" + base[3:] if base.startswith("wss") else "http" + base[2:]


SETTINGS = LoadSettings.from_env(os.environ)
_persons = itertools.count()  # per process: only spreads devices over nodes, never an id
_oracle_failures = 0  # this process's runs that failed the oracle (a worker's stats are reset)
# No proxy for loopback REST calls, even when the shell has http_proxy set.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _fire(name: str, ms: float, *, kind: str = "WS", length: int = 0,
          exception: BaseException | None = None, user: str = "") -> None:
    events.request.fire(  # type: ignore[no-untyped-call]
        request_type=kind, name=name, response_time=ms, response_length=length,
        exception=exception, context={"user": user},
    )


def _since_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


class Device:
    """One device of a person: its socket, its seq gate (`log`), and a greenlet that reads it and
    reconnects it until `close`."""

    def __init__(self, person: ChorusPerson, index: int, ws_url: str) -> None:
        self.person = person
        self.name = f"d{index}"
        self.ws_url = ws_url
        self.rest_url = _rest_base(ws_url)
        self.log = DeviceLog(self.name)
        # The Python client's reconnect schedule and close-code tables (chorus_client.policy), so a
        # Locust device reconnects, renews or gives up as every client must (docs/protocol.md).
        self.reconnects = Reconnects()
        self._ended: tuple[Action, int | None] = (Action.BACKOFF, None)  # how the last attempt ended
        self.epoch: str | None = None
        self.ws: websocket.WebSocket | None = None
        self.connected = Signal()
        self._greenlet: gevent.Greenlet | None = None
        self._closing = False

    def start(self) -> None:
        """Connect once now (so the person starts with its sockets open), then keep it connected."""
        self.connect()
        self._greenlet = gevent.spawn(self._keep_connected)

    def close(self) -> None:
        self._closing = True
        if self._greenlet is not None:
            self._greenlet.kill(block=False)
        if self.ws is not None:
            self.ws.close()

    def connect(self) -> bool:
        started = time.perf_counter()
        url = f"{self.ws_url}?access_token={self.person.token}&device={self.name}"
        if self.log.last_seq is not None and self.epoch:
            url += f"&after={self.log.last_seq}&epoch={self.epoch}"
        try:
            ws = websocket.create_connection(url, timeout=_CONNECT_TIMEOUT_S)
            hello = json.loads(ws.recv())
            if hello.get("type") != FrameType.HELLO:
                ws.close()
                raise ConnectionError(f"first frame was {hello.get('type')!r}, not hello")
        except Exception as exc:
            self._ended = (Action.BACKOFF, None)
            if isinstance(exc, websocket.WebSocketBadStatusException):
                self._ended = (handshake_action(exc.status_code), exc.status_code)
                # Its text carries the response headers (a Date among them): one failure row each.
                exc = ConnectionError(f"handshake status {exc.status_code}")
            _fire("connect", _since_ms(started), exception=exc, user=self.person.user)
            return False
        self.reconnects.connected()
        ws.settimeout(None)  # the reader blocks (cooperatively) until a frame or a close
        self.log.position(hello["seq"])
        self.epoch = self.epoch or hello["epoch"]
        self.ws = ws
        self.connected.set()
        _fire("connect", _since_ms(started), user=self.person.user)
        return True

    def _keep_connected(self) -> None:
        while not self._closing:
            if self.ws is None:
                action, code = self._ended
                step = self.reconnects.after(action, code, renewable=True)
                if step.delay_s is None:  # e.g. 1000, 1008, or tokens refused again and again
                    _fire("connect", 0.0, exception=ConnectionError(step.why), user=self.person.user)
                    return
                gevent.sleep(step.delay_s)
                if step.renew:
                    self.person.renew_token()
                if not self.connect():
                    continue
            assert self.ws is not None
            self._read(self.ws)

    def _read(self, ws: websocket.WebSocket) -> None:
        code = None  # no close frame: the connection dropped (1006)
        try:
            while True:
                opcode, data = ws.recv_data(control_frame=True)  # pings are answered by the library
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                    break
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    self._on_frame(json.loads(data))
        except (websocket.WebSocketException, OSError):
            pass
        finally:
            self._ended = (close_action(code), code)
            self.connected.clear()
            self.ws = None
            ws.close()
            self.person.on_dropped(self)

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == FrameType.EVENT:
            accepted = self.log.accept(frame, time.perf_counter())
            if accepted is not None:
                text = (frame.get("data") or {}).get("text") or ""
                _fire("delivery", time.time() * 1000 - frame["ts"], length=len(text), user=self.person.user)
                self.person.changed.set()
        elif kind == FrameType.RESYNC:
            self.log.resync(frame)
            self.epoch = frame["epoch"]
            self.person.changed.set()
        elif kind in (FrameType.ACK, FrameType.ERROR):
            self.person.on_reply(frame)
        # snapshot: sent to a device without a position, i.e. before this person's first send


class ChorusPerson(User):
    """A person: CHORUS_DEVICES_PER_PERSON devices on different nodes, one run at a time, every run
    judged by the oracle."""

    wait_time = between(0.5 * SETTINGS.send_every_s, 1.5 * SETTINGS.send_every_s)

    def on_start(self) -> None:
        number = next(_persons)
        # uuid4 (from os.urandom) after the fork: distinct in every --processes child and on every
        # machine, unlike a module-level id or counter, which forked children all share.
        self.user = f"{SETTINGS.user_prefix}-{uuid.uuid4().hex}"
        self.renew_token()
        nodes = SETTINGS.node_urls or (_ws_base(self.host or ""),)
        self.devices = [Device(self, i, nodes[(number + i) % len(nodes)]) for i in range(SETTINGS.devices)]
        self.changed = Signal()  # set by the readers on every accepted event
        self.replies: dict[str, tuple[AsyncResult, Device]] = {}  # command id -> its reply, its device
        self.sends = 0
        for device in self.devices:
            device.start()
        # Spread the first sends over one interval, so -r 100 does not mean 100 sends per second.
        gevent.sleep(random.uniform(0, SETTINGS.send_every_s))

    def renew_token(self) -> None:
        """A token for a day (its devices get a fresh one when a node refuses it: 4001 or 401)."""
        claims = {"sub": self.user, "exp": int(time.time()) + 24 * 3600}
        self.token = jwt.encode(claims, SETTINGS.secret, "HS256")

    def on_stop(self) -> None:
        for device in self.devices:
            device.close()
        faults = [f for device in self.devices for f in device.log.take_faults()]
        if faults:
            _fail_oracle("stream", faults, self.user, "")

    # Reader callbacks

    def on_reply(self, frame: dict[str, Any]) -> None:
        pending = self.replies.pop(frame.get("id") or "", None)
        if pending is not None:
            pending[0].set(frame)

    def on_dropped(self, device: Device) -> None:
        for command, (reply, on) in list(self.replies.items()):
            if on is device:
                del self.replies[command]
                reply.set_exception(ConnectionError("socket closed before the reply"))

    # Load

    @task
    def chat(self) -> None:
        sender = self.devices[self.sends % len(self.devices)]
        self.sends += 1
        started = time.perf_counter()
        ack = self._send(sender, started)
        if ack is None:
            return
        run = ack["run"]
        ended = self._wait_until(lambda: all(d.log.ended(run) for d in self.devices), SETTINGS.run_timeout_s)
        self._report_latencies(sender, run, started)
        faults = [f for device in self.devices for f in device.log.take_faults()]
        stored: str | None = None
        if ended:
            try:
                stored = self._stored_answer(sender, ack["conversation"], run)
            except Exception as exc:
                faults.append(Failure(UNVERIFIED, f"REST: {exc!r}"))
        verdict = judge(run, {d.name: [a.frame for a in d.log.of(run)] for d in self.devices},
                        stored=stored, faults=faults)
        for device in self.devices:
            device.log.clear()
        if verdict.ok:
            _fire("run", _since_ms(started), kind="ORACLE", length=len(verdict.shown), user=self.user)
        else:
            _fail_oracle("run", list(verdict.failures), self.user, run, _since_ms(started))

    def _send(self, device: Device, started: float) -> dict[str, Any] | None:
        """Send a new message from `device` and return its ack; retried with the same id (the
        idempotency key) while the socket is down or drops before the ack. None: failed, reported."""
        command = uuid.uuid4().hex
        frame = json.dumps({"type": FrameType.SEND, "id": command, "text": SETTINGS.text})
        deadline = started + _ACK_TIMEOUT_S
        answer = None
        while answer is None and time.perf_counter() < deadline:
            try:
                answer = self._attempt(device, command, frame, deadline)
            except gevent.Timeout:
                break
        if answer is None:
            error: BaseException = TimeoutError(f"no ack in {_ACK_TIMEOUT_S:g} s")
        elif answer["type"] == FrameType.ERROR:
            error = RuntimeError(f"{answer.get('code')}: {answer.get('message')}")
        else:
            _fire("ack", _since_ms(started), user=self.user)
            return answer
        _fire("ack", _since_ms(started), exception=error, user=self.user)
        return None

    def _attempt(self, device: Device, command: str, frame: str, deadline: float) -> dict[str, Any] | None:
        """One try: the reply, or None when the socket was down (after waiting for it, bounded)
        or dropped before the reply; gevent.Timeout when no reply came by `deadline`."""
        ws = device.ws
        if ws is None:
            device.connected.wait(max(0.0, deadline - time.perf_counter()))
            return None
        reply: AsyncResult = AsyncResult()
        self.replies[command] = (reply, device)
        try:
            ws.send(frame)
            answer: dict[str, Any] = reply.get(timeout=max(0.0, deadline - time.perf_counter()))
            return answer
        except (ConnectionError, websocket.WebSocketException, OSError):
            gevent.sleep(0.05)  # a send that failed at once: let the reader see the close first
            return None
        finally:
            self.replies.pop(command, None)

    def _wait_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.perf_counter() + timeout_s
        while True:
            self.changed.clear()
            if done():
                return True
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or not self.changed.wait(remaining):
                return done()

    def _report_latencies(self, sender: Device, run: str, started: float) -> None:
        events_of_run = sender.log.of(run)
        token = next((a for a in events_of_run if a.frame["event"] == Event.TOKEN), None)
        if token is not None:
            _fire("first token", (token.at - started) * 1000, user=self.user)
        end = next((a for a in events_of_run if a.frame["event"] in END_EVENTS), None)
        if end is None:
            _fire("answer", _since_ms(started), exception=TimeoutError("no end event"), user=self.user)
            return
        failure = None
        if end.frame["event"] != Event.RUN_COMPLETED:
            failure = RuntimeError(f"{end.frame['event']}: {end.frame['data'].get('code', '')}")
        _fire("answer", (end.at - started) * 1000, exception=failure,
              length=len(end.frame["data"].get("text", "")), user=self.user)

    def _stored_answer(self, device: Device, conversation: str, run: str) -> str | None:
        """The content of the run's assistant message, read from the sender's node over REST."""
        started = time.perf_counter()
        request = urllib.request.Request(
            f"{device.rest_url}/v1/conversations/{conversation}/messages?limit=50",
            headers={"Authorization": f"Bearer {self.token}"},
        )
        try:
            with _OPENER.open(request, timeout=_REST_TIMEOUT_S) as response:
                body = json.load(response)
        except Exception as exc:
            _fire("messages", _since_ms(started), kind="REST", exception=exc, user=self.user)
            raise
        _fire("messages", _since_ms(started), kind="REST", user=self.user)
        for message in body["messages"]:
            if message["role"] == Role.ASSISTANT and message["run"] == run:
                return str(message["content"])
        return None


def _fail_oracle(name: str, failures: list[Failure], user: str, run: str, ms: float = 0.0) -> None:
    global _oracle_failures
    _oracle_failures += 1
    kinds = ", ".join(sorted({f.kind for f in failures}))
    log.error("oracle: %s %s of %s failed: %s", name, run, user, "; ".join(map(str, failures)))
    # The failure's text is only the kinds, so Locust's failure table counts them instead of
    # listing every run.
    _fire(name, ms, kind="ORACLE", exception=AssertionError(kinds), user=user)


def _exit_code(environment: Environment, **_: Any) -> None:
    """Exit 1 when anything failed the oracle: this process's own count (a worker's), or the
    aggregated stats (the master's, or a standalone run's)."""
    aggregated = sum(e.num_failures for (_, kind), e in environment.stats.entries.items() if kind == "ORACLE")
    failed = max(_oracle_failures, aggregated)
    if failed:
        log.error("oracle: %d run(s) failed; exiting with 1", failed)
        environment.process_exit_code = 1


events.quitting.add_listener(_exit_code)  # type: ignore[no-untyped-call]
