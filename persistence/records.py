"""What the store returns: frozen records, one per kind of row or result."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from protocol.vocabulary import DoubleTexting, RunStatus


def _iso(value: datetime) -> str:
    return value.isoformat()


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str
    agent: str
    double_texting: str
    created_at: datetime
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "title": self.title, "agent": self.agent,
                "double_texting": self.double_texting,
                "created_at": _iso(self.created_at), "updated_at": _iso(self.updated_at)}


@dataclass(frozen=True)
class Message:
    pos: int
    id: str
    role: str
    content: str
    device: str | None
    run: str | None
    seq: int | None
    created_at: datetime
    tools: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "role": self.role, "content": self.content, "device": self.device,
                "run": self.run, "tools": self.tools, "seq": self.seq, "created_at": _iso(self.created_at)}


@dataclass(frozen=True)
class SendRecord:
    """What a send stored: `seq` is the seq of its `message.created` once acked (set on a retry of
    a send done before). `status` is the new run's: `queued`
    (on the job stream) or `waiting` (behind `behind`); `supersedes` are the runs in flight that
    the policy (`interrupt`, `rollback`) cancels."""

    conversation: str
    message: str
    run: str
    seq: int | None
    status: RunStatus = RunStatus.QUEUED
    policy: DoubleTexting = DoubleTexting.ENQUEUE
    behind: str | None = None
    supersedes: tuple[str, ...] = ()
    agent: str = ""  # the conversation's agent (set by `Store.retry_run`)


@dataclass(frozen=True)
class Finished:
    """A run this call ended; `message` is its stored assistant message (None without text);
    `discarded`: the run was rolled back, so neither it nor its user message was kept."""

    message: str | None
    discarded: bool = False


@dataclass(frozen=True)
class RunClaim:
    run: str
    user: str
    conversation: str
    message: str
    attempts: int
    agent: str = "default"
    # Resuming a paused run (its question has its answer): where it paused, the answer, and its
    # text and tool calls so far. None: the run starts (over).
    resume: Resume | None = None


@dataclass(frozen=True)
class Question:
    """What a run asked its user: `checkpoint` is the LangGraph checkpoint it paused at."""

    request: str
    prompt: str
    checkpoint: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"request": self.request, "prompt": self.prompt, "checkpoint": self.checkpoint}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Question:
        return cls(request=obj["request"], prompt=obj["prompt"], checkpoint=obj.get("checkpoint"))


@dataclass(frozen=True)
class Resume:
    """A paused run's answered question, and what it had said and done before asking."""

    question: Question
    answer: str
    text: str
    tools: list[dict[str, Any]]


@dataclass(frozen=True)
class RunInFlight:
    """A queued, running or paused run as Postgres has it: its last checkpoint (text and tool calls
    as of `partial_seq`) and, while paused, its question."""

    run: str
    conversation: str
    status: str
    partial: str
    partial_seq: int | None
    partial_epoch: str | None
    tools: tuple[dict[str, Any], ...] = ()
    question: Question | None = None


@dataclass(frozen=True)
class RunView:
    """One run as its user sees it over HTTP (`GET /v1/runs/{id}`). `text` is the answer once the
    run ended, else the worker's last checkpoint (`partial`, as of `partial_seq` in history
    `partial_epoch`); `message_seq` is the seq of the `message.created` that began it (None when
    that message is gone or was never acked)."""

    run: str
    conversation: str
    status: RunStatus
    attempts: int
    text: str
    partial_seq: int | None
    partial_epoch: str | None
    answer_message: str | None
    error: tuple[str, str] | None
    message_seq: int | None
    created_at: datetime
    updated_at: datetime
    agent: str = ""
    agent_version: str | None = None  # the version that served it, of an agent with versions

    @property
    def ended(self) -> bool:
        return self.status in (RunStatus.COMPLETED, RunStatus.CANCELLED, RunStatus.FAILED)

    def to_json(self) -> dict[str, Any]:
        code, message = self.error or (None, None)
        return {"run": self.run, "conversation": self.conversation, "status": self.status,
                "attempts": self.attempts, "agent": self.agent, "agent_version": self.agent_version,
                "text": self.text if self.ended else None,
                "answer_message": self.answer_message,
                "error": {"code": code, "message": message} if self.error else None,
                "created_at": _iso(self.created_at), "updated_at": _iso(self.updated_at)}
