"""Runs in flight per user (``USER_MAX_RUNS_IN_FLIGHT``) as a hard limit: a send takes a slot in
one Redis step, so sends at the same instant cannot overshoot (the Postgres count this replaces
let every one of them through).

A hash per user, in the user's cluster slot (`Keys.run_slots`), holds one field per run not yet
ended: ``run:<run id>`` -> ms. A send has no run id until Postgres stored it, so it takes its slot
as ``send:<client id>`` -> ms (`take`, Lua: count the fields, add this one only under the limit;
a field already there is a retry of the same send and passes), turns it into its run's once stored
(`hold`), or gives it back if storing failed (`abandon`). The run's end frees it (`free`, from
`Runs.end`, on whichever node or worker ends the run).

A slot whose release was lost (a process died between a run's end and `free`, Redis was away)
must not lock its user out, so before a send is refused the hash is reconciled against Postgres,
the runs' truth: fields of runs that ended or are gone, and reservations older than
`PENDING_GRACE_MS`, are dropped (`stale`, pure), and the slot is asked for again in the same step.
A retry of a send already stored is never refused: it starts nothing new.

Not counted: a run an operator starts from a dead letter (`Runs.answer_again`) never took a slot.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from common.backoff import retrying
from common.keys import Keys
from common.redis_client import TRANSIENT
from persistence.store import Store
from protocol.vocabulary import ENDED
from runs.queue import RedisRunQueue, RunQueue

RUN, SEND = "run:", "send:"
# A reservation lives while its send is routed and stored: well under a minute (each store call
# gives up after ~11 s). One older than this is a send whose process died or whose release was lost.
PENDING_GRACE_MS = 60_000
TTL_S = 86_400  # an idle user's hash goes, and with it anything a lost release left

# KEYS[1] the user's slots; ARGV[1] mode: "take" | "hold".
# take: ARGV[2] limit, ARGV[3] the send's field, ARGV[4] TTL (s), ARGV[5..] fields to drop first.
#   Returns {1, now} when admitted, else {0, now, {field, ms, ...}} (the hash, to reconcile).
# hold: ARGV[2] the send's field, ARGV[3] the run's field, ARGV[4] TTL (s). The run's field is set
#   even when the reservation is gone (dropped as stale): the run exists, so it counts.
_LUA = """
local key, mode = KEYS[1], ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if mode == 'hold' then
  redis.call('HDEL', key, ARGV[2])
  redis.call('HSET', key, ARGV[3], now)
  redis.call('EXPIRE', key, ARGV[4])
  return {1, now}
end
if #ARGV > 4 then
  redis.call('HDEL', key, unpack(ARGV, 5))
end
local field = ARGV[3]
if redis.call('HEXISTS', key, field) == 1 or redis.call('HLEN', key) < tonumber(ARGV[2]) then
  redis.call('HSET', key, field, now)
  redis.call('EXPIRE', key, ARGV[4])
  return {1, now}
end
return {0, now, redis.call('HGETALL', key)}
"""


def send_field(client_id: str) -> str:
    return SEND + client_id


def run_field(run: str) -> str:
    return RUN + run


def stale(entries: Mapping[str, str], statuses: Mapping[str, str], *, now_ms: int,
          grace_ms: int = PENDING_GRACE_MS) -> list[str]:
    """The fields of `entries` (field -> ms) that hold a slot for nothing: runs whose status
    (`statuses`: run id -> status, from Postgres) is ended or unknown (deleted with their
    conversation, rolled back), reservations older than `grace_ms`, and anything unreadable."""
    drop = []
    for name, at in entries.items():
        if name.startswith(RUN):
            status = statuses.get(name[len(RUN):])
            if status is None or status in ENDED:
                drop.append(name)
        elif not (name.startswith(SEND) and at.isdigit() and now_ms - int(at) <= grace_ms):
            drop.append(name)
    return sorted(drop)


@dataclass(frozen=True)
class Taken:
    allowed: bool
    now_ms: int  # Redis's clock
    entries: dict[str, str] = field(default_factory=dict)  # when refused: the hash, field -> ms


RETRY_S = 10.0  # how long a slot step retries through Redis being away


class RunSlots:
    """The slots of every user in Redis. Built from the run queue's client (`of`), so every
    `Runs`, a node's or a worker's, frees the slots of the runs it ends."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._script = redis.register_script(_LUA)

    @classmethod
    def of(cls, queue: RunQueue) -> RunSlots | None:
        """The slots next to `queue`'s Redis; None for a queue in memory (tests without Redis)."""
        if not isinstance(queue, RedisRunQueue):
            return None
        slots = _BY_QUEUE.get(queue)
        if slots is None:
            slots = _BY_QUEUE[queue] = cls(queue.redis, queue.keys)
        return slots

    async def take(self, user: str, client_id: str, *, limit: int, drop: Iterable[str] = ()) -> Taken:
        """Take a slot for the send `client_id` if the user holds fewer than `limit` (after
        dropping the fields `drop`), in one step."""
        reply = await self._run(user, ["take", limit, send_field(client_id), TTL_S, *drop])
        if reply[0]:
            return Taken(True, int(reply[1]))
        flat = reply[2]
        return Taken(False, int(reply[1]), dict(zip(flat[::2], flat[1::2], strict=True)))

    async def hold(self, user: str, client_id: str, run: str) -> None:
        """The send `client_id` was stored as `run`: its slot is the run's now."""
        await self._run(user, ["hold", send_field(client_id), run_field(run), TTL_S])

    async def free(self, user: str, *fields: str) -> None:
        if fields:
            await retrying(lambda: self._redis.hdel(self._keys.run_slots(user), *fields), retry_on=TRANSIENT,
                           deadline_s=RETRY_S, what=f"freeing {user}'s run slots")

    async def _run(self, user: str, args: list[str | int]) -> Any:
        # Every step is idempotent under its field (a send's or a run's), so a connection that
        # Redis reset (the first command after a restart) or a moment's outage is retried, as a
        # publish is, instead of failing the send.
        return await retrying(lambda: self._script(keys=[self._keys.run_slots(user)], args=args),
                              retry_on=TRANSIENT, deadline_s=RETRY_S, what=f"{user}'s run slots")


_BY_QUEUE: weakref.WeakKeyDictionary[RedisRunQueue, RunSlots] = weakref.WeakKeyDictionary()


async def admit(queue: RunQueue, store: Store, user: str, client_id: str, *, limit: int) -> bool:
    """Whether the user may start one run more (a slot is then held for the send `client_id`):
    atomic in Redis, reconciled against Postgres before saying no. Without Redis (a queue in
    memory) Postgres counts, which is racy: for tests only."""
    slots = RunSlots.of(queue)
    if slots is None:
        in_flight, seen = await store.count_runs_in_flight(user, client_id)
        return seen or in_flight < limit
    taken = await slots.take(user, client_id, limit=limit)
    if taken.allowed:
        return True
    if (await store.count_runs_in_flight(user, client_id))[1]:
        return True  # a retry of a send already stored: it starts nothing new
    runs = [name[len(RUN):] for name in taken.entries if name.startswith(RUN)]
    statuses = {run: status for run, (status, _) in (await store.run_statuses(runs)).items()}
    drop = stale(taken.entries, statuses, now_ms=taken.now_ms)
    if not drop:
        return False
    return (await slots.take(user, client_id, limit=limit, drop=drop)).allowed


async def hold(queue: RunQueue, user: str, client_id: str, run: str, status: str) -> None:
    """After the send `client_id` was stored (or found stored) as `run`, now in `status`: the
    slot becomes the run's, or is given back if the run already ended (a late retry)."""
    slots = RunSlots.of(queue)
    if slots is None:
        return
    if status in ENDED:
        await slots.free(user, send_field(client_id))
    else:
        await slots.hold(user, client_id, run)


async def abandon(queue: RunQueue, user: str, client_id: str) -> None:
    """The send `client_id` was not stored (refused, or it failed): give its slot back. Best
    effort: a reservation left behind is dropped once stale."""
    slots = RunSlots.of(queue)
    if slots is not None:
        with contextlib.suppress(Exception):  # left behind, it is dropped once stale
            await slots.free(user, send_field(client_id))


async def free(queue: RunQueue, user: str, run: str) -> None:
    """`run` ended: its slot is free. Best effort: a slot left behind is reconciled away."""
    slots = RunSlots.of(queue)
    if slots is not None:
        with contextlib.suppress(Exception):  # left behind, admission reconciles it away
            await slots.free(user, run_field(run))
