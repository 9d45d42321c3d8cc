"""`Store`: the asyncpg data layer. Postgres errors that mean "not reachable" become `Unavailable`."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from common.backoff import delays_s
from common.batching import Coalesced
from persistence import sql
from persistence.records import (
    Conversation,
    Finished,
    Message,
    Question,
    Resume,
    RunClaim,
    RunInFlight,
    RunView,
    SendRecord,
)
from protocol.vocabulary import DoubleTexting, RunStatus

log = logging.getLogger(__name__)

IN_FLIGHT = (RunStatus.QUEUED, RunStatus.RUNNING, RunStatus.PAUSED)  # what finish_run may end

# asyncpg raises these when Postgres is down, restarting or unreachable.
# asyncpg's per-query timeout; an operation (connection, queries, release) gets a little more.
COMMAND_TIMEOUT_S = 10.0
OPERATION_TIMEOUT_S = COMMAND_TIMEOUT_S + 1.0
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
)


class Unavailable(Exception):
    """Postgres cannot be reached right now; nothing was stored."""


class NotFound(Exception):
    """No such object for this user (whether it does not exist or belongs to someone else)."""


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


class Conflict(Exception):
    """The conversation's double-texting policy is `reject` and a run is in flight."""

    def __init__(self, run: str) -> None:
        super().__init__(f"run {run} is still in flight in this conversation")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What a pooled connection needs on its way back to the pool beyond asyncpg's own rollback of
    an unfinished transaction: nothing. The store sets no session state (no `SET`, `LISTEN`,
    advisory lock or cursor outside a transaction), and asyncpg's default reset query for all of
    them cost every query a second round trip: 14% of a node's CPU as sockets opened (issue 14)."""


class Store:
    """Conversations, messages and runs. Methods taking `user` only ever touch that user's rows."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._in_flight: Coalesced[str, list[RunInFlight]] = Coalesced(self._runs_in_flight_of, missing=list)

    @classmethod
    async def connect(
        cls, database_url: str, *, min_size: int = 1, max_size: int = 10, statement_cache_size: int = 100
    ) -> Store:
        """A pool of `min_size` to `max_size` connections. `statement_cache_size` is asyncpg's
        prepared-statement cache per connection (DATABASE_STATEMENT_CACHE_SIZE; 100 is asyncpg's
        default): 0 behind PgBouncer in transaction mode, where the next transaction may run on
        another server connection, one without the statement ('prepared statement
        "__asyncpg_stmt_1__" does not exist'). Uncached, asyncpg parses each query again in the
        same round trip as its execution, which the pooler keeps on one server connection."""
        pool = await asyncpg.create_pool(
            database_url, min_size=min_size, max_size=max_size, command_timeout=COMMAND_TIMEOUT_S, timeout=5,
            statement_cache_size=statement_cache_size, reset=_keep_session,
        )
        return cls(pool)

    @classmethod
    async def connect_when_ready(
        cls, database_url: str, *, max_size: int = 10, statement_cache_size: int = 100
    ) -> Store:
        """`connect`, retried with backoff while Postgres is not up yet (it may start after the
        node or worker): a process waits for it rather than crash-looping. Other errors (a wrong
        password, a bad database name) still raise."""
        for delay_s in delays_s(base_s=0.2, cap_s=3.0):
            try:
                return await cls.connect(database_url, max_size=max_size,
                                         statement_cache_size=statement_cache_size)
            except _UNAVAILABLE as exc:
                log.warning("postgres not reachable yet (%r); retrying", exc)
                await asyncio.sleep(delay_s)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        await self.pool.close()

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection for one operation, which ends within `OPERATION_TIMEOUT_S` or
        raises `Unavailable`. The bound covers giving the connection back too: after a query
        timed out on a dead network path, asyncpg's release waits for the query's cancellation,
        which takes that path as well (a send was answered `unavailable` after 20 s instead of
        10, tests/test_faults.py); the release goes on in the background (asyncpg shields it)."""
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT_S), self.pool.acquire() as conn:
                yield conn
        except _UNAVAILABLE as exc:
            raise Unavailable(f"postgres: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        async with self._conn() as conn:
            await conn.fetchval("SELECT 1")

    # Sends and runs

    async def accept_send(
        self, user: str, *, client_id: str, conversation: str | None, text: str, device: str, agent: str,
        policy: DoubleTexting | None = None,
    ) -> SendRecord:
        """Store a user message and its run in one transaction, applying the conversation's
        double-texting policy (or `policy`, for this message) when a run is in flight; or return
        what an earlier send with the same `client_id` stored. Raises NotFound for a conversation
        not the user's, Conflict when the policy rejects the message."""
        async with self._conn() as conn:
            row = await conn.fetchrow(sql.FIND_SEND, user, client_id)
            if row is None:
                try:
                    return await self._insert_send(
                        conn, user, client_id, conversation, text, device, agent, policy
                    )
                except asyncpg.UniqueViolationError:
                    row = await conn.fetchrow(sql.FIND_SEND, user, client_id)  # a concurrent twin won
            if row is None:
                raise Unavailable("send vanished after a unique violation")
            run = await conn.fetchrow(sql.SEND_RUN, row["run_id"])
            return SendRecord(
                conversation=row["conversation_id"], message=row["id"], run=row["run_id"],
                seq=row["seq"], status=RunStatus(run["status"]),
                policy=DoubleTexting(run["policy"]), behind=run["behind"],
                supersedes=tuple(run["supersedes"]),
            )

    async def _insert_send(
        self, conn: asyncpg.Connection, user: str, client_id: str, conversation: str | None,
        text: str, device: str, agent: str, policy: DoubleTexting | None,
    ) -> SendRecord:
        message, run = new_id("m"), new_id("r")
        active: list[asyncpg.Record] = []
        async with conn.transaction():
            if conversation is None:
                conversation = new_id("c")
                await conn.execute(sql.INSERT_CONVERSATION, user, conversation, _title(text), agent,
                                   policy or DoubleTexting.ENQUEUE)
                policy = policy or DoubleTexting.ENQUEUE
            else:
                owned = await conn.fetchrow(sql.LOCK_CONVERSATION, user, conversation)
                if owned is None:
                    raise NotFound(f"conversation {conversation}")
                agent, policy = owned["agent"], policy or DoubleTexting(owned["double_texting"])
                active = list(await conn.fetch(sql.ACTIVE_RUNS, conversation))
                await conn.execute(sql.TOUCH_CONVERSATION, user, conversation)
            if active and policy == DoubleTexting.REJECT:
                raise Conflict(active[-1]["id"])
            replaces = policy in (DoubleTexting.INTERRUPT, DoubleTexting.ROLLBACK)
            supersedes = [r["id"] for r in active] if replaces else []
            status, behind = (RunStatus.WAITING, active[-1]["id"]) if active else (RunStatus.QUEUED, None)
            inserted = await conn.fetchval(
                sql.INSERT_USER_MESSAGE, user, message, conversation, text, client_id, device, run
            )
            if inserted is None:
                raise asyncpg.UniqueViolationError("duplicate client id")
            await conn.execute(sql.INSERT_RUN, user, run, conversation, message, status, policy, behind,
                               supersedes)
            if policy == DoubleTexting.ROLLBACK and supersedes:
                await conn.execute(sql.MARK_DISCARD, supersedes)
        return SendRecord(conversation=conversation, message=message, run=run, seq=None,
                          status=status, policy=policy, behind=behind,
                          supersedes=tuple(supersedes))

    async def conversation_agent(self, user: str, conversation: str) -> str:
        """The agent of the user's conversation; NotFound when it is not theirs."""
        async with self._conn() as conn:
            agent: str | None = await conn.fetchval(sql.OWNS_CONVERSATION, user, conversation)
        if agent is None:
            raise NotFound(f"conversation {conversation}")
        return agent

    async def set_message_seq(self, user: str, message: str, seq: int) -> None:
        async with self._conn() as conn:
            await conn.execute(sql.SET_MESSAGE_SEQ, user, message, seq)

    async def get_run(self, user: str, run: str) -> asyncpg.Record:
        async with self._conn() as conn:
            row = await conn.fetchrow(sql.GET_RUN, user, run)
        if row is None:
            raise NotFound(f"run {run}")
        return row

    async def cancel_queued_run(self, user: str, run: str) -> asyncpg.Record | None:
        """Cancel a run no worker has started (waiting or queued): returns its conversation,
        message and discard flag (a rolled-back run's message is deleted), or None if it had
        started or ended."""
        async with self._conn() as conn, conn.transaction():
            row = await conn.fetchrow(sql.CANCEL_QUEUED_RUN, user, run)
            if row is not None and row["discard"]:
                await conn.execute(sql.DELETE_MESSAGE, row["message_id"])
            return row

    async def promote_next(self, conversation: str) -> asyncpg.Record | None:
        """Queue the conversation's next waiting run if nothing else is queued or running;
        returns (id, user_id) of the run to put on the job stream."""
        async with self._conn() as conn, conn.transaction():
            await conn.execute(sql.LOCK_CONVERSATION_BY_ID, conversation)
            return await conn.fetchrow(sql.PROMOTE_NEXT, conversation)

    async def stranded_conversations(self, *, waiting_for_s: float, limit: int = 100) -> list[str]:
        async with self._conn() as conn:
            rows = await conn.fetch(sql.STRANDED_CONVERSATIONS, float(waiting_for_s), limit)
        return [r["conversation_id"] for r in rows]

    async def claim_run(self, run: str, *, worker: str, lease_s: float, version: str | None = None
                        ) -> RunClaim | None:
        """Take `run` for `worker` under a lease, recording the agent `version` that serves it."""
        async with self._conn() as conn:
            row = await conn.fetchrow(sql.CLAIM_RUN, run, worker, float(lease_s), version)
        if row is None:
            return None
        resume = None
        if row["question"] is not None and row["answer"] is not None:
            # What it had said and done when it asked (kept with the question: `partial` moves on
            # with the checkpoints of an attempt that went on after the answer and then died).
            asked = orjson.loads(row["question"])
            answer = str(orjson.loads(row["answer"])["text"])
            resume = Resume(question=Question.from_json(asked), answer=answer,
                            text=str(asked.get("text", "")), tools=list(asked.get("tools", [])))
        return RunClaim(run=run, user=row["user_id"], conversation=row["conversation_id"],
                        message=row["message_id"], attempts=row["attempts"], agent=row["agent"],
                        resume=resume)

    async def ask_run(self, run: str, *, worker: str, question: Question, text: str,
                      tools: list[dict[str, Any]]) -> bool:
        """Record the question `worker`'s run asks its user (before devices are told), with what
        it had said and done by then; False when the worker no longer holds the run."""
        asked = orjson.dumps({**question.to_json(), "text": text, "tools": tools}).decode()
        async with self._conn() as conn:
            return await conn.fetchval(sql.ASK_RUN, run, worker, asked) is not None

    async def pause_run(self, run: str, *, worker: str, question: Question, text: str,
                        tools: list[dict[str, Any]], seq: int | None, epoch: str, timeout_s: float
                        ) -> tuple[bool, str | None]:
        """Let `worker`'s run wait for its user's answer to `question` (paused, no lease) until
        `timeout_s` from now, saving its text and tool calls so far (as of `seq`). Returns (held,
        answer): held False when the worker no longer holds the run; an answer when it had come
        already (the run then stays running, with this worker)."""
        async with self._conn() as conn:
            asked = orjson.dumps({**question.to_json(), "text": text, "tools": tools}).decode()
            row = await conn.fetchrow(sql.PAUSE_RUN, run, worker, asked, text, orjson.dumps(tools).decode(),
                                      seq, epoch or None, float(timeout_s))
        if row is None:
            return False, None
        return True, row["answer"] if row["status"] == RunStatus.RUNNING else None

    async def answer_run(self, user: str, run: str, request: str, text: str, *, device: str
                         ) -> asyncpg.Record | str | None:
        """Record `device`'s answer to a run's question, if it is the first (or `device` repeats
        itself): (status, conversation_id, text, agent, agent_version) after it, `text` the answer
        that counts and status `queued` when the run was paused on it (queue its job). Else the
        device whose answer counts (str), or None when the run waits on no such question."""
        async with self._conn() as conn:
            row = await conn.fetchrow(sql.ANSWER_RUN, user, run, request, text, device)
            if row is not None:
                return row
            state = await conn.fetchrow(sql.RUN_ANSWER, user, run)
        answer = orjson.loads(state["answer"]) if state is not None and state["answer"] else None
        if answer is not None and answer["request"] == request:
            return str(answer.get("by") or "another device")
        return None

    async def paused_run(self, user: str, run: str) -> asyncpg.Record | None:
        """The user's run if it asked a question and holds no worker (paused, or queued again with
        its answer): id, conversation_id, partial, partial_tools, partial_seq."""
        async with self._conn() as conn:
            return await conn.fetchrow(sql.PAUSED_RUN, user, run)

    async def count_paused(self) -> int:
        """How many runs wait for their user's answer now (all users')."""
        async with self._conn() as conn:
            return int(await conn.fetchval(sql.COUNT_PAUSED))

    async def expired_pauses(self, *, limit: int = 100) -> list[asyncpg.Record]:
        """Paused runs past their answer's deadline: id, partial, partial_tools."""
        async with self._conn() as conn:
            return list(await conn.fetch(sql.EXPIRED_PAUSES, limit))

    async def prune_checkpoints(self) -> None:
        """Delete LangGraph's saved state of runs that ended."""
        async with self._conn() as conn:
            for statement in sql.PRUNE_CHECKPOINTS:
                await conn.execute(statement)

    async def renew_lease(self, run: str, *, worker: str, lease_s: float) -> bool:
        async with self._conn() as conn:
            return await conn.fetchval(sql.RENEW_LEASE, run, worker, float(lease_s)) is not None

    async def run_state(self, run: str) -> asyncpg.Record | None:
        async with self._conn() as conn:
            return await conn.fetchrow(sql.RUN_STATE, run)

    async def history(self, conversation: str, upto_message: str) -> list[tuple[str, str]]:
        """The conversation's messages through `upto_message`, oldest first, as (role, text)."""
        async with self._conn() as conn:
            rows = await conn.fetch(sql.HISTORY, conversation, upto_message)
        return [(r["role"], r["content"]) for r in rows]

    async def finish_run(
        self, run: str, *, status: str, text: str, worker: str | None, error_code: str | None = None,
        error_message: str | None = None, tools: list[dict[str, Any]] | None = None,
        usage: tuple[int, int] | None = None,
    ) -> Finished | None:
        """End a run (completed, cancelled or failed) and store its text as the assistant message.
        With `worker`, only while that worker still holds the run (a worker whose lease ran out
        and was taken over must not end the new attempt). `usage`: (prompt, completion) tokens, when
        the endpoint reported them. None when it was not ended here."""
        async with self._conn() as conn, conn.transaction():
            state = await conn.fetchrow(sql.LOCK_RUN, run)
            if state is None or state["status"] not in IN_FLIGHT:
                return None
            if worker is not None and state["worker"] != worker:
                return None
            if state["discard"]:
                # Rolled back: the run and the message that started it leave no trace.
                text = ""
                await conn.execute(sql.DELETE_MESSAGE, state["message_id"])
            message = new_id("m") if text or (tools and not state["discard"]) else None
            if message:
                await conn.execute(sql.INSERT_ASSISTANT_MESSAGE, message, state["conversation_id"],
                                   state["user_id"], text, run, orjson.dumps(tools or []).decode())
            prompt, completion = usage if usage is not None else (None, None)
            await conn.execute(sql.FINISH_RUN, run, status, text, message, error_code, error_message,
                               prompt, completion)
            return Finished(message=message, discarded=bool(state["discard"]))

    async def set_terminal_seq(self, run: str, seq: int) -> None:
        async with self._conn() as conn:
            await conn.execute(sql.SET_TERMINAL_SEQ, run, seq)

    # Lost ends (agent_worker.worker.Worker.republish_lost_ends)

    async def recent_ends(self, *, within_s: float, limit: int) -> list[asyncpg.Record]:
        """Runs whose end was published in the last `within_s`, newest first: id, user_id,
        terminal_seq, end_epoch (None until a sweep checked it) and message_seq (the seq of the
        `message.created` that began the run; None when that message is gone)."""
        async with self._conn() as conn:
            return list(await conn.fetch(sql.RECENT_ENDS, float(within_s), limit))

    async def see_epoch(self, user: str, epoch: str) -> float:
        """Seconds since `user`'s stream was first seen in `epoch` (0 when seen for the first time now)."""
        async with self._conn() as conn:
            age_s: float = await conn.fetchval(sql.SEE_EPOCH, user, epoch)
        return age_s

    async def set_end_epoch(self, runs: list[str], epoch: str) -> None:
        """Record that the ends of `runs` are in the stream's epoch `epoch`."""
        async with self._conn() as conn:
            await conn.execute(sql.SET_END_EPOCH, runs, epoch)

    async def set_end_again(self, run: str, seq: int, epoch: str) -> None:
        """Record the end of `run` published again, at `seq` in epoch `epoch`."""
        async with self._conn() as conn:
            await conn.execute(sql.SET_END_AGAIN, run, seq, epoch)

    async def ended_run(self, run: str) -> asyncpg.Record | None:
        """An ended run as its end event tells it (None when not ended, or gone)."""
        async with self._conn() as conn:
            return await conn.fetchrow(sql.ENDED_RUN, run)

    async def save_partial(self, run: str, text: str, seq: int, epoch: str,
                           tools: list[dict[str, Any]] | None = None) -> None:
        """Checkpoint a running run's answer (and tool calls) so far, as of `seq` in history `epoch`."""
        async with self._conn() as conn:
            await conn.execute(sql.SAVE_PARTIAL, run, text, seq, epoch, orjson.dumps(tools or []).decode())

    async def count_runs_in_flight(self, user: str, client_id: str) -> tuple[int, bool]:
        """The user's runs not yet ended, and whether `client_id` was already sent."""
        async with self._conn() as conn:
            row = await conn.fetchrow(sql.COUNT_RUNS_IN_FLIGHT, user, client_id)
        return int(row["in_flight"]), bool(row["seen"])

    async def runs_in_flight(self, user: str) -> list[RunInFlight]:
        """The user's runs not yet ended, oldest first. Every socket asks as it opens: the users
        asked in one loop turn are read in one query (`common.batching`)."""
        return await self._in_flight.get(user)

    async def _runs_in_flight_of(self, users: list[str]) -> dict[str, list[RunInFlight]]:
        async with self._conn() as conn:
            rows = await conn.fetch(sql.RUNS_IN_FLIGHT, users)
        runs: dict[str, list[RunInFlight]] = {}
        for r in rows:
            runs.setdefault(r["user_id"], []).append(RunInFlight(
                run=r["id"], conversation=r["conversation_id"], status=r["status"], partial=r["partial"],
                partial_seq=r["partial_seq"], partial_epoch=r["partial_epoch"],
                tools=tuple(orjson.loads(r["partial_tools"])),
                question=Question.from_json(orjson.loads(r["question"])) if r["question"] else None))
        return runs

    async def stale_runs(self, *, queued_for_s: float, limit: int = 100) -> list[asyncpg.Record]:
        async with self._conn() as conn:
            return list(await conn.fetch(sql.STALE_RUNS, float(queued_for_s), limit))

    async def touch_run(self, run: str) -> None:
        async with self._conn() as conn:
            await conn.execute(sql.TOUCH_RUN, run)

    # The admin API (ws_node.admin): operators see every user's runs

    async def admin_runs_in_flight(self, *, user: str | None, limit: int) -> list[asyncpg.Record]:
        """Runs not yet ended (waiting, queued, running), oldest first, of `user` or of everyone:
        id, user_id, conversation_id, status, worker, attempts, lease_until, created_at, age_s."""
        async with self._conn() as conn:
            return list(await conn.fetch(sql.ADMIN_RUNS_IN_FLIGHT, user, limit))

    async def run_statuses(self, runs: list[str]) -> dict[str, tuple[str, str | None]]:
        """run -> (status, error_code) for those of `runs` that still exist."""
        async with self._conn() as conn:
            rows = await conn.fetch(sql.RUN_STATUSES, runs)
        return {r["id"]: (r["status"], r["error_code"]) for r in rows}

    async def retry_run(self, failed: str, run: str) -> SendRecord | None:
        """Store `run`, a new run answering the user message of the failed run `failed` (an
        operator retrying a dead letter): queued, or waiting behind the conversation's last run in
        flight, as a send under the `enqueue` policy would be. Idempotent under `run`: called again,
        it returns what the first call stored. None when `failed` did not fail, or stored an answer
        (nothing to answer again); NotFound when it or its user message is gone (the conversation
        was deleted, or the run rolled back)."""
        async with self._conn() as conn, conn.transaction():
            source = await conn.fetchrow(sql.RETRY_SOURCE, failed)
            if source is None:
                raise NotFound(f"run {failed} or its message")
            if source["status"] != RunStatus.FAILED or source["answer_message_id"] is not None:
                return None
            user, conversation, message = source["user_id"], source["conversation_id"], source["message_id"]
            await conn.execute(sql.LOCK_CONVERSATION_BY_ID, conversation)  # as a send, one at a time
            stored = await conn.fetchrow(sql.SEND_RUN, run)
            if stored is not None:
                status, behind = RunStatus(stored["status"]), stored["behind"]
            else:
                active = list(await conn.fetch(sql.ACTIVE_RUNS, conversation))
                status, behind = (RunStatus.WAITING, active[-1]["id"]) if active else (RunStatus.QUEUED, None)
                await conn.execute(sql.INSERT_RUN, user, run, conversation, message, status,
                                   DoubleTexting.ENQUEUE, behind, [])
                await conn.execute(sql.TOUCH_CONVERSATION, user, conversation)
        return SendRecord(conversation=conversation, message=message, run=run, seq=None, status=status,
                          policy=DoubleTexting.ENQUEUE, behind=behind, agent=source["agent"])

    # REST

    async def list_conversations(
        self, user: str, *, limit: int, before: datetime | None
    ) -> list[Conversation]:
        async with self._conn() as conn:
            rows = await conn.fetch(sql.LIST_CONVERSATIONS, user, before, limit)
        return [Conversation(**dict(r)) for r in rows]

    async def create_conversation(
        self, user: str, *, title: str, agent: str, double_texting: str = DoubleTexting.ENQUEUE
    ) -> Conversation:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                sql.INSERT_CONVERSATION, user, new_id("c"), title, agent, double_texting
            )
        return Conversation(**dict(row))

    async def get_conversation(self, user: str, conversation: str) -> Conversation:
        async with self._conn() as conn:
            row = await conn.fetchrow(sql.GET_CONVERSATION, user, conversation)
        if row is None:
            raise NotFound(f"conversation {conversation}")
        return Conversation(**dict(row))

    async def delete_conversation(self, user: str, conversation: str) -> None:
        async with self._conn() as conn:
            if await conn.fetchval(sql.DELETE_CONVERSATION, user, conversation) is None:
                raise NotFound(f"conversation {conversation}")

    async def list_messages(
        self, user: str, conversation: str, *, limit: int, before: int | None
    ) -> list[Message]:
        async with self._conn() as conn:
            if await conn.fetchval(sql.OWNS_CONVERSATION, user, conversation) is None:
                raise NotFound(f"conversation {conversation}")
            rows = await conn.fetch(sql.LIST_MESSAGES, user, conversation, before, limit)
        return [Message(pos=r["pos"], id=r["id"], role=r["role"], content=r["content"], device=r["device"],
                        run=r["run_id"], seq=r["seq"], created_at=r["created_at"],
                        tools=orjson.loads(r["tools"])) for r in rows]

    async def usage(self, user: str, since: datetime) -> dict[str, int]:
        """The tokens of the user's runs that ended since `since` and whose endpoint reported usage."""
        async with self._conn() as conn:
            row = await conn.fetchrow(sql.USAGE, user, since)
        return {"runs": row["runs"], "prompt_tokens": row["prompt_tokens"],
                "completion_tokens": row["completion_tokens"]}

    async def run_view(self, user: str, run: str) -> RunView:
        """`user`'s run `run` (NotFound for another user's, exactly like a missing one)."""
        async with self._conn() as conn:
            row = await conn.fetchrow(sql.RUN_VIEW, user, run)
        if row is None:
            raise NotFound(f"run {run}")
        error = (row["error_code"], row["error_message"] or "") if row["error_code"] else None
        return RunView(run=row["id"], conversation=row["conversation_id"], status=RunStatus(row["status"]),
                       attempts=row["attempts"], text=row["partial"], partial_seq=row["partial_seq"],
                       partial_epoch=row["partial_epoch"], answer_message=row["answer_message_id"],
                       error=error, message_seq=row["message_seq"], created_at=row["created_at"],
                       updated_at=row["updated_at"], agent=row["agent"], agent_version=row["agent_version"])


def _title(text: str) -> str:
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    return first_line[:80]
