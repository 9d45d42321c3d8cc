"""`fanout.resp_pipe.RespPipe` against a real Redis: pipelined replies in order, scripts loaded on
NOSCRIPT, errors as redis-py's, a lost or silent connection failing what is in flight and the next
command connecting again; and the broker publishing through it."""

from __future__ import annotations

import asyncio

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from common.keys import Keys
from fanout.redis_broker import RedisBroker
from fanout.resp_pipe import RespPipe
from loadtest.procs import RedisServer
from tests.support import WAIT_S, unique


async def test_a_thousand_commands_at_once_get_their_own_replies(redis_server: RedisServer) -> None:
    pipe = RespPipe.from_url(redis_server.url)
    prefix = unique("pipe")
    try:
        replies = await asyncio.wait_for(asyncio.gather(
            *(pipe.execute("INCRBY", f"{prefix}:{n % 7}", n) for n in range(1000))), WAIT_S)
        totals = {k: 0 for k in range(7)}
        for n, reply in enumerate(replies):
            totals[n % 7] += n
            assert reply <= totals[n % 7]
        assert [await pipe.execute("GET", f"{prefix}:{k}") for k in range(7)] == [str(totals[k]) for k in range(7)]
    finally:
        await pipe.aclose()


async def test_a_script_unknown_to_redis_is_loaded_and_an_error_reply_is_redis_pys(
    fresh_redis: RedisServer,
) -> None:
    pipe = RespPipe.from_url(fresh_redis.url)
    script = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
    try:
        sha = await pipe.execute("SCRIPT", "LOAD", script)
        await pipe.execute("SCRIPT", "FLUSH")
        assert await pipe.evalsha(sha, script, ["k"], [5]) == 5  # NOSCRIPT, then EVAL
        assert await pipe.evalsha(sha, script, ["k"], [5]) == 10  # cached again by the EVAL
        with pytest.raises(redis_errors.ResponseError, match=r"WRONGTYPE|wrong kind"):
            await pipe.execute("LPUSH", "k", "x")
        assert await pipe.execute("PING") == "PONG"  # the pipe goes on after an error reply
    finally:
        await pipe.aclose()


async def test_the_database_of_the_url_is_selected(redis_server: RedisServer) -> None:
    pipe = RespPipe.from_url(redis_server.url.rsplit("/", 1)[0] + "/3")
    key = unique("db")
    redis = Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/3", decode_responses=True)
    try:
        await pipe.execute("SET", key, "in three")
        assert await redis.get(key) == "in three"
    finally:
        await pipe.aclose()
        await redis.aclose()


async def test_a_killed_connection_fails_what_is_in_flight_and_the_next_command_reconnects(
    fresh_redis: RedisServer,
) -> None:
    pipe = RespPipe.from_url(fresh_redis.url)
    admin = Redis.from_url(fresh_redis.url, decode_responses=True)
    try:
        await pipe.execute("CLIENT", "SETNAME", "the-pipe")
        # Queued before the kill below (the task's first step runs while the kill is on its way).
        blocked = asyncio.ensure_future(pipe.execute("BLPOP", "never", 0))
        assert await admin.client_kill_filter(skipme=True, _type="normal") >= 1
        with pytest.raises(redis_errors.ConnectionError):
            await asyncio.wait_for(blocked, WAIT_S)
        assert await pipe.execute("PING") == "PONG"
    finally:
        await pipe.aclose()
        await admin.aclose()


async def test_a_redis_that_stops_answering_times_out_and_the_pipe_recovers(fresh_redis: RedisServer) -> None:
    pipe = RespPipe.from_url(fresh_redis.url, timeout_s=0.3)
    other = Redis.from_url(fresh_redis.url)
    try:
        await pipe.execute("SET", "k", "before")
        with pytest.raises(redis_errors.TimeoutError):
            await asyncio.wait_for(pipe.execute("DEBUG", "SLEEP", "1"), WAIT_S)
        assert await other.ping()  # answered once Redis wakes up
        # A new connection carries on; the old one's late reply ("OK") answers nothing.
        assert await asyncio.wait_for(pipe.execute("GET", "k"), WAIT_S) == "before"
    finally:
        await pipe.aclose()
        await other.aclose()


async def test_the_broker_publishes_through_the_pipe_in_order_and_dedupes(redis_server: RedisServer) -> None:
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    broker = RedisBroker(redis, Keys(unique("pipe")))
    try:
        results = await asyncio.gather(*(broker.publish("u", f'{{"n":{n}}}', producer="p", pseq=n + 1)
                                         for n in range(200)))
        assert [r.seq for r in results] == list(range(1, 201))  # the order the calls were made in
        again = await broker.publish("u", '{"n":0}', producer="p", pseq=1)
        assert again.duplicate and again.seq == 200  # the producer's last seq: nothing published
        assert await broker.read_after("u", 198, upto=200) == ['{"seq":199,"n":198}', '{"seq":200,"n":199}']
    finally:
        await broker.aclose()
        await redis.aclose()
