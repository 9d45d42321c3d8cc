"""`PublishBatch`: the publishes of one loop turn, sent to Redis as one call of the publish script.

A call of a Lua script costs Redis far more than the PUBLISH inside it: the call itself, one Lua
string per argument, and the script's set-up. One publish per `EVALSHA` cost Redis 2.6x a plain
PUBLISH per delivery at 10k events/s (issue 14; `python -m loadtest.script_cost`). Here callers
queue their publish and wait; at the end of the loop turn every queued publish, whatever its user,
goes out as one `EVALSHA` of `fanout/publish.lua` down the broker's pipelining connection, and
each caller gets its own event's reply. The script does each event as before, atomically, and
keeps one event's Redis error to that event (-3). A lost connection or a refusal of the whole
call (LOADING, BUSY, READONLY) fails every publish of the call, each of which its caller retries
as before (the producer dedupe makes a repeat harmless).

On a Redis Cluster (7 or later) there is a batch per primary (`fanout.redis_broker`): a call may
not declare keys of many slots, so the events' key prefixes go as its first arguments
(`keys_as_args`) and the script's text opens with the flag that lets it touch keys of many slots
on the primary running it. Through Sentinels each publish stays a call of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any

import hiredis
from redis import exceptions as redis_errors

from common.batching import TurnQueue, settle
from fanout.resp_pipe import RespPipe, error

# Publishes per call at most: a call holds Redis for its whole length (~5 µs a publish).
MAX_EVENTS = 128

Reply = tuple[int, int, str]
Event = tuple[str, str, list[str | int]]  # a user's key prefix, the payload, the options


def replies(flat: list[Any]) -> list[Reply | redis_errors.RedisError]:
    """Each event's (status, seq, epoch) from the script's flat reply, or its Redis error."""
    out: list[Reply | redis_errors.RedisError] = []
    for at in range(0, len(flat), 3):
        status, seq, epoch = flat[at:at + 3]
        out.append(error(epoch) if status == -3 else (int(status), int(seq), epoch))
    return out


class PublishBatch:
    def __init__(self, pipe: RespPipe, sha: str, script: str, head: Callable[[], list[str | int]], *,
                 keys_as_args: bool = False) -> None:
        """`head`: the script's first arguments for one call (history length, TTL, new epoch).
        `keys_as_args`: the events' key prefixes go as the call's first arguments, after their
        count, and no key is declared (a Redis Cluster's call to one primary, see publish.lua)."""
        self._pipe = pipe
        self._sha = sha
        self._script = script
        self._head = head
        self._keys_as_args = keys_as_args
        self._queue: TurnQueue[Event, Reply] = TurnQueue(self._send, most=MAX_EVENTS)

    async def publish(self, prefix: str, payload: str, options: list[str | int]) -> Reply:
        """Queue one event (`fanout/publish.lua`'s per-event arguments) and wait for its reply."""
        await self._pipe.ready()
        return await self._queue.add((prefix, payload, options))

    def _send(self, events: list[Event], waiting: list[asyncio.Future[Reply]]) -> None:
        keys, args = [], self._head()
        for prefix, payload, options in events:
            keys.append(prefix)
            args += (payload, len(options), *options)
        self._call("EVALSHA", self._sha, keys, args, waiting)

    def _call(self, verb: str, script: str, keys: list[str], args: list[str | int],
              waiting: list[asyncio.Future[Reply]]) -> None:
        if self._keys_as_args:
            sent = self._pipe.send(verb, script, 0, len(keys), *keys, *args)
        else:
            sent = self._pipe.send(verb, script, len(keys), *keys, *args)
        sent.add_done_callback(partial(self._answered, keys, args, waiting))

    def _answered(self, keys: list[str], args: list[str | int], waiting: list[asyncio.Future[Reply]],
                  sent: asyncio.Future[Any]) -> None:
        if sent.cancelled():
            reply: Any = redis_errors.ConnectionError("redis call cancelled")
        else:
            reply = sent.exception() or sent.result()
        if isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
            self._call("EVAL", self._script, keys, args, waiting)  # a Redis without the script loaded
            return
        if isinstance(reply, hiredis.ReplyError):
            reply = error(reply)
        # The publish was sent all the same for a caller that gave up (cancelled).
        settle(waiting, [reply] * len(waiting) if isinstance(reply, BaseException) else replies(reply))
