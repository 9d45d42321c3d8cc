"""S5, slow consumers among healthy ones, side by side: ``python -m loadtest.bench s5``.

    python -m loadtest.bench s5                                    # 20 busy users, 4 with a stalled phone
    python -m loadtest.bench s5 --systems chorus,socketio-node --json

Per system (``common.SYSTEMS``, one after the other, each with a fresh Redis), S2's set-up with
busy users: ``--users`` users with device A on server process 1 and B on process 2, events of
``--payload-bytes`` published to random users at ``--rate`` for ``--step-s`` (by default 50 events
of 16 KB a second per user, 8 MB for each stalled device over the step: more than loopback's
socket buffers hold, so the server must decide). The first ``--slow-users`` users also have a
third device, alternately on process 1 and 2, that is opened and then never read: a phone on a
stalled network. Whatever the server queues for it is its choice: drop the
socket (Chorus closes it with 4008 past ``SEND_QUEUE_MAX_FRAMES`` and the device resumes later),
or hold it in memory.

Figures per system: the healthy devices' deliveries as in S2 (each event due on A and B: missing,
duplicates, p50/p99 latency, server CPU per delivery), whether the slow sockets were closed by the
server (read after the step until a second of quiet) and how many frames each still held, and the
servers' RSS growth over the step.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.scenarios import s2
from loadtest.scenarios.common import (
    SYSTEMS,
    Deployment,
    chorus_env_argument,
    deployed,
    each_system,
    open_devices,
    opened_figures,
    report,
    rss_bytes,
)

Figures = dict[str, Any]


@dataclass(frozen=True)
class S5Config:
    users: int = 20
    slow_users: int = 4
    rate: int = 1000
    step_s: float = 10.0
    payload_bytes: int = 16_000
    systems: tuple[str, ...] = SYSTEMS
    loadgens: int = 2
    chorus_env: dict[str, str] = field(default_factory=dict)  # Chorus's settings beyond the defaults

    def fanout(self) -> s2.S2Config:
        return s2.S2Config(users=self.users, rates=(self.rate,), step_s=self.step_s,
                           payload_bytes=self.payload_bytes, systems=self.systems, loadgens=self.loadgens)


def devices(dep: Deployment, config: S5Config) -> list[dict[str, Any]]:
    """Every user's devices A and B, and a slow third device for the first `slow_users`."""
    found = [dep.device(f"u{u}", slot) for u in range(config.users) for slot in (0, 1)]
    found += [{**dep.device(f"u{u}", 2, server=u % 2), "slow": True} for u in range(config.slow_users)]
    return found


async def run_system(system: str, config: S5Config, workdir: Path) -> Figures:
    fanout = config.fanout()
    async with deployed(system, workdir, config.loadgens, chorus_env=config.chorus_env) as (dep, loadgens):
        opened = await open_devices(loadgens, devices(dep, config), fanout.connect_concurrency)
        figures = opened_figures(system, opened)
        if opened["refused"]:
            return figures
        await s2.step(dep, loadgens, fanout, fanout.warmup_rate, fanout.warmup_s, 0)
        rss_before = rss_bytes(dep.server_pids)
        row, _ = await s2.step(dep, loadgens, fanout, config.rate, config.step_s, s2.N_PER_STEP)
        rss_after = rss_bytes(dep.server_pids)
        slow = await asyncio.gather(*(g.ask({"op": "slow"}) for g in loadgens))
        figures |= {**row, "slow_sockets": sum(r["sockets"] for r in slow),
                    "slow_closed_by_server": sum(r["closed_by_server"] for r in slow),
                    "slow_frames_held": sum(r["frames"] for r in slow),
                    "rss_growth_mb": (rss_after - rss_before) / 2**20}
        print(f"  {system}: healthy missing {row['missing']}, p99 {row['p99_ms']:.1f} ms; slow closed "
              f"{figures['slow_closed_by_server']}/{figures['slow_sockets']}; RSS "
              f"{figures['rss_growth_mb']:+.1f} MB", file=sys.stderr, flush=True)
        return figures


async def s5(config: S5Config, workdir: Path) -> Figures:
    def problems(system: str, result: Figures) -> list[str]:
        bad = {k: result[k] for k in ("misrouted", "publish_errors") if result.get(k)}
        return [f"{system}: {bad}"] if bad else []

    return await each_system(config.systems, lambda system: run_system(system, config, workdir), problems)


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=20, help="users, 2 healthy devices each")
    parser.add_argument("--slow-users", type=int, default=4, help="users with a third, stalled device")
    parser.add_argument("--rate", type=int, default=1000, help="offered events/s")
    parser.add_argument("--step-s", type=float, default=10.0, help="seconds of publishing")
    parser.add_argument("--payload-bytes", type=int, default=16_000)
    parser.add_argument("--systems", type=s2._systems, default=SYSTEMS, help=",".join(SYSTEMS))
    parser.add_argument("--loadgens", type=int, default=2, help="load-generator processes")
    chorus_env_argument(parser, "SEND_QUEUE_MAX_FRAMES=64")


def render(f: Figures, config: S5Config) -> str:
    header = ["system", "healthy dlv/s", "missing", "dup", "p50 ms", "p99 ms", "server us/dlv",
              "slow closed", "frames held", "RSS growth MB"]
    rows = [[system, f"{r['deliveries_per_s']:.0f}", f"{r['missing']}", f"{r['duplicates']}",
             f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['server_us_per_delivery']:.1f}",
             f"{r['slow_closed_by_server']}/{r['slow_sockets']}", f"{r['slow_frames_held']}",
             f"{r['rss_growth_mb']:+.1f}"]
            for system, r in f["systems"].items() if "slow_sockets" in r]
    title = (f"S5 slow consumers: {config.users} users x 2 healthy devices, {config.slow_users} of them with "
             f"a third device never read; {config.rate} events/s of {config.payload_bytes} bytes to random "
             f"users for {config.step_s:g} s"
             + (f"; Chorus with {config.chorus_env}" if config.chorus_env else ""))
    return report(f, title, [], header, rows,
                  "healthy: devices A and B (missing/dup/latency as in S2); slow closed: stalled sockets the "
                  "server had closed by the end; frames held: what they still had to read; RSS growth: both "
                  "server processes over the step")


async def main(args: argparse.Namespace, workdir: Path) -> tuple[Figures, str]:
    config = S5Config(users=args.users, slow_users=args.slow_users, rate=args.rate, step_s=args.step_s,
                      payload_bytes=args.payload_bytes, systems=args.systems, loadgens=args.loadgens,
                      chorus_env=dict(args.chorus_env))
    figures = {"config": asdict(config), **await s5(config, workdir)}
    return figures, render(figures, config)
