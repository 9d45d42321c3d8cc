"""`UserStream`: the Redis side of a user's ordered stream (publish, position, history, fences)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
from redis.asyncio import Redis

from common.backoff import retrying
from common.redis_client import TRANSIENT, as_text
from fanout.keys import StreamKeys

_PUBLISH_LUA = resources.files("fanout").joinpath("publish.lua").read_text()
_POSITION_LUA = resources.files("fanout").joinpath("position.lua").read_text()


class Fenced(Exception):
    """The run was cancelled: the stream refuses its events (the cancel fence)."""


@dataclass(frozen=True)
class PublishResult:
    seq: int
    epoch: str
    duplicate: bool


@dataclass(frozen=True)
class Position:
    """Where a user's stream stands: `first_seq` is the oldest seq in history (0 = empty)."""

    epoch: str
    seq: int
    first_seq: int


def new_epoch() -> str:
    return secrets.token_hex(4)


def event_tail(conversation: str, run: str | None, event: str, data: dict[str, Any], ts_ms: int) -> str:
    """The event frame minus its leading ``{"seq":N``, which the publish script prepends.
    Encoded once per publish: every node forwards the published text untouched."""
    body = orjson.dumps(
        {"type": "event", "conversation": conversation, "run": run, "event": event, "data": data, "ts": ts_ms}
    )
    return "," + body[1:].decode()


class UserStream:
    """Publishes and reads users' streams. Publishes retry through Redis outages for up to
    `retry_for_s`; give each publish a (`producer`, `pseq`) so a retry is never doubled."""

    def __init__(
        self,
        redis: Redis,
        keys: StreamKeys,
        *,
        history_max: int = 10_000,
        ttl_s: int = 86_400,
        retry_for_s: float = 30.0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.history_max = history_max
        self.ttl_s = ttl_s
        self.retry_for_s = retry_for_s
        self._publish = redis.register_script(_PUBLISH_LUA)
        self._position = redis.register_script(_POSITION_LUA)

    async def publish(
        self,
        user: str,
        *,
        conversation: str,
        run: str | None,
        event: str,
        data: dict[str, Any],
        producer: str = "",
        pseq: int = 0,
        fenced_run: str | None = None,
        pass_fence: bool = False,
    ) -> PublishResult:
        """Append one event to `user`'s stream and publish it. With `fenced_run`, raise `Fenced`
        instead when that run was cancelled (unless `pass_fence`: the run's own cancel event)."""
        k = self.keys
        keys = [k.meta(user), k.history(user), k.producers(user), k.fences(user)]
        tail = event_tail(conversation, run, event, data, int(time.time() * 1000))
        args: list[str | int] = [
            k.channel(user), tail, self.history_max, self.ttl_s, new_epoch(),
            producer, pseq, fenced_run or "", "1" if pass_fence else "0",
        ]

        async def once() -> Any:
            return await self._publish(keys=keys, args=args)

        status, seq, epoch = await retrying(
            once, retry_on=TRANSIENT, deadline_s=self.retry_for_s, what=f"publish {event}"
        )
        if status == -1:
            raise Fenced(fenced_run)
        return PublishResult(seq=int(seq), epoch=as_text(epoch), duplicate=status == 0)

    async def position(self, user: str) -> Position:
        """The user's epoch and latest seq (creating the epoch for a new history)."""
        reply: Any = await self._position(
            keys=[self.keys.meta(user), self.keys.history(user)], args=[new_epoch(), self.ttl_s]
        )
        epoch, seq, first = reply
        return Position(epoch=as_text(epoch), seq=int(seq), first_seq=int(first))

    async def read_after(self, user: str, after: int, *, upto: int) -> list[str] | None:
        """Frames with `after` < seq (at least through `upto`, the seq the caller knows exists),
        oldest first; None when history no longer reaches back to `after` (trimmed or lost), so
        the caller resyncs instead of replaying with a hole."""
        entries: Any = await self.redis.xrange(
            self.keys.history(user), min=f"{after + 1}-0", max="+", count=self.history_max + 1000
        )
        if upto > after and (not entries or int(as_text(entries[0][0]).split("-")[0]) != after + 1):
            return None
        return [as_text(fields["f"]) for _, fields in entries]

    async def fence(self, user: str, run: str) -> None:
        """Cancel fence: from now on the stream refuses every event of `run` but its cancel event."""
        key = self.keys.fences(user)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, run, int(time.time() * 1000))
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

    async def is_fenced(self, user: str, run: str) -> bool:
        return bool(await self.redis.hexists(self.keys.fences(user), run))
