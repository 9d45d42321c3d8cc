"""How a Chorus process starts: read its settings once, configure logging, serve on uvloop; and a
free local port for the processes it starts."""

from __future__ import annotations

import asyncio
import random
import socket
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from common import logs, tracing
from common.config import SettingError, SharedSettings

T = TypeVar("T")


_HANDED_OUT: set[int] = set()


def free_port(*, span: int = 0) -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago (racy by nature: bind soon).

    It is below the kernel's ephemeral range, so no outgoing connection's source port takes it
    before its server binds, and this process never hands the same port out twice. With `span`,
    `port + span` is free too (a Redis Cluster node's bus port)."""
    top = _ephemeral_floor() - 1 - span
    for _ in range(1000 if top > 11_000 else 0):
        port = random.randint(10_000, top)
        wanted = {port, port + span}
        if not wanted & _HANDED_OUT and all(map(_bindable, wanted)):
            _HANDED_OUT.update(wanted)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        return int(port)


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def run(name: str, configure: Callable[[], T], serve: Callable[[T], Coroutine[Any, Any, None]],
        identity: Callable[[T], tuple[SharedSettings, str]], *, service: str) -> int:
    """`configure()` reads the settings (a `SettingError` ends the process with exit code 2 and
    the variable's name); `identity(settings)` gives the shared settings and the instance's name
    (its `NODE_ID`) for the logs; tracing is set up as the `OTEL_*` variables say (`service`: the
    default `service.name`); then `serve(settings)` runs until it returns. Returns the exit code."""
    try:
        settings = configure()
        tracing.configure(service)
    except (SettingError, ValueError) as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        return 2
    shared, instance = identity(settings)
    logs.configure(level=shared.log_level, format=shared.log_format, service=name, instance=instance)
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(serve(settings))
        else:
            uvloop.run(serve(settings))
    finally:
        tracing.shutdown()
    return 0
