"""`python -m chorus_client chat`: two terminals of one user (a phone on node 0, a laptop on node 1),
driven through their stdin and read from their stdout, against a live cluster. A line typed in either
shows its answer, streamed, in both, and the other terminal shows the line with its device."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from loadtest.cluster import LocalCluster
from tests.support import node_ws, unique

WAIT_S = 30.0


def words(n: int) -> str:
    return " ".join(f"word{i}" for i in range(1, n + 1))


class Terminal:
    """One `chat` process: what it printed so far, chunk by chunk as it arrived."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out = ""
        self.chunks: list[str] = []
        self.err = ""
        self.changed = asyncio.Event()
        self._readers = [asyncio.create_task(self._read(proc.stdout, "out")),
                         asyncio.create_task(self._read(proc.stderr, "err"))]

    async def _read(self, stream: asyncio.StreamReader | None, which: str) -> None:
        assert stream is not None
        while chunk := (await stream.read(65536)).decode():
            if which == "out":
                self.out += chunk
                self.chunks.append(chunk)
            else:
                self.err += chunk
            self.changed.set()

    async def until(self, holds: Callable[[], bool], what: str) -> None:
        async def loop() -> None:
            while not holds():
                self.changed.clear()
                await self.changed.wait()

        try:
            await asyncio.wait_for(loop(), WAIT_S)
        except TimeoutError:
            raise AssertionError(f"{what}: not within {WAIT_S}s; stdout {self.out!r}, stderr {self.err!r}") from None

    async def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{line}\n".encode())
        await self.proc.stdin.drain()

    async def end(self) -> int:
        """Close its stdin (the end of input): it leaves once the answers in flight ended."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        code = await asyncio.wait_for(self.proc.wait(), WAIT_S)
        await asyncio.gather(*self._readers)
        return code


@pytest.fixture
async def terminals(cluster: LocalCluster) -> AsyncIterator[Callable[[int, str], Awaitable[Terminal]]]:
    user = unique("alice")
    started: list[Terminal] = []

    async def start(node: int, device: str) -> Terminal:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "chorus_client", "chat", node_ws(cluster, node), "--token", cluster.token(user),
            "--device", device, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        terminal = Terminal(proc)
        started.append(terminal)
        await terminal.until(lambda: f"on device {device}" in terminal.err, f"{device} connected")
        return terminal

    yield start
    for terminal in started:
        if terminal.proc.returncode is None:
            terminal.proc.kill()
            await terminal.proc.wait()


async def test_two_terminals_of_one_user_chat_in_one_conversation(
    terminals: Callable[[int, str], Awaitable[Terminal]],
) -> None:
    phone = await terminals(0, "phone")
    laptop = await terminals(1, "laptop")

    await phone.type("[[tokens:25]] [[slow:0.04]] hello from the phone")
    for terminal in (phone, laptop):
        await terminal.until(lambda t=terminal: f"agent: {words(25)}\n" in t.out, "the first answer")
    assert "[phone] [[tokens:25]] [[slow:0.04]] hello from the phone\n" in laptop.out
    assert "[phone]" not in phone.out, "a terminal does not echo its own line"
    # Streamed token by token: the answer's line reached the laptop in many pieces.
    assert sum(1 for chunk in laptop.chunks if "word" in chunk) >= 5, laptop.chunks

    await laptop.type("[[tokens:4]] and from the laptop")  # the laptop follows the phone's conversation
    for terminal in (phone, laptop):
        await terminal.until(lambda t=terminal: f"agent: {words(4)}\n" in t.out, "the second answer")
    assert "[laptop] [[tokens:4]] and from the laptop\n" in phone.out

    assert await phone.end() == 0 and await laptop.end() == 0
    assert phone.out.count("agent: ") == laptop.out.count("agent: ") == 2
