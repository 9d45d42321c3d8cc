"""Socket churn on one node: what the garbage collector's full passes cost, and whether memory
stays bounded, ``python -m loadtest.churn_bench``.

One node of a local cluster (no workers, no nginx), `--sockets` authenticated sockets opened by
this process, then `--rounds` rounds of a second each: `--per-round` sockets chosen at random
close (`--abort-share` of them abruptly, the TCP connection aborted with no close handshake, as a
phone losing its network does; the rest with a close frame) and as many new ones open. A node
freezes what it holds out of the collector's passes (`common/collector.py`), so closed sockets
that leave cyclic garbage behind wait for a full pass over everything; this shows how often one
comes, what it collects and how long it stops the loop.

Printed: the node's RSS before, during (every ten rounds) and after the churn; its full passes
(from its log: how many, the objects collected, their length); and from its /metrics, the ticks
of its 25 ms loop-lag timer and the collector passes over 20 ms, over the churn and a settle.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from loadtest.cluster import ClusterConfig, LocalCluster
from loadtest.scenarios.common import node_histograms
from loadtest.scenarios.s1 import BUSY, GC, LAG, pause_figures

FULL_PASS = re.compile(r"full garbage-collector pass: (\d+) objects collected, .* (\d+) ms")


async def close_socket(ws: aiohttp.ClientWebSocketResponse, *, abort: bool) -> None:
    """Close `ws` with a close frame, or abort its TCP connection with none (the node meets a
    reset, as from a phone that lost its network)."""
    connection = ws._response.connection  # aiohttp keeps the transport there
    if abort and connection is not None and connection.transport is not None:
        connection.transport.abort()
    else:
        await ws.close()


async def churn(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    node = psutil.Process(cluster.nodes[0].pid)
    url = f"ws://127.0.0.1:{cluster.node_ports[0]}/ws"
    opening = asyncio.Semaphore(100)
    serial = 0
    rss_mb: list[float] = []

    async def open_one(session: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
        nonlocal serial
        serial += 1
        async with opening:
            ws = await session.ws_connect(f"{url}?access_token={cluster.token(f'u{serial}')}&device=d0")
            await ws.receive()  # hello
            return ws

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        sockets = list(await asyncio.gather(*(open_one(session) for _ in range(args.sockets))))
        rss_mb.append(node.memory_info().rss / 2**20)
        before = await asyncio.to_thread(node_histograms, cluster, LAG, BUSY, GC)
        for round_ in range(args.rounds):
            began = time.monotonic()
            random.shuffle(sockets)
            gone, sockets = sockets[:args.per_round], sockets[args.per_round:]
            aborts = round(len(gone) * args.abort_share)
            await asyncio.gather(*(close_socket(ws, abort=index < aborts) for index, ws in enumerate(gone)))
            sockets += await asyncio.gather(*(open_one(session) for _ in gone))
            if round_ % 10 == 9:
                rss_mb.append(node.memory_info().rss / 2**20)
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - began)))
        await asyncio.sleep(args.settle_s)
        after = await asyncio.to_thread(node_histograms, cluster, LAG, BUSY, GC)
        rss_mb.append(node.memory_info().rss / 2**20)
        await asyncio.gather(*(ws.close() for ws in sockets))
    log = (cluster.workdir / "node-a.log").read_text()
    passes = [(int(m[1]), int(m[2])) for m in FULL_PASS.finditer(log)]
    return {"rss_mb": rss_mb, "full_passes": len(passes), "collected": sum(c for c, _ in passes),
            "pass_ms": [ms for _, ms in passes],
            **pause_figures("", before, after)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=5000, help="sockets held on the node")
    parser.add_argument("--rounds", type=int, default=60, help="rounds of a second")
    parser.add_argument("--per-round", type=int, default=500, help="sockets replaced each round")
    parser.add_argument("--abort-share", type=float, default=0.5, help="closes aborted, a share")
    parser.add_argument("--settle-s", type=float, default=12.0, help="seconds settling after")
    parser.add_argument("--workdir", type=Path, help="keep the cluster's logs here")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="churn-"))
    config = ClusterConfig(nodes=1, workers=0, nginx=False, env={"NEW_CONNECTIONS_PER_SECOND": "0"})
    with LocalCluster(workdir, config) as cluster:
        f = asyncio.run(churn(cluster, args))
    rss = " / ".join(f"{mb:.0f}" for mb in f["rss_mb"])
    worst = max(f["pass_ms"], default=0)
    print(f"churn: {args.sockets} sockets on one node, {args.per_round} replaced a second for "
          f"{args.rounds} s, {args.abort_share:.0%} of the closes aborted")
    print(f"  node RSS, MB            {rss} (opened, every 10 s, after {args.settle_s:g} s settling)")
    print(f"  full collector passes   {f['full_passes']}, {f['collected']} objects collected, "
          f"the longest {worst} ms")
    print(f"  loop ticks over 20 ms   {f['stalls_over_20ms']} of {f['stalls_count']}, "
          f"worst <= {f['stalls_worst_le_s'] * 1000:g} ms; of the node's own work {f['busy_over_20ms']}, "
          f"worst <= {f['busy_worst_le_s'] * 1000:g} ms")
    print(f"  GC passes over 20 ms    {f['gc_over_20ms']} of {f['gc_count']}, "
          f"worst <= {f['gc_worst_le_s'] * 1000:g} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
