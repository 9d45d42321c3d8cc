"""What a device shows, as frozen dataclasses: a change replaces the object, never mutates it, so
a UI can compare by identity. The store (store.py) builds them; nothing here does I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol import ENDED, Role, RunStatus

Cursor = str | int  # a REST page cursor (`next_before`), passed back as it came


@dataclass(frozen=True)
class ToolCall:
    """A tool call of a run, as `tool.started` / `tool.completed` (or REST's `tools`) describe it."""

    call: str
    name: str
    arguments: Any = None
    summary: str | None = None
    error: str | None = None
    done: bool = False


@dataclass(frozen=True)
class InputRequest:
    """A question the run waits on (human in the loop): answer it with `respond(run, request, text)`."""

    request: str
    prompt: str


@dataclass(frozen=True)
class RunError:
    code: str
    message: str


@dataclass(frozen=True)
class Run:
    """One answer of the agent.

    `text` is the answer as shown (`protocol.shown_text` over its events; the end event's text once
    ended); `attempt` is 1, or more after a worker died and another restarted the run; `seq` is the
    last seq applied to it (-1: none), which is what makes applying idempotent; `message` is the user
    message that started it, `answer_message` the stored answer once it ended with text; `behind` is
    the run it waits behind (double-texting), `position` its place in the queue for a worker (1:
    next); `stopped_at` the seq of a cancelled run's last token; `rolled_back`: discarded by a
    `rollback`, with the message that started it; `custom` the `value` of each `run.custom` event
    this device saw, in order (what the agent's graph wrote to its custom stream; a restart begins
    them again; REST does not return them)."""

    id: str
    conversation: str
    message: str | None = None
    status: RunStatus = RunStatus.QUEUED
    text: str = ""
    attempt: int = 1
    seq: int = -1
    answer_message: str | None = None
    behind: str | None = None
    position: int | None = None
    input: InputRequest | None = None
    tools: tuple[ToolCall, ...] = ()
    custom: tuple[Any, ...] = ()
    error: RunError | None = None
    stopped_at: int | None = None
    rolled_back: bool = False

    @property
    def ended(self) -> bool:
        return self.status in ENDED


@dataclass(frozen=True)
class Message:
    """A message of a conversation. An assistant message is a view of its run (`status`, `text`):
    `id` is None until the answer is stored; `run` is, for a user message, the run it started."""

    id: str | None
    conversation: str
    role: Role
    text: str
    run: str | None = None
    device: str | None = None  # the device that sent a user message
    client_id: str | None = None  # the send's id (its idempotency key)
    seq: int | None = None  # the seq of its `message.created`
    status: RunStatus | None = None  # an answer's run status; None for user messages


@dataclass(frozen=True)
class Conversation:
    """A conversation; `loaded` once its newest messages came from REST; `next_before` is the REST
    cursor of the page before those loaded (None: none, or not loaded)."""

    id: str
    title: str | None = None
    agent: str | None = None
    double_texting: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    loaded: bool = False
    next_before: Cursor | None = None
