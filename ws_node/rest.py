"""REST: conversations and their messages, for the authenticated user only."""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from common.redis_client import TRANSIENT
from persistence.store import NotFound, Unavailable
from protocol.vocabulary import DoubleTexting
from runs.agents import UnknownAgent
from ws_node import presence
from ws_node.auth import IDENTITY, Identity
from ws_node.services import ADMISSION, SERVICES, Services

MAX_PAGE = 200
USAGE_DEFAULT_WINDOW = timedelta(days=30)


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status)


class RestError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.response = error_response(status, code, message)


def _auth(request: web.Request) -> tuple[Services, Identity]:
    """The services and the identity the node's auth middleware verified for this request."""
    if IDENTITY not in request:
        raise RestError(401, "unauthorized", "missing or invalid token")
    return request.app[SERVICES], request[IDENTITY]


def _is_count(raw: str) -> bool:
    """Plain ASCII digits of a sane length (str.isdigit() alone lets "²" through to int())."""
    return raw.isascii() and raw.isdigit() and len(raw) <= 18


def _id(request: web.Request) -> str:
    """The path's object id; one that cannot exist (NUL, control characters) is simply not found
    (Postgres text refuses NUL: the query would fail, not miss)."""
    value = request.match_info["id"]
    if not value.isprintable() or len(value) > 128:
        raise NotFound(f"conversation {value[:40]!r}")
    return value


def _limit(request: web.Request, default: int = 50) -> int:
    raw = request.query.get("limit", str(default))
    if not _is_count(raw) or not 1 <= int(raw) <= MAX_PAGE:
        raise RestError(400, "bad_request", f"limit must be an integer from 1 to {MAX_PAGE}")
    return int(raw)


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body ({} when there is none); 400 `bad_request` otherwise."""
    if not request.can_read_body:
        return {}
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise RestError(400, "bad_request", "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RestError(400, "bad_request", "body must be a JSON object")
    return body


async def list_conversations(request: web.Request) -> web.Response:
    svc, ident = _auth(request)
    before = None
    if "before" in request.query:
        try:
            before = datetime.fromisoformat(request.query["before"])
            before = (before if before.tzinfo else before.replace(tzinfo=UTC)).astimezone(UTC)
        except (ValueError, OverflowError):  # OverflowError: year 1 with a positive offset, ...
            raise RestError(400, "bad_request", "before must be an ISO 8601 timestamp") from None
        if not 1970 <= before.year <= 9000:  # Postgres refuses some dates Python allows
            raise RestError(400, "bad_request", "before is out of range")
    limit = _limit(request)
    items = await svc.store.list_conversations(ident.user, limit=limit, before=before)
    next_before = items[-1].updated_at.isoformat() if len(items) == limit else None
    return json_response({"conversations": [c.to_json() for c in items], "next_before": next_before})


async def create_conversation(request: web.Request) -> web.Response:
    svc, ident = _auth(request)
    body = await json_body(request)
    title, agent = body.get("title", ""), body.get("agent", "default")
    double_texting = body.get("double_texting", DoubleTexting.ENQUEUE)
    if double_texting not in DoubleTexting.__members__.values():
        raise RestError(400, "bad_request", f"double_texting must be one of {', '.join(DoubleTexting)}")
    if not isinstance(title, str) or len(title) > 200 or "\x00" in title:
        raise RestError(400, "bad_request", "title must be a string of at most 200 characters")
    if not isinstance(agent, str) or not agent or len(agent) > 128 or not agent.isprintable():
        raise RestError(400, "bad_request", "agent must be a non-empty string")
    try:
        await svc.agents.check(agent)
    except UnknownAgent as exc:
        raise RestError(400, "bad_request", str(exc)) from None
    conversation = await svc.store.create_conversation(ident.user, title=title, agent=agent,
                                                       double_texting=double_texting)
    return json_response(conversation.to_json(), 201)


async def get_conversation(request: web.Request) -> web.Response:
    svc, ident = _auth(request)
    conversation = await svc.store.get_conversation(ident.user, _id(request))
    return json_response(conversation.to_json())


async def delete_conversation(request: web.Request) -> web.Response:
    svc, ident = _auth(request)
    await svc.store.delete_conversation(ident.user, _id(request))
    return web.Response(status=204)


async def list_messages(request: web.Request) -> web.Response:
    svc, ident = _auth(request)
    before = request.query.get("before")
    if before is not None and not _is_count(before):
        raise RestError(400, "bad_request", "before must be a message cursor from next_before")
    limit = _limit(request)
    messages = await svc.store.list_messages(
        ident.user, _id(request), limit=limit, before=int(before) if before else None
    )
    next_before = messages[0].pos if len(messages) == limit else None
    return json_response({"messages": [m.to_json() for m in messages], "next_before": next_before})


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """REST errors as JSON; a not-found and someone else's object look the same."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except RestError as exc:
        return exc.response
    except NotFound as exc:
        return error_response(404, "not_found", str(exc))
    except (Unavailable, *TRANSIENT) as exc:
        return error_response(503, "unavailable", f"storage unavailable: {type(exc).__name__}")


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every authenticated REST request (the auth middleware left an identity: `/v1/…`, the
    admin API and the runs over HTTP included) takes a token from its user's REST bucket, one per
    user in Redis for the whole cluster (`USER_REST_PER_SECOND`, `USER_REST_BURST`). Its own
    bucket, not the commands': a page load's burst of reads must not cost a user's sockets their
    sends; the commands over HTTP still take from the command bucket too (`ws_node.http_runs`), so
    REST is no way around it. Refused: 429 `rate_limited` with `Retry-After`. Redis away: it
    fails open, as the command bucket does (the request then fails by itself if it needs Redis)."""
    if IDENTITY in request:
        decision = None
        try:
            decision = await request.app[ADMISSION].rest.take(request[IDENTITY].user)
        except TRANSIENT:
            pass
        if decision is not None and not decision.allowed:
            request.app[SERVICES].stats.rate_limited["rest",] += 1
            refused = error_response(429, "rate_limited", "too many requests; slow down")
            refused.headers["Retry-After"] = str(max(1, math.ceil(decision.retry_after_ms / 1000)))
            return refused
    response: web.StreamResponse = await handler(request)
    return response


async def list_agents(request: web.Request) -> web.Response:
    svc, _ = _auth(request)
    described = await svc.agents.advertised()
    if described is None:
        raise RestError(503, "unavailable", "no agent worker has registered its agents yet")
    return json_response({"agents": described})


async def get_usage(request: web.Request) -> web.Response:
    """The tokens of the user's runs that ended since `since` (ISO 8601; default: 30 days ago),
    summed over the runs whose endpoint reported usage (`runs` counts those)."""
    svc, ident = _auth(request)
    since = datetime.now(UTC) - USAGE_DEFAULT_WINDOW
    if "since" in request.query:
        try:
            since = datetime.fromisoformat(request.query["since"])
        except ValueError:
            raise RestError(400, "bad_request", "since must be an ISO 8601 time") from None
        if since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
    usage = await svc.store.usage(ident.user, since)
    return json_response({"since": since.isoformat(), **usage})


async def get_presence(request: web.Request) -> web.Response:
    """The user's own devices online now (the list `hello` carries)."""
    svc, ident = _auth(request)
    online = await presence.online(svc.redis, svc.keys, ident.user)
    return json_response({"devices": [dataclasses.asdict(d) for d in presence.devices(online)]})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/agents", list_agents)
    app.router.add_get("/v1/presence", get_presence)
    app.router.add_get("/v1/usage", get_usage)
    app.router.add_get("/v1/conversations", list_conversations)
    app.router.add_post("/v1/conversations", create_conversation)
    app.router.add_get("/v1/conversations/{id}", get_conversation)
    app.router.add_delete("/v1/conversations/{id}", delete_conversation)
    app.router.add_get("/v1/conversations/{id}/messages", list_messages)
