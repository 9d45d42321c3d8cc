"""Client commands: send, cancel, ping, auth. Each returns the one reply frame owed to a command id."""

from __future__ import annotations

import orjson

from fanout.stream import Fenced
from persistence.records import SendRecord
from persistence.store import Conflict, NotFound, new_id
from protocol import Ack, Auth, Cancel, Command, ErrorCode, Ping, Pong, ProtocolError, Respond, Send, encode
from runs import agents
from runs.lifecycle import RunDeps, enqueue_run, publish_end, start_next
from ws_node import limits
from ws_node.auth import AuthUnavailable, Forbidden, TokenLease, Unauthorized
from ws_node.connection import Connection
from ws_node.services import Services

TERMINAL = ("completed", "cancelled", "failed")


async def execute(svc: Services, conn: Connection, cmd: Command, lease: TokenLease | None = None) -> str:
    if isinstance(cmd, Send):
        return await send(svc, conn, cmd)
    if isinstance(cmd, Cancel):
        return await cancel(svc, conn, cmd)
    if isinstance(cmd, Ping):
        return encode(Pong(cmd.id))
    if isinstance(cmd, Auth):
        return await auth(lease, cmd)
    if isinstance(cmd, Respond):
        return await respond(svc, conn, cmd)
    raise AssertionError(cmd)


async def auth(lease: TokenLease | None, cmd: Auth) -> str:
    """Renew the socket's token: the socket then lives until the new `exp`. A token that does not
    verify, or is another user's, is refused and the old one stays in force."""
    if lease is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "auth is not accepted on this socket", cmd.id)
    try:
        identity = await lease.renew(cmd.token)
    except Unauthorized:
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "token is invalid or expired", cmd.id) from None
    except Forbidden:
        raise ProtocolError(ErrorCode.FORBIDDEN, "token is for another user", cmd.id) from None
    except AuthUnavailable:
        raise ProtocolError(ErrorCode.UNAVAILABLE, "cannot verify tokens right now; retry", cmd.id) from None
    return encode(Ack(cmd.id, expires_at=int(identity.expires_at)))


async def send(svc: Services, conn: Connection, cmd: Send) -> str:
    """Store the message and its run, publish `message.created`, queue the run, then ack.
    Each step is idempotent under the client's id, so a retry after any failure completes the
    same send instead of starting a second one; only a fully done send is acked."""
    client_id = cmd.id or new_id("s")
    limit = svc.settings.max_runs_in_flight
    if await limits.runs_in_flight_exceeded(svc.store, conn.user, cmd.id, limit):
        raise ProtocolError(ErrorCode.RATE_LIMITED,
                            f"{limit} runs already in flight; wait for one to end or cancel one", cmd.id)
    if cmd.agent is not None and cmd.conversation is None:
        try:
            await agents.check(svc.redis, svc.keys, cmd.agent)
        except agents.UnknownAgent as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc), cmd.id) from None
    try:
        record = await svc.store.accept_send(
            conn.user, client_id=client_id, conversation=cmd.conversation, text=cmd.text,
            device=conn.device, agent=cmd.agent or "default", policy=cmd.double_texting,
        )
    except NotFound:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"no conversation {cmd.conversation}", cmd.id) from None
    except Conflict as exc:
        raise ProtocolError(ErrorCode.CONFLICT, f"{exc}; the conversation's double-texting policy is reject",
                            cmd.id) from None
    seq = record.seq
    if seq is None:
        published = await svc.stream.publish(
            conn.user, conversation=record.conversation, run=record.run, event="message.created",
            data={"message": record.message, "role": "user", "text": cmd.text, "device": conn.device,
                  "client_id": client_id},
            producer=f"msg:{record.message}", pseq=1,
        )
        await _double_text(svc, conn, record)
        await svc.store.set_message_seq(conn.user, record.message, published.seq)
        seq = published.seq
    return encode(Ack(cmd.id, conversation=record.conversation, message=record.message, run=record.run,
                        seq=seq))


async def _double_text(svc: Services, conn: Connection, record: SendRecord) -> None:
    """Start the new run, or tell every device it waits, and cancel what the policy replaces.
    Every step is idempotent, so a retried send repeats them harmlessly."""
    if record.status == "queued":
        await enqueue_run(svc.redis, svc.keys, run=record.run, user=conn.user,
                          conversation=record.conversation)
        return
    await svc.stream.publish(
        conn.user, conversation=record.conversation, run=record.run, event="run.queued",
        data={"behind": record.behind, "policy": record.policy, "message": record.message},
        producer=f"run:{record.run}:queued", pseq=1,
    )
    for run in record.supersedes:
        await _cancel(svc, conn.user, run, by=conn.device)
    # The run it waited behind may have ended meanwhile; then nobody else would start it.
    await start_next(_deps(svc), record.conversation)


def _deps(svc: Services) -> RunDeps:
    return RunDeps(redis=svc.redis, keys=svc.keys, stream=svc.stream, store=svc.store)


async def _cancel(svc: Services, user: str, run: str, *, by: str) -> None:
    """Fence the run so no later event of it gets a seq; a run no worker took yet is ended here
    (and the next one started), a running one by its worker when the fence stops it."""
    await svc.stream.fence(user, run)
    cancelled = await svc.store.cancel_queued_run(user, run)
    if cancelled is not None:
        await publish_end(_deps(svc), user, cancelled["conversation_id"], run, "cancelled", text="",
                          message=None, discarded=cancelled["discard"], by=by)


async def cancel(svc: Services, conn: Connection, cmd: Cancel) -> str:
    """Fence the run so no later event of it gets a seq; a run no worker took yet is ended here,
    a running one by its worker when the fence stops it."""
    try:
        run = await svc.store.get_run(conn.user, cmd.run)
    except NotFound:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"no run {cmd.run}", cmd.id) from None
    if run["status"] in TERMINAL:
        raise ProtocolError(ErrorCode.CONFLICT, f"run {cmd.run} already {run['status']}", cmd.id)
    await _cancel(svc, conn.user, cmd.run, by=conn.device)
    return encode(Ack(cmd.id, run=cmd.run))


async def respond(svc: Services, conn: Connection, cmd: Respond) -> str:
    """Answer a run's question. The first answer from any device wins (HSETNX); every device is
    told who answered (`run.input_received`), later answers get `conflict`. Repeating one's own
    answer (a retry) is harmless: the event is deduped and the worker takes one answer per question."""
    try:
        run = await svc.store.get_run(conn.user, cmd.run)
    except NotFound:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"no run {cmd.run}", cmd.id) from None
    if run["status"] != "running":
        raise ProtocolError(ErrorCode.CONFLICT, f"run {cmd.run} is {run['status']}, not waiting for input",
                            cmd.id)
    answered = svc.keys.answered(conn.user, cmd.run)
    if not await svc.redis.hsetnx(answered, cmd.request, conn.device):
        by: str | None = await svc.redis.hget(answered, cmd.request)  # type: ignore[assignment]
        if by != conn.device:
            raise ProtocolError(ErrorCode.CONFLICT, f"already answered from {by}", cmd.id)
    await svc.redis.expire(answered, svc.settings.history_ttl_s)
    try:
        await svc.stream.publish(
            conn.user, conversation=run["conversation_id"], run=cmd.run, event="run.input_received",
            data={"request": cmd.request, "text": cmd.text, "by": conn.device},
            producer=f"run:{cmd.run}:input:{cmd.request}", pseq=1, fenced_run=cmd.run,
        )
    except Fenced:
        raise ProtocolError(ErrorCode.CONFLICT, f"run {cmd.run} was cancelled", cmd.id) from None
    answers = svc.keys.answers(conn.user, cmd.run)
    await svc.redis.rpush(answers, orjson.dumps({"request": cmd.request, "text": cmd.text}).decode())
    await svc.redis.expire(answers, svc.settings.history_ttl_s)
    return encode(Ack(cmd.id, run=cmd.run, request=cmd.request))
