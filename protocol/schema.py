"""The JSON Schema (draft 2020-12) of the whole protocol, built from the dataclasses and enums.

    python -m protocol.schema > protocol/protocol.schema.json

Nothing here is written by hand: every command, frame and event payload is read with
`dataclasses.fields` and `typing.get_type_hints`, so the schema cannot drift from the code
(tests/test_vocabulary.py checks that the committed `protocol.schema.json` is this output).
Clients in other languages generate their types from the committed file.

What it says, per direction:

- a client command (`$defs/ClientCommand`) is one object per `Command` member, with its `type`
  const; a member is required when it has no default and cannot be null (`id` is optional);
- a server frame (`$defs/ServerFrame`) is one object per `ServerFrame` member, with its `type`
  const; every member is present (null or not) except the frame's `optional` ones, which are
  left out rather than null;
- the `event` frame's `data` is the payload of its `event`: a `oneOf` over `EVENT_DATA` keyed by
  the `event` const, with payload members required in the same way as frames';
- every enum is a `$defs` entry (`enum` of its values, `x-enum-varnames` its member names).

The schema describes what protocol v1 sends and accepts exactly (`additionalProperties: false`).
A client still ignores unknown events and members it receives (docs/protocol.md): a newer server
may send them, so validate what you send, not what you receive.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from typing import Any

from protocol import vocabulary
from protocol.commands import Command
from protocol.events import EVENT_DATA
from protocol.frames import EventFrame, Frame, ServerFrame
from protocol.vocabulary import PROTOCOL_VERSION, FrameType

DIALECT = "https://json-schema.org/draft/2020-12/schema"
FILE_NAME = "protocol.schema.json"


def schema() -> dict[str, Any]:
    """The protocol's JSON Schema as a JSON-ready dict."""
    builder = _Builder()
    commands = [builder.command(cls) for cls in typing.get_args(Command)]
    frames = [builder.frame(cls) for cls in typing.get_args(ServerFrame)]
    # Every enum of the vocabulary, also those no member uses (FrameType is each object's `type`
    # const, CloseCode the socket's).
    for value in vars(vocabulary).values():
        if isinstance(value, enum.EnumType) and value.__module__ == vocabulary.__name__:
            builder.ref(value)
    builder.defs["ClientCommand"] = {
        "description": "A client -> server command: one JSON object per text frame.",
        "oneOf": commands,
    }
    builder.defs["ServerFrame"] = {
        "description": "A server -> client frame: one JSON object per text frame.",
        "oneOf": frames,
    }
    return {
        "$schema": DIALECT,
        "title": f"Chorus wire protocol v{PROTOCOL_VERSION}",
        "description": "Every text frame on a Chorus WebSocket, both directions (docs/protocol.md).",
        "oneOf": [{"$ref": "#/$defs/ClientCommand"}, {"$ref": "#/$defs/ServerFrame"}],
        "$defs": builder.defs,
    }


def render() -> str:
    """`schema()` as the committed file holds it (sorted keys, indent 2, no trailing newline)."""
    return json.dumps(schema(), sort_keys=True, indent=2)


class _Builder:
    """Collects `$defs` while mapping Python types to schemas."""

    def __init__(self) -> None:
        self.defs: dict[str, Any] = {}

    def command(self, cls: type) -> dict[str, Any]:
        # Commands carry no `type` attribute; parse_command maps FrameType.SEND to Send and so on.
        tag = FrameType[cls.__name__.upper()]
        return self._define(cls, tag=tag, parsed=True)

    def frame(self, cls: type[Frame]) -> dict[str, Any]:
        ref = self._define(cls, tag=cls.type, parsed=False)
        if cls is EventFrame:
            self.defs[cls.__name__]["oneOf"] = [
                {"properties": {"event": {"const": str(event)}, "data": self.ref(data_cls)}}
                for event, data_cls in EVENT_DATA.items()
            ]
        return ref

    def ref(self, tp: type) -> dict[str, Any]:
        """A `$ref` to `tp` (an enum or a dataclass), defining it on first use."""
        if issubclass(tp, enum.Enum):
            if tp.__name__ not in self.defs:
                values = [member.value for member in tp]
                self._add(tp, {
                    "type": "integer" if issubclass(tp, int) else "string",
                    "enum": values,
                    "x-enum-varnames": [member.name for member in tp],
                })
            return {"$ref": f"#/$defs/{tp.__name__}"}
        return self._define(tp, tag=None, parsed=False)

    def _define(self, cls: type, *, tag: FrameType | None, parsed: bool) -> dict[str, Any]:
        """Define dataclass `cls` as an object. `parsed`: a command, whose members may be left out
        when they have a default or may be null; otherwise an encoded object, whose members are
        all present except its `optional` ones (left out instead of null)."""
        if cls.__name__ not in self.defs:
            self.defs[cls.__name__] = {}  # reserved first: a dataclass may refer to itself
            hints = typing.get_type_hints(cls)
            optional: tuple[str, ...] = getattr(cls, "optional", ())
            properties: dict[str, Any] = {}
            required: list[str] = []
            if tag is not None:
                properties["type"] = {"const": str(tag)}
                required.append("type")
            for f in dataclasses.fields(cls):
                tp = hints[f.name]
                if parsed:
                    present = (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                               and not _nullable(tp))
                else:
                    present = f.name not in optional
                    if not present:  # never sent as null
                        tp = _strip_none(tp)
                try:
                    properties[f.name] = self._type(tp)
                except TypeError as exc:
                    raise TypeError(f"{cls.__name__}.{f.name}: {exc}") from None
                if present:
                    required.append(f.name)
            self._add(cls, {"type": "object", "properties": properties, "required": required,
                            "additionalProperties": False})
        return {"$ref": f"#/$defs/{cls.__name__}"}

    def _add(self, cls: type, definition: dict[str, Any]) -> None:
        doc = cls.__doc__
        # A dataclass without a docstring gets its signature as one: not a description.
        if doc and not doc.startswith(f"{cls.__name__}("):
            definition = {"description": " ".join(doc.split()), **definition}
        self.defs[cls.__name__] = definition

    def _type(self, tp: Any) -> dict[str, Any]:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is Any:
            return {}
        if tp is type(None):
            return {"type": "null"}
        if origin in (typing.Union, types.UnionType):
            choices = [self._type(arg) for arg in args]
            if all(set(c) == {"type"} for c in choices):  # str | None -> {"type": ["string", "null"]}
                return {"type": [c["type"] for c in choices]}
            return {"anyOf": choices}
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": self._type(args[0])}
        if origin is dict and args and args[0] is str:
            return {"type": "object"} if args[1] is Any else {"type": "object",
                                                             "additionalProperties": self._type(args[1])}
        if isinstance(tp, type) and (issubclass(tp, enum.Enum) or dataclasses.is_dataclass(tp)):
            return self.ref(tp)
        # bool before int: bool is an int in Python, not in JSON Schema.
        for python, json_type in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string")):
            if tp is python:
                return {"type": json_type}
        raise TypeError(f"no JSON Schema for {tp!r}; teach protocol/schema.py")


def _nullable(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _strip_none(tp: Any) -> Any:
    if not _nullable(tp):
        return tp
    rest = [arg for arg in typing.get_args(tp) if arg is not type(None)]
    return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007 (a runtime value)


def main() -> None:
    print(render())


if __name__ == "__main__":
    main()
