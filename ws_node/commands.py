"""Client commands: send, cancel, ping. Each returns the one reply frame owed to a command id."""

from __future__ import annotations

from agent_worker.jobs import enqueue_run
from persistence.store import NotFound, new_id
from ws_node import protocol
from ws_node.connection import Connection
from ws_node.protocol import Cancel, Command, ErrorCode, Ping, ProtocolError, Send
from ws_node.services import Services

TERMINAL = ("completed", "cancelled", "failed")


async def execute(svc: Services, conn: Connection, cmd: Command) -> str:
    if isinstance(cmd, Send):
        return await send(svc, conn, cmd)
    if isinstance(cmd, Cancel):
        return await cancel(svc, conn, cmd)
    if isinstance(cmd, Ping):
        return protocol.pong(cmd.id)
    raise AssertionError(cmd)


async def send(svc: Services, conn: Connection, cmd: Send) -> str:
    """Store the message and its run, publish `message.created`, queue the run, then ack.
    Each step is idempotent under the client's id, so a retry after any failure completes the
    same send instead of starting a second one; only a fully done send is acked."""
    client_id = cmd.id or new_id("s")
    try:
        record = await svc.store.accept_send(
            conn.user, client_id=client_id, conversation=cmd.conversation, text=cmd.text,
            device=conn.device, agent=cmd.agent or "default",
        )
    except NotFound:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"no conversation {cmd.conversation}", cmd.id) from None
    seq = record.seq
    if seq is None:
        published = await svc.stream.publish(
            conn.user, conversation=record.conversation, run=record.run, event="message.created",
            data={"message": record.message, "role": "user", "text": cmd.text, "device": conn.device,
                  "client_id": client_id},
            producer=f"msg:{record.message}", pseq=1,
        )
        await enqueue_run(
            svc.redis, svc.keys, run=record.run, user=conn.user, conversation=record.conversation
        )
        await svc.store.set_message_seq(conn.user, record.message, published.seq)
        seq = published.seq
    return protocol.ack(cmd.id, conversation=record.conversation, message=record.message, run=record.run,
                        seq=seq)


async def cancel(svc: Services, conn: Connection, cmd: Cancel) -> str:
    """Fence the run so no later event of it gets a seq; a run no worker took yet is ended here,
    a running one by its worker when the fence stops it."""
    try:
        run = await svc.store.get_run(conn.user, cmd.run)
    except NotFound:
        raise ProtocolError(ErrorCode.NOT_FOUND, f"no run {cmd.run}", cmd.id) from None
    if run["status"] in TERMINAL:
        raise ProtocolError(ErrorCode.CONFLICT, f"run {cmd.run} already {run['status']}", cmd.id)
    await svc.stream.fence(conn.user, cmd.run)
    conversation = await svc.store.cancel_queued_run(conn.user, cmd.run)
    if conversation is not None:
        published = await svc.stream.publish(
            conn.user, conversation=conversation, run=cmd.run, event="run.cancelled",
            data={"text": "", "message": None, "by": conn.device},
            producer=f"run:{cmd.run}:end", pseq=1, fenced_run=cmd.run, pass_fence=True,
        )
        await svc.store.set_terminal_seq(cmd.run, published.seq)
    return protocol.ack(cmd.id, run=cmd.run)
