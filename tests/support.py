"""Plain helpers shared by the test modules (fixtures live in conftest.py).

Test modules import from here and from conftest's fixtures, never from each other: a helper used by
two modules moves here, one used by a single module stays in it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from chorus_client.testing import RecordingClient as ChorusClient

from loadtest.cluster import LocalCluster
from loadtest.procs import Proc, free_port, wait_http_ok

if TYPE_CHECKING:
    import uvicorn

    from agent_worker.graph import Item

WAIT_S = 10.0  # the bound on a wait inside one process (an MCP call, a graph's answer)
History = Sequence[tuple[str, str]]


def unique(name: str) -> str:
    """`name` with a random suffix: a user (or other id) of the test's own."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


# -- a cluster's nodes and what devices saw ----------------------------------------------------


# The session cluster's nodes announce a device offline this long after its last socket closed.
PRESENCE_DEBOUNCE_S = 1.0


@contextlib.asynccontextmanager
async def in_rotation(cluster: LocalCluster, http: aiohttp.ClientSession) -> AsyncIterator[LocalCluster]:
    """`cluster` with every node up and in nginx's rotation; afterwards, any node a test stopped
    is started again (for the modules whose cluster outlives a test that kills a node)."""
    await _restart_stopped(cluster)
    await _wait_in_rotation(cluster, http)
    yield cluster
    await _restart_stopped(cluster)


async def _restart_stopped(cluster: LocalCluster) -> None:
    for index, node in enumerate(cluster.nodes):
        if not node.alive:
            await asyncio.to_thread(cluster.start_node, index)


async def _wait_in_rotation(cluster: LocalCluster, http: aiohttp.ClientSession, timeout_s: float = 10) -> None:
    """Until nginx has routed both a request and a socket to every node. A node nginx saw fail is
    benched for fail_timeout (2 s locally) even once it is back up, by each upstream on its own:
    REST and `/ws` go through two (nginx/nginx.conf), so one may have taken a node back before
    the other."""
    names = {node.name for node in cluster.nodes}
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while seen != names:
        assert time.monotonic() < deadline, f"nginx routed requests only to {seen} within {timeout_s}s"
        async with http.get(f"{cluster.http_url}/readyz") as response:
            if response.status == 200:
                seen.add((await response.json())["node"])
        await asyncio.sleep(0.05)
    if cluster.nginx is None:
        return
    seen = set()
    while seen != names:
        assert time.monotonic() < deadline, f"nginx routed sockets only to {seen} within {timeout_s}s"
        device = ChorusClient(cluster.ws_url, cluster.token(unique("rotation")), device="probe")
        try:
            seen.add((await device.connect())["node"])  # the client retries a refused attempt itself
        finally:
            await device.close()


async def get_agents(http: aiohttp.ClientSession, cluster: LocalCluster, token: str) -> list[dict[str, Any]]:
    """GET /v1/agents, waiting (bounded) for the worker to have advertised them."""
    url = f"http://127.0.0.1:{cluster.node_ports[0]}/v1/agents"
    for _ in range(300):  # a worker under load may take a while to import and advertise
        async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
            if response.status == 200:
                body: dict[str, Any] = await response.json()
                return list(body["agents"])
            assert response.status == 503
        await asyncio.sleep(0.1)
    raise TimeoutError("no agents advertised")


async def until(fetch: Callable[[], Awaitable[Any]], ok: Callable[[Any], bool], timeout_s: float,
                poll_s: float = 0.2) -> Any:
    """`fetch()` again until its answer is `ok` or `timeout_s` passed; its last answer. For state
    that is written without an event to wait on (heartbeats, presence, rows in Postgres)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = await fetch()
        if ok(answer) or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(poll_s)


async def assert_answer_survived(devices: Sequence[ChorusClient], run: str, text: str,
                                 timeout_s: float = 60) -> None:
    """Each device saw `run` complete with `text` and shows it once, with no duplicate; a hole is
    never silent: any seq a device missed was filled, or it resynced (a Redis failover, a reshard)."""
    for device in devices:
        end = await device.wait_run_end(run, timeout_s)
        assert end["event"] == "run.completed" and end["data"]["text"] == text, end
        assert device.shown[run] == text, "what the device shows is the whole answer, once"
        assert device.duplicates == 0
        assert device.gaps == [] or any(f["type"] == "resync" for f in device.frames)


def node_ws(cluster: LocalCluster, index: int) -> str:
    """The WebSocket URL of one node, not through nginx."""
    return f"ws://127.0.0.1:{cluster.node_ports[index]}/ws"


async def rest(http: aiohttp.ClientSession, base: str, token: str, method: str, path: str,
               **kw: Any) -> tuple[int, Any]:
    """One authenticated REST call: its status and its JSON body (None when it is not JSON)."""
    async with http.request(method, f"{base}{path}", headers={"Authorization": f"Bearer {token}"},
                            **kw) as response:
        body = await response.json() if response.content_type == "application/json" else None
        return response.status, body


async def send_frame(ws: aiohttp.ClientWebSocketResponse, frame: str | bytes) -> None:
    """Send `frame` as a binary frame if it is bytes, else as a text frame."""
    if isinstance(frame, bytes):
        await ws.send_bytes(frame)
    else:
        await ws.send_str(frame)


def tokens(client: ChorusClient, run: str) -> int:
    """How many token events of `run` the client has seen."""
    return sum(1 for e in client.events if e["run"] == run and e["event"] == "token")


def comparable(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What two devices of one user must agree on, event by event."""
    return [(e["seq"], e["event"], e["run"], e["conversation"], e["data"]) for e in events]


def comparable_without_conversation(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """`comparable` without the conversation id."""
    return [(e["seq"], e["event"], e["run"], e["data"]) for e in events]


def extra_node(cluster: LocalCluster, workdir: Path, name: str, **env: str) -> Iterator[int]:
    """A node of the cluster's with settings of its own, for a fixture to yield from; its port."""
    port = free_port()
    node = Proc(name, [sys.executable, "-m", "ws_node"], workdir=workdir, env={
        "REDIS_URL": cluster.redis_url, "DATABASE_URL": cluster.database_url,
        "AUTH_JWT_SECRET": cluster.config.jwt_secret, "PORT": str(port), "NODE_ID": name,
        "HOST": "127.0.0.1", **env,
    })
    node.start()
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/readyz", 30)
        yield port
    finally:
        node.stop()


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0) -> bytes:
    """A frame as a client sends it (masked unless told otherwise)."""
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    size = len(payload)
    flag = 0x80 if masked else 0
    if size < 126:
        head += bytes([flag | size])
    elif size < 65_536:
        head += bytes([flag | 126]) + struct.pack("!H", size)
    else:
        head += bytes([flag | 127]) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawSocket:
    """A WebSocket client on a bare socket: the upgrade head and any bytes `then` in one write,
    frames read one by one, only when told. `receive_buffer`: a tiny one makes a slow phone."""

    def __init__(self, port: int, path: str, *, then: bytes = b"", extra: str = "",
                 receive_buffer: int | None = None) -> None:
        self.sock = socket.socket()
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(20)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode() + then)
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        self.head = head.decode()
        assert " 101 " in self.head.split("\r\n")[0], self.head

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the node")
        return chunk

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += self._recv()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def frame(self) -> tuple[int, bytes]:
        """The next frame: (opcode, payload)."""
        first, second = self._read(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._read(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._read(8))[0]
        return first & 0x0F, self._read(length)

    def json(self) -> dict[str, Any]:
        """The next text frame, parsed; control frames before it are skipped."""
        while True:
            opcode, payload = self.frame()
            if opcode == 0x1:
                return json.loads(payload)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.sock.close()

    def frames_until_close(self) -> tuple[int, int]:
        """Read every frame; returns (text frames read, close code)."""
        texts = 0
        while True:
            opcode, payload = self.frame()
            if opcode == 0x8:
                return texts, struct.unpack("!H", payload[:2])[0]
            texts += opcode == 0x1

    def events_until(self, last_seq: int) -> list[dict[str, Any]]:
        """Read event frames until one reaches `last_seq`."""
        events: list[dict[str, Any]] = []
        while not events or events[-1]["seq"] < last_seq:
            opcode, payload = self.frame()
            assert opcode == 0x1, f"unexpected opcode {opcode}: {payload[:80]!r}"
            frame = json.loads(payload)
            if frame["type"] == "event":
                events.append(frame)
        return events


# -- agents and tools --------------------------------------------------------------------------
# mcp, uvicorn and langchain are imported where they are used: conftest imports this module, and
# loading them at the top would add over a second to every run, the pure tests' included.


def text_of(items: Sequence[Item]) -> str:
    """The text an answer's items add up to (tool events left out)."""
    from agent_worker.graph import Text

    return "".join(item.text for item in items if isinstance(item, Text))


def weather(city: str) -> str:
    """What the test server's ``lookup_weather`` answers: over 400 characters."""
    return f"Sunny, 21 C in {city}; light wind from the west. " + "Details follow. " * 30


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


class McpTestServer:
    """The `mcp` package's MCPServer over Streamable HTTP (uvicorn) on a local port, in a thread.

    Records every tool call (:attr:`calls`) and the JSON-RPC method of every POST (:attr:`methods`).
    """

    def __init__(self, *, json_response: bool = False, stateless: bool = False, port: int = 0) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.methods: list[str] = []
        self.slow_started = threading.Event()
        self._lock = threading.Lock()
        self._json_response, self._stateless, self._port = json_response, stateless, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def _record(self, name: str, arguments: dict[str, Any]) -> None:
        with self._lock:
            self.calls.append((name, arguments))

    def _app(self) -> Asgi:
        import anyio
        from mcp.server.mcpserver import MCPServer
        from mcp.server.mcpserver.exceptions import ToolError

        mcp = MCPServer("chorus-test-tools", log_level="WARNING")

        @mcp.tool()
        def add(a: int, b: int) -> int:
            """Add two integers."""
            self._record("add", {"a": a, "b": b})
            return a + b

        @mcp.tool()
        def lookup_weather(city: str) -> str:
            """The current weather in a city."""
            self._record("lookup_weather", {"city": city})
            if city == "Atlantis":
                raise ToolError("no weather station in Atlantis")
            return weather(city)

        @mcp.tool()
        def crash() -> str:
            """Raises an unexpected exception."""
            self._record("crash", {})
            raise RuntimeError("kaboom")

        @mcp.tool()
        async def slow(seconds: float) -> str:
            """Sleeps, then answers."""
            self._record("slow", {"seconds": seconds})
            self.slow_started.set()
            await anyio.sleep(seconds)
            return "done"

        app: Asgi = mcp.streamable_http_app(json_response=self._json_response, stateless_http=self._stateless)

        async def recording(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["method"] != "POST":
                await app(scope, receive, send)
                return
            received = [await receive()]
            while received[-1]["type"] == "http.request" and received[-1].get("more_body"):
                received.append(await receive())
            body = b"".join(m.get("body", b"") for m in received if m["type"] == "http.request")
            with self._lock:
                self.methods.append(str(json.loads(body or b"{}").get("method")))
            replay = iter(received)

            async def again() -> Message:
                return next(replay, None) or await receive()

            await app(scope, again, send)

        return recording

    def start(self) -> None:
        import uvicorn

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))
        port = sock.getsockname()[1]
        config = uvicorn.Config(self._app(), log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
        server = self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                                        name="mcp-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + WAIT_S
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise TimeoutError("MCP test server did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{port}/mcp"

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(WAIT_S)

    def tool_calls(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return list(self.calls)


def event_payload(conversation: str, run: str | None, event: str, data: dict[str, Any]) -> str:
    """An event frame's payload, for tests that publish straight into a user's stream (also events
    the protocol does not define, which clients must pass through)."""
    # Compact, as protocol.events.event_body encodes: the node's token merging looks for it.
    return json.dumps({"type": "event", "conversation": conversation, "run": run, "event": event, "data": data,
                       "ts": int(time.time() * 1000)}, separators=(",", ":"))


class Recorder:
    """A hub subscriber that keeps what it was given."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.frames: list[tuple[int, str]] = []
        self.resumes = 0
        self.changed = asyncio.Event()

    def deliver(self, seq: int, frame: str) -> None:
        self.frames.append((seq, frame))
        self.changed.set()

    def resume(self) -> None:
        self.resumes += 1
        self.changed.set()

    async def wait(self, predicate: object, timeout_s: float = 10) -> None:
        async def loop() -> None:
            while not predicate():  # type: ignore[operator]
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(loop(), timeout_s)
