"""The run queue: a Redis Stream read by the workers' consumer group. Imported by nodes (enqueue)
and workers (consume), so it must stay free of the agent's heavy imports."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from fanout.keys import RUNS_GROUP, Keys


@dataclass(frozen=True)
class Job:
    """One delivery of a run; `entry` is the stream entry id to ack."""

    entry: str
    run: str
    user: str
    conversation: str

    @classmethod
    def from_entry(cls, entry: str, fields: dict[str, str]) -> Job:
        return cls(entry=entry, run=fields["run"], user=fields["user"], conversation=fields["conversation"])


async def enqueue_run(redis: Redis, keys: Keys, *, run: str, user: str, conversation: str) -> None:
    """Queue a run (at-least-once: a worker's claim in Postgres makes a second delivery harmless)
    and record it as the conversation's run in flight."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(keys.runs, {"run": run, "user": user, "conversation": conversation})
        pipe.hset(keys.inflight(user), conversation, run)
        await pipe.execute()


async def ensure_group(redis: Redis, keys: Keys) -> None:
    try:
        await redis.xgroup_create(keys.runs, RUNS_GROUP, id="0", mkstream=True)
    except Exception as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def clear_inflight(redis: Redis, keys: Keys, *, user: str, conversation: str, run: str) -> None:
    """Forget the conversation's run in flight, unless a newer run took its place."""
    key = keys.inflight(user)
    if await redis.hget(key, conversation) == run:
        await redis.hdel(key, conversation)
