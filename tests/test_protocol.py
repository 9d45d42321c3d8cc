"""Parsing client frames: every malformed frame is a ProtocolError with a useful code, never a crash."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ws_node import protocol
from ws_node.protocol import Cancel, ErrorCode, Ping, ProtocolError, Send, parse_command


def parse(raw: str | bytes) -> protocol.Command:
    return parse_command(raw, max_text_chars=100)


def test_valid_commands() -> None:
    assert parse('{"type":"send","id":"c1","text":"hi"}') == Send(id="c1", text="hi")
    assert parse('{"type":"send","id":"c1","text":"hi","conversation":"c_1"}') == Send(
        id="c1", text="hi", conversation="c_1"
    )
    assert parse('{"type":"cancel","id":"c2","run":"r_1"}') == Cancel(id="c2", run="r_1")
    assert parse('{"type":"ping","id":"c3"}') == Ping(id="c3")
    assert parse('{"type":"ping"}') == Ping(id=None)


@pytest.mark.parametrize(
    ("raw", "code", "fragment"),
    [
        ("not json", ErrorCode.BAD_REQUEST, "not valid JSON"),
        ("[1,2]", ErrorCode.BAD_REQUEST, "JSON object"),
        ('{"type":"bogus","id":"x"}', ErrorCode.BAD_REQUEST, "unknown type"),
        ('{"type":5}', ErrorCode.BAD_REQUEST, "type must be a string"),
        ('{"id":"x"}', ErrorCode.BAD_REQUEST, "type must be a string"),
        ('{"type":"send","id":"x"}', ErrorCode.BAD_REQUEST, "text must be"),
        ('{"type":"send","id":"x","text":7}', ErrorCode.BAD_REQUEST, "text must be"),
        ('{"type":"send","id":"x","text":"   "}', ErrorCode.BAD_REQUEST, "must not be empty"),
        ('{"type":"send","id":"x","text":"hi","conversation":5}', ErrorCode.BAD_REQUEST, "conversation"),
        ('{"type":"send","id":"x","text":"' + "a" * 101 + '"}', ErrorCode.TOO_LARGE, "longer than 100"),
        ('{"type":"cancel","id":"x"}', ErrorCode.BAD_REQUEST, "run must be"),
        ('{"type":"ping","id":5}', ErrorCode.BAD_REQUEST, "id must be"),
        ('{"type":"ping","id":""}', ErrorCode.BAD_REQUEST, "id must be"),
        ("[" * 100_000 + "]" * 100_000, ErrorCode.BAD_REQUEST, "not valid JSON"),
    ],
)
def test_malformed_frames(raw: str, code: ErrorCode, fragment: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse(raw)
    assert info.value.code is code
    assert fragment in info.value.message


def test_error_keeps_the_command_id() -> None:
    with pytest.raises(ProtocolError) as info:
        parse('{"type":"send","id":"abc"}')
    assert info.value.id == "abc"


def test_binary_is_refused() -> None:
    with pytest.raises(ProtocolError):
        parse(b'{"type":"ping"}')


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.sampled_from(["type", "id", "text", "run", "conversation", "x"]),
                                      children, max_size=5),
                    max_leaves=20))
def test_any_json_parses_or_is_a_protocol_error(value: object) -> None:
    try:
        parse(json.dumps(value))
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE)


def test_server_frames_are_compact_json() -> None:
    frame = protocol.hello(node="n", user="u", device="d", epoch="e", seq=3, heartbeat_s=25)
    assert json.loads(frame) == {"type": "hello", "node": "n", "user": "u", "device": "d", "epoch": "e",
                                 "seq": 3, "heartbeat": 25, "protocol": 1}
    assert json.loads(protocol.error(ErrorCode.NOT_FOUND, "no", "c1"))["code"] == "not_found"
