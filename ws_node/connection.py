"""`Connection`: one device's socket: its seq gate, its bounded outgoing queue and its writer.

The socket is read only by its handler task. A frame is written at once, straight to the
transport, when nothing is queued before it and the transport's buffer is below its high-water
mark (centrifuge's writer does the same): no task wake-up per frame, which cost a node about a
third of its CPU (issue 14). Otherwise it is queued for a writer task, the one task that awaits
the socket, which exists only while frames wait (an idle socket has no task, queue or event), so a
slow client fills its bounded queue, not the node's memory.
`deliver()` is called by the hub for every frame of the user and never awaits: it parks frames
while the connection is recovering, lets the next seq through, drops duplicates, and turns a gap
(a Pub/Sub message this node missed) into a catch-up from the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

import orjson

from common.backoff import delays_s
from common.redis_client import TRANSIENT
from fanout.broker import Broker, Position
from fanout.recovery import UNSEQUENCED, Gate, Offer, frame_seq, plan_resume
from persistence.records import RunInFlight
from protocol import CloseCode, DeviceOnline, Hello, Resync, ResyncReason, RunSnapshot, Snapshot, encode
from runs import snapshot
from ws_node import merge, wire
from ws_node.metrics import NodeStats
from ws_node.wire import WRITE_HIGH_WATER

log = logging.getLogger(__name__)
_SERIALS = itertools.count(1)


class Socket(Protocol):
    """What a connection uses of its WebSocket: aiohttp's `WebSocketResponse` or `ws_node.lean`'s
    `WireSocket`."""

    @property
    def closed(self) -> bool: ...

    async def send_str(self, data: str) -> None: ...

    async def close(self, *, code: int = ..., message: bytes = ...) -> bool: ...


class Connection:
    """A device of `user` connected to this node. Slotted, with no task, event or queue of its
    own while idle: a node holds tens of thousands of these (issue 14, memory per socket)."""

    __slots__ = (
        "_catching_up", "_context", "_parked", "_queue", "_transport", "_writer", "_writing",
        "broker", "close_code", "close_reason", "device", "epoch", "gate", "merged_token_max_chars",
        "queue_max_frames", "runs_in_flight", "serial", "stats", "user", "ws",
    )

    def __init__(
        self, ws: Socket, *, user: str, device: str, broker: Broker, queue_max_frames: int,
        runs_in_flight: Callable[[str], Awaitable[list[RunInFlight]]], stats: NodeStats,
        merged_token_max_chars: int = 65_536, transport: asyncio.Transport | None = None,
    ) -> None:
        """`transport`: the socket's transport, for writing frames at once; None when frames must
        go through aiohttp (permessage-deflate was negotiated)."""
        self._transport = transport
        self.serial = next(_SERIALS)  # this socket's number in this process, never reused
        self.stats = stats
        self._writing = False  # the writer task is between taking a frame and having written it
        self.merged_token_max_chars = merged_token_max_chars
        self.runs_in_flight = runs_in_flight
        self.ws = ws
        self.user = user
        self.device = device
        self.broker = broker
        self.queue_max_frames = queue_max_frames
        self.gate = Gate(last=0)
        self.epoch = ""
        self._queue: deque[str] | None = None  # frames waiting for the writer; made when one must wait
        # The writer task, while frames wait or a close frame is due; it runs in the context of the
        # socket's handler (its log fields), whichever task made it.
        self._writer: asyncio.Task[None] | None = None
        self._context = contextvars.copy_context()
        # Live frames parked while the connection (re)reads history; None when live.
        self._parked: list[tuple[int, str]] | None = []
        self._catching_up: asyncio.Task[None] | None = None
        self.close_code: CloseCode | None = None
        self.close_reason = ""

    # Outgoing

    def send(self, frame: str) -> None:
        """Queue one frame. When the queue is full, the tokens in it are merged (ws_node.merge);
        if that frees no room the client is too slow and gets closed (4008)."""
        if self.close_code is not None:
            return
        queue = self._queue
        if not queue and not self._writing and self._write_now(frame):
            return
        if queue is None:
            queue = self._queue = deque()
        elif len(queue) >= self.queue_max_frames:
            # Memory stays bounded: at most queue_max_frames frames of merged_token_max_chars.
            queue = self._queue = deque(merge.compact(queue, max_chars=self.merged_token_max_chars))
            if len(queue) >= self.queue_max_frames * 3 // 4:
                self.close(CloseCode.SLOW_CONSUMER, "outgoing queue full; reconnect with after")
                return
        queue.append(frame)
        self.stats.send_queue.observe(len(queue))
        self._start_writer()

    def _write_now(self, frame: str) -> bool:
        """Write `frame` as one unmasked text frame (RFC 6455) if the transport takes it at once."""
        transport = self._transport
        if transport is None or transport.is_closing() or self.ws.closed:
            return False  # nothing may follow a close frame
        if transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            return False
        data = frame.encode()
        transport.write(wire.frame(wire.Opcode.TEXT, data))
        stats = self.stats
        stats.delivered += 1
        stats.sent_bytes += len(data)
        return True

    def close(self, code: CloseCode, reason: str) -> None:
        """Close after the frames already queued (the writer sends them first)."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            if code is CloseCode.SLOW_CONSUMER:
                self.stats.slow_consumer_closes += 1
            self._start_writer()

    async def finish(self, timeout_s: float) -> None:
        """The socket is done: close it (unless it is already closing), wait up to `timeout_s`
        for the frames queued before and the close frame to go out, and stop any catch-up."""
        self.close(CloseCode.NORMAL, "bye")
        if self._writer is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._writer, timeout_s)
        if self._catching_up is not None:
            self._catching_up.cancel()

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_queued(), context=self._context)

    async def _write_queued(self) -> None:
        """The only task that awaits the socket: writes what queued, then the close frame if one
        is due, and ends; the next frame that must wait starts another."""
        queue = self._queue
        try:
            while queue:
                if self.close_code is CloseCode.SLOW_CONSUMER:
                    queue.clear()  # nothing more to a client that cannot keep up
                    break
                self._writing = True
                frame = queue.popleft()
                try:
                    await self.ws.send_str(frame)
                finally:
                    self._writing = False
                self.stats.delivered += 1
                self.stats.sent_bytes += len(frame.encode())
                queue = self._queue  # compacted meanwhile, perhaps
            if self.close_code is not None:
                await self.ws.close(code=self.close_code, message=self.close_reason.encode()[:120])
        except (ConnectionError, RuntimeError) as exc:  # peer went away mid-write
            log.debug("writer for %s/%s ended: %r", self.user, self.device, exc)
            self.close_code = CloseCode.ABNORMAL  # nothing more can be written
            self._queue = None
        finally:
            self._writer = None

    # Incoming from the hub (fanout.hub.Subscriber)

    def deliver(self, seq: int, frame: str) -> None:
        if seq == UNSEQUENCED:  # presence: no gate, never before hello, never about this device
            if orjson.loads(frame).get("device") == self.device:
                return
            if self._parked is None:
                self.send(frame)
            else:
                self._parked.append((seq, frame))
            return
        if self._parked is not None:
            self._parked.append((seq, frame))
            if len(self._parked) > self.queue_max_frames:
                self.close(CloseCode.SLOW_CONSUMER, "too far behind while recovering")
            return
        offer = self.gate.offer(seq)
        if offer is Offer.DELIVER:
            self.send(frame)
        elif offer is Offer.GAP:
            self._parked = [(seq, frame)]
            self._start_catch_up()

    def resume(self) -> None:
        if self._parked is None:
            self._parked = []
        self._start_catch_up()

    # Recovery

    async def open(self, *, after: int | None, client_epoch: str | None, node: str, heartbeat_s: int,
                   devices: tuple[DeviceOnline, ...] = ()) -> None:
        """After the hub attached this connection (frames are parked meanwhile): say hello, then
        replay history after `after`, or resync, then go live with nothing missed or doubled."""
        position = await self.broker.position(self.user)
        self.epoch = position.epoch
        self.send(encode(Hello(node=node, user=self.user, device=self.device, epoch=position.epoch,
                                 seq=position.seq, heartbeat=heartbeat_s, devices=devices)))
        plan = plan_resume(after=after, client_epoch=client_epoch, epoch=position.epoch,
                           seq=position.seq, first_seq=position.first_seq)
        outcome = "new" if after is None else plan.resync or "replayed"
        self.stats.resumes[str(outcome),] += 1
        if plan.resync is not None:
            await self._resync(plan.resync, position)
        elif plan.replay_after is not None:
            self.gate.last = plan.replay_after
            await self._replay(position)
        else:
            self.gate.last = plan.start
            await self._snapshot(position)
        self._unpark()
        if self._parked is not None:
            self._start_catch_up()

    def _start_catch_up(self) -> None:
        if self._catching_up is None or self._catching_up.done():
            self._catching_up = asyncio.create_task(self._catch_up())

    async def _catch_up(self) -> None:
        """Fill a gap from history, repeating while the parked frames still show one, and
        through Redis errors (after a restart the first command on each pooled connection
        fails): nothing else would call it again, and the device's stream would stay parked.
        Any other error closes the socket (`INTERNAL`), so the device reconnects and resumes from
        its position instead of waiting, silently, on a stream that no longer moves."""
        delays = delays_s(base_s=0.05, cap_s=2.0)
        while self._parked is not None and self.close_code is None:
            try:
                position = await self.broker.position(self.user)
                if position.epoch != self.epoch or position.seq < self.gate.last:
                    # A lost history, or one restored from an older snapshot with the same epoch
                    # (its seqs would be reused and dropped as duplicates): the position is void.
                    await self._resync(ResyncReason.EPOCH_CHANGED, position)
                else:
                    await self._replay(position)
                self._unpark()
            except TRANSIENT as exc:
                log.warning("catch-up for %s/%s failed, retrying: %r", self.user, self.device, exc)
                await asyncio.sleep(next(delays))
            except Exception:
                log.exception("catch-up for %s/%s failed; closing to resume", self.user, self.device)
                self.close(CloseCode.INTERNAL, "recovery failed; reconnect with after")

    async def _replay(self, position: Position) -> None:
        frames = await self.broker.read_after(self.user, self.gate.last, upto=position.seq)
        if frames is None:
            await self._resync(ResyncReason.HISTORY_TRIMMED, position)
            return
        for frame in frames:
            if self.gate.offer(frame_seq(frame)) is Offer.DELIVER:
                self.send(frame)

    async def _resync(self, reason: ResyncReason, position: Position) -> None:
        """The device's position is unusable: move it to `position`, with a snapshot of the runs in
        flight so it shows every answer in progress exactly (finished ones come over REST, and a
        run whose end the device skipped gets it again from the workers' sweep)."""
        self.epoch = position.epoch
        self.gate.last = position.seq
        self.send(encode(Resync(reason, seq=position.seq, epoch=position.epoch)))
        await self._snapshot(position)

    async def _snapshot(self, position: Position) -> None:
        try:
            runs = await self.runs_in_flight(self.user)
        except Exception as exc:  # Postgres away: the device still gets live events
            log.warning("no snapshot for %s/%s: %r", self.user, self.device, exc)
            return
        runs_now = await runs_as_of(self.broker, self.user, runs, position)
        self.send(encode(Snapshot(seq=position.seq, epoch=position.epoch, runs=tuple(runs_now))))

    def _unpark(self) -> None:
        """Deliver parked frames in seq order; if one still leaves a gap, stay parked from it."""
        parked = sorted(self._parked or (), key=lambda item: item[0])
        self._parked = None
        for index, (seq, frame) in enumerate(parked):
            if seq == UNSEQUENCED:  # sorted first
                self.send(frame)
                continue
            offer = self.gate.offer(seq)
            if offer is Offer.GAP:
                self._parked = parked[index:]
                return
            if offer is Offer.DELIVER:
                self.send(frame)


async def runs_as_of(
    broker: Broker, user: str, runs: list[RunInFlight], position: Position
) -> list[RunSnapshot]:
    """`runs` (in flight, from Postgres) with their text exact as of `position.seq`: each one's
    checkpoint plus its events in the history after it (`runs.snapshot`); a run that cannot be
    made exact is left out."""
    after = snapshot.scan_after(runs, epoch=position.epoch, seq=position.seq, first_seq=position.first_seq)
    events = []
    if after is not None and after < position.seq:
        frames = await broker.read_after(user, after, upto=position.seq)
        if frames is None:
            after = None
        else:
            events = [orjson.loads(f) for f in frames if frame_seq(f) <= position.seq]
    return snapshot.build(runs, events, epoch=position.epoch, seq=position.seq, first_seq=position.first_seq,
                          scanned_after=after)
