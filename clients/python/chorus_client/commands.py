"""Commands waiting for their one reply, by id (docs/protocol.md: a command with an `id` gets
exactly one reply with that `id`; a `send`'s id is its idempotency key).

A command marked `resend` is sent again with the same id after every reconnect, and after an
error that says nothing was done (policy.retryable), until it is answered: the server acks a
repeated send id with the same ack and starts no second run. Any other command fails with
ConnectionLost when its socket closes before the reply.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from chorus_client.errors import ChorusError, ConnectionLost

# Commands larger than the server's MAX_FRAME_BYTES are refused before sending (it would close
# the socket with 1009).
MAX_FRAME_BYTES = 64 * 1024


@dataclass(eq=False)
class Pending:
    """`sent_on`: the socket generation the command was last sent on (0: not yet; -1: waiting to be
    retried after a retryable error)."""

    id: str
    text: str
    resend: bool
    future: asyncio.Future[dict[str, Any]]
    sent_on: int = 0
    attempts: int = 0
    retry: asyncio.TimerHandle | None = field(default=None, repr=False)


class Outbox:
    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._pending: dict[str, Pending] = {}
        self._max_frame_bytes = max_frame_bytes

    def add(self, frame: Mapping[str, Any], *, resend: bool) -> Pending:
        """The pending entry of `frame` (which has an `id`); the same id again is the same command."""
        known = self._pending.get(frame["id"])
        if known is not None:
            return known
        text = json.dumps(frame, separators=(",", ":"), ensure_ascii=False)
        if len(text.encode()) > self._max_frame_bytes:
            raise ChorusError("too_large", "the command is larger than the server's frame limit")
        pending = Pending(frame["id"], text, resend, asyncio.get_running_loop().create_future())
        self._pending[pending.id] = pending
        return pending

    def get(self, id_: Any) -> Pending | None:
        return self._pending.get(id_) if isinstance(id_, str) else None

    def resolve(self, pending: Pending, reply: dict[str, Any]) -> None:
        if self._settle(pending):
            pending.future.set_result(reply)

    def fail(self, pending: Pending, error: BaseException) -> None:
        if self._settle(pending):
            pending.future.set_exception(error)
            pending.future.exception()  # retrieved: whoever awaits it still gets it raised

    def to_send(self, generation: int) -> list[Pending]:
        """What to send on socket `generation`, just connected: what was not sent on it yet."""
        return [p for p in self._pending.values() if p.sent_on != generation]

    def socket_closed(self) -> None:
        """Commands that are not resent fail: their reply cannot come any more."""
        for pending in [p for p in self._pending.values() if not p.resend]:
            self.fail(pending, ConnectionLost("the socket closed before the reply"))

    def fail_all(self, error: BaseException) -> None:
        for pending in list(self._pending.values()):
            self.fail(pending, error)

    def __iter__(self) -> Iterator[Pending]:
        return iter(list(self._pending.values()))

    def _settle(self, pending: Pending) -> bool:
        if self._pending.get(pending.id) is not pending:
            return False
        del self._pending[pending.id]
        if pending.retry is not None:
            pending.retry.cancel()
        return not pending.future.done()


def new_id() -> str:
    """A fresh command id (a UUID: unique across devices, as an idempotency key must be)."""
    return uuid.uuid4().hex
