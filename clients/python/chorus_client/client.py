"""ChorusClient: one device of one user. One task keeps one WebSocket open (reconnecting with
jittered backoff and its `after`/`epoch`), passes every event through the seq gate into the store,
resends commands with the same id until they are answered, renews the token in place and reloads
from REST when told to `resync`. The contract is docs/protocol.md; the JavaScript SDK
(clients/js/src/client.js) follows the same rules, cited where they are applied.

The socket is read only by that task; commands are written from the callers' tasks (aiohttp
serialises the writes of one socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import urlencode

import aiohttp

from chorus_client import policy
from chorus_client.commands import Outbox, Pending, new_id
from chorus_client.emitter import Emitter, Subscription
from chorus_client.errors import ChorusError, ClientClosed, CommandTimeout
from chorus_client.events import (
    ClientEvent,
    Connected,
    ConnectionState,
    Disconnected,
    ErrorReported,
    EventReceived,
    FrameReceived,
    Reloaded,
    Resynced,
    SeqGap,
    SnapshotApplied,
    StateChanged,
)
from chorus_client.gate import Position, SeqGate
from chorus_client.models import Conversation, Message
from chorus_client.rest import RestClient, rest_base
from chorus_client.store import Store
from chorus_client.tokens import TokenProvider, Tokens
from chorus_client.wire import ack_of, hello_of, pong_of
from protocol import Ack, DoubleTexting, FrameType, Hello, Pong

log = logging.getLogger("chorus_client")

E = TypeVar("E", bound=ClientEvent)


@dataclass
class Stats:
    """`connects`: hellos received; `duplicates`: events dropped as already seen; `gaps`: events
    that would have left a gap (each cost a reconnect); `resyncs`: positions the server could not use."""

    connects: int = 0
    duplicates: int = 0
    gaps: int = 0
    resyncs: int = 0


@dataclass(frozen=True)
class _Outcome:
    """How one connection attempt ended: refused with an HTTP `status`, or a socket that opened and
    closed with `code`, or neither (unreachable, or no token)."""

    status: int | None = None
    code: int | None = None
    opened: bool = False
    retry_after_s: float | None = None


class ChorusClient:
    """One device of one user.

    `url`: the WebSocket URL ("wss://host/ws"), or a function choosing one per attempt (it is read
    again before every attempt, so assigning `client.url` moves the next connect). `token`: a JWT,
    or a provider called with a `TokenReason` ("connect", "expiring", "unauthorized"), sync or
    async, again before the token expires and after a 4001. Options:

    - `device`: this device's id (default: the one the server assigns in the first `hello`);
    - `rest_url`: REST base URL (default: `url`'s origin over http(s));
    - `auth`: "frame" sends the token as the first frame (never in a URL, so never in a log), "query"
      as `access_token`;
    - `position`: resume from a saved `Position` (`client.position`);
    - `session`: an aiohttp session of your own (default: one of the client's, closed by `close()`);
    - `reconnect`: False gives up at the first close (tests of the server use it);
    - `backoff`: reconnect delays (`policy.Backoff`, 50 ms doubling up to 2 s, full jitter);
    - `connect_timeout_s`: a socket with no `hello` this long is dropped and tried again;
    - `heartbeat_s`: ping the server when nothing came for this long, and drop a socket whose pong
      does not come (a dead network is noticed); None: rely on the server's pings;
    - `refresh_before_s`: renew the token this long before it expires (at most half its life left);
    - `too_many_devices_retry_s`: after a 4029, retry after this long; None: give up;
    - `max_unauthorized`: 4001s (or HTTP 401s) in a row, no hello between, before giving up;
    - `reload_on_resync`: reload conversations and loaded messages from REST after a `resync`;
    - `store`: a `Store` of your own (e.g. shared with a UI layer).
    """

    def __init__(
        self,
        url: str | Callable[[], str],
        token: str | TokenProvider,
        *,
        device: str | None = None,
        rest_url: str | None = None,
        auth: Literal["frame", "query"] = "frame",
        position: Position | None = None,
        session: aiohttp.ClientSession | None = None,
        reconnect: bool = True,
        backoff: policy.Backoff = policy.Backoff(),  # noqa: B008 (frozen)
        connect_timeout_s: float = 10.0,
        heartbeat_s: float | None = 20.0,
        refresh_before_s: float = 60.0,
        too_many_devices_retry_s: float | None = 30.0,
        max_unauthorized: int = 3,
        reload_on_resync: bool = True,
        store: Store | None = None,
    ) -> None:
        self.url = url
        self.device = device
        self.store = store if store is not None else Store()
        self.hello: Hello | None = None
        self.state = ConnectionState()
        self.stats = Stats()
        base = rest_url or rest_base(url if isinstance(url, str) else url())
        self.rest = RestClient(base, self._rest_token, self._http)
        self._auth = auth
        self._session = session
        self._own_session = session is None
        self._reconnects = policy.Reconnects(backoff, reconnect, too_many_devices_retry_s, max_unauthorized)
        self._connect_timeout_s = connect_timeout_s
        self._heartbeat_s = heartbeat_s
        self._reload_on_resync = reload_on_resync
        self._tokens = Tokens(token, refresh_before_s=refresh_before_s)
        self._gate = SeqGate(position.after, position.epoch) if position else SeqGate()
        self._outbox = Outbox()
        self._emitter = Emitter()
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[Hello]] = []
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._generation = 0  # the current socket's; replies and retries of older sockets are ignored
        self._connected = False
        self._stopping = False
        self._closed = False  # close()d or given up: commands are refused until connect() again
        self._token_reason: Literal["connect", "unauthorized"] = "connect"
        self._reconnect_after_s: float | None = None  # a `reconnect` frame's after_ms
        self._reset: str | None = None  # why the reader must drop the socket and resume (a gap)
        # The client closed the current socket itself to resume: whatever code the server's reply
        # close frame carries (a node answers every close with 1000), this is a reconnect.
        self._resetting = False
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()

    # Reading

    @property
    def position(self) -> Position | None:
        """Where this device is in its user's stream: save it to resume after a restart."""
        return self._gate.position

    @position.setter
    def position(self, position: Position | None) -> None:
        """Resume from `position` at the next connect (None: as a new device)."""
        self._gate = SeqGate(position.after, position.epoch) if position else SeqGate()

    def on(self, kind: type[E], callback: Callable[[E], object]) -> Callable[[], None]:
        """Call `callback` (inline, in the reading task: do not block) with every event of `kind`;
        returns the function that unsubscribes. See events.py for the kinds."""
        return self._emitter.on(kind, callback)

    def subscribe(self, *kinds: type[ClientEvent], maxsize: int = 1000) -> Subscription:
        """An async iterator over events of `kinds` (all when none), with a queue of its own bounded
        to `maxsize` (past it the oldest are dropped and `Overflowed` says how many)."""
        return self._emitter.subscribe(kinds, maxsize)

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float | None = None) -> None:
        """Until `predicate()` holds, checked after every frame and every change of state; raises
        TimeoutError after `timeout_s`."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await self._changed.wait()

    # Connecting

    async def connect(self) -> Hello:
        """Start (or start again after `close()`) and return the first `hello`. The client then
        stays connected on its own; this raises only if the client is closed or gives up first."""
        if self._connected and self.hello is not None:
            return self.hello
        waiter: asyncio.Future[Hello] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if self._runner is None or self._runner.done():
            self._stopping = self._closed = False
            self._runner = asyncio.create_task(self._run(), name="chorus-client")
        return await waiter

    async def close(self) -> None:
        """Close for good: no reconnect; pending commands fail with ClientClosed; subscriptions end."""
        self._stopping = True
        self._wake.set()
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._runner), 5)
            if not self._runner.done():
                self._runner.cancel()
        self._finish(ClientClosed("the client was closed"), None)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def wake(self) -> None:
        """The network came back (or the app came to the foreground): reconnect now if waiting."""
        self._wake.set()

    async def reconnect(self) -> None:
        """Drop the socket and connect again from the current position (resume with after/epoch)."""
        if self._ws is not None:
            await self._close_to_resume(self._ws, "reconnect requested")
        else:
            self.wake()

    # Commands

    async def request(self, frame: Mapping[str, Any], *, timeout_s: float | None = None,
                      resend: bool = False) -> dict[str, Any]:
        """Send a command frame (an `id` is added when it has none) and return its one reply as
        received; an `error` reply raises ChorusError. With `resend`, the command is sent again with
        the same id after every reconnect and after a retryable error until answered; without, it
        fails with ConnectionLost if its socket closes first. Sending the same id again while it is
        pending waits for the same reply."""
        if frame.get("id") is None:
            frame = {**frame, "id": new_id()}
        if self._closed:
            raise ClientClosed("the client is closed")
        pending = self._outbox.add(frame, resend=resend)
        if pending.sent_on == 0 and self._connected:
            await self._transmit(pending)
        try:
            return await asyncio.wait_for(asyncio.shield(pending.future), timeout_s)
        except TimeoutError:
            if pending.future.done():
                raise
            error = CommandTimeout(f"no reply to {frame.get('type')} {frame['id']} in {timeout_s} s")
            self._outbox.fail(pending, error)
            raise error from None

    async def send(self, text: str, *, conversation: str | None = None, id: str | None = None,
                   agent: str | None = None, double_texting: DoubleTexting | str | None = None,
                   timeout_s: float | None = None) -> Ack:
        """Send a message (`conversation` None starts a new one); returns its ack once it is stored.
        `id` (a fresh UUID by default) is the idempotency key: the send goes again with it after
        every reconnect and retryable error until acked, and the server starts one run however many
        copies arrive."""
        frame: dict[str, Any] = {"type": FrameType.SEND, "id": id or new_id(), "text": text}
        if conversation:
            frame["conversation"] = conversation
        if agent:
            frame["agent"] = agent
        if double_texting:
            frame["double_texting"] = str(double_texting)
        return ack_of(await self.request(frame, timeout_s=timeout_s, resend=True))

    async def cancel(self, run: str, *, timeout_s: float | None = None) -> Ack:
        """Stop a run, from any device; a run that already ended is ChorusError `conflict`."""
        frame = {"type": FrameType.CANCEL, "run": run}
        return ack_of(await self.request(frame, timeout_s=timeout_s, resend=True))

    async def respond(self, run: str, request: str, text: str, *, timeout_s: float | None = None) -> Ack:
        """Answer a run's question (`Run.input`); the first answer from any device wins, a later
        one is `conflict`."""
        frame = {"type": FrameType.RESPOND, "run": run, "request": request, "text": text}
        return ack_of(await self.request(frame, timeout_s=timeout_s, resend=True))

    async def ping(self, *, timeout_s: float = 10.0) -> Pong:
        return pong_of(await self.request({"type": FrameType.PING}, timeout_s=timeout_s))

    async def auth(self, token: str | None = None, *, timeout_s: float = 10.0) -> Ack:
        """Hand the open socket a fresh token now (`token`, or the provider's); the client renews on
        its own before expiry, so this is rarely needed. A refused token leaves the old one in force."""
        fresh = token if token is not None else await self._tokens.fetch("expiring")
        reply = await self.request({"type": FrameType.AUTH, "token": fresh}, timeout_s=timeout_s)
        self._tokens.adopt(fresh, reply.get("expires_at"))
        self._schedule_refresh()
        return ack_of(reply)

    # REST, into the store

    async def load_conversations(self) -> list[Conversation]:
        """The conversation list (newest page), into the store."""
        page = await self.rest.list_conversations()
        self._emit_all(self.store.load_conversations(page["conversations"]))
        return self.store.conversation_list()

    async def load_messages(self, conversation: str, *, older: bool = False,
                            limit: int | None = None) -> list[Message]:
        """A conversation's newest messages (or, with `older`, the page before those loaded)."""
        known = self.store.conversations.get(conversation)
        before = known.next_before if older and known is not None else None
        if older and before is None:
            return self.store.messages(conversation)
        page = await self.rest.list_messages(conversation, limit=limit, before=before)
        self._emit_all(self.store.load_messages(conversation, page["messages"],
                                                next_before=page.get("next_before"), newest=not older))
        return self.store.messages(conversation)

    async def create_conversation(self, **fields: Any) -> Conversation:
        """Over REST (`title`, `agent`, `double_texting`); a `send` without `conversation` creates
        one too."""
        created = await self.rest.create_conversation(**fields)
        self._emit_all(self.store.load_conversations([created]))
        return self.store.conversations[created["id"]]

    async def delete_conversation(self, conversation: str) -> None:
        await self.rest.delete_conversation(conversation)
        self._emit_all(self.store.remove_conversation(conversation))

    async def load_presence(self) -> Mapping[str, str]:
        """The user's devices online now (REST `GET /v1/presence`), into the store: device -> node."""
        self._emit_all(self.store.set_devices((await self.rest.presence())["devices"]))
        return self.store.devices

    # The connection: one task, one socket at a time

    async def _run(self) -> None:
        while not self._stopping:
            try:
                outcome = await self._serve()
            except Exception as exc:  # a bug must not end the device's stream: say so, start again
                log.exception("connection attempt failed")
                self._report(ChorusError("internal", repr(exc)))
                outcome = _Outcome()
            if self._stopping:
                return
            delay_s = self._next_delay(outcome)
            if delay_s is None:
                return
            self._set_state(status="reconnecting", node=None, attempt=self._reconnects.attempt,
                            code=outcome.status or outcome.code, delay_s=delay_s)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay_s)

    async def _serve(self) -> _Outcome:
        """One attempt: open a socket, read it until it closes; how it ended."""
        self._set_state(status="connecting" if self.stats.connects == 0 else "reconnecting", node=None,
                        delay_s=None)
        try:
            token = await self._tokens.get(self._token_reason)
        except Exception as exc:
            self._report(ChorusError("token", str(exc) or repr(exc)))
            return _Outcome()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                ws = await self._http().ws_connect(
                    self._socket_url(token), heartbeat=self._heartbeat_s, max_msg_size=0,
                    timeout=aiohttp.ClientWSTimeout(ws_close=5.0))
        except aiohttp.WSServerHandshakeError as exc:
            hint = exc.headers.get("Retry-After", "") if exc.headers else ""
            return _Outcome(status=exc.status, retry_after_s=float(hint) if hint.isdigit() else None)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.debug("connect failed: %r", exc)
            return _Outcome()
        self._generation += 1
        self._ws = ws
        try:
            if self._stopping:
                await ws.close()
            else:
                if self._auth == "frame":
                    await ws.send_str(json.dumps({"type": FrameType.AUTH, "id": f"auth-{self._generation}",
                                                  "token": token}))
                await self._read(ws)
        finally:
            self._detach()
        code = ws.close_code if ws.close_code is not None else 1006  # no close frame: dropped
        if self._resetting:
            code, self._resetting = policy.CLIENT_RESET, False
        self._tell(Disconnected(code, str(ws.exception() or "")))
        return _Outcome(code=code, opened=True)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        deadline = asyncio.get_running_loop().time() + self._connect_timeout_s
        while True:
            wait_s = None if self._connected else deadline - asyncio.get_running_loop().time()
            try:
                message = await ws.receive(timeout=wait_s)
            except TimeoutError:
                await self._close_to_resume(ws, "no hello in time")
                return
            if message.type is aiohttp.WSMsgType.TEXT:
                await self._on_text(message.data)
                if self._reset is not None:
                    # Never shown: start again from the last seq shown; the server replays the rest.
                    reason, self._reset = self._reset, None
                    await self._close_to_resume(ws, reason)
                    return
            elif message.type is not aiohttp.WSMsgType.BINARY:
                return  # CLOSE, CLOSING, CLOSED, ERROR (e.g. no pong to our heartbeat)

    async def _close_to_resume(self, ws: aiohttp.ClientWebSocketResponse, reason: str) -> None:
        self._resetting = True
        await ws.close(code=policy.CLIENT_RESET, message=reason.encode()[:120])

    def _detach(self) -> None:
        """The socket is gone: forget it; commands that are not resent fail."""
        self._ws = None
        self._connected = False
        self._reset = None
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        self._outbox.socket_closed()

    def _next_delay(self, outcome: _Outcome) -> float | None:
        """How long to wait before the next attempt (docs/protocol.md, close codes); None: give up."""
        code = outcome.status if outcome.status is not None else outcome.code
        if outcome.status is not None:
            action = policy.handshake_action(outcome.status)
        else:
            action = policy.close_action(outcome.code) if outcome.opened else policy.Action.BACKOFF
        step = self._reconnects.after(action, code, renewable=self._tokens.renewable,
                                      drain_s=self._reconnect_after_s, retry_after_s=outcome.retry_after_s)
        if step.delay_s is None:
            self._stop(code, step.why)
        elif step.renew:
            self._tokens.forget()  # never reuse it: the provider is asked for a fresh one
            self._token_reason = "unauthorized"
        return step.delay_s

    def _stop(self, code: int | None, why: str) -> None:
        """Give up: no next attempt."""
        kind = "unauthorized" if code in (401, 4001) else "gave_up"
        error = ClientClosed(why, kind, close_code=code)
        if code != 1000:
            self._report(error)
        self._finish(error, code)

    def _finish(self, error: ClientClosed, code: int | None) -> None:
        self._stopping = self._closed = True
        self._outbox.fail_all(error)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # retrieved: the caller of connect() still gets it raised
        self._waiters.clear()
        if self.state.status != "closed":
            self._set_state(status="closed", node=None, code=code, delay_s=None)
        self._emitter.end()

    # Frames

    async def _on_text(self, text: str) -> None:
        try:
            frame = json.loads(text)
        except ValueError:
            frame = None
        if not isinstance(frame, dict):
            self._report(ChorusError("bad_frame", "a frame that is not a JSON object"))
            return
        if self._emitter.wants(FrameReceived):
            self._tell(FrameReceived(frame))
        try:
            await self._on_frame(frame)
        except (KeyError, TypeError, ValueError) as exc:  # a malformed frame: say so, read on
            self._report(ChorusError("bad_frame", f"{frame.get('type')} frame: {exc!r}"))
        self._pulse()

    async def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == FrameType.EVENT:
            self._on_event(frame)
        elif kind in (FrameType.ACK, FrameType.PONG, FrameType.ERROR):
            self._on_reply(frame)
        elif kind == FrameType.HELLO:
            await self._on_hello(frame)
        elif kind == FrameType.RESYNC:
            # The position was unusable (history trimmed, or a new epoch): the device is now at
            # `seq`, a snapshot follows, and what it shows is reloaded from REST, which is complete.
            if frame["epoch"] != self._gate.epoch:
                self._emit_all(self.store.new_epoch())
            self._gate.reset(frame["seq"], frame["epoch"])
            self.stats.resyncs += 1
            self._tell(Resynced(str(frame.get("reason")), frame["seq"], frame["epoch"]))
            if self._reload_on_resync:
                self._spawn(self._reload())
        elif kind == FrameType.SNAPSHOT:
            if self._gate.last is None:
                self._gate.reset(frame["seq"], frame["epoch"])
            self._emit_all(self.store.apply_snapshot(frame["seq"], frame.get("runs") or ()))
            runs = tuple(r["run"] for r in frame.get("runs") or ())
            self._tell(SnapshotApplied(frame["seq"], frame["epoch"], runs))
        elif kind == FrameType.PRESENCE:  # not sequenced: no gate, applied idempotently
            self._emit_all(self.store.apply_presence(frame["device"], bool(frame["online"]), frame["node"]))
        elif kind == FrameType.RECONNECT:
            # The node drains: it closes with 1012 right after; reconnect after `after_ms`.
            self._reconnect_after_s = frame.get("after_ms", 0) / 1000
        # anything else: a frame of a newer server, ignored

    async def _on_hello(self, frame: dict[str, Any]) -> None:
        resumed = self._gate.position is not None
        self._gate.hello(frame["seq"], frame["epoch"])
        hello = self.hello = hello_of(frame)
        self.device = hello.device  # the same device id on every reconnect (presence, device limit)
        self._connected = True
        self._reconnects.connected()
        self._token_reason = "connect"
        self._reconnect_after_s = None
        self.stats.connects += 1
        if "devices" in frame:  # the devices online now: replaces the list
            self._emit_all(self.store.set_devices(frame["devices"]))
        self._set_state(status="connected", node=hello.node, resumed=resumed, attempt=0, code=None,
                        delay_s=None)
        self._tell(Connected(hello, resumed))
        self._schedule_refresh()
        generation = self._generation
        for pending in self._outbox.to_send(generation):
            await self._transmit(pending)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(hello)
        self._waiters.clear()

    def _on_event(self, frame: dict[str, Any]) -> None:
        seq, seq_from = frame["seq"], frame.get("seq_from")
        last = self._gate.last
        offer = self._gate.offer(seq, seq_from)
        if offer == "duplicate":
            self.stats.duplicates += 1
        elif offer == "gap":
            assert last is not None
            self.stats.gaps += 1
            self._tell(SeqGap(last, seq if seq_from is None else seq_from, seq))
            self._reset = f"gap after seq {last}"
        else:
            self._emit_all(self.store.apply(frame))
            self._tell(EventReceived(frame))

    def _on_reply(self, frame: dict[str, Any]) -> None:
        id_ = frame.get("id")
        if frame["type"] == FrameType.ACK and id_ == f"auth-{self._generation}":
            if frame.get("expires_at") is not None:  # the first-frame auth's ack
                self._tokens.expires_at(frame["expires_at"])
            return
        pending = self._outbox.get(id_)
        if pending is None:
            if frame["type"] == FrameType.ERROR:
                self._report(ChorusError.from_frame(frame))
            return
        if frame["type"] != FrameType.ERROR:
            self._outbox.resolve(pending, frame)
        elif pending.resend and policy.retryable(str(frame.get("code"))):
            # Nothing was done: the same id again, after the server's hint or our backoff.
            pending.attempts += 1
            pending.sent_on = -1
            hint_ms = frame.get("retry_after_ms")
            backoff_s = self._reconnects.backoff.delay_s(pending.attempts)
            delay_s = hint_ms / 1000 if hint_ms is not None else backoff_s
            pending.retry = asyncio.get_running_loop().call_later(delay_s, self._retry, pending)
        else:
            self._outbox.fail(pending, ChorusError.from_frame(frame))

    def _retry(self, pending: Pending) -> None:
        if self._outbox.get(pending.id) is pending and pending.sent_on == -1 and self._connected:
            self._spawn(self._transmit(pending))

    async def _transmit(self, pending: Pending) -> None:
        ws, generation = self._ws, self._generation
        if ws is None or not self._connected:
            return  # sent after the next hello (or failed by the close)
        try:
            await ws.send_str(pending.text)
            pending.sent_on = generation
        except (ConnectionError, aiohttp.ClientError):
            pass  # the socket is closing: its close decides (resent after the next hello, or failed)

    async def _reload(self) -> None:
        loaded = [c.id for c in self.store.conversations.values() if c.loaded]
        try:
            await self.load_conversations()
            for conversation in loaded:
                try:
                    await self.load_messages(conversation)
                except ChorusError as exc:
                    if exc.status != 404:
                        raise
                    self._emit_all(self.store.remove_conversation(conversation))  # deleted meanwhile
        except (ChorusError, aiohttp.ClientError, TimeoutError) as exc:
            self._report(exc if isinstance(exc, ChorusError) else ChorusError("reload", repr(exc)))
            return
        self._tell(Reloaded(len(loaded)))

    # Tokens

    def _schedule_refresh(self) -> None:
        """Renew the token in place (an `auth` frame) before the server closes the socket with 4001."""
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        delay_s = self._tokens.refresh_in_s()
        if delay_s is not None and self._connected:
            self._refresher = self._spawn(self._renew(self._generation, delay_s))

    async def _renew(self, generation: int, delay_s: float) -> None:
        while True:
            await asyncio.sleep(delay_s)
            if generation != self._generation or not self._connected:
                return
            try:
                token = await self._tokens.fetch("expiring")
                reply = await self.request({"type": FrameType.AUTH, "token": token}, timeout_s=10.0)
            except (ChorusError, ValueError, TimeoutError) as exc:
                if generation != self._generation:
                    return
                self._report(exc if isinstance(exc, ChorusError) else ChorusError("token", str(exc)))
                # The old token stays in force: try again while there is time; a 4001 does the rest.
                left_s = self._tokens.seconds_left()
                if left_s <= 2:
                    return
                delay_s = min(left_s / 2, 30.0)
                continue
            self._tokens.adopt(token, reply.get("expires_at"))
            next_s = self._tokens.refresh_in_s()
            if next_s is None:
                return
            delay_s = next_s

    async def _rest_token(self, fresh: bool) -> str:
        return await self._tokens.get("unauthorized" if fresh and self._tokens.renewable else "connect")

    # Small things

    def _socket_url(self, token: str) -> str:
        url = self.url() if callable(self.url) else self.url
        params: list[tuple[str, str]] = []
        if self.device:
            params.append(("device", self.device))
        position = self._gate.position
        if position is not None:
            params.append(("after", str(position.after)))
            if position.epoch:
                params.append(("epoch", position.epoch))
        params.append(("auth", "frame") if self._auth == "frame" else ("access_token", token))
        return f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or (self._own_session and self._session.closed):
            self._session = aiohttp.ClientSession()
        return self._session

    def _set_state(self, **change: Any) -> None:
        self.state = dataclasses.replace(self.state, **change)
        self._tell(StateChanged(self.state))

    def _emit_all(self, events: Iterable[ClientEvent]) -> None:
        for event in events:
            self._tell(event)

    def _tell(self, event: ClientEvent) -> None:
        """Emit `event`, and wake every `wait_for` (its predicate may read what the event says)."""
        self._emitter.emit(event)
        self._pulse()

    def _report(self, error: ChorusError) -> None:
        log.debug("chorus client: %s", error)
        self._tell(ErrorReported(error))

    def _pulse(self) -> None:
        """Wake every `wait_for`: something changed."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("chorus client: a background task failed", exc_info=task.exception())
            self._report(ChorusError("internal", repr(task.exception())))
