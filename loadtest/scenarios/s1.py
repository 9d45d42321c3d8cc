"""S1, idle capacity and memory side by side: ``python -m loadtest.bench s1``.

    python -m loadtest.bench s1                          # 4,000 sockets on each system
    python -m loadtest.bench s1 --sockets 400 --systems chorus,raw-probe

Per system (``common.SYSTEMS``, one after the other, each with a fresh Redis): two server
processes; ``--sockets`` authenticated devices (``--sockets / 2`` users, device A on process 1 and
B on process 2; Chorus: real JWTs, the socket counts once its hello arrived; Socket.IO: once the
namespace connect is acknowledged; the others: once the upgrade is answered), opened
``--concurrency`` at a time by the load generators. Figures: the time to open them all; RSS per
idle socket = (RSS of both server processes with N sockets, after ``--settle-s``, minus their RSS
before the first socket) / N; Redis's RSS growth per socket (Chorus keeps presence there); and
the servers' CPU while the N sockets sit idle for ``--idle-s``; the nodes' event-loop stalls (Chorus
exports a loop-lag histogram) while opening, idle, while Chorus's first node drains on SIGTERM with
its half of the sockets, and as the rest close. No warm-up: what a server allocates lazily on its
first connection is counted in, spread over N.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.procs import Proc
from loadtest.scenarios.common import (
    SYSTEMS,
    cpu_s,
    deployed,
    each_system,
    open_devices,
    opened_figures,
    report,
    rss_bytes,
    systems,
)

Figures = dict[str, Any]
STALL_S = 0.02  # the bound on an event-loop stall (a loop-lag bucket bound)
LAG, GC = "chorus_event_loop_lag_seconds", "chorus_gc_pause_seconds"
BUSY = "chorus_event_loop_busy_lag_seconds"  # the part of the lag the node's own work accounts for
DRAIN_TIMEOUT_S = 60  # a node's default drain is 10 s, then up to 5 s for its last sockets to close


@dataclass(frozen=True)
class S1Config:
    sockets: int = 4000
    systems: tuple[str, ...] = SYSTEMS
    loadgens: int = 2
    concurrency: int = 100
    settle_s: float = 3.0
    close_settle_s: float = 15.0  # past a node's collector settling after closes (10 steps of 1 s)
    idle_s: float = 5.0
    loadgen_nice: int = 0


def stall_figures(prefix: str, before: dict[float, float], after: dict[float, float]) -> Figures:
    """From two reads of a histogram of pauses (bucket bound -> cumulative count): how many it
    counted between them, how many of those were over 20 ms, and the bound of the worst one's
    bucket."""
    grew = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
    count = grew.get(math.inf, 0.0)
    worst = min((bound for bound, seen in grew.items() if seen >= count), default=math.inf)
    return {f"{prefix}_count": int(count), f"{prefix}_over_20ms": int(count - grew.get(STALL_S, 0.0)),
            f"{prefix}_worst_le_s": worst}


def pause_figures(phase: str, before: dict[str, dict[float, float]] | None,
                  after: dict[str, dict[float, float]] | None) -> Figures:
    """The loop's stalls and the collector's passes between two reads of the nodes' histograms
    (none for a system that exports neither)."""
    if before is None or after is None:
        return {}
    return (stall_figures(f"{phase}stalls", before[LAG], after[LAG])
            | stall_figures(f"{phase}busy", before[BUSY], after[BUSY])
            | stall_figures(f"{phase}gc", before[GC], after[GC]))


def memory_figures(sockets: int, rss_before: int, rss_after: int, redis_before: int,
                   redis_after: int) -> Figures:
    per = max(sockets, 1)
    return {"rss_before_mb": rss_before / 2**20, "rss_after_mb": rss_after / 2**20,
            "kb_per_socket": (rss_after - rss_before) / per / 1000,
            "redis_kb_per_socket": (redis_after - redis_before) / per / 1000}


async def run_system(system: str, config: S1Config, workdir: Path) -> Figures:
    # A node accepts 500 new sockets a second by default (HTTP 429 beyond): S1 opens them as fast
    # as the peers take them, which is not what it measures.
    async with deployed(system, workdir, config.loadgens, chorus_env={"NEW_CONNECTIONS_PER_SECOND": "0"},
                        loadgen_nice=config.loadgen_nice) as (dep, loadgens):
        await asyncio.sleep(1.0)  # let start-up allocations settle
        servers, redis = dep.server_pids, [dep.redis_pid]
        rss_before, redis_before = rss_bytes(servers), rss_bytes(redis)
        devices = [dep.device(f"u{i // 2}", i % 2) for i in range(config.sockets)]
        pauses_start = await asyncio.to_thread(dep.histograms, LAG, BUSY, GC)
        opened = await open_devices(loadgens, devices, config.concurrency)
        await asyncio.sleep(config.settle_s)
        rss_after, redis_after = rss_bytes(servers), rss_bytes(redis)
        idle_before, pauses_before = cpu_s(servers), await asyncio.to_thread(dep.histograms, LAG, BUSY, GC)
        await asyncio.sleep(config.idle_s)
        idle_cpu_s = cpu_s(servers) - idle_before
        pauses_after = await asyncio.to_thread(dep.histograms, LAG, BUSY, GC)
        stalls = (pause_figures("open_", pauses_start, pauses_before)
                  | pause_figures("", pauses_before, pauses_after))
        if dep.cluster is not None:  # the first node drained (SIGTERM) with its half of the sockets
            stalls |= await drained(dep.cluster.nodes[0])
            pauses_after = await asyncio.to_thread(dep.histograms, LAG, BUSY, GC)  # the other node's alone
        # The sockets closed at once, as in a client fleet's restart: the collector's steps (and
        # any full pass they make) follow the closes.
        await asyncio.gather(*(gen.close() for gen in loadgens))
        await asyncio.sleep(config.close_settle_s)
        pauses_closed = await asyncio.to_thread(dep.histograms, LAG, BUSY, GC)
        stalls |= pause_figures("close_", pauses_after, pauses_closed)
        figures: Figures = {**opened_figures(system, opened),
                            "sockets_per_s": opened["ok"] / max(opened["open_s"], 1e-9),
                            "idle_cpu_pct": idle_cpu_s / config.idle_s * 100, **stalls}
        figures |= memory_figures(opened["ok"], rss_before, rss_after, redis_before, redis_after)
        print(f"  {system}: {opened['ok']} sockets in {opened['open_s']:.1f} s, "
              f"{figures['kb_per_socket']:.1f} KB per socket", file=sys.stderr, flush=True)
        return figures


async def drained(node: Proc) -> Figures:
    """SIGTERM a Chorus node and wait for it to exit: its drain (every socket told to reconnect
    elsewhere over DRAIN_SECONDS, then closed) as the node logs it on the way out, with its
    event loop's stalls meanwhile (its /metrics are gone by then)."""
    began = time.monotonic()
    node.terminate()
    await asyncio.to_thread(node.wait, DRAIN_TIMEOUT_S)
    record = node.records("drained")[-1]
    return {"drain_s": time.monotonic() - began, "drained": record["drained"], "drain_left": record["left"],
            "drain_stalls_count": record["stall_ticks"], "drain_stalls_over_20ms": record["stalls_over_20ms"],
            "drain_stalls_worst_le_s": record["worst_stall_le_s"], "drain_busy_count": record["stall_ticks"],
            "drain_busy_over_20ms": record["busy_stalls_over_20ms"],
            "drain_busy_worst_le_s": record["worst_busy_stall_le_s"]}


async def s1(config: S1Config, workdir: Path) -> Figures:
    return await each_system(config.systems, lambda system: run_system(system, config, workdir))


def arguments(parser: argparse.ArgumentParser) -> None:
    def chosen(value: str) -> tuple[str, ...]:
        try:
            return systems(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parser.add_argument("--sockets", type=int, default=4000, help="idle sockets per system")
    parser.add_argument("--systems", type=chosen, default=SYSTEMS, help=",".join(SYSTEMS))
    parser.add_argument("--loadgens", type=int, default=2, help="load-generator processes")
    parser.add_argument("--concurrency", type=int, default=100, help="sockets being opened at once")
    parser.add_argument("--idle-s", type=float, default=5.0, help="seconds of idle CPU measured")
    parser.add_argument("--loadgen-nice", type=int, default=0,
                        help="the load generators' niceness: 10 leaves the servers a core when both want one")


def render(f: Figures, config: S1Config) -> str:
    def over(r: Figures, key: str) -> str:
        worst_ms = r[f"{key}_worst_le_s"] * 1000
        return f"{r[f'{key}_over_20ms']} of {r[f'{key}_count']}, worst <= {worst_ms:g} ms"

    def stalls(r: Figures, phase: str) -> str:
        if f"{phase}stalls_count" not in r:
            return "n/a"
        return f"{loop(r, phase)}; GC {over(r, f'{phase}gc')}"

    def loop(r: Figures, phase: str) -> str:
        return (f"loop {over(r, f'{phase}stalls')} (own work: {r[f'{phase}busy_over_20ms']}, "
                f"worst <= {r[f'{phase}busy_worst_le_s'] * 1000:g} ms)")

    def drain(r: Figures) -> str:
        if "drained" not in r:
            return "n/a"
        return f"{r['drained']} in {r['drain_s']:.1f} s ({r['drain_left']} left); {loop(r, 'drain_')}"

    rows = [[s, f"{r['sockets']}", f"{r['open_s']:.1f}", f"{r['sockets_per_s']:.0f}",
             f"{r['rss_before_mb']:.1f}", f"{r['rss_after_mb']:.1f}", f"{r['kb_per_socket']:.1f}",
             f"{r['redis_kb_per_socket']:.2f}", f"{r['idle_cpu_pct']:.2f}", stalls(r, "open_"),
             stalls(r, ""), drain(r), stalls(r, "close_")]
            for s, r in f["systems"].items()]
    header = ["system", "sockets", "open s", "opened/s", "RSS 0 MB", "RSS N MB", "KB/socket",
              "Redis KB/socket", "idle CPU %", "over 20 ms: opening", "idle", "drain of server 1", "closing"]
    title = (f"S1 idle sockets: {config.sockets} authenticated sockets per system "
             f"({config.sockets // 2} users x 2, one device on each server process), "
             f"{config.concurrency} opening at once")
    return report(f, title, [], header, rows,
                  "RSS: both server processes together; idle CPU: both, % of one core over "
                  f"{config.idle_s:g} s with the sockets open; over 20 ms: the ticks of the nodes' 25 ms "
                  "loop-lag timer that ran over 20 ms late, and the garbage collector's passes over 20 ms "
                  "(Chorus exports both; 'own work': of those ticks, the ones late by over 20 ms counting "
                  "at most the CPU time the node's loop used since the tick before, the rest of a stall "
                  "being time it waited for a CPU), while the sockets opened (and settled), while idle, "
                  "while Chorus's first node drained on SIGTERM (its half of the sockets told to reconnect "
                  "elsewhere over DRAIN_SECONDS and closed, as the node logs it on the way out), and as all "
                  "the rest closed at once (and settled)")


async def main(args: argparse.Namespace, workdir: Path) -> tuple[Figures, str]:
    config = S1Config(sockets=args.sockets, systems=args.systems, loadgens=args.loadgens,
                      concurrency=args.concurrency, idle_s=args.idle_s, loadgen_nice=args.loadgen_nice)
    figures = {"config": asdict(config), **await s1(config, workdir)}
    return figures, render(figures, config)
