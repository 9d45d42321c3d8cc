"""S2, fan-out side by side: ``python -m loadtest.bench s2``.

    python -m loadtest.bench s2                                    # 2,000 users x 2 devices, all systems
    python -m loadtest.bench s2 --users 200 --rates 1000 --step-s 3 --systems chorus,raw-probe
    python -m loadtest.bench s2 --json --plot /tmp/s2-plots

Per system (``common.SYSTEMS``, one after the other, each with a fresh Redis): two server
processes, ``--users`` users with device A on process 1 and device B on process 2, held by
``--loadgens`` load-generator processes. Then per offered rate, a publisher process
(``loadtest/peers/publisher.py``, or ``node/publisher.js``) publishes events of ``--payload-bytes``
to random users for ``--step-s`` seconds through the system's own path (Chorus: ``RedisBroker.
publish``, the Lua script every producer runs); each event must reach both devices. Figures per
system and rate: deliveries/s (arrivals / first publish to last arrival); missing, duplicate and
misrouted deliveries; p50/p99 latency (the publisher's wall clock inside the event to arrival);
CPU per delivery of the two server processes, of Redis and of the load generators, and the
publisher's CPU per event (psutil user+system over the step and its drain; the publisher's own
``getrusage``). A 1 s step at 1,000 events/s before the first rate warms every system up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.fanout_bench import _pct
from loadtest.peers import install
from loadtest.procs import REPO_ROOT
from loadtest.scenarios.common import (
    SYSTEMS,
    Deployment,
    LoadGen,
    cpu_s,
    deployed,
    each_system,
    open_devices,
    opened_figures,
    report,
    systems,
)

Figures = dict[str, Any]
N_PER_STEP = 10_000_000  # event numbers of step k start at k * this: a late arrival never counts twice


@dataclass(frozen=True)
class S2Config:
    users: int = 2000
    rates: tuple[int, ...] = (2500, 5000, 10000)
    step_s: float = 8.0
    payload_bytes: int = 150
    systems: tuple[str, ...] = SYSTEMS
    loadgens: int = 2
    warmup_rate: int = 1000
    warmup_s: float = 1.0
    drain_timeout_s: float = 15.0
    connect_concurrency: int = 100


def step_figures(*, rate: float, publish_span_s: float, published: int, first_n: int, keys: list[int],
                 latency_ms: list[float], misrouted: int, started_at: float, last_at: float,
                 cpu: dict[str, float]) -> Figures:
    """One step's figures. ``keys`` are arrivals as ``2 * n + slot`` (slot 0/1: device A/B), so
    each published event ``n`` in ``[first_n, first_n + published)`` is due exactly twice, once
    per device. ``cpu`` holds CPU-seconds of ``servers``, ``redis``, ``loadgens``, ``publisher``."""
    counts = Counter(keys)
    low, high = 2 * first_n, 2 * (first_n + published)
    delivered = sum(1 for key in counts if low <= key < high)
    stale = sum(c for key, c in counts.items() if not low <= key < high)  # an earlier step's, late
    expected = 2 * published
    ordered = sorted(latency_ms) or [0.0]
    per_delivery = max(delivered, 1)  # the publish rate below: a slow path shows as under `rate`
    span_s = max(last_at - started_at, 1e-9) if delivered else 0.0
    return {
        "offered_events_per_s": rate, "published": published,
        "publish_rate": published / max(publish_span_s, 1e-9),
        "expected": expected, "delivered": delivered, "missing": expected - delivered,
        "duplicates": sum(c - 1 for key, c in counts.items() if c > 1 and low <= key < high),
        "stale": stale, "misrouted": misrouted, "deliveries_per_s": delivered / span_s if span_s else 0.0,
        "p50_ms": _pct(ordered, 0.50), "p99_ms": _pct(ordered, 0.99), "max_ms": ordered[-1],
        **{f"{part}_cpu_s": cpu[part] for part in ("servers", "redis", "loadgens", "publisher")},
        "server_us_per_delivery": cpu["servers"] / per_delivery * 1e6,
        "redis_us_per_delivery": cpu["redis"] / per_delivery * 1e6,
        "loadgen_us_per_delivery": cpu["loadgens"] / per_delivery * 1e6,
        "publisher_us_per_event": cpu["publisher"] / max(published, 1) * 1e6,
    }


async def _publish(dep: Deployment, config: S2Config, *, rate: float, duration_s: float,
                   first_n: int) -> dict[str, Any]:
    argv, env = dep.publisher(rate=rate, duration_s=duration_s, users=config.users, first_n=first_n,
                              payload_bytes=config.payload_bytes)
    log = dep.workdir / "publisher.log"
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                env={**os.environ, **env})
    out, err = await asyncio.wait_for(proc.communicate(), duration_s * 4 + 60)
    await asyncio.to_thread(_append, log, err)
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"{dep.system} publisher exited {proc.returncode}; "
                           f"see {dep.workdir}/publisher.log")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as log:
        log.write(data)


async def _drain(loadgens: list[LoadGen], expected: int, timeout_s: float) -> None:
    """Wait until every expected delivery arrived, or arrivals stop for 1 s, or the timeout."""
    deadline = time.monotonic() + timeout_s
    last, changed = -1, time.monotonic()
    while time.monotonic() < deadline:
        counts = await asyncio.gather(*(g.ask({"op": "count"}) for g in loadgens))
        arrivals = sum(r["arrivals"] for r in counts)
        if arrivals >= expected:
            return
        if arrivals != last:
            last, changed = arrivals, time.monotonic()
        elif time.monotonic() - changed > 1.0:
            return
        await asyncio.sleep(0.1)


async def step(dep: Deployment, loadgens: list[LoadGen], config: S2Config, rate: float, duration_s: float,
               first_n: int, *, during: Callable[[], Awaitable[None]] | None = None,
               servers: list[int] | None = None) -> tuple[Figures, list[dict[str, Any]]]:
    """One rate's step: its figures, and what each load generator took (`during` runs alongside
    the publisher; `servers`: the server processes whose CPU counts, all by default)."""
    await asyncio.gather(*(g.ask({"op": "take"}) for g in loadgens))  # forget stragglers
    servers, redis, gens = servers or dep.server_pids, [dep.redis_pid], [g.pid for g in loadgens]
    before = (cpu_s(servers), cpu_s(redis), cpu_s(gens))
    load = os.getloadavg()[0]
    publishing = _publish(dep, config, rate=rate, duration_s=duration_s, first_n=first_n)
    if during is None:
        published = await publishing
    else:
        published, _ = await asyncio.gather(publishing, during())
    await _drain(loadgens, 2 * published["published"], config.drain_timeout_s)
    after = (cpu_s(servers), cpu_s(redis), cpu_s(gens))
    taken = await asyncio.gather(*(g.ask({"op": "take"}) for g in loadgens))
    figures = step_figures(
        rate=rate, publish_span_s=published["span_s"], published=published["published"], first_n=first_n,
        keys=[k for t in taken for k in t["keys"]], latency_ms=[x for t in taken for x in t["latency_ms"]],
        misrouted=sum(t["misrouted"] for t in taken), started_at=published["started_at"],
        last_at=max(t["last_at"] for t in taken),
        cpu={"servers": after[0] - before[0], "redis": after[1] - before[1], "loadgens": after[2] - before[2],
             "publisher": published["cpu_s"]})
    figures["publish_errors"] = published.get("errors", 0)
    figures["publish_first_error"] = published.get("first_error", "")
    figures["closed_sockets"] = sum(t["closed"] for t in taken)
    figures["load_before"] = load
    return figures, taken


async def run_system(system: str, config: S2Config, workdir: Path) -> Figures:
    async with deployed(system, workdir, config.loadgens) as (dep, loadgens):
        devices = [dep.device(f"u{u}", slot) for u in range(config.users) for slot in (0, 1)]
        opened = await open_devices(loadgens, devices, config.connect_concurrency)
        figures: Figures = {**opened_figures(system, opened), "steps": []}
        if opened["refused"]:
            return figures
        await step(dep, loadgens, config, config.warmup_rate, config.warmup_s, 0)
        for index, rate in enumerate(config.rates, start=1):
            try:
                row, _ = await step(dep, loadgens, config, rate, config.step_s, index * N_PER_STEP)
            except (RuntimeError, TimeoutError) as exc:  # keep the rates measured so far
                figures["step_error"] = f"@ {rate}/s: {exc!r}"[:2000]
                break
            figures["steps"].append(row)
            print(f"  {system} @ {rate}/s: {row['deliveries_per_s']:.0f} deliveries/s, missing "
                  f"{row['missing']}, p99 {row['p99_ms']:.1f} ms, server "
                  f"{row['server_us_per_delivery']:.1f} us/delivery", file=sys.stderr, flush=True)
        return figures


async def s2(config: S2Config, workdir: Path) -> Figures:
    def problems(system: str, result: Figures) -> list[str]:
        found = [f"{system} {result['step_error']}"] if result.get("step_error") else []
        for row in result["steps"]:
            bad = {k: row[k] for k in ("missing", "duplicates", "misrouted", "publish_errors",
                                       "publish_first_error") if row[k]}
            if bad:
                found.append(f"{system} @ {row['offered_events_per_s']}/s: {bad}")
        return found

    return await each_system(config.systems, lambda system: run_system(system, config, workdir), problems)


def _rates(value: str) -> tuple[int, ...]:
    rates = tuple(int(v) for v in value.split(",") if v.strip())
    if not rates or min(rates) < 1:
        raise argparse.ArgumentTypeError(f"positive events/s, comma-separated: {value!r}")
    return rates


def _systems(value: str) -> tuple[str, ...]:
    try:
        return systems(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=2000, help="users, 2 devices each")
    parser.add_argument("--rates", type=_rates, default=(2500, 5000, 10000), help="offered events/s")
    parser.add_argument("--step-s", type=float, default=8.0, help="seconds per rate")
    parser.add_argument("--systems", type=_systems, default=SYSTEMS, help=",".join(SYSTEMS))
    parser.add_argument("--loadgens", type=int, default=2, help="load-generator processes")
    parser.add_argument("--payload-bytes", type=int, default=150)
    parser.add_argument("--plot", type=Path, help="write PNG plots into this directory")


def render(f: Figures, config: S2Config) -> str:
    header = ["system", "offered ev/s", "published/s", "deliveries/s", "missing", "p50 ms", "p99 ms",
              "server us/dlv", "redis us/dlv", "publisher us/ev", "loadgen us/dlv", "load"]
    rows = []
    for system, result in f["systems"].items():
        for r in result["steps"]:
            rows.append([system, f"{r['offered_events_per_s']}", f"{r['publish_rate']:.0f}",
                         f"{r['deliveries_per_s']:.0f}", f"{r['missing']}", f"{r['p50_ms']:.1f}",
                         f"{r['p99_ms']:.1f}", f"{r['server_us_per_delivery']:.1f}",
                         f"{r['redis_us_per_delivery']:.1f}", f"{r['publisher_us_per_event']:.1f}",
                         f"{r['loadgen_us_per_delivery']:.1f}", f"{r['load_before']:.2f}"])
    opened = [f"  {s}: {r['sockets']} sockets opened in {r['open_s']:.1f} s" for s, r in f["systems"].items()]
    title = (f"S2 fan-out: {config.users} users x 2 devices (A on server process 1, B on 2), "
             f"{config.payload_bytes}-byte events to random users, {config.step_s:g} s per rate, "
             f"{config.loadgens} load-generator processes")
    return report(f, title, opened, header, rows,
                  "us/dlv: CPU-microseconds per delivery (psutil user+system over the step and its drain); "
                  "load: 1-min load average before the step")


def plot(figures: Figures, directory: Path) -> list[str]:
    """PNGs of server CPU per delivery and p99 latency against offered rate, drawn by matplotlib
    from the peers venv (``loadtest/peers/plot.py``); returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "s2.json"
    source.write_text(json.dumps(figures))
    argv = [str(install.peers_python()), "-m", "loadtest.peers.plot", str(source), str(directory)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    if done.returncode != 0:
        raise RuntimeError(f"plot failed: {done.stderr[-2000:]}")
    return done.stdout.split()


async def main(args: argparse.Namespace, workdir: Path) -> tuple[Figures, str]:
    config = S2Config(users=args.users, rates=args.rates, step_s=args.step_s,
                      payload_bytes=args.payload_bytes, systems=args.systems, loadgens=args.loadgens)
    figures = {"config": asdict(config), **await s2(config, workdir)}
    if args.plot:
        try:
            figures["plots"] = await asyncio.to_thread(plot, figures, args.plot)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            figures["errors"].append(repr(exc))
    return figures, render(figures, config)
