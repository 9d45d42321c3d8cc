"""Server frames read into the protocol's dataclasses, tolerantly: a field a newer server adds is
ignored, as docs/protocol.md asks of clients."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protocol import PROTOCOL_VERSION, Ack, DeviceOnline, Hello, Pong


def hello_of(frame: Mapping[str, Any]) -> Hello:
    devices = tuple(DeviceOnline(str(d["device"]), str(d["node"])) for d in frame.get("devices") or ())
    return Hello(node=frame["node"], user=frame["user"], device=frame["device"], epoch=frame["epoch"],
                 seq=frame["seq"], heartbeat=frame["heartbeat"],
                 protocol=frame.get("protocol", PROTOCOL_VERSION), devices=devices)


def ack_of(frame: Mapping[str, Any]) -> Ack:
    return Ack(id=frame.get("id"), conversation=frame.get("conversation"), message=frame.get("message"),
               run=frame.get("run"), seq=frame.get("seq"), request=frame.get("request"),
               expires_at=frame.get("expires_at"))


def pong_of(frame: Mapping[str, Any]) -> Pong:
    return Pong(id=frame.get("id"))
