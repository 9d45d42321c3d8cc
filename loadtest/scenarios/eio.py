"""The part of Engine.IO 4 / Socket.IO 5 a benchmark client needs, over the websocket transport
only (``/socket.io/?EIO=4&transport=websocket``), with no I/O: text packets in, packets out.

    server: 0{"sid":..,"pingInterval":..}   Engine.IO open
    client: 40{"user":..,"token":..}        Socket.IO connect to "/" with an auth payload
    server: 40{"sid":..}  or  44{"message":..}   connected, or refused
    server: 2        client: 3              Engine.IO ping / pong (the server pings in v4)
    server: 42["ev",{..}]                   an event (``42/nsp,`` and an ack id may come between)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

PATH = "/socket.io/?EIO=4&transport=websocket"
PONG = "3"

Kind = Literal["open", "ping", "close", "connected", "connect_error", "event", "other"]


@dataclass(frozen=True)
class Packet:
    kind: Kind
    data: Any = None  # open: the handshake dict; connected/connect_error: the dict; event: its args
    name: str = ""  # event only
    namespace: str = "/"


def connect(auth: dict[str, str] | None = None, namespace: str = "/") -> str:
    """The Socket.IO CONNECT packet, as an Engine.IO message."""
    prefix = "40" if namespace == "/" else f"40{namespace},"
    return prefix + (json.dumps(auth, separators=(",", ":")) if auth else "")


def parse(message: str) -> Packet:
    """One Engine.IO text message from the server."""
    if not message:
        return Packet("other", message)
    engine = message[0]
    if engine == "0":
        return Packet("open", json.loads(message[1:]))
    if engine == "2":
        return Packet("ping", message[1:])
    if engine == "1":
        return Packet("close")
    if engine != "4" or len(message) < 2:
        return Packet("other", message)
    return _socket_packet(message[1], message[2:])


def _socket_packet(kind: str, rest: str) -> Packet:
    namespace = "/"
    if rest.startswith("/"):
        comma = rest.find(",")
        namespace, rest = (rest, "") if comma < 0 else (rest[:comma], rest[comma + 1:])
    at = 0
    while at < len(rest) and rest[at].isdigit():  # an ack id, unused here
        at += 1
    body = json.loads(rest[at:]) if rest[at:] else None
    if kind == "0":
        return Packet("connected", body, namespace=namespace)
    if kind == "4":
        return Packet("connect_error", body, namespace=namespace)
    if kind == "1":
        return Packet("close", namespace=namespace)
    if kind == "2" and isinstance(body, list) and body:
        return Packet("event", body[1:], name=str(body[0]), namespace=namespace)
    return Packet("other", body, namespace=namespace)


def event_payload(message: str, loads: Callable[[str], Any] = json.loads) -> Any:
    """Fast path for the benchmark's reader: the first argument of a default-namespace event
    without an ack id (``42["ev",{..}]``), or None for any other message."""
    if message.startswith('42["'):
        body = loads(message[2:])
        return body[1] if len(body) > 1 else None
    return None
