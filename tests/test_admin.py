"""The admin API (`/v1/admin/…`) against a real cluster: who may call it, and what each route shows
of a real situation (devices on two nodes, a run streaming, the worker, a dead-lettered run)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import jwt
import pytest
from chorus_client.testing import RecordingClient as ChorusClient
from redis.asyncio import Redis

from common.keys import Keys
from fanout.redis_broker import RedisBroker
from loadtest.cluster import LocalCluster
from persistence.store import Store
from protocol.vocabulary import RunStatus
from runs.lifecycle import Runs
from runs.queue import Delivery, Job, MemoryRunQueue, RedisRunQueue
from tests.support import node_ws, rest, unique, until
from ws_node.app import create_app
from ws_node.auth import has_role
from ws_node.settings import NodeSettings

# Every admin route, with a path that matches it (the entry need not exist: the role is checked first).
ROUTES = [
    ("GET", "/v1/admin/users/{user}/devices", "/v1/admin/users/someone/devices"),
    ("GET", "/v1/admin/runs", "/v1/admin/runs"),
    ("GET", "/v1/admin/nodes", "/v1/admin/nodes"),
    ("GET", "/v1/admin/workers", "/v1/admin/workers"),
    ("GET", "/v1/admin/dead-letters", "/v1/admin/dead-letters"),
    ("POST", "/v1/admin/dead-letters/{entry}/retry", "/v1/admin/dead-letters/1-1/retry"),
    ("POST", "/v1/admin/dead-letters/{entry}/discard", "/v1/admin/dead-letters/1-1/discard"),
]
POLL_S = 15.0  # heartbeats come every 2 s: a change shows within one or two


def token(cluster: LocalCluster, user: str, **claims: Any) -> str:
    body = {"sub": user, "exp": int(time.time()) + 3600, **claims}
    return jwt.encode(body, cluster.config.jwt_secret, "HS256")


def admin_token(cluster: LocalCluster) -> str:
    return token(cluster, unique("ops"), roles=["viewer", "chorus-admin"])


# Who may call it


def test_the_route_list_is_every_admin_route_the_node_serves() -> None:
    env = {"REDIS_URL": "redis://127.0.0.1:1/0", "DATABASE_URL": "postgresql://u@127.0.0.1:1/x",
           "AUTH_JWT_SECRET": "s" * 32}
    app = create_app(NodeSettings.from_env(env))
    served = {(route.method, route.resource.canonical) for route in app.router.routes()
              if route.resource is not None and route.resource.canonical.startswith("/v1/admin")
              and route.method != "HEAD"}
    assert served == {(method, canonical) for method, canonical, _ in ROUTES}


@pytest.mark.parametrize(("method", "path"), [(m, p) for m, _, p in ROUTES], ids=[c for _, c, _ in ROUTES])
async def test_every_admin_route_refuses_users_without_the_role(
    cluster: LocalCluster, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    url = f"{cluster.http_url}{path}"
    async with http.request(method, url) as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "unauthorized"
    user = unique("mallory")
    for claims in ({}, {"roles": ["viewer"]}, {"roles": "chorus-admins"}, {"role": "chorus-admin"},
                   {"roles": {"chorus-admin": True}}):
        status, body = await rest(http, cluster.http_url, token(cluster, user, **claims), method, path)
        assert status == 403, claims
        assert body == {"error": {"code": "forbidden",
                                  "message": "the admin API needs a token with the admin role"}}


@pytest.mark.parametrize(("claims", "claim", "expected"), [
    ({"roles": "chorus-admin"}, "roles", True),
    ({"roles": ["a", "chorus-admin"]}, "roles", True),
    ({"roles": []}, "roles", False),
    ({"roles": "chorus-admin-2"}, "roles", False),
    ({"roles": None}, "roles", False),
    ({"roles": {"chorus-admin": 1}}, "roles", False),
    ({"realm_access": {"roles": ["chorus-admin"]}}, "realm_access.roles", True),
    ({"realm_access": ["chorus-admin"]}, "realm_access.roles", False),
    ({"https://example.com/roles": ["chorus-admin"]}, "https://example.com/roles", True),
    ({"a.b": "x", "a": {"b": "chorus-admin"}}, "a.b", False),  # the whole name wins
])
def test_the_admin_claim_is_a_string_or_a_list_holding_the_value(
    claims: dict[str, Any], claim: str, expected: bool
) -> None:
    assert has_role(claims, claim, "chorus-admin") is expected


# What each route shows


async def test_devices_on_two_nodes_and_the_nodes_sockets(cluster: LocalCluster, http: aiohttp.ClientSession) -> None:
    user, admin = unique("alice"), admin_token(cluster)
    phone = ChorusClient(node_ws(cluster, 0), cluster.token(user), device="phone")
    laptop = ChorusClient(node_ws(cluster, 1), cluster.token(user), device="laptop")
    await phone.connect()
    await laptop.connect()

    async def devices() -> Any:
        return (await rest(http, cluster.http_url, admin, "GET", f"/v1/admin/users/{user}/devices"))[1]

    try:
        listed = await until(devices, lambda body: len(body["devices"]) == 2, POLL_S)
        assert listed == {"user": user, "devices": [
            {"device": "laptop", "node": "node-b", "node_alive": True},
            {"device": "phone", "node": "node-a", "node_alive": True},
        ]}

        async def nodes() -> Any:
            return (await rest(http, cluster.http_url, admin, "GET", "/v1/admin/nodes"))[1]

        listed = await until(nodes, lambda body: all(n["sockets"] >= 1 and n["users"] >= 1 for n in body["nodes"]),
                             POLL_S)
        assert [n["node"] for n in listed["nodes"]] == ["node-a", "node-b"]
        for node in listed["nodes"]:
            assert node["sockets"] >= 1 and node["users"] >= 1
            assert node["ready"] is True and node["draining"] is False
            assert node["pubsub"] is True and node["postgres"] is True
            assert node["started_at"] <= node["updated_at"]
            assert "expires_at" not in node
    finally:
        await phone.close()
        await laptop.close()
    gone = await until(devices, lambda body: body["devices"] == [], POLL_S)
    assert gone == {"user": user, "devices": []}


async def test_a_run_in_flight_and_the_worker_running_it(cluster: LocalCluster, http: aiohttp.ClientSession) -> None:
    user, admin = unique("alice"), admin_token(cluster)
    device = ChorusClient(cluster.ws_url, cluster.token(user), device="phone")
    await device.connect()
    try:
        run = (await device.send("[[tokens:40]] [[slow:0.05]] take your time"))["run"]
        await device.wait_for(lambda: any(e["run"] == run and e["event"] == "run.started" for e in device.events))
        status, body = await rest(http, cluster.http_url, admin, "GET", f"/v1/admin/runs?user={user}")
        assert status == 200
        [listed] = body["runs"]
        assert {k: listed[k] for k in ("run", "user", "status", "worker", "attempt")} == {
            "run": run, "user": user, "status": "running", "worker": "worker-1", "attempt": 1}
        assert listed["conversation"].startswith("c_") and listed["lease_until"] is not None
        assert 0 <= listed["age_s"] < 30
        assert set(body["queue"]) == {"depth", "oldest_s", "taken"} and body["queue"]["taken"] >= 1

        status, bounded = await rest(http, cluster.http_url, admin, "GET", "/v1/admin/runs?limit=1")
        assert status == 200 and bounded["limit"] == 1 and len(bounded["runs"]) == 1
        status, refused = await rest(http, cluster.http_url, admin, "GET", "/v1/admin/runs?limit=0")
        assert status == 400 and refused["error"]["code"] == "bad_request"

        async def workers() -> Any:
            return (await rest(http, cluster.http_url, admin, "GET", "/v1/admin/workers"))[1]

        busy = await until(workers, lambda body: any(w["busy"] >= 1 for w in body["workers"]), POLL_S)
        [worker] = busy["workers"]
        assert worker["worker"] == "worker-1" and worker["agents"] == ["default"]
        assert worker["busy"] >= 1 and worker["concurrency"] == 8 and worker["draining"] is False
        assert busy["busy"] == worker["busy"] and busy["slots"] == 8

        assert (await device.wait_run_end(run))["event"] == "run.completed"
        status, body = await rest(http, cluster.http_url, admin, "GET", f"/v1/admin/runs?user={user}")
        assert (status, body["runs"]) == (200, [])
    finally:
        await device.close()


# Dead letters


@dataclass
class Backstage:
    """The cluster's Postgres and Redis, as its workers see them."""

    store: Store
    redis: Redis
    db: asyncpg.Connection
    keys: Keys


@pytest.fixture
async def backstage(cluster: LocalCluster) -> AsyncIterator[Backstage]:
    store = await Store.connect(cluster.database_url, max_size=2)
    redis = Redis.from_url(cluster.redis_url, decode_responses=True)
    db = await asyncpg.connect(cluster.database_url)
    try:
        yield Backstage(store, redis, db, Keys())
    finally:
        await db.close()
        await redis.aclose()
        await store.close()


async def dead_lettered(back: Backstage, user: str, text: str) -> tuple[str, str, str]:
    """A send whose run is dead-lettered exactly as `Worker._dead_letter` does it, without the
    minutes of killed workers that take (tests/test_worker.py does that): its job goes to a queue
    no worker reads. Returns (run, conversation, user message)."""
    runs = Runs(back.store, RedisBroker(back.redis, back.keys), MemoryRunQueue())
    record, _ = await runs.accept_send(user, "phone", client_id=unique("s"), text=text, conversation=None,
                                       agent=None, policy=None)
    await back.store.finish_run(record.run, status=RunStatus.FAILED, text="", worker=None,
                                error_code="run_dead_lettered", error_message="the run failed 3 times")
    await runs.publish_unpublished_end(record.run)
    job = Job(run=record.run, user=user, conversation=record.conversation)
    await RedisRunQueue(back.redis, back.keys).dead_letter(Delivery("0-1", job, deliveries=4))
    return record.run, record.conversation, record.message


async def dead_letter_of(http: aiohttp.ClientSession, cluster: LocalCluster, admin: str,
                         run: str) -> dict[str, Any] | None:
    status, body = await rest(http, cluster.http_url, admin, "GET", "/v1/admin/dead-letters?limit=1000")
    assert status == 200
    return next((e for e in body["dead_letters"] if e["run"] == run), None)


async def test_retrying_a_dead_letter_answers_the_message_with_a_new_run(
    cluster: LocalCluster, http: aiohttp.ClientSession, backstage: Backstage
) -> None:
    user, admin = unique("alice"), admin_token(cluster)
    device = ChorusClient(cluster.ws_url, cluster.token(user), device="phone")
    await device.connect()
    try:
        dead, conversation, message = await dead_lettered(backstage, user, "[[tokens:5]] answer me, please")
        assert (await device.wait_run_end(dead))["data"]["code"] == "run_dead_lettered"
        letter = await dead_letter_of(http, cluster, admin, dead)
        assert letter is not None
        assert {k: letter[k] for k in ("user", "conversation", "deliveries", "run_status", "error_code")} == {
            "user": user, "conversation": conversation, "deliveries": 4, "run_status": "failed",
            "error_code": "run_dead_lettered"}
        path = f"/v1/admin/dead-letters/{letter['entry']}/retry"
        status, _ = await rest(http, cluster.http_url, cluster.token(user), "POST", path)
        assert status == 403  # the user whose run it is may not retry it either

        status, retried = await rest(http, cluster.http_url, admin, "POST", path)
        assert status == 201
        run = retried["run"]
        assert retried == {"entry": letter["entry"], "retried": dead, "run": run, "conversation": conversation,
                           "message": message, "status": "queued", "behind": None}
        end = await device.wait_run_end(run)
        assert end["event"] == "run.completed"
        assert end["data"]["text"] == "word1 word2 word3 word4 word5"
        queued = next(e for e in device.events if e["run"] == run)
        assert (queued["event"], queued["data"]["message"]) == ("run.queued", message)
        assert device.gaps == [] and device.duplicates == 0

        assert await dead_letter_of(http, cluster, admin, dead) is None
        status, body = await rest(http, cluster.http_url, admin, "POST", path)
        assert (status, body["error"]["code"]) == (404, "not_found")
        rows = await backstage.db.fetch("SELECT id, status FROM runs WHERE message_id = $1 ORDER BY created_at",
                                        message)
        assert [(r["id"], r["status"]) for r in rows] == [(dead, "failed"), (run, "completed")]
        answer = await backstage.db.fetchval(
            "SELECT content FROM messages WHERE run_id = $1 AND role = 'assistant'", run)
        assert answer == end["data"]["text"]
    finally:
        await device.close()


async def test_discarding_a_dead_letter_and_one_that_cannot_be_retried(
    cluster: LocalCluster, http: aiohttp.ClientSession, backstage: Backstage
) -> None:
    user, admin = unique("alice"), admin_token(cluster)
    dead, conversation, _ = await dead_lettered(backstage, user, "[[tokens:5]] never mind")
    letter = await dead_letter_of(http, cluster, admin, dead)
    assert letter is not None
    entry = letter["entry"]
    # The conversation is gone: nothing to answer again, so retrying is refused and the letter kept.
    status, _ = await rest(http, cluster.http_url, cluster.token(user), "DELETE", f"/v1/conversations/{conversation}")
    assert status == 204
    status, body = await rest(http, cluster.http_url, admin, "POST", f"/v1/admin/dead-letters/{entry}/retry")
    assert (status, body["error"]["code"]) == (409, "conflict")
    kept = await dead_letter_of(http, cluster, admin, dead)
    assert kept is not None and kept["run_status"] is None  # the run went with its conversation
    status, page = await rest(http, cluster.http_url, admin, "GET", "/v1/admin/dead-letters?limit=1")
    assert status == 200 and len(page["dead_letters"]) == 1 and page["total"] >= 1
    assert page["next_after"] == page["dead_letters"][0]["entry"]
    status, rest_of = await rest(http, cluster.http_url, admin, "GET",
                                 f"/v1/admin/dead-letters?after={page['next_after']}&limit=1000")
    assert status == 200 and len(rest_of["dead_letters"]) == page["total"] - 1

    status, _ = await rest(http, cluster.http_url, cluster.token(user), "POST",
                           f"/v1/admin/dead-letters/{entry}/discard")
    assert status == 403
    status, body = await rest(http, cluster.http_url, admin, "POST", f"/v1/admin/dead-letters/{entry}/discard")
    assert (status, body) == (200, {"entry": entry, "run": dead, "discarded": True})
    assert await dead_letter_of(http, cluster, admin, dead) is None
    for action in ("discard", "retry"):
        status, body = await rest(http, cluster.http_url, admin, "POST", f"/v1/admin/dead-letters/{entry}/{action}")
        assert (status, body["error"]["code"]) == (404, "not_found")
    status, body = await rest(http, cluster.http_url, admin, "POST", "/v1/admin/dead-letters/not-an-id/discard")
    assert status == 404
