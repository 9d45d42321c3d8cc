"""Security and bad input (issue 5): nobody gets in where they don't belong, nothing crashes a node.

Pure rules first (token bucket, origins, URL redaction, settings, token verification), then the
Lua bucket against real Redis, then real node processes: the session cluster (dev mode, default
limits) and nodes of this module's own with strict settings, a JWKS URL, or a tiny connection rate.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from chorus_client.testing import ClientError
from chorus_client.testing import RecordingClient as ChorusClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from common.config import SettingError, redact_url
from common.keys import Keys
from loadtest.cluster import LocalCluster
from loadtest.procs import REPO_ROOT, Proc, RedisServer, free_port, wait_http_ok
from persistence.migrate import sqlalchemy_url, upgrade_head
from tests.support import RawSocket, client_frame, rest, send_frame, unique
from ws_node.auth import (
    AuthUnavailable,
    Identity,
    JwksKeys,
    TokenLease,
    Unauthorized,
    Verifier,
    normalise_origin,
    origin_allowed,
)
from ws_node.limits import Bucket, Decision, LocalBucket, Rate, RedisBuckets, take
from ws_node.settings import NodeSettings

SECRET = "strict-node-secret-of-at-least-32-chars"
AUDIENCE, ISSUER = "chorus-test", "https://issuer.test"
ALLOWED_ORIGIN = "https://app.example.com"
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC_PUBLIC_PEM = EC_KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
SERVER_ERROR = re.compile(r"Traceback|Error handling request|Unhandled|\bCRITICAL\b")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], hmac_key: bytes | None) -> str:
    """A JWT built by hand, for tokens PyJWT refuses to make (alg none, a PEM as HMAC secret)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = (b"" if hmac_key is None
                 else hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest())
    return f"{signing_input}.{b64(signature)}"


def claims_for(user: str, ttl_s: float = 3600, **extra: Any) -> dict[str, Any]:
    return {"sub": user, "exp": int(time.time() + ttl_s), "aud": AUDIENCE, "iss": ISSUER, **extra}


def strict_token(user: str, ttl_s: float = 3600, **extra: Any) -> str:
    return jwt.encode(claims_for(user, ttl_s, **extra), SECRET, "HS256")


# ---------------------------------------------------------------------------------------------
# Pure rules


FULL = Rate(per_s=2, burst=3)


@pytest.mark.parametrize(
    ("bucket", "now_ms", "rate", "cost", "expected"),
    [
        (None, 1000, FULL, 1, Decision(True, 0, Bucket(2000, 1000))),  # a new bucket starts full
        (Bucket(0, 1000), 1000, FULL, 1, Decision(False, 500, Bucket(0, 1000))),  # empty: 1 token = 500 ms
        (Bucket(0, 1000), 1250, FULL, 1, Decision(False, 250, Bucket(500, 1250))),  # half refilled
        (Bucket(0, 1000), 1500, FULL, 1, Decision(True, 0, Bucket(0, 1500))),  # exactly one refilled
        (Bucket(0, 1000), 60_000, FULL, 1, Decision(True, 0, Bucket(2000, 60_000))),  # capped at burst
        (Bucket(1500, 5000), 4000, FULL, 1, Decision(True, 0, Bucket(500, 5000))),  # clock went back
        (Bucket(1000, 0), 0, FULL, 2, Decision(False, 500, Bucket(1000, 0))),  # cost above what is left
        (None, 0, FULL, 4, Decision(False, 500, Bucket(3000, 0))),  # cost above burst never passes
        (Bucket(0, 0), 3, Rate(per_s=0.5, burst=1), 1, Decision(False, 1998, Bucket(1, 3))),  # floor
        (Bucket(0, 0), 10, Rate(per_s=0, burst=1), 1, Decision(True, 0, Bucket(0, 0))),  # 0 = unlimited
    ],
)
def test_token_bucket(bucket: Bucket | None, now_ms: int, rate: Rate, cost: int, expected: Decision) -> None:
    assert take(bucket, now_ms=now_ms, rate=rate, cost=cost) == expected


def test_local_bucket_refills_with_its_clock() -> None:
    now = [100.0]
    bucket = LocalBucket(Rate(per_s=1, burst=2), clock=lambda: now[0])
    assert [bucket.take().allowed for _ in range(3)] == [True, True, False]
    assert bucket.take().retry_after_ms == 1000
    now[0] += 1.0
    assert bucket.take().allowed and not bucket.take().allowed


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://App.Example.com", "https://app.example.com"),
        ("https://app.example.com:443/", "https://app.example.com"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("null", None),
        ("https://app.example.com/path", None),
        ("ftp://app.example.com", None),
        ("https://user@app.example.com", None),
        ("https://app.example.com:99999", None),
        ("", None),
    ],
)
def test_normalise_origin(value: str, expected: str | None) -> None:
    assert normalise_origin(value) == expected


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "dev", "expected"),
    [
        (None, "chat.example.com", (), False, True),  # not a browser
        ("https://evil.example", "chat.example.com", (), False, False),
        ("https://chat.example.com", "chat.example.com", (), False, True),  # same origin
        ("http://127.0.0.1:8080", "127.0.0.1:8080", (), False, True),
        ("http://127.0.0.1:8081", "127.0.0.1:8080", (), False, False),
        ("https://app.example.com", "chat.example.com", ("https://app.example.com",), False, True),
        ("https://APP.example.com:443", "chat.example.com", ("https://app.example.com",), False, True),
        ("http://app.example.com", "chat.example.com", ("https://app.example.com",), False, False),
        ("https://app.example.com.evil", "chat.example.com", ("https://app.example.com",), False, False),
        ("null", "chat.example.com", ("https://app.example.com",), False, False),
        ("https://evil.example", "chat.example.com", ("*",), False, True),  # only when explicit
        ("https://evil.example", "chat.example.com", (), True, True),  # CHORUS_DEV=1
        ("null", None, (), True, True),
    ],
)
def test_origin_allow_list(origin: str | None, host: str | None, allowed: tuple[str, ...], dev: bool,
                           expected: bool) -> None:
    assert origin_allowed(origin, host=host, allowed=allowed, dev=dev) is expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://default:s3cret@cache.example.com:6380", "rediss://default:***@cache.example.com:6380"),
        ("postgresql://chorus:p%40ss@db/chorus?sslmode=verify-full",
         "postgresql://chorus:***@db/chorus?sslmode=verify-full"),
        ("postgresql://chorus@db/chorus", "postgresql://chorus@db/chorus"),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


BASE_ENV = {"REDIS_URL": "redis://:redis-pass@127.0.0.1:1/0",
            "DATABASE_URL": "postgresql://u:pg-pass@127.0.0.1:1/x?sslmode=require"}


def test_settings_defaults_and_repr_hide_secrets() -> None:
    settings = NodeSettings.from_env({**BASE_ENV, "AUTH_JWT_SECRET": SECRET})
    assert settings.jwt_algorithms == ("HS256",)
    assert (settings.allowed_origins, settings.dev) == ((), False)
    assert (settings.max_devices_per_user, settings.max_runs_in_flight) == (100, 8)
    assert (settings.commands_per_s, settings.commands_burst) == (20.0, 60)
    assert (settings.connections_per_s, settings.connections_burst) == (500.0, 1000)
    text = repr(settings)
    assert "redis-pass" not in text and "pg-pass" not in text and SECRET not in text
    assert "***" in text

    keyed = NodeSettings.from_env({**BASE_ENV, "AUTH_JWT_PUBLIC_KEY": EC_PUBLIC_PEM,
                                   "CHORUS_ALLOWED_ORIGINS": "https://A.example.com, http://b.example:81,*"})
    assert keyed.jwt_algorithms == ("RS256", "ES256") and keyed.jwt_secret is None
    assert keyed.allowed_origins == ("https://a.example.com", "http://b.example:81", "*")


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({}, "AUTH_JWT_SECRET"),
        ({"AUTH_JWT_SECRET": SECRET, "AUTH_JWT_ALGORITHMS": "none"}, "AUTH_JWT_ALGORITHMS"),
        ({"AUTH_JWT_SECRET": SECRET, "AUTH_JWT_ALGORITHMS": "RS256"}, "AUTH_JWT_ALGORITHMS"),
        ({"AUTH_JWT_PUBLIC_KEY": EC_PUBLIC_PEM, "AUTH_JWT_ALGORITHMS": "HS256"}, "AUTH_JWT_ALGORITHMS"),
        ({"AUTH_JWT_PUBLIC_KEY": "not a key"}, "AUTH_JWT_PUBLIC_KEY"),
        ({"AUTH_JWT_PUBLIC_KEY_FILE": "/nonexistent/key.pem"}, "AUTH_JWT_PUBLIC_KEY_FILE"),
        ({"AUTH_JWKS_URL": "file:///etc/passwd"}, "AUTH_JWKS_URL"),
        ({"AUTH_JWKS_URL": "https://idp/jwks", "AUTH_JWT_PUBLIC_KEY": EC_PUBLIC_PEM}, "AUTH_JWKS_URL"),
        ({"AUTH_JWT_SECRET": SECRET, "CHORUS_ALLOWED_ORIGINS": "app.example.com"}, "CHORUS_ALLOWED_ORIGINS"),
        ({"AUTH_JWT_SECRET": SECRET, "USER_COMMANDS_BURST": "0"}, "USER_COMMANDS_BURST"),
        ({"AUTH_JWT_SECRET": SECRET, "NEW_CONNECTIONS_PER_SECOND": "fast"}, "NEW_CONNECTIONS_PER_SECOND"),
    ],
)
def test_bad_security_settings_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingError) as info:
        NodeSettings.from_env({**BASE_ENV, **env})
    assert str(info.value).startswith(name)


async def test_verifier_policy() -> None:
    """Explicit algorithms, the key chosen by the algorithm's family, exp/sub required, aud/iss
    required when configured."""
    verifier = Verifier(algorithms=("HS256", "ES256"), secret=SECRET, public_key=EC_PUBLIC_PEM,
                        audience=AUDIENCE, issuer=ISSUER)
    assert (await verifier.verify(strict_token("alice"))).user == "alice"
    assert (await verifier.verify(jwt.encode(claims_for("bob"), EC_KEY, "ES256"))).user == "bob"
    now = int(time.time())
    refused = [
        "",
        "not.a.jwt",
        "x" * 9000,
        jwt.encode(claims_for("alice", ttl_s=-5), SECRET, "HS256"),  # expired
        jwt.encode({"sub": "alice", "aud": AUDIENCE, "iss": ISSUER}, SECRET, "HS256"),  # no exp
        jwt.encode({"exp": now + 60, "aud": AUDIENCE, "iss": ISSUER}, SECRET, "HS256"),  # no sub
        jwt.encode(claims_for("alice", sub=""), SECRET, "HS256"),
        jwt.encode(claims_for("a" * 129), SECRET, "HS256"),
        jwt.encode(claims_for("alice", aud="someone-else"), SECRET, "HS256"),
        jwt.encode({"sub": "alice", "exp": now + 60, "iss": ISSUER}, SECRET, "HS256"),  # no aud
        jwt.encode(claims_for("alice", iss="https://evil.test"), SECRET, "HS256"),
        jwt.encode(claims_for("alice"), "another-secret-that-is-32-chars-long", "HS256"),
        forge({"alg": "HS384", "typ": "JWT"}, claims_for("alice"), SECRET.encode()),  # not in the list
        forge({"alg": "none", "typ": "JWT"}, claims_for("alice"), None),
        # algorithm confusion: HS256 "signed" with the public key the node trusts
        forge({"alg": "HS256", "typ": "JWT"}, claims_for("alice"), EC_PUBLIC_PEM.encode()),
        jwt.encode(claims_for("alice"), ec.generate_private_key(ec.SECP256R1()), "ES256"),
        forge({"alg": "HS256", "typ": "JWT"}, claims_for("alice", exp=float("inf")), SECRET.encode()),
    ]
    for token in refused:
        with pytest.raises(Unauthorized):
            await verifier.verify(token)
    # Without a public key, an ES256 token has nothing to verify against.
    secret_only = Verifier(algorithms=("HS256",), secret=SECRET)
    with pytest.raises(Unauthorized):
        await secret_only.verify(jwt.encode(claims_for("bob"), EC_KEY, "ES256"))
    # Without an audience configured, a token naming one is refused (PyJWT's strict default).
    with pytest.raises(Unauthorized):
        await secret_only.verify(strict_token("alice"))


async def test_a_token_lease_ends_at_exp_and_moves_on_renewal() -> None:
    verifier = Verifier(algorithms=("HS256",), secret=SECRET, audience=AUDIENCE, issuer=ISSUER)
    expired = asyncio.Event()
    lease = TokenLease(verifier, Identity("alice", time.time() + 0.3), on_expire=expired.set)
    lease.start()
    await asyncio.wait_for(expired.wait(), 3)

    expired.clear()
    lease = TokenLease(verifier, Identity("alice", time.time() + 0.3), on_expire=expired.set)
    lease.start()
    renewed = await lease.renew(strict_token("alice", ttl_s=1e12))  # centuries away: still a sane timer
    assert renewed.user == "alice" and lease.identity is renewed
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(expired.wait(), 0.6)
    lease.stop()


def test_sqlalchemy_url_hands_tls_parameters_to_asyncpg() -> None:
    from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
    from sqlalchemy.engine import make_url

    dsn = "postgresql://chorus:p%40ss@db.example:5432/chorus?sslmode=verify-full&sslrootcert=/ca.pem"
    _, kwargs = PGDialect_asyncpg().create_connect_args(make_url(sqlalchemy_url(dsn)))  # type: ignore[no-untyped-call]
    assert kwargs == {"dsn": dsn}  # asyncpg parses it whole: sslmode is not a connect() keyword


def test_migrations_run_with_sslmode_in_the_url(cluster: LocalCluster) -> None:
    separator = "&" if "?" in cluster.database_url else "?"
    upgrade_head(f"{cluster.database_url}{separator}sslmode=prefer")  # the test server has no TLS
    with pytest.raises(Exception) as info:
        upgrade_head(f"{cluster.database_url}{separator}sslmode=require")
    assert not isinstance(info.value, TypeError), "sslmode must reach asyncpg, not crash SQLAlchemy"
    assert "SSL" in str(info.value) or "ssl" in str(info.value)


# ---------------------------------------------------------------------------------------------
# The command bucket in Redis


async def test_lua_bucket_is_the_pure_function(redis_server: RedisServer, keys: Keys) -> None:
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    rate = Rate(per_s=3.5, burst=4)
    buckets = RedisBuckets(redis, keys, rate)
    try:
        expected: Bucket | None = None
        for now_ms in [10_000, 10_000, 10_001, 10_050, 10_050, 10_050, 10_050, 10_333, 10_900, 9_000,
                       11_200, 11_201, 20_000, 20_000, 20_001]:
            pure = take(expected, now_ms=now_ms, rate=rate)
            assert await buckets.take("alice", now_ms=now_ms) == pure, now_ms
            expected = pure.bucket
        # Another user's bucket is untouched; the key expires once it would be full again.
        assert (await buckets.take("bob", now_ms=20_001)).bucket == Bucket(3000, 20_001)
        ttl_ms = await redis.pttl(keys.command_bucket("alice"))
        assert 0 < ttl_ms <= 1143 + 1000  # ceil(4000 thousandths / 3.5 per ms) + 1 s
        # With Redis's clock: four pass at once, the fifth waits about 1/3.5 s.
        clocked = RedisBuckets(redis, keys, rate)
        decisions = [await clocked.take("carol") for _ in range(5)]
        assert [d.allowed for d in decisions] == [True] * 4 + [False]
        assert 0 < decisions[-1].retry_after_ms <= 286
    finally:
        await redis.aclose()


# ---------------------------------------------------------------------------------------------
# Nodes of this module's own


def start_node(cluster: LocalCluster, workdir: Path, name: str, env: dict[str, str]) -> tuple[Proc, int]:
    port = free_port()
    node = Proc(name, [sys.executable, "-m", "ws_node"], workdir=workdir, env={
        "REDIS_URL": cluster.redis_url, "DATABASE_URL": cluster.database_url, "PORT": str(port),
        "NODE_ID": name, "HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT), **env,
    })
    node.start()
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/readyz", 30, proc=node)
    except BaseException:
        node.stop()
        raise
    return node, port


class StrictNode:
    def __init__(self, proc: Proc, port: int) -> None:
        self.proc, self.port = proc, port
        self.ws_url = f"ws://127.0.0.1:{port}/ws"
        self.http_url = f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def strict(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StrictNode]:
    """Production defaults (no CHORUS_DEV) with small limits, aud/iss required, HS256 + ES256."""
    proc, port = start_node(cluster, tmp_path_factory.mktemp("strict"), "strict-node", {
        "AUTH_JWT_SECRET": SECRET, "AUTH_JWT_PUBLIC_KEY": EC_PUBLIC_PEM, "AUTH_JWT_ALGORITHMS": "HS256,ES256",
        "AUTH_JWT_AUDIENCE": AUDIENCE, "AUTH_JWT_ISSUER": ISSUER, "AUTH_FRAME_TIMEOUT_SECONDS": "1",
        "CHORUS_ALLOWED_ORIGINS": ALLOWED_ORIGIN, "USER_MAX_DEVICES": "2", "USER_COMMANDS_PER_SECOND": "5",
        "USER_COMMANDS_BURST": "10", "USER_MAX_RUNS_IN_FLIGHT": "1",
    })
    yield StrictNode(proc, port)
    proc.stop()
    assert not SERVER_ERROR.search(proc.log_text()), proc.log_text()[-3000:]


async def refused_status(http: aiohttp.ClientSession, url: str, **kw: Any) -> int:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        async with http.ws_connect(url, **kw):
            pass
    return info.value.status


async def replies_to(ws: aiohttp.ClientWebSocketResponse, ids: set[str],
                     timeout_s: float = 10) -> list[dict[str, Any]]:
    """The replies to the commands with these ids, in arrival order (other frames skipped)."""
    replies: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout_s):
        while len(replies) < len(ids):
            frame = await ws.receive_json()
            if frame.get("id") in ids:
                replies.append(frame)
    return replies


async def close_code(ws: aiohttp.ClientWebSocketResponse, timeout_s: float = 10) -> int | None:
    """Read until the server closes; returns its close code."""
    async with asyncio.timeout(timeout_s):
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return ws.close_code


async def test_origins_are_checked_before_the_upgrade(strict: StrictNode, cluster: LocalCluster,
                                                      http: aiohttp.ClientSession) -> None:
    url = f"{strict.ws_url}?access_token={strict_token(unique('alice'))}"
    for origin in ("https://evil.example", "null", "http://app.example.com", "https://app.example.com.evil"):
        assert await refused_status(http, url, origin=origin) == 403, origin
    # listed, same origin, not a browser
    origins: list[str | None] = [ALLOWED_ORIGIN, f"http://127.0.0.1:{strict.port}", None]
    for passing in origins:
        async with http.ws_connect(url, origin=passing) as ws:
            assert (await ws.receive_json(timeout=5))["type"] == "hello"
    # The session cluster runs with CHORUS_DEV=1: any origin.
    async with http.ws_connect(f"{cluster.ws_url}?access_token={cluster.token(unique('alice'))}",
                               origin="https://evil.example") as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "hello"


async def test_tokens_with_the_wrong_audience_issuer_or_algorithm_are_refused(
    strict: StrictNode, http: aiohttp.ClientSession
) -> None:
    user = unique("alice")
    bad = [
        jwt.encode({"sub": user, "exp": int(time.time()) + 60}, SECRET, "HS256"),  # no aud, no iss
        jwt.encode(claims_for(user, aud="other"), SECRET, "HS256"),
        jwt.encode(claims_for(user, iss="https://evil.test"), SECRET, "HS256"),
        forge({"alg": "none", "typ": "JWT"}, claims_for(user), None),
        forge({"alg": "HS256", "typ": "JWT"}, claims_for(user), EC_PUBLIC_PEM.encode()),
    ]
    for token in bad:
        assert await refused_status(http, f"{strict.ws_url}?access_token={token}") == 401
    async with http.get(f"{strict.http_url}/v1/conversations",
                        headers={"Authorization": f"Bearer {bad[0]}"}) as response:
        assert response.status == 401
    es256 = jwt.encode(claims_for(user), EC_KEY, "ES256")
    async with http.ws_connect(strict.ws_url, headers={"Authorization": f"Bearer {es256}"}) as ws:
        assert (await ws.receive_json(timeout=5))["user"] == user
    async with http.get(f"{strict.http_url}/v1/conversations",
                        headers={"Authorization": f"Bearer {es256}"}) as response:
        assert response.status == 200


async def test_token_as_the_first_frame(strict: StrictNode, http: aiohttp.ClientSession) -> None:
    user = unique("alice")
    client = ChorusClient(strict.ws_url, strict_token(user), device="browser", first_frame_token=True,
                          auto_reconnect=False)
    hello = await client.connect()
    assert hello["user"] == user
    assert (await client.ping())["type"] == "pong"
    await client.close()

    url = f"{strict.ws_url}?auth=frame"
    async with http.ws_connect(url) as ws:  # the auth frame's id is acked before the hello
        await ws.send_json({"type": "auth", "id": "a1", "token": strict_token(user)})
        ack = await ws.receive_json(timeout=5)
        assert ack["type"] == "ack" and ack["id"] == "a1" and ack["expires_at"] > time.time()
        assert (await ws.receive_json(timeout=5))["type"] == "hello"
    for first in (None, {"type": "ping"}, {"type": "auth", "token": "nope"}, "garbage",
                  {"type": "auth", "token": strict_token(user, ttl_s=-10)}):
        async with http.ws_connect(url) as ws:
            started = time.monotonic()
            if first is not None:
                await ws.send_str(first if isinstance(first, str) else json.dumps(first))
            assert await close_code(ws) == 4001, first
            if first is None:  # AUTH_FRAME_TIMEOUT_SECONDS=1
                assert 0.8 < time.monotonic() - started < 5
    # Without a token and without auth=frame, still a plain 401 before the upgrade.
    assert await refused_status(http, strict.ws_url) == 401


async def test_an_expiring_token_ends_the_socket_with_4001_unless_renewed(
    strict: StrictNode, http: aiohttp.ClientSession
) -> None:
    user = unique("alice")
    async with http.ws_connect(f"{strict.ws_url}?access_token={strict_token(user, ttl_s=2)}") as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "hello"
        assert await close_code(ws, 8) == 4001

    client = ChorusClient(strict.ws_url, strict_token(user, ttl_s=3), device="renewing", auto_reconnect=False)
    await client.connect()
    try:
        for token, code in [("garbage", "unauthorized"), (strict_token(unique("mallory")), "forbidden"),
                            (strict_token(user, ttl_s=-1), "unauthorized")]:
            with pytest.raises(ClientError) as info:
                await client.auth(token)
            assert info.value.code == code
        fresh = strict_token(user, ttl_s=3600)
        ack = await client.auth(fresh)
        assert ack["expires_at"] > time.time() + 3000
        # Well past the first token's exp the socket still serves.
        with pytest.raises(TimeoutError):
            await client.wait_for(lambda: bool(client.close_codes), 3.5)
        assert (await client.ping())["type"] == "pong"
    finally:
        await client.close()


async def test_a_flood_of_commands_is_rate_limited_and_the_socket_lives(strict: StrictNode,
                                                                      http: aiohttp.ClientSession) -> None:
    user = unique("alice")
    async with http.ws_connect(f"{strict.ws_url}?access_token={strict_token(user)}") as ws:
        await ws.receive_json(timeout=5)
        for n in range(30):  # a flood: burst 10, then 5/s
            await ws.send_json({"type": "ping", "id": f"p{n}"})
        replies = await replies_to(ws, {f"p{n}" for n in range(30)})
        limited = [r for r in replies if r["type"] == "error"]
        assert 10 <= 30 - len(limited) <= 15
        assert {r["code"] for r in limited} == {"rate_limited"}
        assert all(0 < r["retry_after_ms"] <= 200 for r in limited)
        # The socket lives; after the advised wait the next command passes.
        await asyncio.sleep(limited[-1]["retry_after_ms"] / 1000)
        await ws.send_json({"type": "ping", "id": "after"})
        assert await replies_to(ws, {"after"}) == [{"type": "pong", "id": "after"}]


async def test_the_command_bucket_is_shared_by_all_nodes(cluster: LocalCluster) -> None:
    """One bucket per user in Redis: a user cannot multiply the limit by spreading devices over
    nodes. The cluster's nodes run the defaults (20/s, burst 60)."""
    token = cluster.token(unique("alice"))
    on_a = ChorusClient(f"ws://127.0.0.1:{cluster.node_ports[0]}/ws", token, auto_reconnect=False)
    on_b = ChorusClient(f"ws://127.0.0.1:{cluster.node_ports[1]}/ws", token, auto_reconnect=False)
    bystander = ChorusClient(f"ws://127.0.0.1:{cluster.node_ports[1]}/ws", cluster.token(unique("bob")),
                             auto_reconnect=False)
    for client in (on_a, on_b, bystander):
        await client.connect()
    try:
        async def allowed(client: ChorusClient, count: int) -> int:
            results = await asyncio.gather(*(client.ping() for _ in range(count)), return_exceptions=True)
            for result in results:
                assert not isinstance(result, BaseException) or (
                    isinstance(result, ClientError) and result.code == "rate_limited"), result
            return sum(not isinstance(r, BaseException) for r in results)

        assert 60 <= await allowed(on_a, 100) <= 75
        assert await allowed(on_b, 10) <= 5, "node B must see the bucket node A drained"
        assert await allowed(bystander, 10) == 10
    finally:
        for client in (on_a, on_b, bystander):
            await client.close()


async def test_the_command_limit_fails_open_when_redis_is_away(cluster: LocalCluster, fresh_redis: RedisServer,
                                                               tmp_path: Path) -> None:
    """Without Redis the bucket cannot be read: commands that do not need Redis (ping, auth) keep
    working rather than failing on the limit; those that do fail by themselves (`unavailable`)."""
    proc, port = await asyncio.to_thread(start_node, cluster, tmp_path, "redisless-node", {
        "REDIS_URL": fresh_redis.url, "AUTH_JWT_SECRET": cluster.config.jwt_secret,
    })
    user = unique("alice")
    client = ChorusClient(f"ws://127.0.0.1:{port}/ws", cluster.token(user), auto_reconnect=False)
    try:
        await client.connect()
        await asyncio.to_thread(fresh_redis.stop)
        assert (await client.ping())["type"] == "pong"
        assert (await client.auth(cluster.token(user)))["type"] == "ack"
    finally:
        await client.close()
        await asyncio.to_thread(proc.stop)
    assert not SERVER_ERROR.search(proc.log_text()), proc.log_text()[-2000:]


async def test_runs_in_flight_are_limited_per_user(strict: StrictNode) -> None:
    user = unique("alice")
    client = ChorusClient(strict.ws_url, strict_token(user), auto_reconnect=False)
    await client.connect()
    try:
        first = await client.send("[[tokens:200]] [[slow:0.05]] a long answer", id="long")
        with pytest.raises(ClientError) as info:
            await client.send("another question", id="second")
        assert info.value.code == "rate_limited"
        # A retry of the send in flight is not a new run: it gets its ack again.
        again = await client.send("[[tokens:200]] [[slow:0.05]] a long answer", id="long")
        assert again["run"] == first["run"]
        await client.cancel(first["run"])
        assert (await client.wait_run_end(first["run"]))["event"] == "run.cancelled"
        second = await client.send("another question", id="second")
        assert (await client.wait_run_end(second["run"]))["event"] == "run.completed"
    finally:
        await client.close()


async def test_devices_per_user_are_limited_across_the_cluster(strict: StrictNode,
                                                               http: aiohttp.ClientSession) -> None:
    user = unique("alice")
    token = strict_token(user)
    devices = [ChorusClient(strict.ws_url, token, device=f"d{n}", auto_reconnect=False) for n in range(2)]
    for device in devices:
        await device.connect()
        await device.ping()  # answered after the device is marked online
    try:
        async with http.ws_connect(f"{strict.ws_url}?access_token={token}&device=d2") as ws:
            assert await close_code(ws) == 4029
        # The same device again (a reconnect racing its old socket) is not an extra device.
        async with http.ws_connect(f"{strict.ws_url}?access_token={token}&device=d1") as ws:
            assert (await ws.receive_json(timeout=5))["type"] == "hello"
        # Another user is not affected.
        async with http.ws_connect(f"{strict.ws_url}?access_token={strict_token(unique('bob'))}") as ws:
            assert (await ws.receive_json(timeout=5))["type"] == "hello"
    finally:
        for device in devices:
            await device.close()


async def test_new_connections_per_node_are_rate_limited(cluster: LocalCluster, tmp_path: Path,
                                                         http: aiohttp.ClientSession) -> None:
    proc, port = start_node(cluster, tmp_path, "trickle-node", {
        "AUTH_JWT_SECRET": cluster.config.jwt_secret, "NEW_CONNECTIONS_PER_SECOND": "0.2",
        "NEW_CONNECTIONS_BURST": "3",
    })
    try:
        url = f"ws://127.0.0.1:{port}/ws?access_token={cluster.token(unique('alice'))}"
        for _ in range(3):
            async with http.ws_connect(url) as ws:
                await ws.receive_json(timeout=5)
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(url)
        assert info.value.status == 429
        assert info.value.headers is not None and 1 <= int(info.value.headers["Retry-After"]) <= 5
        # REST is not counted.
        async with http.get(f"http://127.0.0.1:{port}/v1/conversations",
                            headers={"Authorization": f"Bearer {cluster.token(unique('bob'))}"}) as response:
            assert response.status == 200
    finally:
        await asyncio.to_thread(proc.stop)
    assert not SERVER_ERROR.search(proc.log_text())


# ---------------------------------------------------------------------------------------------
# JWKS


RSA_KEYS = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]


def jwk(index: int) -> dict[str, Any]:
    public = jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEYS[index].public_key(), as_dict=True)
    return {**public, "kid": f"key-{index}", "use": "sig", "alg": "RS256"}


def rs_token(index: int, user: str, kid: str | None = None) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 600}, RSA_KEYS[index], "RS256",
                      headers={"kid": kid or f"key-{index}"})


class JwksServer:
    """The identity provider's JWKS endpoint (the seam): serves `keys`, or `status` when set."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.status = 200
        self.fetches = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.status != 200:
            return web.Response(status=self.status)
        return web.json_response({"keys": self.keys})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", self._jwks)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"


async def test_jwks_keys_are_cached_and_refreshed_on_an_unknown_kid() -> None:
    server = JwksServer()
    await server.start()
    try:
        # The key server is down and nothing is cached: unavailable (not unauthorized), and a
        # crowd of clients connecting meanwhile costs the key server one request, not one each.
        server.status = 503
        crowded = Verifier(algorithms=("RS256",), jwks=JwksKeys(server.url, cache_s=300, cooldown_s=2))
        results = await asyncio.gather(*(crowded.verify(rs_token(0, "alice")) for _ in range(5)),
                                       return_exceptions=True)
        assert all(isinstance(r, AuthUnavailable) for r in results)
        assert server.fetches == 1
        keys = JwksKeys(server.url, cache_s=300, cooldown_s=0)
        verifier = Verifier(algorithms=("RS256",), jwks=keys)
        with pytest.raises(AuthUnavailable):
            await verifier.verify(rs_token(0, "alice"))
        server.status, server.keys = 200, [jwk(0)]
        assert (await verifier.verify(rs_token(0, "alice"))).user == "alice"
        fetched = server.fetches
        for _ in range(5):  # cached
            await verifier.verify(rs_token(0, "alice"))
        # Unknown kids within the cooldown: refused without asking the server again.
        keys.cooldown_s = 3600
        for kid in ("key-9", "key-10"):
            with pytest.raises(Unauthorized):
                await verifier.verify(rs_token(0, "alice", kid=kid))
        assert server.fetches == fetched
        # A JWKS server that fails later: the cached keys keep serving.
        server.status = 500
        keys.cooldown_s = 0
        assert (await verifier.verify(rs_token(0, "alice"))).user == "alice"
        with pytest.raises(Unauthorized):
            await verifier.verify(rs_token(1, "alice"))  # refresh failed, key-1 unknown
        assert server.fetches == fetched + 1
        # Rotation: key-1 appears; a token with the new kid triggers one refresh and verifies.
        server.status, server.keys = 200, [jwk(0), jwk(1)]
        assert (await verifier.verify(rs_token(1, "bob"))).user == "bob"
        assert server.fetches == fetched + 2
        # A token signed by key-0's private key but claiming key-1 does not verify.
        forged = jwt.encode({"sub": "mallory", "exp": int(time.time()) + 60}, RSA_KEYS[0], "RS256",
                            headers={"kid": "key-1"})
        with pytest.raises(Unauthorized):
            await verifier.verify(forged)
    finally:
        assert server.runner is not None
        await server.runner.cleanup()


async def test_a_node_with_a_jwks_url(cluster: LocalCluster, tmp_path: Path,
                                      http: aiohttp.ClientSession) -> None:
    server = JwksServer()
    await server.start()
    server.status = 503
    proc, port = await asyncio.to_thread(start_node, cluster, tmp_path, "jwks-node", {
        "AUTH_JWKS_URL": server.url, "AUTH_JWKS_COOLDOWN_SECONDS": "0", "AUTH_JWKS_CACHE_SECONDS": "300",
    })
    try:
        url = f"ws://127.0.0.1:{port}/ws"
        # The key server is down and nothing is cached: 503 (try later), not 401 (new token).
        assert await refused_status(http, f"{url}?access_token={rs_token(0, 'alice')}") == 503
        async with http.get(f"http://127.0.0.1:{port}/v1/conversations",
                            headers={"Authorization": f"Bearer {rs_token(0, 'alice')}"}) as response:
            assert response.status == 503
        server.status, server.keys = 200, [jwk(0)]
        user = unique("alice")
        async with http.ws_connect(f"{url}?access_token={rs_token(0, user)}") as ws:
            assert (await ws.receive_json(timeout=5))["user"] == user
        server.keys = [jwk(0), jwk(1)]  # rotation
        async with http.ws_connect(url, headers={"Authorization": f"Bearer {rs_token(1, user)}"}) as ws:
            assert (await ws.receive_json(timeout=5))["user"] == user
        # HS256 is not in the default list for a JWKS node: not even with the "right" secret.
        hs = forge({"alg": "HS256", "typ": "JWT"}, {"sub": user, "exp": int(time.time()) + 60},
                   json.dumps(jwk(0)).encode())
        assert await refused_status(http, f"{url}?access_token={hs}") == 401
        async with http.get(f"http://127.0.0.1:{port}/v1/conversations",
                            headers={"Authorization": f"Bearer {rs_token(1, user)}"}) as response:
            assert response.status == 200
    finally:
        await asyncio.to_thread(proc.stop)
        assert server.runner is not None
        await server.runner.cleanup()
    assert not SERVER_ERROR.search(proc.log_text()), proc.log_text()[-2000:]


# ---------------------------------------------------------------------------------------------
# Authorization: every command and request, including guessed ids


def guesses(real: str) -> list[str]:
    """Ids an attacker would try next to one they saw (or to nothing at all)."""
    prefix = real.split("_", 1)[0]
    return [real[:-1] + ("0" if real[-1] != "0" else "1"), real.upper(), f"{real} ", f"{prefix}_%",
            f"{prefix}_*", "' OR '1'='1", f"{real}' --", f"{prefix}_" + "0" * 20, "../" + real]


async def test_nobody_reads_resumes_cancels_deletes_or_receives_another_users_things(
    cluster: LocalCluster, http: aiohttp.ClientSession
) -> None:
    alice_user, bob_user = unique("alice"), unique("bob")
    alice_token, bob_token = cluster.token(alice_user), cluster.token(bob_user)
    alice = ChorusClient(cluster.ws_url, alice_token, device="phone")
    await alice.connect()
    bob = ChorusClient(f"ws://127.0.0.1:{cluster.node_ports[1]}/ws", bob_token, device="phone")
    await bob.connect()
    try:
        ack = await alice.send("[[tokens:30]] [[slow:0.02]] my secret plan", id="turn-1")
        conversation, run, message = ack["conversation"], ack["run"], ack["message"]

        # The same client id from bob is bob's own send, never alice's ack.
        mine = await bob.send("my own words", id="turn-1")
        assert (mine["conversation"], mine["run"], mine["message"]) != (conversation, run, message)

        for guess in [run, *guesses(run)]:
            with pytest.raises(ClientError) as info:
                await bob.cancel(guess)
            assert info.value.code == "not_found", guess
        for guess in [conversation, *guesses(conversation)]:
            with pytest.raises(ClientError) as info:
                await bob.send("let me in", conversation=guess)
            assert info.value.code == "not_found", guess
            for method, path in [("GET", f"/v1/conversations/{guess}"),
                                 ("GET", f"/v1/conversations/{guess}/messages"),
                                 ("DELETE", f"/v1/conversations/{guess}")]:
                status, _ = await rest(http, cluster.http_url, bob_token, method, path)
                assert status in (404, 405), (method, guess, status)  # "../x" may not route at all
        await alice.wait_run_end(run)
        assert alice.run_end(run)["event"] == "run.completed"  # type: ignore[index]

        # Resuming replays only the caller's own stream, whatever position and epoch it claims.
        for after, epoch in [(0, alice.epoch), (1, alice.epoch), (0, None), (alice.last_seq, alice.epoch)]:
            thief = ChorusClient(f"ws://127.0.0.1:{cluster.node_ports[0]}/ws", bob_token, device="thief",
                                 auto_reconnect=False)
            thief.last_seq, thief.epoch = after, epoch
            hello = await thief.connect()
            assert hello["user"] == bob_user
            await thief.ping()
            assert all(e["conversation"] != conversation for e in thief.events), (after, epoch)
            assert all(f.get("user", bob_user) == bob_user for f in thief.frames)
            await thief.close()
        # A token for alice's id with bob's signature (wrong secret) gets nowhere.
        forged = jwt.encode({"sub": alice_user, "exp": int(time.time()) + 60},
                            "bobs-own-secret-of-32-characters-long", "HS256")
        assert await refused_status(http, f"{cluster.ws_url}?access_token={forged}") == 401

        await bob.ping()
        assert [e for e in bob.events if e["conversation"] == conversation] == []
        assert {e["conversation"] for e in bob.events} == {mine["conversation"]}
        status, body = await rest(http, cluster.http_url, alice_token, "GET",
                                  f"/v1/conversations/{conversation}/messages")
        assert status == 200 and "my secret plan" in body["messages"][0]["content"]
        status, listing = await rest(http, cluster.http_url, bob_token, "GET", "/v1/conversations")
        assert [c["id"] for c in listing["conversations"]] == [mine["conversation"]]
    finally:
        await alice.close()
        await bob.close()


# ---------------------------------------------------------------------------------------------
# Bad input


def test_invalid_utf8_text_fails_the_socket_with_1007(cluster: LocalCluster) -> None:
    """RFC 6455 says a text frame that is not UTF-8 fails the connection: with 1007, before the
    node serves the frame (documented in docs/security.md). The node's own sockets (`ws_node.lean`)
    fail it as it arrives, here perhaps before the hello; the next socket is served as usual."""
    raw = RawSocket(cluster.node_ports[0], f"/ws?access_token={cluster.token(unique('alice'))}")
    raw.sock.sendall(client_frame(0x1, b'{"type":"ping","id":"\xc3\x28"}'))
    _, code = raw.frames_until_close()
    assert code == 1007
    again = RawSocket(cluster.node_ports[0], f"/ws?access_token={cluster.token(unique('alice'))}")
    assert json.loads(again.frame()[1])["type"] == "hello"


async def test_hostile_frames_get_errors_and_the_socket_lives(cluster: LocalCluster,
                                                            http: aiohttp.ClientSession) -> None:
    token = cluster.token(unique("alice"))
    async with http.ws_connect(f"ws://127.0.0.1:{cluster.node_ports[0]}/ws?access_token={token}") as ws:
        await ws.receive_json(timeout=5)
        cases: list[tuple[str | bytes, str | None]] = [
            ("[" * 30_000 + "]" * 30_000, "bad_request"),  # deep nesting (under the 64 KiB frame cap)
            ('{"type":"ping","id":"n","x":' + "[" * 5000 + "]" * 5000 + "}", "bad_request"),
            ('{"type":"ping","id":"n","x":' + "9" * 20_000 + "}", "bad_request"),  # over Python's int limit
            ('{"type":"ping","id":"n","x":1e999999}', None),  # inf: parses, harmless
            ('{"type":"send","id":"t","text":{"$gt":""}}', "bad_request"),
            ('{"type":"send","id":"t","text":"hi","conversation":["c_1"]}', "bad_request"),
            ('{"type":"cancel","id":"t","run":null}', "bad_request"),
            ('{"type":"auth","id":"t"}', "bad_request"),
            ('{"type":"auth","id":"t","token":"' + "a" * 9000 + '"}', "too_large"),
            ('{"type":"auth","id":"t","token":"a.b.c"}', "unauthorized"),
            ('{"type":"send","id":"' + "i" * 200 + '","text":"hi"}', "bad_request"),
            ('{"type":"ping","id":"dup","id":"dup2"}', None),  # duplicate keys: the last wins
            ('{"type":"\\u0000ping","id":"z"}', "bad_request"),
            ("\ufeff{}", "bad_request"),
            ("", "bad_request"),
            ("null", "bad_request"),
            (b"", "bad_request"),
            (b"\x00" * 1000, "bad_request"),
        ]
        for frame, code in cases:
            await send_frame(ws, frame)
            reply = await ws.receive_json(timeout=5)
            while reply["type"] not in ("error", "pong"):  # e.g. a snapshot after the hello
                reply = await ws.receive_json(timeout=5)
            if code is None:
                assert reply["type"] == "pong", (frame[:60], reply)
            else:
                assert (reply["type"], reply["code"]) == ("error", code), (frame[:60], reply)
        await ws.send_json({"type": "ping", "id": "alive"})
        assert await replies_to(ws, {"alive"}) == [{"type": "pong", "id": "alive"}]


@pytest.mark.parametrize(
    "query",
    ["after=%C2%B2", "after=-1", "after=1e3", "after=" + "9" * 40, "epoch=" + "e" * 100,
     "device=" + "d" * 200],
)
async def test_bad_resume_parameters_are_400_before_the_upgrade(cluster: LocalCluster, query: str,
                                                                http: aiohttp.ClientSession) -> None:
    url = f"ws://127.0.0.1:{cluster.node_ports[0]}/ws?access_token={cluster.token(unique('a'))}&{query}"
    assert await refused_status(http, url) == 400


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/v1/conversations?limit=%C2%B2", None, 400),  # "²".isdigit() is True; int() refuses it
        ("GET", "/v1/conversations?before=0001-01-01T00:00:00%2B01:00", None, 400),  # before year 1
        ("GET", "/v1/conversations?before=9999-12-31T23:59:59-01:00", None, 400),  # after year 9999
        ("GET", "/v1/conversations/{own}/messages?before=%C2%B2", None, 400),
        ("GET", "/v1/conversations/{own}/messages?before=99999999999999999999", None, 400),  # > bigint
        ("GET", "/v1/conversations/%00", None, 404),
        ("DELETE", "/v1/conversations/%00", None, 404),
        ("GET", "/v1/conversations/%00/messages", None, 404),
        ("POST", "/v1/conversations", {"title": "a\u0000b"}, 400),  # Postgres text refuses NUL
        ("POST", "/v1/conversations", {"agent": "\u0000"}, 400),
        ("POST", "/v1/conversations", b'{"title": "\\ud800"}', 400),  # a lone surrogate
    ],
)
async def test_malformed_rest_input_is_a_client_error_not_a_server_error(
    cluster: LocalCluster, http: aiohttp.ClientSession, method: str, path: str, body: Any, status: int
) -> None:
    token = cluster.token(unique("alice"))
    base = f"http://127.0.0.1:{cluster.node_ports[1]}"
    logged = len(cluster.nodes[1].log_text())
    created, own = await rest(http, base, token, "POST", "/v1/conversations", json={"title": "mine"})
    assert created == 201
    kw = {"json": body} if isinstance(body, dict) else {"data": body}
    got, reply = await rest(http, base, token, method, path.replace("{own}", own["id"]), **kw)
    assert got == status, reply
    assert reply["error"]["code"] in ("bad_request", "not_found")
    new_log = cluster.nodes[1].log_text()[logged:]
    assert not SERVER_ERROR.search(new_log), new_log[-3000:]


# ---------------------------------------------------------------------------------------------
# Property-based: a corpus of hostile frames and REST bodies against a running node


@pytest.fixture(scope="module")
def node_logs_at_start(cluster: LocalCluster) -> list[int]:
    return [len(node.log_text()) for node in cluster.nodes]


@pytest.fixture(scope="module")
def victim(cluster: LocalCluster, node_logs_at_start: list[int]) -> dict[str, str]:
    """Bob, with a conversation and a finished run that the fuzzing user aims at; and the
    fuzzer's own conversation (so REST paths reach the database, not only the 404)."""

    async def setup() -> dict[str, str]:
        user = unique("bob")
        token = cluster.token(user)
        bob = ChorusClient(cluster.ws_url, token, device="phone", auto_reconnect=False)
        fuzzer = ChorusClient(cluster.ws_url, cluster.token(f"fuzzer-{user}"), auto_reconnect=False)
        await bob.connect()
        await fuzzer.connect()
        ack = await bob.send("bob's private question")
        own = await fuzzer.send("the fuzzer's own question")
        await bob.wait_run_end(ack["run"])
        await fuzzer.wait_run_end(own["run"])
        await bob.close()
        await fuzzer.close()
        return {"user": user, "token": token, "conversation": ack["conversation"], "run": ack["run"],
                "message": ack["message"], "own_conversation": own["conversation"]}

    return asyncio.run(setup())


SERVER_FIELDS = ("conversation", "run", "message")


def leaks(victim: dict[str, str], value: Any, keys: tuple[str, ...] = SERVER_FIELDS) -> bool:
    """Does a server reply carry bob's things? Only fields the server fills in count (anywhere in
    the reply), plus bob's text: the fuzzer's own messages may echo any id it typed."""
    if isinstance(value, dict):
        if any(value.get(key) in (victim["conversation"], victim["run"], victim["message"]) for key in keys):
            return True
        return any(leaks(victim, item, keys) for item in value.values())
    if isinstance(value, list):
        return any(leaks(victim, item, keys) for item in value)
    return isinstance(value, str) and "bob's private" in value


def hostile_strings(victim: dict[str, str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=40),
        st.sampled_from([victim["conversation"], victim["run"], victim["message"], victim["user"],
                         victim["token"], victim["own_conversation"], "c_" + "0" * 20, "r_" + "f" * 20, "%",
                         "*", "' OR 1=1 --", "\x00", "a\x00b", "\ud800", "x\udfff", "{u:x}", "\ud7ff\ue000",
                         "a" * 8200, "[[tokens:3]] hi", " ", "\u2028", "null"]),
    )


def frames(victim: dict[str, str]) -> st.SearchStrategy[str | bytes]:
    strings = hostile_strings(victim)
    leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | strings
    values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
    ids = st.none() | strings | st.integers()
    # Well-formed commands carrying hostile strings reach the handlers (storage, stream, auth)...
    typed = st.one_of(
        st.fixed_dictionaries({"type": st.just("send"), "id": ids, "text": strings},
                              optional={"conversation": strings, "agent": strings}),
        st.fixed_dictionaries({"type": st.just("cancel"), "id": ids, "run": strings}),
        st.fixed_dictionaries({"type": st.just("auth"), "id": ids, "token": strings}),
        st.fixed_dictionaries({"type": st.just("ping"), "id": ids}),
    )
    # ...the rest exercises the parser.
    loose = st.fixed_dictionaries(
        {"type": st.sampled_from(["send", "cancel", "ping", "auth", "hello", "event"]) | values},
        optional={"id": ids, "text": strings | values, "conversation": strings | values,
                  "run": strings | values, "token": strings | values, "agent": values, "after": values},
    )
    return st.one_of(
        typed.map(json.dumps),
        loose.map(json.dumps),
        values.map(json.dumps),
        st.text(max_size=200),
        st.binary(max_size=200),
        st.integers(1, 20_000).map(lambda n: "[" * n + "]" * n),
        st.integers(1, 10_000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    ).filter(lambda frame: len(frame.encode() if isinstance(frame, str) else frame) < 60_000)  # under 1009


async def _fuzz_socket(url: str, corpus: list[str | bytes]) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        hello = await ws.receive_json(timeout=10)
        assert hello["type"] == "hello"
        for frame in corpus:
            await send_frame(ws, frame)
        await ws.send_json({"type": "ping", "id": "fuzz-end"})
        replies = []
        async with asyncio.timeout(20):
            while True:
                msg = await ws.receive()
                assert msg.type is aiohttp.WSMsgType.TEXT, (msg, ws.close_code)
                reply = json.loads(msg.data)
                replies.append(reply)
                if reply.get("id") == "fuzz-end":
                    return replies


ALLOWED_ERRORS = {"bad_request", "too_large", "not_found", "conflict", "forbidden", "unauthorized",
                  "rate_limited"}


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_frames_never_crash_a_node_or_leak(cluster: LocalCluster, victim: dict[str, str],
                                                  data: st.DataObject) -> None:
    corpus = data.draw(st.lists(frames(victim), min_size=1, max_size=15))
    fuzzer = cluster.token(unique("fuzzer"))  # a fresh command bucket: the frames reach the handlers
    node = data.draw(st.sampled_from([0, 1]))
    url = f"ws://127.0.0.1:{cluster.node_ports[node]}/ws?access_token={fuzzer}"
    replies = asyncio.run(_fuzz_socket(url, corpus))
    for reply in replies:
        if reply["type"] == "error":
            assert reply["code"] in ALLOWED_ERRORS, reply  # never "internal"
        else:  # errors may echo the id the fuzzer sent; nothing else may carry bob's things
            assert not leaks(victim, reply), reply


REST_PATHS = ["/v1/conversations", "/v1/conversations/{id}", "/v1/conversations/{id}/messages"]


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_rest_requests_never_crash_a_node_or_leak(cluster: LocalCluster, victim: dict[str, str],
                                                         data: st.DataObject) -> None:
    strings = hostile_strings(victim)
    method = data.draw(st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"]))
    ids = st.sampled_from([victim["conversation"], victim["own_conversation"], "c_x", "%00", "%ED%A0%80",
                           "%2e%2e", "c_%25"]) | st.from_regex(r"[A-Za-z0-9_.~-]{1,40}", fullmatch=True)
    path = data.draw(st.sampled_from(REST_PATHS)).replace("{id}", data.draw(ids))
    query_values = st.from_regex(r"[ -~]{0,30}", fullmatch=True) | st.sampled_from(
        ["9" * 25, "-1", "0", "²", "٣", "2024-01-01T00:00:00", "2024-01-01T00:00:00+99:00", "1e9"])
    query = data.draw(st.dictionaries(st.sampled_from(["limit", "before", "access_token", "x"]), query_values,
                                      max_size=2))
    body_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | strings,
                               lambda inner: st.lists(inner, max_size=3)
                               | st.dictionaries(st.sampled_from(["title", "agent", "x", "double_texting"]),
                                                 inner, max_size=3), max_leaves=8)
    body = data.draw(body_values.map(lambda v: json.dumps(v).encode()) | st.binary(max_size=300))
    token = cluster.token(unique(f"fuzzer-{victim['user']}"))  # a fresh REST bucket: requests reach the handlers

    async def go() -> int:
        async with aiohttp.ClientSession() as session, session.request(
            method, f"http://127.0.0.1:{cluster.node_ports[0]}{path}", params=query, data=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        ) as response:
            text = await response.text()
            if 200 <= response.status < 300 and text:
                if leaks(victim, json.loads(text), ("id", *SERVER_FIELDS)):
                    raise AssertionError(f"bob's things served to the fuzzer: {text[:300]}")
            return response.status

    status = asyncio.run(go())
    assert status in (200, 201, 204, 400, 404, 405, 413), (method, path, query, body[:80], status)


def test_after_the_fuzzing_nodes_serve_and_logged_no_errors(cluster: LocalCluster, victim: dict[str, str],
                                                            node_logs_at_start: list[int]) -> None:
    """Runs after the fuzz tests (file order): the nodes still serve everyone, bob's things are
    intact, and no node logged a traceback or an unhandled error."""

    async def check() -> None:
        for index in range(len(cluster.nodes)):
            client = ChorusClient(f"ws://127.0.0.1:{cluster.node_ports[index]}/ws",
                                  cluster.token(unique("after")), auto_reconnect=False)
            await client.connect()
            ack = await client.send("still there?")
            assert (await client.wait_run_end(ack["run"]))["event"] == "run.completed"
            await client.close()
        async with aiohttp.ClientSession() as http:
            status, body = await rest(http, f"http://127.0.0.1:{cluster.node_ports[0]}", victim["token"],
                                      "GET", f"/v1/conversations/{victim['conversation']}/messages")
            assert status == 200 and [m["role"] for m in body["messages"]] == ["user", "assistant"]

    asyncio.run(check())
    for node, start in zip(cluster.nodes, node_logs_at_start, strict=True):
        new = node.log_text()[start:]
        match = SERVER_ERROR.search(new)
        assert match is None, new[max(0, match.start() - 500):match.start() + 2500] if match else ""


# ---------------------------------------------------------------------------------------------
# Secrets stay out of logs


async def test_tokens_and_credentials_stay_out_of_logs(cluster: LocalCluster, tmp_path: Path,
                                                      http: aiohttp.ClientSession) -> None:
    token = cluster.token(unique("alice"))
    async with http.ws_connect(f"{cluster.ws_url}?access_token={token}") as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "hello"
    async with http.get(f"{cluster.http_url}/v1/conversations?access_token={token}") as response:
        assert response.status == 200
    assert cluster.nginx is not None
    access_log = cluster.nginx.access_log.read_text()
    assert "/ws" in access_log and "/v1/conversations" in access_log
    signature = token.rsplit(".", 1)[1]
    assert signature not in access_log, "nginx logged a token"
    for node in cluster.nodes:
        assert signature not in node.log_text()

    # A node whose Redis and Postgres URLs carry passwords, with Redis unreachable: it logs the
    # failures (and never the passwords or the JWT secret).
    database_url = cluster.database_url.replace("://", "://chorus:pg-s3cret@", 1) if "@" not in \
        cluster.database_url else cluster.database_url
    port = free_port()
    node = Proc("leaky-node", [sys.executable, "-m", "ws_node"], workdir=tmp_path, env={
        "REDIS_URL": f"redis://:redis-s3cret@127.0.0.1:{free_port()}/0", "DATABASE_URL": database_url,
        "AUTH_JWT_SECRET": SECRET, "PORT": str(port), "NODE_ID": "leaky-node", "HOST": "127.0.0.1",
        "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT),
    })
    node.start()
    try:
        async with asyncio.timeout(30):
            while "pubsub" not in node.log_text() and "redis" not in node.log_text().lower():
                assert node.alive, node.log_text()
                await asyncio.sleep(0.1)
    finally:
        node.stop()
    log = node.log_text()
    for secret in ("redis-s3cret", "pg-s3cret", SECRET):
        assert secret not in log, secret
