"""Parsing client frames: every malformed frame is a ProtocolError with a useful code, never a crash."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
from protocol import Auth, Cancel, ErrorCode, Ping, ProtocolError, Send, parse_command


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
    assert parse('{"type":"auth","id":"a1","token":"x.y.z"}') == Auth(id="a1", token="x.y.z")
    assert "x.y.z" not in repr(Auth(id="a1", token="x.y.z"))  # a token never lands in a log line


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
        ('{"type":"ping","x":' + "9" * 5000 + "}", ErrorCode.BAD_REQUEST, "not valid JSON"),  # int limit
        ("\ufeff{}", ErrorCode.BAD_REQUEST, "not valid JSON"),
        ('{"type":"auth","id":"x"}', ErrorCode.BAD_REQUEST, "token must be"),
        ('{"type":"auth","id":"x","token":5}', ErrorCode.BAD_REQUEST, "token must be"),
        ('{"type":"auth","id":"x","token":"' + "t" * 8193 + '"}', ErrorCode.TOO_LARGE, "token is too long"),
        # Postgres text refuses NUL; a lone surrogate cannot be encoded to UTF-8 (asyncpg, orjson, socket)
        ('{"type":"send","id":"x","text":"a\\u0000b"}', ErrorCode.BAD_REQUEST, "without NUL"),
        ('{"type":"send","id":"x","text":"\\ud800"}', ErrorCode.BAD_REQUEST, "without NUL"),
        ('{"type":"send","id":"x","text":"hi","conversation":"c\\u0000"}', ErrorCode.BAD_REQUEST,
         "conversation"),
        ('{"type":"cancel","id":"x","run":"\\udfff"}', ErrorCode.BAD_REQUEST, "run must be"),
        ('{"type":"ping","id":"\\u0000"}', ErrorCode.BAD_REQUEST, "id must be"),
        ('{"type":"ping","id":"\\ud800"}', ErrorCode.BAD_REQUEST, "id must be"),
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


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=()), max_size=30))
def test_any_string_field_is_storable_or_refused(value: str) -> None:
    """Whatever a client puts in a string field, what gets through encodes to UTF-8 without NUL."""
    frame = json.dumps({"type": "send", "id": "x", "text": f"t{value}", "conversation": value or None})
    try:
        cmd = parse(frame)
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE)
        return
    assert isinstance(cmd, Send)
    for field in (cmd.text, cmd.conversation or ""):
        assert "\x00" not in field
        field.encode("utf-8")


def test_rate_limited_errors_say_when_to_retry() -> None:
    frame = json.loads(protocol.encode(protocol.Error(ErrorCode.RATE_LIMITED, "slow down", "c1", retry_after_ms=250)))
    assert frame == {"type": "error", "id": "c1", "code": "rate_limited", "message": "slow down",
                     "retry_after_ms": 250}
    assert "retry_after_ms" not in json.loads(protocol.encode(protocol.Error(ErrorCode.BAD_REQUEST, "no")))


def test_server_frames_are_compact_json() -> None:
    frame = protocol.encode(protocol.Hello(node="n", user="u", device="d", epoch="e", seq=3, heartbeat=25))
    assert json.loads(frame) == {"type": "hello", "node": "n", "user": "u", "device": "d", "epoch": "e",
                                 "seq": 3, "heartbeat": 25, "protocol": 1, "devices": []}
    assert json.loads(protocol.encode(protocol.Error(ErrorCode.NOT_FOUND, "no", "c1")))["code"] == "not_found"
