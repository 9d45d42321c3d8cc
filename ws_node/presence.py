"""Presence: which devices of a user are online, on which node (a Redis hash per user).

Fields are ``device -> "<node>|<expires_ms>"``; the node refreshes its own devices every
`refresh_s`, so the devices of a node that died disappear once their expiry passes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from redis.asyncio import Redis

from common.keys import Keys

REFRESH_S = 30.0
TTL_S = 3 * REFRESH_S


def _value(node: str) -> str:
    return f"{node}|{int((time.time() + TTL_S) * 1000)}"


async def mark_online(redis: Redis, keys: Keys, devices: Iterable[tuple[str, str]], node: str) -> None:
    """Record (user, device) pairs as online on `node`."""
    async with redis.pipeline(transaction=False) as pipe:
        for user, device in devices:
            pipe.hset(keys.presence(user), device, _value(node))
            pipe.expire(keys.presence(user), int(TTL_S))
        await pipe.execute()


async def mark_offline(redis: Redis, keys: Keys, user: str, device: str, node: str) -> None:
    key = keys.presence(user)
    current: str | None = await redis.hget(key, device)  # type: ignore[assignment]
    if current is not None and current.split("|", 1)[0] == node:
        await redis.hdel(key, device)  # another node may already hold the device's newer socket


async def online(redis: Redis, keys: Keys, user: str) -> dict[str, str]:
    """device -> node for the user's devices whose entry has not expired."""
    now_ms = time.time() * 1000
    result = {}
    entries: dict[str, str] = await redis.hgetall(keys.presence(user))  # type: ignore[assignment]
    for device, value in entries.items():
        node, _, expires = value.partition("|")
        if expires.isdigit() and int(expires) > now_ms:
            result[device] = node
    return result
