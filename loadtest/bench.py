"""Scenario benchmarks: ``python -m loadtest.bench SCENARIO [options]``.

    python -m loadtest.bench s3                                   # agent runs at 1, 10, 50 at once
    python -m loadtest.bench s3 --chunks 200 --concurrency 1,5 --json

A scenario is an entry of ``SCENARIOS``: its options, and a run returning its figures (a dict) and
its table. ``main`` prints the table, or with ``--json`` the figures as JSON on stdout and the table
on stderr. S1 (idle sockets) and S2 (fan-out), Chorus side by side with its peers, are in
``loadtest/scenarios/``, as are S4 (a reconnect storm) and S5 (slow consumers).

S3, agent runs: what Chorus adds between a model and a device. ``loadtest.llm_server`` (its own
process) streams ``--chunks`` one-token chunks with no delay. Per concurrency level, first the
baseline: that many ``ChatOpenAI.astream`` calls at once in this process, built by the worker's own
``agent_worker.model.build_chat_model``. Then the same answers through Chorus: a ``LocalCluster``
(one node, one worker, no nginx) whose worker points ``LLM_BASE_URL`` at the server, one device per
run (distinct users, so the per-user run limit never bites), all sends at once. Every answer is
checked: the text a device shows and the ``run.completed`` text must both equal the expected answer,
with no gap or duplicate. Figures, all on one clock (``time.time()``, one machine):

- token rate: model chunks delivered per second over all runs of a level (first send or request
  start to the last token arriving); Chorus coalesces chunks into fewer events, so the chunks are
  counted in the delivered text, not as events;
- time to first token: Chorus from the send's ack to the run's first ``token`` event on the device,
  bare from the request's start to the first chunk with text; "added" is the difference of the
  two at p50 and at p99; and send -> the model request arriving at the server;
- where the first token's time goes (p50 of each leg): send -> ack (the node), ack -> the model
  request (queue, claim, history, graph), that request -> the first `token` event's publish
  (its ``ts``: the model's first chunk through LangGraph and the worker's loop), publish -> device;
- CPU per token: the worker's user+system time (its process tree, psutil) over the Chorus phase,
  against this process's own CPU (``time.process_time``) over the bare phase; the node's too.

``--worker-processes N`` passes ``WORKER_PROCESSES=N`` to the worker and reports what it shows (its
``/readyz`` and its process tree), whether or not it supports the setting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from chorus_client.testing import RecordingClient as ChorusClient
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage

from agent_worker.model import ModelConfig, build_chat_model
from loadtest.cluster import ClusterConfig, LocalCluster
from loadtest.fanout_bench import machine
from loadtest.llm_server import expected_answer
from loadtest.procs import Proc, free_port, wait_http_ok
from loadtest.scenarios import s1, s2, s4, s5
from protocol import Event, FrameType

Figures = dict[str, Any]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values) or [0.0]
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _tree_cpu_s(pid: int) -> float:
    """User+system CPU-seconds of a process, its reaped children and its live descendants."""
    try:
        root = psutil.Process(pid)
        t = root.cpu_times()
        total: float = t.user + t.system + t.children_user + t.children_system
        for child in root.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                c = child.cpu_times()
                total += c.user + c.system
        return total
    except psutil.NoSuchProcess:
        return 0.0


# -- S3: agent runs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Config:
    chunks: int = 2000
    levels: tuple[int, ...] = (1, 10, 50)
    worker_concurrency: int = 64
    worker_processes: int | None = None  # passed as WORKER_PROCESSES; the worker may ignore it
    batch: int = 16  # chunks per write of the LLM server
    run_timeout_s: float = 300.0


@dataclass
class RunTimes:
    """One run's moments (wall clock): `start` is the send (Chorus) or the request (bare)."""

    key: str  # the text sent: the LLM server files the request's arrival under it
    start: float
    first: float  # first text: the first `token` event, or the first chunk with text
    last: float  # the last text arrived
    arrived: float  # the model request reached the server
    acked: float = 0.0  # Chorus only: the send's ack
    published: float = 0.0  # Chorus only: the first `token` event's `ts` (the worker's publish, in ms)
    ended: float = 0.0  # Chorus only: `run.completed`


class TimedClient(ChorusClient):
    """The reference client, noting when each run's first and last `token` arrived (and its `ts`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.first_token: dict[str, float] = {}
        self.first_published: dict[str, float] = {}
        self.last_token: dict[str, float] = {}

    def record(self, frame: dict[str, Any]) -> None:
        if frame.get("type") == FrameType.EVENT and frame.get("event") == Event.TOKEN:
            now, run = time.time(), frame["run"]
            if run not in self.first_token:
                self.first_token[run], self.first_published[run] = now, frame["ts"] / 1000
            self.last_token[run] = now
        super().record(frame)


async def _bare(model: BaseChatModel, texts: list[str], expected: str) -> tuple[list[RunTimes], list[str]]:
    """`len(texts)` astream calls at once; returns their times (arrival filled later) and errors."""

    async def one(text: str) -> RunTimes | str:
        start = time.time()
        first, parts = 0.0, []
        async for chunk in model.astream([HumanMessage(text)]):
            if chunk.content:
                first = first or time.time()
                parts.append(str(chunk.content))
        if "".join(parts) != expected:
            return f"bare {text!r}: {len(parts)} chunks, text differs from the expected answer"
        return RunTimes(key=text, start=start, first=first, last=time.time(), arrived=0.0)

    results = await asyncio.gather(*(one(text) for text in texts))
    return [r for r in results if isinstance(r, RunTimes)], [r for r in results if isinstance(r, str)]


async def _chorus(clients: list[TimedClient], texts: list[str], expected: str,
                  timeout_s: float) -> tuple[list[RunTimes], list[str]]:
    """One send per device at once; waits for every `run.completed` and checks every answer."""

    async def one(client: TimedClient, text: str) -> RunTimes | str:
        start = time.time()
        ack = await client.send(text, timeout_s=30)
        acked, run = time.time(), ack["run"]
        end = await client.wait_run_end(run, timeout_s)
        ended = time.time()
        shown, stored = client.run_text(run), end["data"].get("text")
        if end["event"] != Event.RUN_COMPLETED or shown != expected or stored != expected:
            return (f"run {run}: {end['event']}, shown {len(shown.split())} chunks, stored "
                    f"{len((stored or '').split())}, expected {len(expected.split())} "
                    f"(error: {end['data'].get('error')})")
        if client.gaps or client.duplicates:
            return f"run {run}: gaps {client.gaps}, duplicates {client.duplicates}"
        return RunTimes(key=text, start=start, first=client.first_token[run], last=client.last_token[run],
                        arrived=0.0, acked=acked, published=client.first_published[run], ended=ended)

    results = await asyncio.gather(*(one(c, t) for c, t in zip(clients, texts, strict=True)))
    return [r for r in results if isinstance(r, RunTimes)], [r for r in results if isinstance(r, str)]


def _level_figures(prefix: str, runs: list[RunTimes], tokens: int, cpu_s: float,
                   ttft_from: Callable[[RunTimes], float]) -> Figures:
    span_s = max(max(r.last for r in runs) - min(r.start for r in runs), 1e-9) if runs else 0.0
    ttft_ms = [(r.first - ttft_from(r)) * 1000 for r in runs]
    to_llm_ms = [(r.arrived - r.start) * 1000 for r in runs]
    return {
        f"{prefix}_tokens_per_s": tokens / span_s if runs else 0.0,
        f"{prefix}_ttft_p50_ms": _pct(ttft_ms, 0.5), f"{prefix}_ttft_p99_ms": _pct(ttft_ms, 0.99),
        f"{prefix}_to_llm_p50_ms": _pct(to_llm_ms, 0.5), f"{prefix}_to_llm_p99_ms": _pct(to_llm_ms, 0.99),
        f"{prefix}_cpu_s": cpu_s, f"{prefix}_cpu_us_per_token": cpu_s / max(tokens, 1) * 1e6,
    }


def _s3_row(level: int, chunks: int, bare: list[RunTimes], chorus: list[RunTimes],
            cpu_s: dict[str, float]) -> Figures:
    """One concurrency level's figures (runs that failed their check are left out)."""
    tokens_bare, tokens_chorus = chunks * len(bare), chunks * len(chorus)
    row: Figures = {"concurrency": level, "runs_ok": len(chorus), "bare_runs_ok": len(bare)}
    row |= _level_figures("bare", bare, tokens_bare, cpu_s["bare"], lambda r: r.start)
    row |= _level_figures("chorus", chorus, tokens_chorus, cpu_s["chorus"], lambda r: r.acked)
    # Where the first token's time goes, p50 of each leg: the node accepting the send, the worker
    # taking the run to the model, the model's first chunk through LangGraph to the worker's
    # publish, and the fan-out to the device (`ts` has millisecond resolution).
    for leg in _LEGS:
        since, until = leg.split("_to_")
        ms = [(getattr(r, _MOMENT[until]) - getattr(r, _MOMENT[since])) * 1000 for r in chorus]
        row[f"chorus_{leg}_p50_ms"] = _pct(ms, 0.5)
    row["chorus_answer_p50_ms"] = _pct([(r.ended - r.start) * 1000 for r in chorus], 0.5)
    row["node_cpu_us_per_token"] = cpu_s["node"] / max(tokens_chorus, 1) * 1e6
    row["rate_ratio"] = row["chorus_tokens_per_s"] / max(row["bare_tokens_per_s"], 1e-9)
    row["cpu_ratio"] = row["chorus_cpu_us_per_token"] / max(row["bare_cpu_us_per_token"], 1e-9)
    row["added_ttft_p50_ms"] = row["chorus_ttft_p50_ms"] - row["bare_ttft_p50_ms"]
    row["added_ttft_p99_ms"] = row["chorus_ttft_p99_ms"] - row["bare_ttft_p99_ms"]
    return row


_LEGS = ("send_to_ack", "ack_to_llm", "llm_to_publish", "publish_to_device")
_MOMENT = {"send": "start", "ack": "acked", "llm": "arrived", "publish": "published", "device": "first"}


async def _worker_report(session: aiohttp.ClientSession, cluster: LocalCluster, port: int,
                         requested: int | None) -> str:
    """What the worker shows of WORKER_PROCESSES: its /readyz and its process tree."""
    readyz = f"http://127.0.0.1:{port}/readyz"
    try:
        await asyncio.to_thread(wait_http_ok, readyz, 10)
        async with session.get(readyz) as response:
            said = (await response.text()).strip()
    except (OSError, TimeoutError, aiohttp.ClientError) as exc:
        said = f"unreachable ({exc!r})"
    root = cluster.workers[0].pid
    tree = [root, *(p.pid for p in psutil.Process(root).children(recursive=True))]
    asked = f"WORKER_PROCESSES={requested}" if requested else "WORKER_PROCESSES not set"
    return f"{asked}; worker process tree: {len(tree)} process(es); /readyz: {said}"


async def s3(config: S3Config, workdir: Path) -> Figures:
    expected = expected_answer(config.chunks)
    llm_port = free_port()
    llm = Proc("llm", [sys.executable, "-m", "loadtest.llm_server", "--port", str(llm_port),
                       "--chunks", str(config.chunks), "--batch", str(config.batch)], workdir=workdir)
    llm_url = f"http://127.0.0.1:{llm_port}"
    env = {"LLM_BASE_URL": f"{llm_url}/v1", "LLM_API_KEY": "bench", "LLM_MODEL": "bench-model",
           "WORKER_CONCURRENCY": str(config.worker_concurrency)}
    if config.worker_processes:
        env["WORKER_PROCESSES"] = str(config.worker_processes)
    cluster = LocalCluster(workdir, ClusterConfig(nodes=1, workers=1, nginx=False, env=env))
    health_port = free_port()
    # The worker's own health port, set on its Proc only: in ClusterConfig.env the node would get it too.
    cluster.workers[0].env["INTERNAL_PORT"] = str(health_port)
    model = build_chat_model(ModelConfig(base_url=f"{llm_url}/v1", api_key="bench", model="bench-model"))
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    clients: list[TimedClient] = []
    figures: Figures = {"errors": []}
    try:
        llm.start()
        await asyncio.to_thread(wait_http_ok, f"{llm_url}/healthz", 10, proc=llm)
        await asyncio.to_thread(cluster.start)
        figures["worker_report"] = await _worker_report(session, cluster, health_port,
                                                        config.worker_processes)
        worker_pid, node_pid = cluster.workers[0].pid, cluster.nodes[0].pid
        tag = secrets.token_hex(3)

        async def devices(level: str, count: int) -> list[TimedClient]:
            made = [TimedClient(cluster.ws_url, cluster.token(f"s3-{tag}-{level}-{i}"), session=session,
                                auto_reconnect=False) for i in range(count)]
            clients.extend(made)
            await asyncio.gather(*(c.connect() for c in made))
            return made

        # Warm-up, not measured: the first call of each side pays for imports, pools and graph build.
        # Two runs per worker process, at once, so that each process likely takes one.
        _, errors = await _bare(model, [f"warm {tag}"], expected)
        warm = await devices("warm", 2 * (config.worker_processes or 1))
        warm_texts = [f"warm chorus {tag} {i}" for i in range(len(warm))]
        _, more = await _chorus(warm, warm_texts, expected, config.run_timeout_s)
        await asyncio.gather(*(c.close() for c in warm))
        figures["errors"] += errors + more
        figures["load_before"] = os.getloadavg()[0]
        for level in config.levels:
            texts = [f"s3 {tag} bare c{level} r{i}" for i in range(level)]
            cpu_before = time.process_time()
            bare, errors = await _bare(model, texts, expected)
            bare_cpu_s = time.process_time() - cpu_before

            clients_now = await devices(f"c{level}", level)
            sends = [f"s3 {tag} chorus c{level} r{i}" for i in range(level)]
            worker_cpu_s, node_cpu_s = -_tree_cpu_s(worker_pid), -_tree_cpu_s(node_pid)
            chorus, more = await _chorus(clients_now, sends, expected, config.run_timeout_s)
            worker_cpu_s += _tree_cpu_s(worker_pid)
            node_cpu_s += _tree_cpu_s(node_pid)
            figures["errors"] += errors + more
            await asyncio.gather(*(c.close() for c in clients_now))

            async with session.get(f"{llm_url}/arrivals") as response:
                arrived: dict[str, float] = (await response.json())["arrivals"]
            for run in [*bare, *chorus]:
                if run.key not in arrived:
                    figures["errors"].append(f"the LLM server saw no request for {run.key!r}")
                run.arrived = arrived.get(run.key, run.start)
            row = _s3_row(level, config.chunks, bare, chorus, cpu_s={
                "bare": bare_cpu_s, "chorus": worker_cpu_s, "node": node_cpu_s})
            figures[f"c{level}"] = row
            print(f"  c{level}: bare {row['bare_tokens_per_s']:.0f} tok/s, chorus "
                  f"{row['chorus_tokens_per_s']:.0f} tok/s, {len(more) + len(errors)} errors",
                  file=sys.stderr, flush=True)
        figures["load_after"] = os.getloadavg()[0]
        figures["llm_server_cpu_s"] = _tree_cpu_s(llm.pid)
        return figures
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        await session.close()
        root = getattr(model, "root_async_client", None)
        if root is not None:
            await root.close()
        await asyncio.to_thread(cluster.stop)
        llm.stop()


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, *rows]
    return [" | ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in lines]


def render_s3(f: Figures, config: S3Config) -> str:
    rows = [f[f"c{level}"] for level in config.levels if f"c{level}" in f]

    def pair(r: Figures, key: str) -> str:
        return f"{r[key + '_p50_ms']:.1f} / {r[key + '_p99_ms']:.1f}"

    speed = _table(
        ["runs", "tok/s bare", "tok/s Chorus", "ratio", "CPU us/tok bare", "worker", "ratio", "node us/tok"],
        [[str(r["concurrency"]), f"{r['bare_tokens_per_s']:.0f}", f"{r['chorus_tokens_per_s']:.0f}",
          f"{r['rate_ratio']:.2f}", f"{r['bare_cpu_us_per_token']:.0f}",
          f"{r['chorus_cpu_us_per_token']:.0f}", f"{r['cpu_ratio']:.2f}", f"{r['node_cpu_us_per_token']:.0f}"]
         for r in rows])
    latency = _table(
        ["runs", "TTFT bare", "TTFT Chorus", "added", "send->LLM", "answer p50"],
        [[str(r["concurrency"]), pair(r, "bare_ttft"), pair(r, "chorus_ttft"), pair(r, "added_ttft"),
          pair(r, "chorus_to_llm"), f"{r['chorus_answer_p50_ms']:.0f}"] for r in rows])
    legs = _table(["runs", "send->ack", "ack->LLM", "LLM->publish", "publish->device"],
                  [[str(r["concurrency"]), *(f"{r[f'chorus_{leg}_p50_ms']:.1f}" for leg in _LEGS)]
                   for r in rows])
    errors = f.get("errors", [])
    return "\n".join([
        f"S3 agent runs: {config.chunks} one-token chunks per answer, no delay; 1 node, 1 worker "
        f"(WORKER_CONCURRENCY={config.worker_concurrency}), no nginx, TOKEN_COALESCE_MS default",
        f"  machine        {machine()}",
        f"  load average   {f.get('load_before', 0):.2f} before, {f.get('load_after', 0):.2f} after",
        f"  worker         {f.get('worker_report', '?')}",
        f"  LLM server CPU {f.get('llm_server_cpu_s', 0):.2f} s in all (the load generator's own cost)",
        "", "token rate (chunks of the answer delivered per second, all runs) and CPU per token:", *speed,
        "", "milliseconds, p50 / p99: TTFT bare = request -> first chunk; TTFT Chorus = ack -> first token "
        "event; added = their difference; send->LLM = send -> the request reaching the model server:",
        *latency,
        "", "the first token through Chorus, p50 ms of each leg:", *legs,
        "", f"errors: {len(errors)}", *(f"  {e}" for e in errors[:20]),
    ])


def _levels(value: str) -> tuple[int, ...]:
    levels = tuple(int(v) for v in value.split(",") if v.strip())
    if not levels or len(set(levels)) != len(levels) or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"distinct positive numbers, comma-separated: {value!r}")
    return levels


def _s3_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunks", type=int, default=2000, help="one-token chunks per answer")
    parser.add_argument("--concurrency", type=_levels, default=(1, 10, 50), help="levels, e.g. 1,10,50")
    parser.add_argument("--worker-concurrency", type=int, default=64, help="WORKER_CONCURRENCY")
    parser.add_argument("--worker-processes", type=int, help="WORKER_PROCESSES, if the worker supports it")
    parser.add_argument("--batch", type=int, default=16, help="chunks per write of the LLM server")


async def _s3_main(args: argparse.Namespace, workdir: Path) -> tuple[Figures, str]:
    config = S3Config(chunks=args.chunks, levels=args.concurrency, worker_concurrency=args.worker_concurrency,
                      worker_processes=args.worker_processes, batch=args.batch)
    figures = await s3(config, workdir)
    return {"config": asdict(config), **figures}, render_s3(figures, config)


@dataclass(frozen=True)
class Scenario:
    """One scenario of the command line: its options, and a run that returns (figures, table)."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Path], Coroutine[Any, Any, tuple[Figures, str]]]


SCENARIOS = {
    "s1": Scenario("idle sockets: memory per socket and time to open, Chorus and its peers",
                   s1.arguments, s1.main),
    "s2": Scenario("fan-out: CPU per delivery, loss and latency at offered rates, Chorus and its peers",
                   s2.arguments, s2.main),
    "s3": Scenario("agent runs: Chorus against bare ChatOpenAI.astream", _s3_arguments, _s3_main),
    "s4": Scenario("reconnect storm: a server process killed, its devices back on the other, resuming",
                   s4.arguments, s4.main),
    "s5": Scenario("slow consumers: stalled devices among healthy ones, Chorus and its peers", s5.arguments,
                   s5.main),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="scenario", required=True)
    for name, scenario in SCENARIOS.items():
        sub = subparsers.add_parser(name, help=scenario.help)
        scenario.arguments(sub)
        sub.add_argument("--json", action="store_true", help="figures as JSON on stdout (table on stderr)")
        sub.add_argument("--workdir", type=Path, help="keep the cluster's logs here")
    args = parser.parse_args(argv)
    run = SCENARIOS[args.scenario].run
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chorus-bench-"))
    try:
        import uvloop
    except ImportError:
        figures, table = asyncio.run(run(args, workdir))
    else:
        figures, table = uvloop.run(run(args, workdir))
    print(table, file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps({"scenario": args.scenario, "machine": machine(), **figures}, indent=2))
    if args.workdir is None:
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)
    return 1 if figures["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
