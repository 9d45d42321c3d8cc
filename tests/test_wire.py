"""`ws_node.wire` (RFC 6455 with no I/O) and `ws_node.lean`'s request-head parsing, as tables."""

from __future__ import annotations

import struct

import pytest

from tests.support import client_frame
from ws_node import lean, wire
from ws_node.wire import Close, Failure, Message, Ping, Pong


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


SNOWMAN = "☃".encode()  # three bytes, split over two fragments below


@pytest.mark.parametrize(("data", "events"), [
    (client_frame(0x1, b'{"type":"ping"}'), [Message('{"type":"ping"}')]),
    (client_frame(0x2, b"\x00\xff"), [Message(b"\x00\xff")]),
    (client_frame(0x1, b""), [Message("")]),
    (client_frame(0x1, b"a" * 200), [Message("a" * 200)]),  # 16-bit length
    (client_frame(0x1, b"b" * 70_000), [Message("b" * 70_000)]),  # 64-bit length
    (client_frame(0x9, b"hi") + client_frame(0xA, b""), [Ping(b"hi"), Pong(b"")]),
    # fragmented, with a ping between the fragments and a character split over two of them
    (client_frame(0x1, b"x" + SNOWMAN[:1], fin=False) + client_frame(0x9, b"")
     + client_frame(0x0, SNOWMAN[1:], fin=False) + client_frame(0x0, b"y"), [Ping(b""), Message("x☃y")]),
    (client_frame(0x8, b""), [Close(1005, "")]),
    (client_frame(0x8, close_payload(1000, b"bye")), [Close(1000, "bye")]),
    (client_frame(0x8, close_payload(4000)), [Close(4000, "")]),
    (client_frame(0x8, close_payload(1012)), [Close(1012, "")]),
])
def test_frames_become_events(data: bytes, events: list[wire.Event]) -> None:
    assert wire.FrameReader(max_size=100_000).feed(data) == events


@pytest.mark.parametrize(("data", "code"), [
    (client_frame(0x1, b"{}", masked=False), 1002),
    (client_frame(0x1, b"{}", rsv=0x40), 1002),  # permessage-deflate's bit, never negotiated here
    (client_frame(0x3, b""), 1002),  # a reserved opcode
    (client_frame(0x9, b"p" * 126), 1002),  # a control frame over 125 bytes
    (client_frame(0x9, b"", fin=False), 1002),  # a fragmented control frame
    (client_frame(0x0, b"orphan"), 1002),  # a continuation of nothing
    (client_frame(0x1, b"a", fin=False) + client_frame(0x1, b"b"), 1002),  # a new message mid-message
    (client_frame(0x8, b"\x03"), 1002),  # a one-byte close code
    (client_frame(0x8, close_payload(1005)), 1002),  # a code only for local use
    (client_frame(0x8, close_payload(999)), 1002),
    (client_frame(0x8, close_payload(1000, b"\xff")), 1007),
    (client_frame(0x1, b"\xc3\x28"), 1007),
    (client_frame(0x1, b"a" * 1025), 1009),
    (client_frame(0x1, b"a" * 600, fin=False) + client_frame(0x0, b"a" * 600), 1009),  # the whole message
])
def test_broken_frames_fail_with_their_close_code(data: bytes, code: int) -> None:
    reader = wire.FrameReader(max_size=1024)
    events = reader.feed(data + client_frame(0x1, b"after"))
    assert isinstance(events[-1], Failure) and events[-1].code == code, events
    assert reader.feed(client_frame(0x1, b"more")) == [], "nothing is read after a failure"


def test_a_frame_fed_a_byte_at_a_time_is_one_event() -> None:
    data = client_frame(0x1, b"c" * 300) + client_frame(0x9, b"p")
    reader = wire.FrameReader(max_size=1024)
    events = [event for byte in data for event in reader.feed(bytes([byte]))]
    assert events == [Message("c" * 300), Ping(b"p")]


def test_an_oversized_frame_fails_on_its_header_before_its_payload_arrives() -> None:
    header = client_frame(0x1, b"a" * 70_000)[:14]
    assert wire.FrameReader(max_size=65_536).feed(header) == [Failure(1009, "message too big")]


@pytest.mark.parametrize(("size", "header"), [
    (125, b"\x81\x7d"), (126, b"\x81\x7e\x00\x7e"), (65_535, b"\x81\x7e\xff\xff"),
    (65_536, b"\x81\x7f" + struct.pack("!Q", 65_536)),
])
def test_server_frames_are_final_and_unmasked(size: int, header: bytes) -> None:
    data = wire.frame(wire.Opcode.TEXT, b"z" * size)
    assert data[:len(header)] == header and len(data) == len(header) + size


def test_a_close_frame_fits_a_control_frame() -> None:
    data = wire.close_frame(4008, "é" * 200)
    assert data[:2] == bytes([0x88, 125]) and data[2:4] == struct.pack("!H", 4008)


def test_accept_key() -> None:
    assert wire.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 1.3
    assert wire.accept_key("c2hvcnQ=") is None  # not 16 bytes
    assert wire.accept_key("not base64!") is None


UPGRADE = ("GET /ws?access_token=t&device=phone HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
           "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13")


@pytest.mark.parametrize(("head", "lean_serves"), [
    (UPGRADE, True),
    (UPGRADE.replace("Upgrade: websocket", "upgrade:   WebSocket"), True),
    (UPGRADE.replace("GET /ws?", "GET /wsx?"), False),
    (UPGRADE.replace("GET", "POST"), False),
    (UPGRADE.replace("HTTP/1.1", "HTTP/1.0"), False),
    (UPGRADE + "\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits", True),  # declined
    (UPGRADE + "\r\nContent-Length: 3", False),
    (UPGRADE.replace("Upgrade: websocket\r\n", ""), False),
    (UPGRADE.replace("device=phone", "device=tél"), False),  # not ASCII: aiohttp decides
    (UPGRADE + "\r\nX-Long: " + "a" * 9000, False),  # over aiohttp's line limit: aiohttp answers
    (UPGRADE + "\r\n bad-fold: x", False),
])
def test_which_requests_the_node_serves_itself(head: str, lean_serves: bool) -> None:
    upgrade = lean.parse_upgrade(head.encode())
    assert (upgrade is not None) is lean_serves
    if upgrade is not None:
        assert upgrade.raw_query == "access_token=t&device=phone"
        assert upgrade.headers["sec-websocket-key"] == "dGhlIHNhbXBsZSBub25jZQ=="


def test_a_compression_offer_goes_to_aiohttp_only_when_compression_is_on() -> None:
    offer = (UPGRADE + "\r\nSec-WebSocket-Extensions: permessage-deflate").encode()
    assert lean.parse_upgrade(offer, compression=True) is None
    assert lean.parse_upgrade(UPGRADE.encode(), compression=True) is not None
    upgrade = lean.parse_upgrade(offer)
    assert upgrade is not None
    reply = lean.handshake(upgrade)
    assert isinstance(reply, bytes) and b"Extensions" not in reply  # declined: no extension named


def test_the_handshake_answers_101_or_what_aiohttp_would() -> None:
    upgrade = lean.parse_upgrade(UPGRADE.encode())
    assert upgrade is not None
    reply = lean.handshake(upgrade)
    assert isinstance(reply, bytes) and reply.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in reply
    for broken in (UPGRADE.replace("Version: 13", "Version: 8"), UPGRADE.replace("Connection: Upgrade", "Connection: x"),
                   UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ=")):
        upgrade = lean.parse_upgrade(broken.encode())
        assert upgrade is not None
        refused = lean.handshake(upgrade)
        assert not isinstance(refused, bytes) and refused.status == 400
        response = lean.refusal(refused)
        assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"Connection: close" in response
