"""Client commands: each frame becomes one call (on `runs.Runs` for send, cancel and respond) and
returns the one reply frame owed to its command id."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from fanout.broker import Fenced
from persistence.records import SendRecord
from persistence.store import Conflict, NotFound
from protocol import Ack, Auth, Cancel, Command, ErrorCode, Ping, Pong, ProtocolError, Respond, Send, encode
from runs.agents import AgentUnavailable, UnknownAgent
from runs.lifecycle import AlreadyAnswered, NotWaiting, Overloaded, RunEnded, TooManyRuns
from ws_node.auth import AuthUnavailable, Forbidden, TokenLease, Unauthorized
from ws_node.connection import Connection
from ws_node.services import Services

_tracer = trace.get_tracer("chorus.ws_node")

# A send to an agent with no live worker: when to try again (a restarting worker is back in seconds).
AGENT_RETRY_AFTER_MS = 5_000


async def execute(svc: Services, conn: Connection, cmd: Command, lease: TokenLease) -> str:
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


async def auth(lease: TokenLease, cmd: Auth) -> str:
    """Renew the socket's token: the socket then lives until the new `exp`. A token that does not
    verify, or is another user's, is refused and the old one stays in force."""
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
    """Accept the send, then ack it (see `accept_send`)."""
    record, seq = await accept_send(svc, conn.user, conn.device, cmd)
    return encode(Ack(cmd.id, conversation=record.conversation, message=record.message, run=record.run,
                      seq=seq))


async def accept_send(svc: Services, user: str, device: str, cmd: Send) -> tuple[SendRecord, int]:
    """Accept the send (stored, published, queued) for `user`'s `device`, the WebSocket's and
    HTTP's one path (ws_node.http_runs). Each step is idempotent under the client's id, so a
    retry after any failure completes the same send instead of starting a second one; only a
    fully done send is acked (`record.seq` is set when it was done before: a repeat). Raises
    `ProtocolError` with the code the client gets. Traced as `chorus.send`, the root of the
    run's trace (its context travels in the job)."""
    with _tracer.start_as_current_span("chorus.send", kind=SpanKind.SERVER) as span:
        record, seq = await _accept(svc, user, device, cmd)
        if span.is_recording():
            span.set_attributes({"chorus.user": user, "chorus.device": device,
                                 "chorus.conversation": record.conversation, "chorus.run": record.run or "",
                                 "chorus.message": record.message})
        return record, seq


async def _accept(svc: Services, user: str, device: str, cmd: Send) -> tuple[SendRecord, int]:
    try:
        return await svc.runs.accept_send(
            user, device, client_id=cmd.id, text=cmd.text, conversation=cmd.conversation,
            agent=cmd.agent, policy=cmd.double_texting,
        )
    except TooManyRuns as exc:
        raise ProtocolError(ErrorCode.RATE_LIMITED, str(exc), cmd.id) from None
    except Overloaded as exc:
        raise ProtocolError(ErrorCode.OVERLOADED, str(exc), cmd.id,
                            retry_after_ms=exc.retry_after_ms) from None
    except UnknownAgent as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc), cmd.id) from None
    except AgentUnavailable as exc:
        raise ProtocolError(ErrorCode.AGENT_UNAVAILABLE, str(exc), cmd.id,
                            retry_after_ms=AGENT_RETRY_AFTER_MS) from None
    except NotFound:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"no conversation {cmd.conversation}", cmd.id) from None
    except Conflict as exc:
        raise ProtocolError(ErrorCode.CONFLICT, f"{exc}; the conversation's double-texting policy is reject",
                            cmd.id) from None


async def cancel(svc: Services, conn: Connection, cmd: Cancel) -> str:
    await cancel_run(svc, conn.user, conn.device, cmd)
    return encode(Ack(cmd.id, run=cmd.run))


async def cancel_run(svc: Services, user: str, device: str, cmd: Cancel) -> None:
    """Cancel `user`'s run from `device` (the WebSocket's and HTTP's one path); raises
    `ProtocolError` with the code the client gets."""
    try:
        await svc.runs.cancel(user, cmd.run, by=device)
    except NotFound:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"no run {cmd.run}", cmd.id) from None
    except RunEnded as exc:
        raise ProtocolError(ErrorCode.CONFLICT, str(exc), cmd.id) from None


async def respond(svc: Services, conn: Connection, cmd: Respond) -> str:
    await respond_run(svc, conn.user, conn.device, cmd)
    return encode(Ack(cmd.id, run=cmd.run, request=cmd.request))


async def respond_run(svc: Services, user: str, device: str, cmd: Respond) -> None:
    """Answer `user`'s run's question from `device` (the WebSocket's and HTTP's one path); raises
    `ProtocolError` with the code the client gets."""
    try:
        await svc.runs.respond(user, cmd.run, request=cmd.request, text=cmd.text, device=device)
    except NotFound:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"no run {cmd.run}", cmd.id) from None
    except (NotWaiting, AlreadyAnswered) as exc:
        raise ProtocolError(ErrorCode.CONFLICT, str(exc), cmd.id) from None
    except Fenced:
        raise ProtocolError(ErrorCode.CONFLICT, f"run {cmd.run} was cancelled", cmd.id) from None
