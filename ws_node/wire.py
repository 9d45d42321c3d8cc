"""RFC 6455, the server's side, with no I/O (wsproto's shape): bytes from the client in, events
out; frames to the client built as bytes. `ws_node.lean` puts it on a socket.

Only what a Chorus node needs: no extensions (a client offering permessage-deflate is served by
aiohttp instead), no subprotocols. Every way a client can break the protocol ends in a
`Failure` with the close code RFC 6455 gives it: 1002 (protocol), 1007 (text not UTF-8), 1009
(message over the size limit).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum

# uvloop's default high-water mark of a transport: a node writes a frame at once only while the
# socket holds less than this unwritten (else it queues, `ws_node.connection`), and aborts a socket
# ending with more (`ws_node.lean`).
WRITE_HIGH_WATER = 64 * 1024
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")
_CODE = struct.Struct("!H")


class Opcode(IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


@dataclass(frozen=True, slots=True)
class Message:
    """A whole data message: `data` is str for text, bytes for binary."""

    data: str | bytes


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The client's close frame. `code` is 1005 when it carried none (RFC 6455 7.1.5)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Failure:
    """The client broke the protocol: close with `code`; nothing after it is read."""

    code: int
    reason: str


Event = Message | Ping | Pong | Close | Failure


def accept_key(key: str) -> str | None:
    """`Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`, or None if the key is not the
    base64 of 16 bytes."""
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except ValueError:
        return None
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def frame(opcode: Opcode, payload: bytes) -> bytes:
    """One final, unmasked frame (servers never mask)."""
    size = len(payload)
    if size < 126:
        return _SHORT.pack(0x80 | opcode, size) + payload
    if size < 65_536:
        return _MEDIUM.pack(0x80 | opcode, 126, size) + payload
    return _LONG.pack(0x80 | opcode, 127, size) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut to fit a control frame's 125 bytes."""
    return frame(Opcode.CLOSE, _CODE.pack(code) + reason.encode()[:123])


def _unmask(mask: bytes, data: bytes) -> bytes:
    size = len(data)
    key = int.from_bytes((mask * (size // 4 + 1))[:size], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(size, "little")


class FrameReader:
    """Client frames to events. Masking, control frames inside fragmented messages, the size
    limit of a whole message and UTF-8 of text are all checked here."""

    __slots__ = ("_buffer", "_fragments", "_fragments_size", "_message_opcode", "broken", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.broken = False
        self._buffer = b""
        self._fragments: list[bytes] | None = None  # a fragmented message so far
        self._fragments_size = 0
        self._message_opcode = Opcode.TEXT

    def feed(self, data: bytes) -> list[Event]:
        """The events in `data` and what was left of the last call; stops at a `Failure`."""
        if self.broken:
            return []
        buffer = self._buffer + data if self._buffer else data
        events: list[Event] = []
        offset = 0
        while True:
            parsed = self._next(buffer, offset)
            if parsed is None:
                break
            event, offset = parsed
            if event is None:
                continue
            events.append(event)
            if isinstance(event, Failure):
                self.broken = True
                self._buffer = b""
                return events
        self._buffer = buffer[offset:]
        return events

    def _next(self, buffer: bytes, offset: int) -> tuple[Event | None, int] | None:
        """One frame at `offset`: its event (None for a fragment that ends no message) and where
        the next frame starts; None when the frame is not all there yet."""
        available = len(buffer) - offset
        if available < 2:
            return None
        first, second = buffer[offset], buffer[offset + 1]
        fin, opcode, size = first & 0x80, first & 0x0F, second & 0x7F
        head = 2
        if size == 126:
            head = 4
            if available < head:
                return None
            size = int.from_bytes(buffer[offset + 2:offset + 4], "big")
        elif size == 127:
            head = 10
            if available < head:
                return None
            size = int.from_bytes(buffer[offset + 2:offset + 10], "big")
        if first & 0x70:
            return Failure(1002, "reserved bits set without an extension"), offset
        if not second & 0x80:
            return Failure(1002, "client frames must be masked"), offset
        if opcode >= 0x8:
            if not fin or size > 125:
                return Failure(1002, "a control frame must be final and at most 125 bytes"), offset
        elif opcode not in (0x0, 0x1, 0x2):
            return Failure(1002, f"unknown opcode {opcode}"), offset
        if size > self.max_size or (opcode == 0x0 and self._fragments_size + size > self.max_size):
            return Failure(1009, "message too big"), offset
        end = offset + head + 4 + size
        if len(buffer) < end:
            return None
        mask = buffer[offset + head:offset + head + 4]
        payload = _unmask(mask, buffer[offset + head + 4:end]) if size else b""
        return self._event(bool(fin), Opcode(opcode), payload), end

    def _event(self, fin: bool, opcode: Opcode, payload: bytes) -> Event | None:
        if opcode is Opcode.PING:
            return Ping(payload)
        if opcode is Opcode.PONG:
            return Pong(payload)
        if opcode is Opcode.CLOSE:
            return _close(payload)
        if opcode is Opcode.CONTINUATION:
            if self._fragments is None:
                return Failure(1002, "a continuation frame with no message to continue")
            self._fragments.append(payload)
            self._fragments_size += len(payload)
            if not fin:
                return None
            payload, opcode = b"".join(self._fragments), self._message_opcode
            self._fragments, self._fragments_size = None, 0
        elif self._fragments is not None:
            return Failure(1002, "a new message before the last one ended")
        elif not fin:
            self._fragments, self._fragments_size, self._message_opcode = [payload], len(payload), opcode
            return None
        if opcode is Opcode.BINARY:
            return Message(payload)
        try:
            return Message(payload.decode())
        except UnicodeDecodeError:
            return Failure(1007, "text frame is not valid UTF-8")


def _close(payload: bytes) -> Event:
    if not payload:
        return Close(1005, "")
    if len(payload) == 1:
        return Failure(1002, "a close frame with a one-byte code")
    code = _CODE.unpack_from(payload)[0]
    if not ((1000 <= code <= 1014 and code not in (1004, 1005, 1006)) or 3000 <= code <= 4999):
        return Failure(1002, f"close code {code} may not be sent")
    try:
        return Close(code, payload[2:].decode())
    except UnicodeDecodeError:
        return Failure(1007, "close reason is not valid UTF-8")
