"""Runs over HTTP, for clients that cannot hold a WebSocket (docs/protocol.md, "Runs over HTTP").

    POST /v1/conversations/{id}/messages   a `send`: the same validation, idempotency and errors
    GET  /v1/runs/{id}                     the run as Postgres has it
    POST /v1/runs/{id}/cancel              a `cancel`
    GET  /v1/runs/{id}/events              the run's events as Server-Sent Events

The commands take the WebSocket's own path (`ws_node.commands`), so both transports accept, refuse
and deduplicate alike. An event stream is one more subscriber of the node's hub (`RunStream`),
recovered the way a socket is (`ws_node.connection`): attached first, live frames parked while the
history is read, then released through the same seq gate, so nothing is missed or doubled at the
seam. It keeps only its run's frames, and it is the handler's task, the only one writing the
response, that reads history, so a stream that ends leaves no task behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from typing import Any

import orjson
from aiohttp import web

import protocol
from common.backoff import delays_s
from common.redis_client import TRANSIENT
from fanout.broker import Position
from fanout.hub import Unavailable as HubUnavailable
from fanout.recovery import UNSEQUENCED, Gate, Offer, frame_seq, plan_resume
from persistence.records import RunInFlight, RunView
from persistence.store import NotFound
from protocol import Ack, Cancel, ErrorCode, ProtocolError, Respond, ResyncReason, Send
from protocol.frames import to_json
from protocol.vocabulary import END_EVENTS, FrameType, RunStatus
from ws_node import commands
from ws_node.auth import IDENTITY
from ws_node.connection import runs_as_of
from ws_node.limits import Bucket, Decision
from ws_node.rest import RestError, json_body, json_response
from ws_node.services import ADMISSION, SERVICES, Services

log = logging.getLogger(__name__)
DEVICE = "http"  # the device named in `message.created` and a cancel's `by` for what HTTP sends
HEARTBEAT_S = 15.0  # a `: ping` comment after this long without a write: proxies keep the stream open
POLL_S = 1.0  # how often an idle stream checks that its client is still there and the node not draining
# X-Accel-Buffering: nginx passes each event on at once instead of buffering the response.
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
WRITE_TIMEOUT_S = 30.0  # a client that takes no bytes for this long is gone
_STATUS = {
    ErrorCode.BAD_REQUEST: 400, ErrorCode.UNAUTHORIZED: 401, ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404, ErrorCode.CONFLICT: 409, ErrorCode.TOO_LARGE: 413, ErrorCode.RATE_LIMITED: 429,
    ErrorCode.OVERLOADED: 503, ErrorCode.UNAVAILABLE: 503, ErrorCode.AGENT_UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}


class RunStream:
    """A hub subscriber keeping one run's frames for one SSE response. `deliver` never awaits: it
    parks frames while the stream reads history, gates them by the user's seq, keeps the run's
    and wakes the writer. At most `max_frames` wait; past that the client is too slow, the stream
    ends (`overflowed`) and the client resumes with `Last-Event-ID`."""

    def __init__(self, user: str, run: str, *, max_frames: int) -> None:
        self.user = user
        self.run = run
        self.max_frames = max_frames
        self.gate = Gate(last=0)
        self.epoch = ""
        self.parked: list[tuple[int, str]] | None = []  # None when live
        self.ready: deque[tuple[int, str, str]] = deque()  # (seq, event name, data) to write
        self.overflowed = False
        self.finished = False  # a resync told the run's end: nothing follows
        self.wake = asyncio.Event()
        self._needle = '"run":' + orjson.dumps(run).decode()  # cheap test before parsing a frame

    def deliver(self, seq: int, frame: str) -> None:
        if seq == UNSEQUENCED or self.overflowed:  # presence is no run's
            return
        if self.parked is not None:
            self.parked.append((seq, frame))
            if len(self.parked) > self.max_frames:
                self._overflow()
            return
        offer = self.gate.offer(seq)
        if offer is Offer.DELIVER:
            self._keep(seq, frame)
        elif offer is Offer.GAP:  # a Pub/Sub message missed: the writer fills it from history
            self.parked = [(seq, frame)]
            self.wake.set()

    def resume(self) -> None:
        if self.parked is None:
            self.parked = []
        self.wake.set()

    def replayed(self, frames: list[str]) -> None:
        """History read for this stream: kept whatever their number (they are in memory already,
        and a long run's history is over any bound: bounding it would end the stream before its
        first event, on every attempt)."""
        for frame in frames:
            seq = frame_seq(frame)
            if self.gate.offer(seq) is Offer.DELIVER:
                self._keep(seq, frame, bounded=False)

    def unpark(self) -> None:
        """Release parked frames in seq order; if one still leaves a gap, stay parked from it."""
        parked = sorted(self.parked or (), key=lambda item: item[0])
        self.parked = None
        for index, (seq, frame) in enumerate(parked):
            offer = self.gate.offer(seq)
            if offer is Offer.GAP:
                self.parked = parked[index:]
                self.wake.set()
                return
            if offer is Offer.DELIVER:
                self._keep(seq, frame)

    def resynced(self, seq: int, data: dict[str, Any], *, ended: bool) -> None:
        self.ready.append((seq, FrameType.RESYNC, orjson.dumps(data).decode()))
        self.finished = ended
        self.wake.set()

    def _keep(self, seq: int, frame: str, *, bounded: bool = True) -> None:
        if self._needle not in frame:
            return
        body = orjson.loads(frame)
        if body.get("run") != self.run:
            return
        if bounded and len(self.ready) >= self.max_frames:
            self._overflow()
            return
        self.ready.append((seq, body["event"], frame))
        self.wake.set()

    def _overflow(self) -> None:
        self.overflowed = True
        self.parked = None
        self.ready.clear()
        self.wake.set()


async def post_message(request: web.Request) -> web.Response:
    """A `send` to the conversation in the path: 201 with the ack, 200 with the same ack again."""
    svc, user = await _command(request)
    body = await json_body(request)
    if not isinstance(body.get("id"), str):
        raise RestError(400, "bad_request", "body must be a JSON object with an id (the idempotency key)")
    frame = {**body, "type": FrameType.SEND, "conversation": request.match_info["id"]}
    try:  # the `send` frame's own parser: the same checks, the same codes
        cmd = protocol.parse_command(orjson.dumps(frame).decode(), max_text_chars=svc.settings.max_text_chars)
        assert isinstance(cmd, Send)
        record, seq = await commands.accept_send(svc, user, DEVICE, cmd)
    except ProtocolError as exc:
        raise _refusal(exc) from None
    ack = Ack(cmd.id, conversation=record.conversation, message=record.message, run=record.run, seq=seq)
    return json_response(to_json(ack), 200 if record.seq is not None else 201)


async def get_run(request: web.Request) -> web.Response:
    svc, user = _identity(request)
    view = await svc.store.run_view(user, _run_id(request))
    return json_response(view.to_json())


async def cancel_run(request: web.Request) -> web.Response:
    """A `cancel`: 200 when the run is already cancelled (no worker had it), 202 when its worker
    is stopping it (its `run.cancelled` follows on the stream)."""
    svc, user = await _command(request)
    run = _run_id(request)
    try:
        await commands.cancel_run(svc, user, DEVICE, Cancel(id=None, run=run))
    except ProtocolError as exc:
        raise _refusal(exc) from None
    view = await svc.store.run_view(user, run)
    return json_response({**to_json(Ack(None, run=run)), "status": view.status}, 200 if view.ended else 202)


async def post_input(request: web.Request) -> web.Response:
    """A `respond`: the answer `{"request", "text"}` to the question the run waits on (its
    `run.input_required`); 200 with the ack, also when repeated. The first answer from any device
    counts; a later one is 409 `conflict`."""
    svc, user = await _command(request)
    frame = {**await json_body(request), "type": FrameType.RESPOND, "run": _run_id(request)}
    try:  # the `respond` frame's own parser and path
        cmd = protocol.parse_command(orjson.dumps(frame).decode(), max_text_chars=svc.settings.max_text_chars)
        assert isinstance(cmd, Respond)
        await commands.respond_run(svc, user, DEVICE, cmd)
    except ProtocolError as exc:
        raise _refusal(exc) from None
    return json_response(to_json(Ack(cmd.id, run=cmd.run, request=cmd.request)))


async def run_events(request: web.Request) -> web.StreamResponse:
    """The run's events as Server-Sent Events, from its first event still in history (or after
    `Last-Event-ID` / `?after=`), live until its end event."""
    svc, user = _identity(request)
    view = await svc.store.run_view(user, _run_id(request))
    after = _after(request)
    if svc.draining:
        raise RestError(503, "unavailable", "node draining; connect again")
    admitted = request.app[ADMISSION].connections.take()  # the node's new-connection rate, as for /ws
    if not admitted.allowed:
        svc.stats.rate_limited["connections",] += 1
        raise _refusal(ProtocolError(ErrorCode.RATE_LIMITED, "too many new connections; retry later",
                                     retry_after_ms=admitted.retry_after_ms))
    stream = RunStream(user, view.run, max_frames=svc.settings.queue_max_frames)
    try:
        await svc.hub.attach(stream)  # first: what is published from now on is parked, not missed
    except HubUnavailable:
        raise RestError(503, "unavailable", "stream unavailable; retry") from None
    try:
        await _open(svc, stream, view, after)
        if view.ended and not stream.ready and stream.parked is None and not stream.finished:
            # The client already has the end (an EventSource reconnects by itself after the stream
            # ends): 204 tells it to stop, rather than a stream that would only ever ping.
            return web.Response(status=204)
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        if await _follow(svc, request, response, stream):
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write_eof()
        return response
    finally:
        await asyncio.gather(svc.hub.detach(stream), return_exceptions=True)


async def _open(svc: Services, stream: RunStream, view: RunView, after: int | None) -> None:
    """Where the stream starts: after `after`, or before the run's `message.created`, whichever
    is later (nothing of the run comes before it); replayed from history, or a resync."""
    position = await svc.broker.position(stream.user)
    stream.epoch = position.epoch
    start = view.message_seq - 1 if view.message_seq is not None else 0
    if after is not None:
        start = max(after, start) if after <= position.seq else after  # ahead: the epoch changed
    plan = plan_resume(after=start, client_epoch=None, epoch=position.epoch, seq=position.seq,
                       first_seq=position.first_seq)
    if plan.resync is not None:
        await _resync(svc, stream, plan.resync, position)
    elif plan.replay_after is not None:
        stream.gate.last = plan.replay_after
        await _replay(svc, stream, position)
    else:
        stream.gate.last = plan.start
    stream.unpark()


async def _replay(svc: Services, stream: RunStream, position: Position) -> None:
    frames = await svc.broker.read_after(stream.user, stream.gate.last, upto=position.seq)
    if frames is None:
        await _resync(svc, stream, ResyncReason.HISTORY_TRIMMED, position)
    else:
        stream.replayed(frames)


async def _resync(svc: Services, stream: RunStream, reason: ResyncReason, position: Position) -> None:
    """The history no longer holds what follows the client's position: move it to `position`, with
    the run's status and its text as of it (read after the position, and Postgres stores a run's
    end before its end event is published, so an end at or before `position` shows here)."""
    stream.epoch = position.epoch
    stream.gate.last = position.seq
    view = await svc.store.run_view(stream.user, stream.run)
    text = view.text if view.ended else await _text_as_of(svc, stream.user, view, position)
    stream.resynced(position.seq, {"type": FrameType.RESYNC, "reason": reason, "seq": position.seq,
                                   "epoch": position.epoch, "run": view.run, "status": view.status,
                                   "text": text}, ended=view.ended)


async def _text_as_of(svc: Services, user: str, view: RunView, position: Position) -> str:
    """A run's text as of `position.seq` (running, paused, or queued again after its answer): its
    checkpoint plus its events in history after it (`runs.snapshot`, as a socket's snapshot); the
    checkpoint alone when that cannot be exact. Nothing for a run that has not begun."""
    if view.status == RunStatus.WAITING or (view.status == RunStatus.QUEUED and view.partial_seq is None):
        return ""
    runs = [RunInFlight(run=view.run, conversation=view.conversation, status=view.status, partial=view.text,
                        partial_seq=view.partial_seq, partial_epoch=view.partial_epoch)]
    built = await runs_as_of(svc.broker, user, runs, position)
    return built[0].text if built else view.text


async def _follow(
    svc: Services, request: web.Request, response: web.StreamResponse, stream: RunStream
) -> bool:
    """Write the stream's events until the run's end (True), or until the client is gone, too
    slow, or the node drains (False: the client resumes with `Last-Event-ID`, elsewhere)."""
    loop = asyncio.get_running_loop()
    last_write = loop.time()
    delays = delays_s(base_s=0.05, cap_s=2.0)
    while True:
        stream.wake.clear()
        if stream.parked is not None and not stream.overflowed:
            try:
                await _catch_up(svc, stream)
            except TRANSIENT as exc:  # Redis away: try again, while the client waits
                log.warning("catch-up of run %s for %s failed, retrying: %r", stream.run, stream.user, exc)
                await asyncio.sleep(next(delays))
        while stream.ready:
            seq, event, data = stream.ready.popleft()
            if not await _write(response, f"id: {seq}\nevent: {event}\ndata: {data}\n\n"):
                return False
            last_write = loop.time()
            if event in END_EVENTS:
                return True
        if stream.finished:
            return True
        if stream.overflowed or svc.draining or _gone(request):
            return False
        if loop.time() - last_write >= HEARTBEAT_S:
            if not await _write(response, ": ping\n\n"):
                return False
            last_write = loop.time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stream.wake.wait(), POLL_S)


async def _catch_up(svc: Services, stream: RunStream) -> None:
    """Fill a gap (or what a Pub/Sub reconnect may have lost) from history, as a socket does."""
    position = await svc.broker.position(stream.user)
    if position.epoch != stream.epoch or position.seq < stream.gate.last:
        await _resync(svc, stream, ResyncReason.EPOCH_CHANGED, position)
    else:
        await _replay(svc, stream, position)
    stream.unpark()


async def _write(response: web.StreamResponse, text: str) -> bool:
    try:
        await asyncio.wait_for(response.write(text.encode()), WRITE_TIMEOUT_S)
    except (ConnectionError, RuntimeError, TimeoutError):
        return False
    return True


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _identity(request: web.Request) -> tuple[Services, str]:
    if IDENTITY not in request:
        raise RestError(401, "unauthorized", "missing or invalid token")
    return request.app[SERVICES], request[IDENTITY].user


async def _command(request: web.Request) -> tuple[Services, str]:
    """The identity, held to the user's command rate, the one every node applies to a socket's
    commands too (one bucket per user in Redis)."""
    svc, user = _identity(request)
    try:
        allowed = await request.app[ADMISSION].commands.take(user)
    except TRANSIENT:  # fails open, as for a socket: the command then fails on its own
        allowed = Decision(True, 0, Bucket(0, 0))
    if not allowed.allowed:
        svc.stats.rate_limited["commands",] += 1
        raise _refusal(ProtocolError(ErrorCode.RATE_LIMITED, "too many commands; slow down",
                                     retry_after_ms=allowed.retry_after_ms))
    return svc, user


def _refusal(exc: ProtocolError) -> RestError:
    """A command's `error` as a REST error: the same code, its HTTP status, `Retry-After` when
    waiting helps."""
    refused = RestError(_STATUS[exc.code], exc.code, exc.message)
    if exc.retry_after_ms:
        refused.response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_ms / 1000)))
    return refused


def _run_id(request: web.Request) -> str:
    """The path's run id; one that cannot exist (NUL, control characters) is simply not found."""
    value = request.match_info["id"]
    if not value.isprintable() or len(value) > 128:
        raise NotFound(f"run {value[:40]!r}")
    return value


def _after(request: web.Request) -> int | None:
    """The client's position: `Last-Event-ID` (an EventSource sends it when it reconnects, to the
    URL it first used) over `?after=`."""
    raw = request.headers.get("Last-Event-ID") or request.query.get("after")
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise RestError(400, "bad_request", "Last-Event-ID and after must be a seq (a non-negative integer)")
    return int(raw)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/conversations/{id}/messages", post_message)
    app.router.add_get("/v1/runs/{id}", get_run)
    app.router.add_post("/v1/runs/{id}/cancel", cancel_run)
    app.router.add_post("/v1/runs/{id}/input", post_input)
    app.router.add_get("/v1/runs/{id}/events", run_events)
