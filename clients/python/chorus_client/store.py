"""What a device shows: conversations, their messages, runs with their streaming text and status,
and the user's devices online. Pure (no I/O): the client feeds it the frames its seq gate
accepted, `snapshot` frames, presence and REST pages, in any mix, and each method returns the
changes it made (events.Change) for the client to emit.

Why it is idempotent: every run remembers the last seq applied to it (`Run.seq`). A snapshot is
exact as of its seq, so an event at or below a run's seq is already in the run and is skipped;
messages are keyed by id. So a resync (REST reload + snapshot) racing live events, or a REST page
loaded twice, never doubles text or messages. The same rules as the JavaScript SDK's store
(clients/js/src/store.js).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from chorus_client.events import (
    Change,
    ConversationChanged,
    MessageChanged,
    MessagesChanged,
    PresenceChanged,
    RunChanged,
)
from chorus_client.models import Conversation, Cursor, InputRequest, Message, Run, RunError, ToolCall
from protocol import END_EVENTS, Event, Role, RunStatus, shown_text

# The seq of a run known from its stored answer (REST): no token can add to it any more.
STORED = sys.maxsize


class Store:
    def __init__(self) -> None:
        self.conversations: dict[str, Conversation] = {}
        self.runs: dict[str, Run] = {}
        self.devices: dict[str, str] = {}  # presence: device -> node
        self._messages: dict[str, Message] = {}  # user messages by id
        self._order: dict[str, list[str]] = {}  # conversation -> its user messages' ids, in order
        self._run_order: dict[str, list[str]] = {}  # conversation -> its runs, in the order first seen
        self._changes: list[Change] = []

    # Reading

    def run(self, run: str) -> Run | None:
        return self.runs.get(run)

    def messages(self, conversation: str) -> list[Message]:
        """A conversation's messages in order: each user message, then the answer of the run it
        started; runs whose user message this device has not seen (yet) come last."""
        out: list[Message] = []
        shown: set[str] = set()
        for id_ in self._order.get(conversation, []):
            message = self._messages.get(id_)
            if message is None:
                continue
            out.append(message)
            run = self.runs.get(message.run) if message.run else None
            if run is not None and not run.rolled_back:
                out.append(_answer(run))
                shown.add(run.id)
        for id_ in self._run_order.get(conversation, []):
            run = self.runs.get(id_)
            if run is not None and id_ not in shown and not run.rolled_back:
                out.append(_answer(run))
        return out

    def conversation_list(self) -> list[Conversation]:
        """Conversations, most recently active first (as REST lists them; new ones first)."""
        return sorted(self.conversations.values(), key=_activity, reverse=True)

    # Applying

    def apply(self, frame: Mapping[str, Any]) -> list[Change]:
        """Apply one event frame the seq gate accepted. Unknown events are ignored."""
        conversation = frame["conversation"]
        self._conversation(conversation)
        name, data, seq, run_id = frame["event"], frame.get("data") or {}, frame["seq"], frame.get("run")
        if name == Event.MESSAGE_CREATED:
            self._put_message(Message(
                id=data["message"], conversation=conversation, role=Role(data.get("role", Role.USER)),
                text=data["text"], run=run_id, device=data.get("device"), client_id=data.get("client_id"),
                seq=seq))
            if run_id and run_id not in self.runs:
                self._put_run(Run(run_id, conversation, message=data["message"]))
            self._touch(conversation, frame.get("ts"))
            return self._take()
        if run_id is None:
            return self._take()
        before = self.runs.get(run_id) or Run(run_id, conversation)
        # Already in the run (a snapshot or REST page covered it); a run known only from its stored
        # answer still takes its end event, which tells how it ended.
        if seq <= before.seq and not (before.seq == STORED and name in END_EVENTS):
            return self._take()
        change = _run_change(before, name, data)
        if change is None:
            return self._take()  # an event this client does not know: ignored, as the protocol asks
        if name not in END_EVENTS:
            change["text"] = shown_text(before.text, name, data)
        run = dataclasses.replace(before, seq=seq, **change)
        self._put_run(run)
        if run.rolled_back and run.message:
            self._remove_message(run.conversation, run.message)
        return self._take()

    def new_epoch(self) -> list[Change]:
        """The user's stream started over (a new epoch counts its seqs from 1 again): what runs
        remember of the old one must not hold back the snapshot and events of the new one."""
        for run in list(self.runs.values()):
            if run.seq not in (-1, STORED):
                self._put_run(dataclasses.replace(run, seq=-1))
        return self._take()

    def apply_snapshot(self, seq: int, runs: Iterable[Mapping[str, Any]]) -> list[Change]:
        """A `snapshot`: each run in flight with its text and tool calls exact as of `seq`, and the
        question a paused run waits on (so this device can answer it)."""
        for item in runs:
            self._conversation(item["conversation"])
            before = self.runs.get(item["run"]) or Run(item["run"], item["conversation"])
            if before.seq > seq:
                continue
            status = _status(item["status"])
            asked = item.get("input")
            tools = tuple(ToolCall(t["call"], t["name"], t.get("arguments"), t.get("summary"), t.get("error"),
                                   bool(t.get("done"))) for t in item.get("tools") or ())
            self._put_run(dataclasses.replace(
                before, status=status, text=item["text"], seq=seq, tools=tools,
                input=InputRequest(asked["request"], asked["prompt"]) if asked else None))
        return self._take()

    def set_devices(self, devices: Iterable[Mapping[str, Any]]) -> list[Change]:
        """The devices online now (a `hello`'s `devices`, or REST `GET /v1/presence`): replaces the list."""
        online = {str(d["device"]): str(d["node"]) for d in devices}
        if online != self.devices:
            self.devices = online
            self._changes.append(PresenceChanged(dict(online)))
        return self._take()

    def apply_presence(self, device: str, online: bool, node: str) -> list[Change]:
        """A `presence` frame (not sequenced: applied as it comes, idempotently)."""
        devices = dict(self.devices)
        if online:
            devices[device] = node
        else:
            devices.pop(device, None)
        return self.set_devices({"device": d, "node": n} for d, n in devices.items())

    def load_conversations(self, items: Iterable[Mapping[str, Any]]) -> list[Change]:
        """Conversations from REST (`GET /v1/conversations`): added or updated, never removed."""
        fields = {f.name for f in dataclasses.fields(Conversation)} - {"id", "loaded", "next_before"}
        for item in items:
            before = self.conversations.get(item["id"]) or Conversation(item["id"])
            known = {k: v for k, v in item.items() if k in fields}
            self._put_conversation(dataclasses.replace(before, **known))
        return self._take()

    def load_messages(self, conversation: str, page: Iterable[Mapping[str, Any]], *,
                      next_before: Cursor | None = None, newest: bool = True) -> list[Change]:
        """A page of a conversation's messages from REST (oldest first), merged with what is known:
        messages by id, answers into their runs (an answer in REST is a run that ended). `newest`:
        this is the newest page (else an older one)."""
        known = self._conversation(conversation)
        ids: list[str] = []
        for item in page:
            if item["role"] == Role.USER:
                ids.append(item["id"])
                before_message = self._messages.get(item["id"])
                self._put_message(Message(
                    id=item["id"], conversation=conversation, role=Role.USER, text=item["content"],
                    run=item.get("run"), device=item.get("device"),
                    client_id=before_message.client_id if before_message else None,
                    seq=item.get("seq") or (before_message.seq if before_message else None)), append=False)
                if item.get("run") and item["run"] not in self.runs:
                    self._put_run(Run(item["run"], conversation, message=item["id"]))
            elif item.get("run"):
                before = self.runs.get(item["run"]) or Run(item["run"], conversation)
                # A stored answer belongs to a run that ended; REST does not say how, so a run not
                # known to have ended is shown completed (its end event, if it comes, says exactly).
                tools = tuple(ToolCall(t["call"], t["name"], t.get("arguments"), t.get("summary"),
                                       t.get("error"), done=True) for t in item.get("tools") or ())
                self._put_run(dataclasses.replace(
                    before, status=before.status if before.ended else RunStatus.COMPLETED,
                    text=item["content"], answer_message=item["id"], seq=STORED, input=None, behind=None,
                    position=None, tools=tools))
        self._order[conversation] = merge_order(self._order.get(conversation, []), ids)
        cursor = next_before if newest or known.next_before is not None else known.next_before
        self._put_conversation(dataclasses.replace(self.conversations[conversation],
                                                   loaded=known.loaded or newest, next_before=cursor))
        self._changes.append(MessagesChanged(conversation))
        return self._take()

    def remove_conversation(self, conversation: str) -> list[Change]:
        """Forget a deleted conversation."""
        for id_ in self._order.pop(conversation, []):
            self._messages.pop(id_, None)
        for id_ in self._run_order.pop(conversation, []):
            self.runs.pop(id_, None)
        self.conversations.pop(conversation, None)
        self._changes.append(MessagesChanged(conversation))
        return self._take()

    # Internals

    def _take(self) -> list[Change]:
        changes, self._changes = self._changes, []
        return changes

    def _conversation(self, conversation: str) -> Conversation:
        known = self.conversations.get(conversation)
        if known is None:
            known = Conversation(conversation)
            self._put_conversation(known)
        return known

    def _put_conversation(self, conversation: Conversation) -> None:
        self.conversations[conversation.id] = conversation
        self._changes.append(ConversationChanged(conversation))

    def _touch(self, conversation: str, ts_ms: int | None) -> None:
        known = self.conversations[conversation]
        if ts_ms is None:
            return
        at = datetime.fromtimestamp(ts_ms / 1000, UTC)
        if known.updated_at is None or _time(known.updated_at) < at:
            self._put_conversation(dataclasses.replace(known, updated_at=at.isoformat()))

    def _put_message(self, message: Message, *, append: bool = True) -> None:
        assert message.id is not None
        new = message.id not in self._messages
        self._messages[message.id] = message
        if new and append:
            self._order.setdefault(message.conversation, []).append(message.id)
        self._changes.append(MessageChanged(message))
        if new and append:
            self._changes.append(MessagesChanged(message.conversation))

    def _remove_message(self, conversation: str, message: str) -> None:
        if self._messages.pop(message, None) is None:
            return
        self._order[conversation] = [id_ for id_ in self._order.get(conversation, []) if id_ != message]
        self._changes.append(MessagesChanged(conversation))

    def _put_run(self, run: Run) -> None:
        if run.id not in self.runs:
            self._run_order.setdefault(run.conversation, []).append(run.id)
            if not run.message:
                self._changes.append(MessagesChanged(run.conversation))
        self.runs[run.id] = run
        self._changes.append(RunChanged(run))


def _run_change(run: Run, name: str, data: Mapping[str, Any]) -> dict[str, Any] | None:
    """What event `name` changes in `run` (the text aside), or None for an unknown event."""
    if name == Event.RUN_QUEUED:
        change: dict[str, Any] = {"status": RunStatus.WAITING if data.get("behind") else RunStatus.QUEUED,
                                  "behind": data.get("behind"), "position": data.get("position")}
        if data.get("message"):
            change["message"] = data["message"]
        return change
    if name == Event.RUN_STARTED:
        return {"status": RunStatus.RUNNING, "attempt": data.get("attempt", 1),
                "message": data.get("message"), "behind": None, "position": None, "input": None, "tools": (),
                "custom": ()}
    if name == Event.TOKEN:
        return {"status": RunStatus.RUNNING}
    if name == Event.RUN_RESUMED:
        return {"attempt": data.get("attempt", run.attempt)}
    if name == Event.TOOL_STARTED:
        return {"tools": (*run.tools, ToolCall(data["call"], data["name"], data.get("arguments")))}
    if name == Event.TOOL_COMPLETED:
        summary, error = data.get("summary"), data.get("error")
        if any(t.call == data["call"] for t in run.tools):
            return {"tools": tuple(dataclasses.replace(t, summary=summary, error=error, done=True)
                                   if t.call == data["call"] else t for t in run.tools)}
        return {"tools": (*run.tools, ToolCall(data["call"], data["name"], None, summary, error, done=True))}
    if name == Event.RUN_CUSTOM:
        return {"status": RunStatus.RUNNING, "custom": (*run.custom, data.get("value"))}
    if name == Event.RUN_INPUT_REQUIRED:
        return {"status": RunStatus.PAUSED, "input": InputRequest(data["request"], data["prompt"])}
    if name == Event.RUN_INPUT_RECEIVED:
        answered = run.input and run.input.request == data.get("request")
        return {"status": RunStatus.RUNNING, "input": None} if answered else {}
    if name in END_EVENTS:
        # The end event's text is the whole answer (of the last attempt): equal to the tokens shown
        # when nothing was missed, and right even when this device joined after the run began.
        end: dict[str, Any] = {"text": data.get("text", ""), "input": None, "behind": None, "position": None,
                               "rolled_back": bool(data.get("rolled_back"))}
        if name == Event.RUN_FAILED:
            return end | {"status": RunStatus.FAILED, "answer_message": data.get("answer_message"),
                          "error": RunError(str(data.get("code")), str(data.get("message")))}
        status = RunStatus.COMPLETED if name == Event.RUN_COMPLETED else RunStatus.CANCELLED
        return end | {"status": status, "answer_message": data.get("message"),
                      "stopped_at": data.get("stopped_at")}
    return None


def _status(value: str) -> RunStatus:
    try:
        return RunStatus(value)
    except ValueError:
        # A status a newer server added: the run is in flight (snapshots list no other).
        return RunStatus.RUNNING


def _answer(run: Run) -> Message:
    return Message(run.answer_message, run.conversation, Role.ASSISTANT, run.text, run=run.id,
                   status=run.status)


def _activity(conversation: Conversation) -> datetime:
    if conversation.updated_at is None:
        return datetime.max.replace(tzinfo=UTC)  # not known yet: a new one, first
    return _time(conversation.updated_at)


def _time(iso: str) -> datetime:
    try:
        at = datetime.fromisoformat(iso)
    except ValueError:
        return datetime.max.replace(tzinfo=UTC)
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def merge_order(old: list[str], page: list[str]) -> list[str]:
    """The order after a REST page: ids seen before the page's first known one stay before it
    (older pages), then the page in its order, then ids not in the page (newer, live ones)."""
    in_page = set(page)
    first_shared = next((i for i, id_ in enumerate(old) if id_ in in_page), -1)
    before = [id_ for id_ in old[:max(first_shared, 0)] if id_ not in in_page]
    after = [id_ for id_ in (old if first_shared == -1 else old[first_shared:]) if id_ not in in_page]
    return [*before, *page, *after]

