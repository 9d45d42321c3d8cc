"""Presence: which of a user's devices are online, on which node, and telling the user's other
devices when one comes or goes.

A Redis hash per user holds ``device -> "<node>|<socket>|<expires_ms>"``; `presence.lua` changes
an entry and publishes the `presence` frame about it on the user's channel in one step, so a frame
is sent exactly when an entry changes hands between online and offline. The frame is not part of
the stream (no seq, no history): a device that reconnects gets the whole list in `hello`.

A device goes offline `debounce_s` after its socket closed, and only if that socket still holds
its entry: a quick reconnect, to this node or another, takes the entry over and no offline/online
pair is sent. Each node refreshes its own devices' entries; the devices of a node that died
disappear once their entries expire (`TTL_S`), without a frame (their devices reconnect elsewhere).

The hash is also the device limit (`USER_MAX_DEVICES`): `join` counts the user's other devices
with a socket open and adds this one only under the limit, in the same script, so devices
connecting at the same instant to any nodes cannot overshoot it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from importlib import resources
from typing import Any

from redis.asyncio import Redis

from common.keys import Keys
from common.redis_client import is_cluster, script_for
from fanout.cluster_pipe import ClusterPipes
from fanout.resp_pipe import RespPipe
from protocol import DeviceOnline, Presence, encode

log = logging.getLogger(__name__)

REFRESH_S = 30.0
TTL_S = 3 * REFRESH_S
CLOSE_TIMEOUT_S = 5.0
CLOSED = "-"  # a closed socket's name starts with it (presence.lua)
CLOSED_GRACE_S = 10.0
CLUSTER_REFRESH_BATCH = 16  # script calls in flight at once on a Redis Cluster (no pipelines there)
_LUA = resources.files("ws_node").joinpath("presence.lua").read_text()


def _entries(raw: dict[str, str], now_ms: float, *, open_only: bool = False) -> dict[str, str]:
    """device -> node for the entries that have not expired (`open_only`: and whose socket has
    not closed, as a device still within its debounce has)."""
    online = {}
    for device, value in raw.items():
        parts = value.rsplit("|", 2)
        if len(parts) == 3 and parts[2].isdigit() and int(parts[2]) > now_ms:
            if not (open_only and parts[1].startswith(CLOSED)):
                online[device] = parts[0]
    return online


async def online(redis: Redis, keys: Keys, user: str, *, open_only: bool = False) -> dict[str, str]:
    """device -> node for the user's devices online now (`open_only`: with a socket open now)."""
    raw: dict[str, str] = await redis.hgetall(keys.presence(user))  # type: ignore[assignment]
    return _entries(raw, time.time() * 1000, open_only=open_only)


def devices(online: dict[str, str]) -> tuple[DeviceOnline, ...]:
    return tuple(DeviceOnline(device, node) for device, node in sorted(online.items()))


class Presences:
    """This node's side of presence. `socket` names one socket of the device on this node."""

    def __init__(self, redis: Redis, keys: Keys, channel: Callable[[str], str], *, node: str,
                 debounce_s: float, scripts: RespPipe | ClusterPipes | None = None) -> None:
        """`scripts`: the broker's pipelined connection(s) (`RedisBroker.scripts`), which the
        script takes when given: a refresh of 50 sockets is then one write and one read, where
        redis-py's pipeline spent ~40 µs of the loop per socket (issue 14)."""
        self._redis = redis
        self._scripts = scripts
        self._keys = keys
        self._channel = channel
        self._node = node
        self._debounce_s = debounce_s
        self._lua = script_for(redis, _LUA)  # SPUBLISH on a cluster
        self._script = redis.register_script(self._lua)
        self._leaving: dict[tuple[str, str, str], asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def join(self, user: str, device: str, socket: str, *, max_devices: int = 0
                   ) -> tuple[DeviceOnline, ...] | None:
        """The device is online through `socket`; returns the user's devices online now. None,
        with nothing changed, when the user already has `max_devices` other devices with a socket
        open (0: no limit): checked and taken in one step (presence.lua), so concurrent connects
        cannot overshoot. The device itself never counts (a reconnect, a second socket)."""
        now_ms = time.time() * 1000
        reply = await self._run("join", user, device, socket, now_ms, max_devices=max_devices)
        if not reply[0]:
            return None
        flat = reply[1]
        return devices(_entries(dict(zip(flat[::2], flat[1::2], strict=True)), now_ms))

    async def refresh(self, sockets: Iterable[tuple[str, str, str]]) -> None:
        """Extend the entries of (user, device, socket) held by this node's sockets."""
        now_ms = time.time() * 1000
        if self._scripts is not None:
            await asyncio.gather(*(self._run("refresh", *ident, now_ms) for ident in sockets))
            return
        if is_cluster(self._redis):
            # redis-py's cluster pipelines refuse scripts (EVALSHA): a few calls at a time instead,
            # each routed to its user's shard.
            due = list(sockets)
            for start in range(0, len(due), CLUSTER_REFRESH_BATCH):
                batch = due[start:start + CLUSTER_REFRESH_BATCH]
                await asyncio.gather(*(self._run("refresh", *ident, now_ms) for ident in batch))
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for user, device, socket in sockets:
                await self._run("refresh", user, device, socket, now_ms, client=pipe)
            await pipe.execute()

    async def closed(self, user: str, device: str, socket: str) -> None:
        """`socket` closed: the device goes offline in `debounce_s` unless it came back meanwhile.
        Until then its entry names a closed socket, which the device limit does not count."""
        try:
            await self._run("close", user, device, socket, time.time() * 1000)
        except Exception as exc:  # the entry expires by itself
            log.warning("presence: cannot mark %s/%s closed: %r", user, device, exc)
            return
        ident = (user, device, CLOSED + socket)
        self._leaving[ident] = asyncio.get_running_loop().call_later(self._debounce_s, self._leave, ident)

    def _leave(self, ident: tuple[str, str, str]) -> None:
        self._leaving.pop(ident, None)
        task = asyncio.create_task(self._left(*ident))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _left(self, user: str, device: str, socket: str) -> None:
        try:
            await self._run("leave", user, device, socket, time.time() * 1000)
        except Exception as exc:  # the entry expires by itself; only the frame is lost
            log.warning("presence: cannot take %s/%s offline: %r", user, device, exc)

    async def close(self) -> None:
        """On shutdown: the devices still due to go offline go now (those that reconnected to
        another node meanwhile are left alone by the script)."""
        due = list(self._leaving)
        for handle in self._leaving.values():
            handle.cancel()
        self._leaving.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(self._left(*ident) for ident in due), *self._tasks),
                                   CLOSE_TIMEOUT_S)

    def _run(self, mode: str, user: str, device: str, socket: str, now_ms: float,
             client: Redis | None = None, max_devices: int = 0) -> Awaitable[Any]:
        frame = encode(Presence(device=device, online=mode != "leave", node=self._node))
        # A closed socket's entry lasts out the debounce, and a little more, if this node dies.
        ttl_s = self._debounce_s + CLOSED_GRACE_S if mode == "close" else TTL_S
        owner, expires_ms = f"{self._node}|{socket}", int(now_ms + ttl_s * 1000)
        args: list[str | int] = [mode, device, owner, expires_ms, int(now_ms), int(TTL_S),
                                 self._channel(user), frame, max_devices]
        keys = [self._keys.presence(user)]
        if self._scripts is not None and client is None:
            return self._scripts.evalsha(self._script.sha, self._lua, keys, args)
        return self._script(keys=keys, args=args, client=client)
