"""The admin API (`/v1/admin/…`) for operators, and the node heartbeat it reads back.

Every route needs a token that carries the admin role (`Identity.admin`: the claim
`AUTH_ADMIN_CLAIM` is, or lists, `AUTH_ADMIN_VALUE`; docs/security.md). `setup` wraps each handler
in that check, so no route can forget it: without a token 401, with a user's token 403, both in
the REST error shape. docs/protocol.md lists the routes and their answers:

    GET  /v1/admin/users/{user}/devices        the user's devices online, and their nodes
    GET  /v1/admin/runs?user=&limit=           runs not yet ended (status, worker, attempt, age), the queue
    GET  /v1/admin/nodes                       nodes alive: sockets, users, readiness
    GET  /v1/admin/workers                     workers alive: agents and load
    GET  /v1/admin/dead-letters?after=&limit=  the dead-letter stream, oldest first
    POST /v1/admin/dead-letters/{entry}/retry  answer the dead run's message again, as a new run
    POST /v1/admin/dead-letters/{entry}/discard

Retrying starts a NEW run for the same user message instead of making the dead one runnable
again: the dead run already published its one end (`run.failed`), and every end of a run shares
one producer id, so a second end would be dropped and the devices would never see the answer
finish; clients also treat an ended run as final. The new run's id is derived from the dead
letter's entry, so a retry repeated after a failure half-way stores and queues one run, not two.

Nodes and workers are seen through heartbeats (`common.heartbeat`): each rewrites a small JSON
record in a Redis hash (`Keys.nodes`, `Keys.workers`) every `HEARTBEAT_S`; a record carries its
own expiry, so a process that died leaves the list once it passes, and is pruned then.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from common.heartbeat import HEARTBEAT_S, beat, heartbeats, iso
from persistence.store import NotFound
from runs.queue import DeadLetter
from ws_node import presence
from ws_node.auth import IDENTITY
from ws_node.rest import RestError, json_response
from ws_node.services import SERVICES, Services, answer_within

log = logging.getLogger(__name__)

MAX_LIMIT = 1000
_ENTRY = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")

Handler = Callable[[web.Request, Services], Awaitable[web.Response]]


def setup(app: web.Application) -> None:
    """Add the admin routes and the node's heartbeat (after the services' cleanup context)."""
    app.cleanup_ctx.append(heartbeat_ctx)
    app.router.add_get("/v1/admin/users/{user}/devices", _admin_only(user_devices))
    app.router.add_get("/v1/admin/runs", _admin_only(runs_in_flight))
    app.router.add_get("/v1/admin/nodes", _admin_only(nodes))
    app.router.add_get("/v1/admin/workers", _admin_only(workers))
    app.router.add_get("/v1/admin/dead-letters", _admin_only(dead_letters))
    app.router.add_post("/v1/admin/dead-letters/{entry}/retry", _admin_only(retry_dead_letter))
    app.router.add_post("/v1/admin/dead-letters/{entry}/discard", _admin_only(discard_dead_letter))


def _admin_only(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def checked(request: web.Request) -> web.Response:
        if IDENTITY not in request:  # the auth middleware verified no token
            raise RestError(401, "unauthorized", "missing or invalid token")
        if not request[IDENTITY].admin:
            raise RestError(403, "forbidden", "the admin API needs a token with the admin role")
        return await handler(request, request.app[SERVICES])

    return checked


# Routes


async def user_devices(request: web.Request, svc: Services) -> web.Response:
    user = request.match_info["user"]
    if not 0 < len(user) <= 128 or not user.isprintable():
        raise RestError(400, "bad_request", "user must be 1-128 printable characters")
    online = await presence.online(svc.redis, svc.keys, user)
    alive = {record["node"] for record in await heartbeats(svc.redis, svc.keys.nodes)}
    devices = [{"device": device, "node": node, "node_alive": node in alive}
               for device, node in sorted(online.items())]
    return json_response({"user": user, "devices": devices})


async def runs_in_flight(request: web.Request, svc: Services) -> web.Response:
    user = request.query.get("user") or None
    if user is not None and (len(user) > 128 or not user.isprintable()):
        raise RestError(400, "bad_request", "user must be 1-128 printable characters")
    limit = _limit(request)
    rows = await svc.store.admin_runs_in_flight(user=user, limit=limit)
    backlog = await svc.runs.queue.backlog(await svc.runs.all_pools())
    queue = {"depth": backlog.depth, "oldest_s": round(backlog.oldest_s, 3), "taken": backlog.taken}
    return json_response({"runs": [_run_json(r) for r in rows], "limit": limit, "queue": queue})


def _run_json(row: Any) -> dict[str, Any]:
    lease_until = row["lease_until"]
    return {"run": row["id"], "user": row["user_id"], "conversation": row["conversation_id"],
            "status": row["status"], "worker": row["worker"], "attempt": row["attempts"],
            "age_s": round(row["age_s"], 3), "created_at": row["created_at"].isoformat(),
            "lease_until": lease_until.isoformat() if lease_until else None}


async def nodes(request: web.Request, svc: Services) -> web.Response:
    return json_response({"nodes": await heartbeats(svc.redis, svc.keys.nodes)})


async def workers(request: web.Request, svc: Services) -> web.Response:
    alive = await heartbeats(svc.redis, svc.keys.workers)
    return json_response({"workers": alive, "busy": sum(w.get("busy", 0) for w in alive),
                          "slots": sum(w.get("concurrency", 0) for w in alive)})


async def dead_letters(request: web.Request, svc: Services) -> web.Response:
    after = request.query.get("after") or None
    if after is not None and not _ENTRY.fullmatch(after):
        raise RestError(400, "bad_request", "after must be an entry id from next_after")
    limit = _limit(request)
    queue = svc.runs.queue
    letters = await queue.dead_letters(after=after, limit=limit)
    total = await queue.dead_letter_count()
    runs = await svc.store.run_statuses([letter.job.run for letter in letters]) if letters else {}
    entries = []
    for letter in letters:
        status, error = runs.get(letter.job.run, (None, None))
        entries.append({"entry": letter.entry, "run": letter.job.run, "user": letter.job.user,
                        "conversation": letter.job.conversation, "deliveries": letter.deliveries,
                        "dead_at": iso(letter.dead_at()), "run_status": status, "error_code": error})
    next_after = letters[-1].entry if len(letters) == limit else None
    return json_response({"dead_letters": entries, "total": total, "next_after": next_after})


async def retry_dead_letter(request: web.Request, svc: Services) -> web.Response:
    """A new run answers the dead run's user message (see the module's docstring for why not the
    same run); then the dead letter is removed. Every step is safe to repeat."""
    letter = await _dead_letter(request, svc)
    dead, run = letter.job.run, _retry_run_id(letter)
    try:
        record = await svc.runs.answer_again(letter.job.user, dead, run)
    except NotFound:
        raise RestError(409, "conflict", f"run {dead} or its message no longer exists (conversation "
                                         "deleted or run rolled back): discard the dead letter") from None
    if record is None:
        raise RestError(409, "conflict", f"run {dead} did not fail without an answer: nothing to retry; "
                                         "discard the dead letter")
    conversation = record.conversation
    await svc.runs.queue.drop_dead_letter(letter.entry)
    log.info("dead letter %s retried: run %s answers the message of run %s", letter.entry, run, dead)
    return json_response({"entry": letter.entry, "retried": dead, "run": run, "conversation": conversation,
                          "message": record.message, "status": record.status, "behind": record.behind}, 201)


async def discard_dead_letter(request: web.Request, svc: Services) -> web.Response:
    letter = await _dead_letter(request, svc)
    if not await svc.runs.queue.drop_dead_letter(letter.entry):
        raise RestError(404, "not_found", f"no dead letter {letter.entry}")
    log.info("dead letter %s (run %s) discarded", letter.entry, letter.job.run)
    return json_response({"entry": letter.entry, "run": letter.job.run, "discarded": True})


async def _dead_letter(request: web.Request, svc: Services) -> DeadLetter:
    entry = request.match_info["entry"]
    letter = await svc.runs.queue.dead_letter_entry(entry) if _ENTRY.fullmatch(entry) else None
    if letter is None:
        raise RestError(404, "not_found", f"no dead letter {entry[:40]!r}")
    return letter


def _retry_run_id(letter: DeadLetter) -> str:
    """The retry's run id, the same for every retry of one dead letter (shaped as `store.new_id`)."""
    return "r_" + hashlib.sha256(f"retry:{letter.entry}:{letter.job.run}".encode()).hexdigest()[:20]


def _limit(request: web.Request, default: int = 100) -> int:
    raw = request.query.get("limit", str(default))
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= MAX_LIMIT:
        raise RestError(400, "bad_request", f"limit must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


# Heartbeats


async def heartbeat_ctx(app: web.Application) -> AsyncIterator[None]:
    """The node's heartbeat from start to shutdown (draining shows in it); removed on the way out."""
    svc = app[SERVICES]
    task = asyncio.create_task(_node_heartbeat(svc, started_at=iso(time.time())), name="admin-heartbeat")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    with contextlib.suppress(Exception):
        await svc.redis.hdel(svc.keys.nodes, svc.settings.node_id)


async def _node_heartbeat(svc: Services, *, started_at: str) -> None:
    node = svc.settings.node_id
    ping: asyncio.Future[None] | None = None
    while True:
        try:
            # One ping at a time: on a dead network path a ping holds its pooled connection until
            # the command timeout (10 s), and one every beat would take the pool from the sends
            # (tests/test_faults.py, the Postgres blackhole).
            if ping is None or ping.done():
                ping = asyncio.ensure_future(svc.store.ping())
                postgres, = await answer_within(2.0, ping)
            else:
                postgres = False
            ready = postgres and svc.hub.healthy and not svc.draining
            await beat(svc.redis, svc.keys.nodes, node, {
                "node": node, "sockets": len(svc.connections), "users": svc.hub.users, "ready": ready,
                "draining": svc.draining, "pubsub": svc.hub.healthy, "postgres": postgres,
                "started_at": started_at})
        except Exception as exc:  # Redis away: the record expires, and the node drops off the list
            log.warning("node heartbeat failed: %r", exc)
        await asyncio.sleep(HEARTBEAT_S)


