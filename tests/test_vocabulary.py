"""The protocol's vocabulary is one fact: the JSON Schema, the Postgres constraints, the event
payloads and every other package agree with `protocol/`, and nothing else spells it.

Pure tests: no network, no servers.
"""

from __future__ import annotations

import ast
import enum
import json
import re
import sys
import tokenize
import typing
from collections.abc import Iterator
from functools import reduce
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import protocol
from protocol import (
    EVENT_DATA,
    DoubleTexting,
    ErrorCode,
    Event,
    EventData,
    ResyncReason,
    Role,
    RunStatus,
    encode,
    event_body,
    parse_command,
    shown_text,
)
from protocol import schema as protocol_schema
from protocol.events import (
    MessageCreated,
    RunCancelled,
    RunCompleted,
    RunCustom,
    RunFailed,
    RunInputReceived,
    RunInputRequired,
    RunQueued,
    RunResumed,
    RunStarted,
    Token,
    ToolCompleted,
    ToolStarted,
)

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "protocol" / protocol_schema.FILE_NAME

# The schema

SCHEMA = protocol_schema.schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def test_committed_schema_is_the_generated_one() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == protocol_schema.render() + "\n", (
        "protocol/protocol.schema.json is stale: python -m protocol.schema > protocol/protocol.schema.json"
    )


def test_schema_is_valid_draft_2020_12() -> None:
    assert SCHEMA["$schema"] == jsonschema.Draft202012Validator.META_SCHEMA["$id"]
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_module_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    protocol_schema.main()
    assert json.loads(capsys.readouterr().out) == SCHEMA


def test_every_enum_is_defined() -> None:
    for enum_cls in (protocol.FrameType, Event, RunStatus, DoubleTexting, Role, ErrorCode, ResyncReason,
                     protocol.CloseCode):
        definition = SCHEMA["$defs"][enum_cls.__name__]
        assert definition["enum"] == [member.value for member in enum_cls]
        assert definition["x-enum-varnames"] == [member.name for member in enum_cls]


COMMANDS: list[dict[str, Any]] = [
    {"type": "send", "id": "c1", "text": "Hello"},
    {"type": "send", "id": "c1", "conversation": "c_1", "agent": "default", "text": "Hello",
     "double_texting": "interrupt"},
    {"type": "send", "text": "Hello", "conversation": None, "double_texting": None},
    {"type": "cancel", "id": "c2", "run": "r_1"},
    {"type": "ping", "id": "c3"},
    {"type": "ping"},
    {"type": "auth", "id": "a1", "token": "x.y.z"},
    {"type": "respond", "id": "c4", "run": "r_1", "request": "q_1", "text": "Paris"},
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c["type"])
def test_schema_accepts_what_the_parser_accepts(command: dict[str, Any]) -> None:
    VALIDATOR.validate(command)
    parsed = parse_command(json.dumps(command), max_text_chars=100)
    assert type(parsed).__name__.lower() == command["type"]


def test_every_command_has_an_example() -> None:
    assert {type(parse_command(json.dumps(c), max_text_chars=100)) for c in COMMANDS} == set(
        typing.get_args(protocol.Command))


@pytest.mark.parametrize("command", [
    {"type": "send", "id": "c1"},  # no text
    {"type": "send", "text": "hi", "double_texting": "later"},
    {"type": "cancel", "id": "c2"},  # no run
    {"type": "respond", "id": "c4", "run": "r_1", "text": "Paris"},  # no request
    {"type": "auth", "id": "a1"},  # no token
    {"type": "ping", "id": 5},
    {"type": "bogus", "id": "x"},
    {"id": "x"},
])
def test_schema_refuses_what_the_parser_refuses(command: dict[str, Any]) -> None:
    assert not VALIDATOR.is_valid(command)
    with pytest.raises(protocol.ProtocolError):
        parse_command(json.dumps(command), max_text_chars=100)


SERVER_FRAMES: list[protocol.ServerFrame] = [
    protocol.Hello(node="node-a", user="alice", device="phone-1", epoch="9f2c01ab", seq=57, heartbeat=25),
    protocol.Hello(node="node-a", user="alice", device="phone-1", epoch="9f2c01ab", seq=57, heartbeat=25,
                   devices=(protocol.DeviceOnline("phone-1", "node-a"), protocol.DeviceOnline("laptop", "node-b"))),
    protocol.Presence(device="laptop", online=False, node="node-b"),
    protocol.Ack(id="c1", conversation="c_1", message="m_1", run="r_1", seq=58),
    protocol.Ack(id="c2", run="r_1"),
    protocol.Ack(id="a1", expires_at=1795358019),
    protocol.Error(ErrorCode.NOT_FOUND, "no run r_1", "c2"),
    protocol.Error(ErrorCode.BAD_REQUEST, "frame is not valid JSON"),  # "id": null
    protocol.Error(ErrorCode.RATE_LIMITED, "slow down", "c1", retry_after_ms=250),
    protocol.Pong(id="c3"),
    protocol.Pong(id=None),
    protocol.Resync(ResyncReason.HISTORY_TRIMMED, seq=1042, epoch="9f2c01ab"),
    protocol.Reconnect(after_ms=0),
    protocol.Snapshot(seq=1042, epoch="9f2c01ab", runs=(
        protocol.RunSnapshot(run="r_1", conversation="c_1", status=RunStatus.RUNNING, text="The answer so far"),
        protocol.RunSnapshot(run="r_2", conversation="c_2", status=RunStatus.QUEUED, text=""),
    )),
    protocol.Snapshot(seq=0, epoch="9f2c01ab"),
]


@pytest.mark.parametrize("frame", SERVER_FRAMES, ids=lambda f: f.type)
def test_schema_accepts_encoded_frames(frame: protocol.ServerFrame) -> None:
    VALIDATOR.validate(json.loads(encode(frame)))


def test_every_server_frame_has_an_example() -> None:
    # Event frames are the payload examples below.
    assert {type(f) for f in SERVER_FRAMES} | {protocol.EventFrame} == set(typing.get_args(protocol.ServerFrame))


PAYLOADS: list[EventData] = [
    MessageCreated(message="m_1", text="Hello", device="phone-1", client_id="c1"),
    RunQueued(behind="r_0", policy=DoubleTexting.INTERRUPT, message="m_1"),
    RunQueued(behind=None, policy=DoubleTexting.ENQUEUE, message="m_1"),
    RunStarted(message="m_1", attempt=1, worker="worker-1"),
    Token(text="Hel"),
    RunResumed(text="Hello wor", attempt=2),
    ToolStarted(call="call_1", name="search", arguments={"query": "reconnects", "limit": 3}),
    ToolCompleted(call="call_1", name="search", summary="3 results", error=None),
    ToolCompleted(call="call_1", name="search", summary=None, error="timed out"),
    RunCustom(value={"step": 2, "of": 5, "sources": [{"title": "Dune", "pages": [3, 4]}], "done": False, "note": None}),
    RunCustom(value="searching"),
    RunInputRequired(request="q_1", prompt="Which city?"),
    RunInputReceived(request="q_1", text="Paris", by="laptop"),
    RunCompleted(message="m_2", text="Hello world"),
    RunCompleted(message=None, text="", rolled_back=True, by="phone-1"),
    RunCancelled(message="m_2", text="Hel", stopped_at=61),
    RunCancelled(message=None, text="", by="phone-1"),
    RunCancelled(message=None, text="", rolled_back=True, by="laptop"),
    RunFailed(code="llm_timeout", message="the model did not answer in time", text="", answer_message=None),
    RunFailed(code="internal", message="bug", text="Hel", answer_message="m_2", rolled_back=True),
]


def stream_frame(body: str, seq: int, seq_from: int | None = None) -> dict[str, Any]:
    """What a device receives: the published body with the seq put in front, as the stream does."""
    head = f'{{"seq":{seq},' if seq_from is None else f'{{"seq":{seq},"seq_from":{seq_from},'
    frame: dict[str, Any] = json.loads(head + body[1:])
    return frame


def payload_frame(data: EventData, *, run: str | None = "r_1", seq: int = 5) -> dict[str, Any]:
    return stream_frame(event_body("c_1", run, data, ts_ms=1795358019091), seq)


@pytest.mark.parametrize("data", PAYLOADS, ids=lambda d: f"{d.event}")
def test_schema_accepts_every_event(data: EventData) -> None:
    frame = payload_frame(data)
    VALIDATOR.validate(frame)
    assert protocol.EventFrame.from_json(frame).event is data.event


def test_schema_accepts_merged_tokens_and_events_of_no_run() -> None:
    VALIDATOR.validate(stream_frame(event_body("c_1", "r_1", Token(text="Hello"), ts_ms=1), 9, seq_from=5))
    VALIDATOR.validate(payload_frame(PAYLOADS[0], run=None))


@pytest.mark.parametrize("data", PAYLOADS, ids=lambda d: f"{d.event}")
def test_the_publishers_fast_encoding_is_byte_for_byte_the_protocols(data: EventData) -> None:
    from runs.lifecycle import compact_json

    for run in ("r_1", None):
        assert event_body("c_1", run, data, 7, dumps=compact_json) == event_body("c_1", run, data, 7)
    text = Token(text='naïve "quotes" \\ \u2028 \U0001f600 <tag>')
    assert event_body("c", "r", text, 1, dumps=compact_json) == event_body("c", "r", text, 1)


def test_every_payload_class_has_an_example() -> None:
    assert {type(d) for d in PAYLOADS} == set(EVENT_DATA.values())


def _without(obj: dict[str, Any], *path: str) -> dict[str, Any]:
    """A deep copy of `obj` without the member at `path`."""
    copy: dict[str, Any] = json.loads(json.dumps(obj))
    parent = reduce(lambda o, key: o[key], path[:-1], copy)
    del parent[path[-1]]
    return copy


TOKEN = payload_frame(Token(text="Hel"))
STARTED = payload_frame(RunStarted(message="m_1", attempt=1, worker="worker-1"))
COMPLETED = payload_frame(RunCompleted(message="m_2", text="Hello world"))


@pytest.mark.parametrize("frame", [
    {**TOKEN, "event": "token.bogus"},  # an unknown event
    {**TOKEN, "event": "run.started"},  # another event's data
    {**TOKEN, "data": {"text": "Hel", "extra": 1}},  # an unknown member (v1 sends none)
    {**STARTED, "data": {**STARTED["data"], "attempt": "1"}},
    {**COMPLETED, "data": {**COMPLETED["data"], "by": None}},  # optional members are left out, never null
    _without(TOKEN, "data", "text"),
    _without(COMPLETED, "data", "text"),
    _without(STARTED, "data", "worker"),
    _without(TOKEN, "ts"),
    _without(TOKEN, "seq"),
    _without(TOKEN, "run"),  # null when no run, never absent
    {**TOKEN, "type": "events"},
    {**json.loads(encode(SERVER_FRAMES[0])), "seq": None},
    _without(json.loads(encode(SERVER_FRAMES[0])), "epoch"),
    {**json.loads(encode(protocol.Error(ErrorCode.CONFLICT, "ended"))), "code": "gone"},
], ids=lambda f: str(f.get("event", f.get("type"))))
def test_schema_refuses_broken_frames(frame: dict[str, Any]) -> None:
    assert not VALIDATOR.is_valid(frame)


# Event payloads


def _subclasses(cls: type) -> Iterator[type]:
    subclasses: list[type] = cls.__subclasses__()
    for sub in subclasses:
        yield sub
        yield from _subclasses(sub)


def test_every_payload_class_is_mapped_and_every_event_has_one() -> None:
    assert set(_subclasses(EventData)) == set(EVENT_DATA.values())
    assert set(EVENT_DATA) == set(Event)
    for event, cls in EVENT_DATA.items():
        assert cls.event is event


# Postgres constraints

MIGRATIONS = sorted((ROOT / "persistence" / "migrations" / "versions").glob("*.py"))
_TABLE = re.compile(r"\b(?:CREATE|ALTER)\s+TABLE\s+(?:IF\s+(?:NOT\s+)?EXISTS\s+)?(\w+)", re.IGNORECASE)
_CHECK_IN = re.compile(r"\bCHECK\s*\(\s*(\w+)\s+IN\s*\(([^)]*)\)\s*\)", re.IGNORECASE)
_DEFAULT = re.compile(r"\b(\w+)\s+text\s+NOT\s+NULL\s+DEFAULT\s+'([^']*)'", re.IGNORECASE)
_STATUS = re.compile(r"\bstatus\s*(?:=\s*'([^']*)'|IN\s*\(([^)]*)\))", re.IGNORECASE)


def _quoted(sql: str) -> list[str]:
    return re.findall(r"'([^']*)'", sql)


def _per_column(pattern: re.Pattern[str]) -> dict[tuple[str, str], list[str]]:
    """(table, column) -> the quoted values `pattern` finds after that table's CREATE/ALTER,
    the last migration winning (a later one may replace a constraint)."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in MIGRATIONS:
        text = path.read_text(encoding="utf-8")
        for match in pattern.finditer(text):
            tables = _TABLE.findall(text, 0, match.start())
            assert tables, f"{path.name}: {match.group(0)!r} follows no CREATE/ALTER TABLE"
            found[(tables[-1], match.group(1))] = _quoted(match.group(0).split(match.group(1), 1)[1])
    return found


COLUMN_ENUMS: dict[tuple[str, str], type[enum.StrEnum]] = {
    ("runs", "status"): RunStatus,
    ("conversations", "double_texting"): DoubleTexting,
    ("messages", "role"): Role,
}


def test_check_constraints_are_the_enums() -> None:
    assert MIGRATIONS
    checks = _per_column(_CHECK_IN)
    for column, enum_cls in COLUMN_ENUMS.items():
        assert column in checks, f"no CHECK (... IN (...)) on {column[0]}.{column[1]}"
        assert sorted(checks[column]) == sorted(m.value for m in enum_cls), f"{column[0]}.{column[1]}"


def test_column_defaults_are_enum_members() -> None:
    enums: dict[tuple[str, str], type[enum.StrEnum]] = {**COLUMN_ENUMS, ("runs", "policy"): DoubleTexting}
    defaults = _per_column(_DEFAULT)
    checked = [(column, value) for column, (value,) in defaults.items() if column in enums]
    assert checked
    for column, value in checked:
        assert value in {m.value for m in enums[column]}, f"{column[0]}.{column[1]} DEFAULT {value!r}"


def test_sql_statuses_are_run_statuses() -> None:
    """persistence/sql.py and the migrations spell statuses (the grep test below spares them)."""
    for path in [ROOT / "persistence" / "sql.py", *MIGRATIONS]:
        for match in _STATUS.finditer(path.read_text(encoding="utf-8")):
            values = [match.group(1)] if match.group(1) is not None else _quoted(match.group(2))
            unknown = set(values) - {m.value for m in RunStatus}
            assert not unknown, f"{path.relative_to(ROOT)}: {match.group(0)!r}"


# Nobody else spells the vocabulary

VOCABULARY = {member.value for enum_cls in (Event, RunStatus, DoubleTexting) for member in enum_cls}
SCANNED = ("protocol", "common", "fanout", "runs", "ws_node", "agent_worker", "persistence", "loadtest",
           "clients/python/chorus_client")


def _exempt(relative: str) -> bool:
    # protocol/ defines the vocabulary; SQL has to spell it (checked against the enums above). The
    # benchmark's peers are other systems, speaking their own protocols.
    return (relative.startswith(("protocol/", "persistence/migrations/", "loadtest/peers/"))
            or relative == "persistence/sql.py")


# Literals equal to a vocabulary word that mean something else. Keep it short: a new entry needs
# a reason, and an entry that no longer matches fails test_allow_list_is_current.
ALLOWED = {
    # The worker's /readyz JSON reports how many runs it holds under the key "running".
    ("agent_worker/__main__.py", "running"),
    # The `auth` command's member holding the JWT, not the `token` event.
    ("clients/python/chorus_client/client.py", "token"),
    # The dev login's JSON reply names the JWT it minted "token".
    ("ws_node/web.py", "token"),
    # The benchmark's peers take a token in their own connect payload.
    ("loadtest/scenarios/common.py", "token"),
}


def _literals(path: Path) -> Iterator[tuple[int, str]]:
    """(line, value) of each string literal in `path` equal to a vocabulary word."""
    with path.open("rb") as source:
        for tok in tokenize.tokenize(source.readline):
            if tok.type != tokenize.STRING:
                continue
            try:
                value = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):  # an f-string: not a constant
                continue
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            if value in VOCABULARY:
                yield tok.start[0], value


def _found(package: str) -> Iterator[tuple[str, int, str]]:
    for path in sorted((ROOT / package).rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if not _exempt(relative):
            for line, value in _literals(path):
                yield relative, line, value


@pytest.mark.parametrize("package", SCANNED)
def test_no_vocabulary_literals(package: str) -> None:
    spelled = [f"{file}:{line}: {value!r}" for file, line, value in _found(package)
               if (file, value) not in ALLOWED]
    assert not spelled, "use the enums of protocol/ instead of:\n" + "\n".join(spelled)


def test_allow_list_is_current() -> None:
    found = {(file, value) for package in SCANNED for file, _, value in _found(package)}
    assert ALLOWED <= found, f"stale entries: {ALLOWED - found}"


def test_protocol_imports_only_the_standard_library() -> None:
    allowed = set(sys.stdlib_module_names) | {"protocol"}
    for path in sorted((ROOT / "protocol").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"protocol/{path.name} imports {name}"


# The shown-text reducer

@pytest.mark.parametrize(("before", "event", "data", "after"), [
    ("", "token", {"text": "Hel"}, "Hel"),
    ("Hel", "token", {"text": "lo"}, "Hello"),
    ("Hel", "token", {"text": "lo world"}, "Hello world"),  # a merged frame: the joined texts
    ("Hello", "run.started", {"message": "m_1", "attempt": 2, "worker": "w"}, ""),  # a restart
    ("Hel", "run.resumed", {"text": "Hello wor", "attempt": 2}, "Hello wor"),
    ("", "run.resumed", {"text": "", "attempt": 2}, ""),
    ("Hello", "run.completed", {"message": "m_2", "text": "Hello world"}, "Hello"),
    ("Hello", "run.cancelled", {"message": None, "text": ""}, "Hello"),
    ("Hello", "tool.started", {"call": "c", "name": "n", "arguments": {}}, "Hello"),
    ("Hello", "future.event", {"text": "ignored"}, "Hello"),  # clients ignore unknown events
])
def test_shown_text(before: str, event: str, data: dict[str, Any], after: str) -> None:
    assert shown_text(before, event, data) == after
    if event in VOCABULARY:
        assert shown_text(before, Event(event), data) == after


@pytest.mark.parametrize("data", PAYLOADS, ids=lambda d: f"{d.event}")
def test_shown_text_keeps_text_on_other_events(data: EventData) -> None:
    if data.event not in (Event.TOKEN, Event.RUN_STARTED, Event.RUN_RESUMED):
        assert shown_text("Hello", data.event, data.to_data()) == "Hello"


def test_shown_text_folds_a_run() -> None:
    events: list[tuple[str, dict[str, Any]]] = [
        ("run.started", {"attempt": 1}), ("token", {"text": "a"}), ("token", {"text": "b"}),
        ("run.started", {"attempt": 2}), ("token", {"text": "c"}),
        ("run.resumed", {"text": "cd", "attempt": 2}), ("token", {"text": "e"}), ("tool.completed", {}),
    ]
    assert reduce(lambda text, e: shown_text(text, e[0], e[1]), events, "stale") == "cde"
