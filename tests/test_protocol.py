"""Parsing client frames: every malformed frame is a ProtocolError with a useful code, never a crash.
Encoding `run.custom` events: any JSON value within the limits, anything else refused."""

from __future__ import annotations

import json
import re
import reprlib

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol
from protocol import Auth, Cancel, ErrorCode, Ping, ProtocolError, Send, event_body, parse_command
from protocol import schema as protocol_schema
from protocol.events import MAX_CUSTOM_BYTES, MAX_CUSTOM_DEPTH, RunCustom, custom_value


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


# run.custom: a graph's custom stream payload, as any JSON value within limits

CUSTOM_SCHEMA = jsonschema.Draft202012Validator(protocol_schema.schema())
AT_THE_LIMIT = "x" * (MAX_CUSTOM_BYTES - 2)  # with its quotes, exactly MAX_CUSTOM_BYTES of JSON


def nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("value", [
    {"step": 2, "of": 5, "sources": [{"title": "Dune", "pages": [3, 4]}]},
    ["a", 1, 2.5, True, None], "searching", 0, -1.25, False, None,
    AT_THE_LIMIT, "é" * ((MAX_CUSTOM_BYTES - 2) // 2),  # two bytes each in UTF-8
    nested(MAX_CUSTOM_DEPTH), 2**63 - 1, -(2**63), "a\u0000b \u2028 \U0001f600",
], ids=reprlib.repr)
def test_a_custom_event_carries_any_json_value_within_the_limits(value: object) -> None:
    assert custom_value(value) == value
    frame = json.loads('{"seq":7,' + event_body("c_1", "r_1", RunCustom(value=value), ts_ms=1)[1:])
    assert frame["event"] == "run.custom" and frame["data"] == {"value": value}
    CUSTOM_SCHEMA.validate(frame)
    parsed = protocol.EventFrame.from_json(frame)
    assert (parsed.event, parsed.data) == (protocol.Event.RUN_CUSTOM, {"value": value})


def test_a_custom_payload_is_converted_to_its_json_form() -> None:
    assert custom_value((1, (2, "x"))) == [1, [2, "x"]]
    assert custom_value({1: "one", None: "none", 2.5: True}) == {"1": "one", "null": "none", "2.5": True}
    assert custom_value({"at": {3, 4}}, default=sorted) == {"at": [3, 4]}


@pytest.mark.parametrize(("payload", "fragment"), [
    (object(), "no JSON form"),
    ({"at": {3, 4}}, "no JSON form"),  # a set, and no `default` to convert it
    (float("nan"), "no JSON form"),
    ([float("inf")], "no JSON form"),
    ("\ud800", "no JSON form"),  # a lone surrogate: not UTF-8
    ({(1, 2): "a tuple key"}, "no JSON form"),
    (AT_THE_LIMIT + "x", f"{MAX_CUSTOM_BYTES + 1} bytes of JSON, over the {MAX_CUSTOM_BYTES} allowed"),
    ("é" * (MAX_CUSTOM_BYTES // 2), "over the"),
    (nested(MAX_CUSTOM_DEPTH + 1), f"nested deeper than {MAX_CUSTOM_DEPTH}"),
    ({"deep": nested(MAX_CUSTOM_DEPTH)}, "nested deeper"),
    (nested(5000), "no JSON form"),  # deeper than json itself recurses
    (2**63, "64 bits"),
    ([-(2**63) - 1], "64 bits"),
], ids=reprlib.repr)
def test_a_custom_payload_without_a_json_form_or_over_a_limit_is_refused(payload: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        custom_value(payload)


@pytest.mark.parametrize("data", [{}, {"value": 1, "extra": 2}], ids=["no value", "extra member"])
def test_the_schema_refuses_a_custom_event_without_exactly_a_value(data: dict[str, object]) -> None:
    frame = json.loads('{"seq":7,' + event_body("c_1", "r_1", RunCustom(value=1), ts_ms=1)[1:])
    assert not CUSTOM_SCHEMA.is_valid({**frame, "data": data})
