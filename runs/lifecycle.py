"""The run queue: a Redis Stream read by the workers' consumer group. Imported by nodes (enqueue)
and workers (consume), so it must stay free of the agent's heavy imports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from common.backoff import retrying
from common.keys import RUNS_GROUP, Keys
from fanout.stream import UserStream
from persistence.store import Store, Unavailable

END_EVENTS = {"completed": "run.completed", "cancelled": "run.cancelled", "failed": "run.failed"}


@dataclass(frozen=True)
class RunDeps:
    """What ending and starting runs needs; nodes and workers both do it."""

    redis: Redis
    keys: Keys
    stream: UserStream
    store: Store
    store_retry_s: float = 600.0


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
    """Queue a run (at-least-once: a worker's claim in Postgres makes a second delivery harmless)."""
    await redis.xadd(keys.runs, {"run": run, "user": user, "conversation": conversation})


async def ensure_group(redis: Redis, keys: Keys) -> None:
    try:
        await redis.xgroup_create(keys.runs, RUNS_GROUP, id="0", mkstream=True)
    except Exception as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def publish_end(
    deps: RunDeps, user: str, conversation: str, run: str, status: str, *, text: str,
    message: str | None, error: tuple[str, str] | None = None, stopped_at: int | None = None,
    discarded: bool = False, by: str | None = None,
) -> None:
    """Publish a run's one end event (its end is already stored), then start the conversation's
    next waiting run. The end's producer id is shared by every publisher of the run's end (this
    worker, a later one, a node cancelling a queued run), so exactly one gets a seq."""
    data: dict[str, Any] = {"message": message, "text": text}
    if error is not None:
        # run.failed: `message` is the readable reason, as in every error; the partial answer
        # (if any was stored) is `answer_message`.
        data = {"code": error[0], "message": error[1], "text": text, "answer_message": message}
    if stopped_at is not None:
        data["stopped_at"] = stopped_at
    if discarded:
        data["rolled_back"] = True
    if by is not None:
        data["by"] = by
    published = await deps.stream.publish(
        user, conversation=conversation, run=run, event=END_EVENTS[status], data=data,
        producer=f"run:{run}:end", pseq=1, fenced_run=run, pass_fence=True,
    )

    async def record() -> None:
        await deps.store.set_terminal_seq(run, published.seq)

    await retrying(record, retry_on=(Unavailable,), deadline_s=deps.store_retry_s,
                   what=f"recording the end of run {run}")
    await start_next(deps, conversation)


async def start_next(deps: RunDeps, conversation: str) -> None:
    """Put the conversation's next waiting run on the job stream, if nothing else is in flight."""

    async def promote() -> Any:
        return await deps.store.promote_next(conversation)

    promoted = await retrying(promote, retry_on=(Unavailable,), deadline_s=deps.store_retry_s,
                              what=f"starting the next run of {conversation}")
    if promoted is not None:
        await enqueue_run(deps.redis, deps.keys, run=promoted["id"], user=promoted["user_id"],
                          conversation=conversation)
