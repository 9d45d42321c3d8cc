"""The node's own WebSocket code (`ws_node.lean`) on a real node: what it serves and what it hands
to aiohttp, its one heartbeat timer, and the parts of RFC 6455 clients rarely exercise."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from loadtest.cluster import LocalCluster
from tests.support import RawSocket, client_frame, extra_node, unique


@pytest.fixture
def quick_heartbeat_node(cluster: LocalCluster, tmp_path: Path) -> Iterator[int]:
    """A node that pings sockets idle for a second."""
    yield from extra_node(cluster, tmp_path, "heartbeat-node", HEARTBEAT_SECONDS="1")


@pytest.fixture
def compressing_node(cluster: LocalCluster, tmp_path: Path) -> Iterator[int]:
    """A node that accepts permessage-deflate."""
    yield from extra_node(cluster, tmp_path, "compressing-node", WS_COMPRESSION="true")


def test_a_socket_that_stops_answering_pings_is_dropped_and_one_that_answers_stays(
    cluster: LocalCluster, quick_heartbeat_node: int
) -> None:
    token = cluster.token(unique("alice"))
    silent = RawSocket(quick_heartbeat_node, f"/ws?access_token={token}&device=silent")
    lively = RawSocket(quick_heartbeat_node, f"/ws?access_token={token}&device=lively")
    try:
        assert silent.json()["type"] == "hello" and lively.json()["type"] == "hello"
        pings = 0
        while pings < 4:  # four pings answered: it outlived two intervals of silence several times
            opcode, payload = lively.frame()
            if opcode == 0x9:
                lively.sock.sendall(client_frame(0xA, payload))
                pings += 1
        opcodes = []
        with pytest.raises(ConnectionError):  # the node ends it: no pong came
            while True:
                opcodes.append(silent.frame()[0])
        assert 0x9 in opcodes, "pinged before being dropped"
        lively.sock.sendall(client_frame(0x1, b'{"type":"ping","id":"p1"}'))
        while (reply := lively.json())["type"] != "pong":  # presence frames: the silent one went offline
            pass
        assert reply == {"type": "pong", "id": "p1"}
    finally:
        silent.close()
        lively.close()


def test_fragments_control_frames_and_a_frame_sent_with_the_upgrade_are_served(cluster: LocalCluster) -> None:
    token = cluster.token(unique("alice"))
    auth = client_frame(0x1, json.dumps({"type": "auth", "id": "a1", "token": token}).encode())
    client = RawSocket(cluster.node_ports[0], "/ws?auth=frame", then=auth)  # the auth frame rides with the head
    try:
        assert "Server:" not in client.head, "served by the node's own code, not aiohttp"
        assert client.json()["type"] == "ack"
        assert client.json()["type"] == "hello"
        command = b'{"type":"ping","id":"split"}'
        client.sock.sendall(client_frame(0x1, command[:5], fin=False) + client_frame(0x9, b"between")
                            + client_frame(0x0, command[5:12], fin=False) + client_frame(0x0, command[12:]))
        frames = []  # (the snapshot may come first)
        while not frames or frames[-1] != (0x1, b'{"type":"pong","id":"split"}'):
            frames.append(client.frame())
        # the ping was answered in the middle of the message, before the message's own reply
        assert (0xA, b"between") in frames
        client.sock.sendall(client_frame(0x2, b"\x00"))
        assert client.json()["code"] == "bad_request"
        client.sock.sendall(client_frame(0x8, struct.pack("!H", 1000)))
        opcode, payload = client.frame()
        assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 1000  # the close answered
    finally:
        client.close()


def test_frames_sent_with_the_upgrade_beyond_a_heads_worth_are_all_served(cluster: LocalCluster) -> None:
    """A client that sends 2,000 commands (~70 KB) behind its upgrade: the node stops reading while
    it admits the socket, then serves every one (a reply each: `pong`, or `rate_limited`)."""
    commands = b"".join(client_frame(0x1, f'{{"type":"ping","id":"p{n}"}}'.encode()) for n in range(2000))
    assert len(commands) > 32 * 1024
    client = RawSocket(cluster.node_ports[0], f"/ws?access_token={cluster.token(unique('alice'))}", then=commands)
    try:
        replies: set[object] = set()
        while len(replies) < 2000:
            reply = client.json()
            if reply["type"] in ("pong", "error"):
                replies.add(reply["id"])
        assert replies == {f"p{n}" for n in range(2000)}
    finally:
        client.close()


def test_an_unmasked_frame_fails_the_socket_with_1002(cluster: LocalCluster) -> None:
    client = RawSocket(cluster.node_ports[0], f"/ws?access_token={cluster.token(unique('alice'))}")
    try:
        client.sock.sendall(client_frame(0x1, b'{"type":"ping"}', masked=False))
        while (frame := client.frame())[0] != 0x8:
            pass
        assert struct.unpack("!H", frame[1][:2])[0] == 1002
    finally:
        client.close()


@pytest.mark.parametrize("compression", [False, True], ids=["declined", "accepted"])
async def test_a_compression_offer_and_everything_else(cluster: LocalCluster, compressing_node: int,
                                                      http: aiohttp.ClientSession, compression: bool) -> None:
    """A client offering permessage-deflate (every browser does) is served by the node's own code
    with the offer declined, or with `WS_COMPRESSION` by aiohttp, compressed; a plain upgrade by the
    node's own code; all get the same stream. REST on the same port is aiohttp's."""
    user = unique("alice")
    port = compressing_node if compression else cluster.node_ports[0]
    url = f"ws://127.0.0.1:{port}/ws?access_token={cluster.token(user)}"
    async with http.ws_connect(url + "&device=deflate", compress=15) as deflated, \
            http.ws_connect(url + "&device=plain") as plain:
        assert deflated.compress == (15 if compression else 0)
        assert ("Server" in deflated._response.headers) is compression  # aiohttp names itself
        assert plain.compress == 0 and "Server" not in plain._response.headers
        hellos = [await ws.receive_json(timeout=5) for ws in (deflated, plain)]
        assert [hello["type"] for hello in hellos] == ["hello", "hello"]
        for ws in (deflated, plain):
            await ws.send_json({"type": "ping", "id": "both"})
            while (reply := await ws.receive_json(timeout=5))["type"] != "pong":
                pass
            assert reply["id"] == "both"
    async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
        assert response.status == 200 and "Server" in response.headers
    async with http.get(f"http://127.0.0.1:{port}/ws?device=x") as response:
        assert response.status in (400, 401)  # not an upgrade: aiohttp answers it


def test_a_client_that_shuts_its_side_without_a_close_frame_is_torn_down(cluster: LocalCluster) -> None:
    """Its FIN is read (`eof_received`): the node keeps the transport until the socket's teardown,
    then closes it; the device goes offline as after any close."""
    token = cluster.token(unique("fin"))
    port = cluster.node_ports[0]
    leaver = RawSocket(port, f"/ws?access_token={token}&device=leaver")
    stayer = RawSocket(port, f"/ws?access_token={token}&device=stayer")
    try:
        assert leaver.json()["type"] == "hello" and stayer.json()["type"] == "hello"
        leaver.sock.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionError):  # the node closes its side too, with no frame after
            while True:
                opcode, _ = leaver.frame()
                assert opcode != 0x8, "no close frame to a client that is gone"
        while (frame := stayer.json())["type"] != "presence" or frame["online"]:
            pass
        assert frame["device"] == "leaver"
    finally:
        leaver.close()
        stayer.close()
