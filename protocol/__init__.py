"""Chorus wire protocol v1: the one vocabulary nodes, workers and every client share.

Standard library only, and it imports nothing else of Chorus, so any client can vendor it
(wsproto's `events.py` is the model: frozen dataclasses in, text out, no I/O).

- `protocol.vocabulary`: enums for frame types, events, run statuses, double-texting policies,
  error codes, resync reasons and close codes;
- `protocol.commands`: client -> server commands and `parse_command`;
- `protocol.frames`: server -> client frames and `encode`;
- `protocol.events`: the `data` of each event, and `event_body` for publishers;
- `protocol.text`: the text a device shows for a run (`shown_text`);
- `protocol.schema`: the JSON Schema of all of it (``python -m protocol.schema``).

See docs/protocol.md.
"""

from protocol.commands import (
    MAX_ID_CHARS,
    Auth,
    Cancel,
    Command,
    Ping,
    ProtocolError,
    Respond,
    Send,
    parse_command,
    storable,
)
from protocol.events import EVENT_DATA, EventData, event_body
from protocol.frames import (
    Ack,
    DeviceOnline,
    Error,
    EventFrame,
    Hello,
    Pong,
    Presence,
    Reconnect,
    Resync,
    RunSnapshot,
    ServerFrame,
    Snapshot,
    encode,
)
from protocol.text import shown_text
from protocol.vocabulary import (
    END_EVENT,
    END_EVENTS,
    ENDED,
    IN_FLIGHT,
    PROTOCOL_VERSION,
    RECONNECT_CODES,
    CloseCode,
    DoubleTexting,
    ErrorCode,
    Event,
    FrameType,
    ResyncReason,
    Role,
    RunStatus,
)

__all__ = [
    "ENDED",
    "END_EVENT",
    "END_EVENTS",
    "EVENT_DATA",
    "IN_FLIGHT",
    "MAX_ID_CHARS",
    "PROTOCOL_VERSION",
    "RECONNECT_CODES",
    "Ack",
    "Auth",
    "Cancel",
    "CloseCode",
    "Command",
    "DeviceOnline",
    "DoubleTexting",
    "Error",
    "ErrorCode",
    "Event",
    "EventData",
    "EventFrame",
    "FrameType",
    "Hello",
    "Ping",
    "Pong",
    "Presence",
    "ProtocolError",
    "Reconnect",
    "Respond",
    "Resync",
    "ResyncReason",
    "Role",
    "RunSnapshot",
    "RunStatus",
    "Send",
    "ServerFrame",
    "Snapshot",
    "encode",
    "event_body",
    "parse_command",
    "shown_text",
    "storable",
]
