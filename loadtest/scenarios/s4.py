"""S4, a reconnect storm side by side: ``python -m loadtest.bench s4``.

    python -m loadtest.bench s4                                    # 2,000 users x 2 devices, all systems
    python -m loadtest.bench s4 --users 500 --systems chorus,socketio-node --json

Per system (``common.SYSTEMS``, one after the other, each with a fresh Redis), S2's set-up: two
server processes, ``--users`` users with device A on process 1 and device B on process 2, events
published to random users at ``--rate`` through the system's own path. ``--kill-at-s`` into a step
of ``--step-s``, server process 1 is SIGKILLed: every device A loses its socket at once and
connects again at once to process 2 (the load generators retry a refused attempt after 0.2 s,
doubling up to 2 s, ten times). A Chorus device resumes with the last ``seq`` it saw and its
stream's ``epoch``; the peers have no resume over their Redis adapters, so what was published
while a device was away is lost to it. Every event must still reach both devices.

Figures per system: devices dropped and reconnected (failed, if any), the time each took from
noticing the close to being connected again (p50, p99, and the last one: the storm's length),
missing and duplicate deliveries over the step, resyncs (Chorus: history could not fill the gap),
p50/p99 latency of the step's deliveries (a replayed event arrives late: its latency counts from
its publish), and the surviving process's CPU over the step per delivery.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.fanout_bench import _pct
from loadtest.scenarios import s2
from loadtest.scenarios.common import (
    SYSTEMS,
    chorus_env_argument,
    deployed,
    each_system,
    open_devices,
    opened_figures,
    report,
)

Figures = dict[str, Any]


@dataclass(frozen=True)
class S4Config:
    users: int = 2000
    rate: int = 2000
    step_s: float = 8.0
    kill_at_s: float = 2.0
    payload_bytes: int = 150
    systems: tuple[str, ...] = SYSTEMS
    loadgens: int = 2
    connect_concurrency: int = 100
    chorus_env: dict[str, str] = field(default_factory=dict)  # Chorus's settings beyond the defaults

    def fanout(self) -> s2.S2Config:
        return s2.S2Config(users=self.users, rates=(self.rate,), step_s=self.step_s,
                           payload_bytes=self.payload_bytes, systems=self.systems, loadgens=self.loadgens,
                           connect_concurrency=self.connect_concurrency)


def storm_figures(row: Figures, taken: list[dict[str, Any]], dropped: int) -> Figures:
    """A storm step's figures: S2's for the step, and the reconnects the load generators saw."""
    reconnect_ms = sorted(ms for t in taken for ms in t["reconnect_ms"])
    return {
        **row, "dropped": dropped, "reconnected": len(reconnect_ms),
        "reconnect_failed": sum(t["reconnect_failed"] for t in taken),
        "resyncs": sum(t["resyncs"] for t in taken),
        "reconnect_p50_ms": _pct(reconnect_ms, 0.50) if reconnect_ms else 0.0,
        "reconnect_p99_ms": _pct(reconnect_ms, 0.99) if reconnect_ms else 0.0,
        "all_back_ms": reconnect_ms[-1] if reconnect_ms else 0.0,
    }


async def run_system(system: str, config: S4Config, workdir: Path) -> Figures:
    fanout = config.fanout()
    async with deployed(system, workdir, config.loadgens, chorus_env=config.chorus_env) as (dep, loadgens):
        devices = []
        for u in range(config.users):
            user = f"u{u}"
            devices.append({**dep.device(user, 0), "fallback": dep.device(user, 0, server=1)["url"]})
            devices.append(dep.device(user, 1))
        opened = await open_devices(loadgens, devices, config.connect_concurrency)
        figures = opened_figures(system, opened)
        if opened["refused"]:
            return figures
        await s2.step(dep, loadgens, fanout, fanout.warmup_rate, fanout.warmup_s, 0)
        survivor = dep.server_pids[1]

        async def kill() -> None:
            await asyncio.sleep(config.kill_at_s)
            await asyncio.to_thread(dep.kill_server, 0)

        row, taken = await s2.step(dep, loadgens, fanout, config.rate, config.step_s, s2.N_PER_STEP,
                                   during=kill, servers=[survivor])
        figures |= storm_figures(row, taken, dropped=config.users)
        print(f"  {system}: {figures['reconnected']}/{config.users} back, the last after "
              f"{figures['all_back_ms']:.0f} ms; missing {figures['missing']}, duplicates "
              f"{figures['duplicates']}", file=sys.stderr, flush=True)
        return figures


async def s4(config: S4Config, workdir: Path) -> Figures:
    def problems(system: str, result: Figures) -> list[str]:
        bad = {k: result[k] for k in ("reconnect_failed", "misrouted", "publish_errors") if result.get(k)}
        if "dropped" in result and result["reconnected"] + result["reconnect_failed"] != result["dropped"]:
            bad["unaccounted"] = result["dropped"] - result["reconnected"] - result["reconnect_failed"]
        return [f"{system}: {bad}"] if bad else []

    return await each_system(config.systems, lambda system: run_system(system, config, workdir), problems)


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=2000, help="users, 2 devices each")
    parser.add_argument("--rate", type=int, default=2000, help="offered events/s during the storm")
    parser.add_argument("--step-s", type=float, default=8.0, help="seconds of publishing")
    parser.add_argument("--kill-at-s", type=float, default=2.0, help="when server process 1 is killed")
    parser.add_argument("--systems", type=s2._systems, default=SYSTEMS, help=",".join(SYSTEMS))
    parser.add_argument("--loadgens", type=int, default=2, help="load-generator processes")
    chorus_env_argument(parser, "NEW_CONNECTIONS_PER_SECOND=0")


def render(f: Figures, config: S4Config) -> str:
    header = ["system", "dropped", "back", "never", "p50 ms", "p99 ms", "last ms", "missing", "dup",
              "resyncs", "dlv p99 ms", "survivor us/dlv"]
    rows = [[system, f"{r['dropped']}", f"{r['reconnected']}", f"{r['reconnect_failed']}",
             f"{r['reconnect_p50_ms']:.0f}", f"{r['reconnect_p99_ms']:.0f}", f"{r['all_back_ms']:.0f}",
             f"{r['missing']}", f"{r['duplicates']}", f"{r['resyncs']}", f"{r['p99_ms']:.0f}",
             f"{r['server_us_per_delivery']:.1f}"]
            for system, r in f["systems"].items() if "dropped" in r]
    title = (f"S4 reconnect storm: {config.users} users x 2 devices; {config.rate} events/s to random users "
             f"for {config.step_s:g} s; server process 1 SIGKILLed after {config.kill_at_s:g} s, its "
             f"{config.users} devices reconnect at once to process 2"
             + (f"; Chorus with {config.chorus_env}" if config.chorus_env else ""))
    return report(f, title, [], header, rows,
                  "p50/p99/last ms: from a device noticing its socket closed to its next socket being ready "
                  "(Chorus: hello); missing/dup: deliveries over the whole step (each event is due on both "
                  "devices); dlv p99: publish to arrival; survivor us/dlv: process 2's CPU per delivery")


async def main(args: argparse.Namespace, workdir: Path) -> tuple[Figures, str]:
    config = S4Config(users=args.users, rate=args.rate, step_s=args.step_s, kill_at_s=args.kill_at_s,
                      systems=args.systems, loadgens=args.loadgens, chorus_env=dict(args.chorus_env))
    figures = {"config": asdict(config), **await s4(config, workdir)}
    return figures, render(figures, config)
