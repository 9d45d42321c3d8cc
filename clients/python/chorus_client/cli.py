"""`python -m chorus_client chat <ws-url> --token <jwt> [--conversation ID] [--device NAME]`: chat
with the agent from a terminal. Each line read from stdin is sent; the agent's answer streams in
token by token, and the messages other devices of the user send show up as they arrive, so two
terminals (a phone, a laptop) chat in one conversation.

Without `--conversation` the terminal follows the first conversation it sees a message in: the one
its own first line creates, or the one another device writes in first. `/cancel` stops the answer
in progress, `/quit` (or the end of stdin, once the answers in flight ended) leaves. The chat goes
to stdout; what happens to the connection goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from typing import TextIO

from chorus_client.client import ChorusClient
from chorus_client.errors import ChorusError
from chorus_client.events import (
    ClientEvent,
    Connected,
    ErrorReported,
    MessageChanged,
    RunChanged,
    StateChanged,
)
from chorus_client.models import Run
from protocol import Role, RunStatus

_END_WAIT_S = 120.0  # at the end of stdin, how long the answers in flight may take to end


class Chat:
    """The terminal's view of one conversation: prints other devices' messages and streams the
    answers, each run's text as a growing line."""

    def __init__(self, client: ChorusClient, conversation: str | None, out: TextIO, err: TextIO) -> None:
        self.client = client
        self.conversation = conversation
        self.out, self.err = out, err
        self._printed: dict[str, str] = {}  # run -> the text printed so far
        self._open: str | None = None  # the run whose line is still being written
        self._seen: set[str] = set()  # user messages printed (or our own, not printed)

    def follows(self, conversation: str) -> bool:
        if self.conversation is None:
            self.conversation = conversation  # the first conversation with a message: ours from now on
        return conversation == self.conversation

    def on_event(self, event: ClientEvent) -> None:
        if isinstance(event, MessageChanged):
            self._message(event)
        elif isinstance(event, RunChanged) and self.conversation == event.run.conversation:
            self._stream(event.run)
        elif isinstance(event, Connected) and not event.resumed:
            hello = event.hello
            self.err.write(f"chorus: connected to {hello.node} as {hello.user} on device {hello.device}\n")
        elif isinstance(event, StateChanged) and event.state.status == "reconnecting" and event.state.code:
            self.err.write(f"chorus: reconnecting (closed with {event.state.code})\n")
        elif isinstance(event, ErrorReported):
            self.err.write(f"chorus: {event.error}\n")
        self.out.flush()
        self.err.flush()

    def _message(self, event: MessageChanged) -> None:
        message = event.message
        if message.role != Role.USER or message.id is None or message.id in self._seen:
            return
        self._seen.add(message.id)
        if not self.follows(message.conversation) or message.device == self.client.device:
            return  # our own line: the terminal shows it already
        self._close_line()
        self.out.write(f"[{message.device}] {message.text}\n")

    def _stream(self, run: Run) -> None:
        printed = self._printed.get(run.id)
        if printed is None:
            if not run.text and not run.ended:
                return  # queued, or started with no token yet
            self._close_line()
            self.out.write("agent: ")
            printed, self._open = "", run.id
        elif self._open != run.id:  # another answer's line was open: continue this one below it
            self._close_line()
            self.out.write("agent (cont.): ")
            self._open = run.id
        if run.text.startswith(printed):
            self.out.write(run.text[len(printed):])
        else:  # the run restarted (a worker died) or was resumed: its text begins again
            self.out.write(f"\nagent (again): {run.text}")
        self._printed[run.id] = run.text
        if run.ended:
            if run.status == RunStatus.CANCELLED:
                self.out.write(" [cancelled]")
            elif run.status == RunStatus.FAILED and run.error:
                self.out.write(f" [failed: {run.error.message}]")
            self._close_line()

    def _close_line(self) -> None:
        if self._open is not None:
            self.out.write("\n")
            self._open = None

    def in_flight(self) -> list[Run]:
        runs = self.client.store.runs.values()
        return [r for r in runs if r.conversation == self.conversation and not r.ended]


async def chat(url: str, token: str, *, conversation: str | None, device: str | None,
               lines: asyncio.Queue[str | None], out: TextIO, err: TextIO) -> int:
    """Run one terminal's chat until `/quit` or the end of input (None); the exit status."""
    client = ChorusClient(url, token, device=device)
    view = Chat(client, conversation, out, err)
    client.on(ClientEvent, view.on_event)
    try:
        await client.connect()
        if conversation is not None:
            await client.load_messages(conversation)
        while (line := await lines.get()) is not None:
            text = line.strip()
            if text == "/quit":
                return 0
            if text == "/cancel":
                for run in view.in_flight():
                    await client.cancel(run.id)
            elif text:
                ack = await client.send(text, conversation=view.conversation)
                view.follows(ack.conversation or "")
        await client.wait_for(lambda: not view.in_flight(), _END_WAIT_S)
        return 0
    except ChorusError as exc:
        err.write(f"chorus: {exc}\n")
        return 1
    except TimeoutError:
        err.write("chorus: answers still in flight at the end of input\n")
        return 1
    finally:
        await client.close()


def _read_lines(loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[str | None]) -> None:
    """Feed stdin's lines to the loop (a daemon thread: a terminal's read cannot be awaited portably)."""
    for line in sys.stdin:
        loop.call_soon_threadsafe(lines.put_nowait, line)
    loop.call_soon_threadsafe(lines.put_nowait, None)


async def _main(args: argparse.Namespace) -> int:
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    threading.Thread(target=_read_lines, args=(asyncio.get_running_loop(), lines), daemon=True).start()
    return await chat(args.url, args.token, conversation=args.conversation, device=args.device, lines=lines,
                      out=sys.stdout, err=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chorus_client", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    talk = commands.add_parser("chat", help="chat with the agent; other devices' messages show up too")
    talk.add_argument("url", help="the WebSocket URL, e.g. ws://127.0.0.1:8080/ws")
    talk.add_argument("--token", required=True, help="a JWT for the user")
    talk.add_argument("--conversation", help="the conversation to chat in (default: a new one)")
    talk.add_argument("--device", help="this terminal's device id (default: one the server assigns)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        return 130
