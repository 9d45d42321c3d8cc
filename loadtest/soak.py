"""Soak: a live local cluster under rotating faults while users chat, then every transcript checked.

    python -m loadtest.soak --minutes 10        # or --seconds 30; --help for the knobs

It starts its own `LocalCluster` (two nodes, nginx, one worker; the demo model, or the endpoint
in ``LLM_BASE_URL``/``LLM_API_KEY``/``LLM_MODEL``), connects `users` users with 2-3 reference
clients each (one straight to each node, every other user's third through nginx), and lets each
user chat in one conversation (send from a random connected device, wait for the run's end on
any device, repeat) while a fault loop cycles through:

    node_kill      SIGKILL a node, start it again
    node_term      SIGTERM a node (it drains: `reconnect` + 1012 to every socket), start it again
    redis_restart  restart Redis with its data (`RedisServer.restart(keep_data=True)`: SHUTDOWN SAVE)
    worker_kill    SIGKILL the agent worker, start a new one (its runs resume after their lease)

and, only when asked for with ``--faults``:

    redis_lossy    SAVE, then SIGTERM (which does not save) and start: the writes that land in
                   between (tens of ms of tokens) are lost, as in a Redis crash shortly after a
                   snapshot or AOF fsync. The history's life is over: the publish script starts
                   a new epoch, devices get `resync` (counted, expected here, not a mismatch) and
                   `run.resumed` with each answer in flight, so their transcripts stay whole.
                   A run whose end was lost, or landed before a device resynced past it, gets
                   `run.resumed` and its end published again by the worker's sweep, once per
                   epoch (a device may so see an end twice, telling the same; counted apart).
                   A run whose last tokens were lost has its end refused until the worker has
                   published the whole answer again (`run.resumed`), so it is never shown cut
                   short. CI runs this fault alone for 20 s (tests/test_soak.py).

Then traffic and faults stop, every run seen must end, every device must reach its user's last
seq, and the transcripts are checked:

    gaps           a device received seq N+k (k > 1) after N
    duplicates     a device received a seq at or below one it already had
    mismatched     devices of a user whose event lists differ; a device that stopped short of
                   its user's last seq; a run whose last attempt's tokens do not concatenate to
                   its `run.completed` text; an acked send whose run never ended or whose ack
                   disagrees with its `message.created`; a device told to `resync` (no default
                   fault loses data, so none should be)

The exit status is 1 when any of the three is non-zero; every device's frames are then written to
``<workdir>/transcripts.json``. Also printed, without changing the status: sends the server could
not ack within `SEND_DEADLINE_S`, and node/worker log lines with ERROR or a Traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from chorus_client.testing import ClientError
from chorus_client.testing import RecordingClient as ChorusClient
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from common.keys import Keys
from fanout.redis_broker import RedisBroker
from loadtest.cluster import ClusterConfig, LocalCluster
from protocol import END_EVENTS, ErrorCode, Event, FrameType

FAULTS = ("node_kill", "node_term", "redis_restart", "worker_kill")
OPTIONAL_FAULTS = ("redis_lossy",)
RETRYABLE_CODES = {ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL}  # docs/protocol.md: retry with the same id
SEND_DEADLINE_S = 60.0  # per send, across retries and reconnects
RUN_END_WAIT_S = 60.0  # a user waits this long for its run's end before the next send
SERVER_ERROR = re.compile(r"Traceback|\b(ERROR|CRITICAL)\b")
_LLM_VARS = ("LLM_BASE_URL", "LLM_API_KEY", "LLM_MODEL")
# Short lease and drains so a fault heals in seconds, not the production half-minute.
_CLUSTER_ENV = {"RUN_LEASE_SECONDS": "4", "DRAIN_SECONDS": "2", "WORKER_DRAIN_SECONDS": "5"}


@dataclass
class SoakConfig:
    """What to run: traffic for `seconds`, a fault from `faults` (in a seeded rotation) every
    `fault_every_s`; `llm_env` goes to the workers (empty: the built-in demo model)."""

    seconds: float = 600.0
    users: int = 4
    fault_every_s: float = 6.0
    settle_s: float = 120.0  # after traffic: bound for runs to end and devices to catch up
    llm_env: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    faults: tuple[str, ...] = FAULTS


@dataclass
class SoakReport:
    """What a soak saw; `ok` is the verdict (no gap, no duplicate, nothing mismatched)."""

    seconds: float = 0.0
    devices: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    sends_acked: int = 0
    sends_unacked: list[str] = field(default_factory=list)
    send_retries: int = 0
    run_ends: Counter[str] = field(default_factory=Counter)
    runs_restarted: int = 0
    reconnects: int = 0
    events_checked: int = 0
    gaps: int = 0
    duplicates: int = 0
    resyncs: int = 0
    ends_again: int = 0  # end events a device got again after a resync (lossy faults only)
    mismatched: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.events_checked > 0 and not (self.gaps or self.duplicates or self.mismatched)

    def render(self) -> str:
        faults = ", ".join(f"{kind} {n}" for kind, n in sorted(self.faults.items())) or "none"
        ends = ", ".join(f"{kind.removeprefix('run.')} {n}" for kind, n in sorted(self.run_ends.items()))
        lines = [
            f"soak: {self.seconds:.0f} s of traffic, {self.devices} devices; faults: {faults}",
            f"  sends acked          {self.sends_acked}  (retries {self.send_retries}, "
            f"not acked within {SEND_DEADLINE_S:.0f} s: {len(self.sends_unacked)})",
            f"  runs ended           {sum(self.run_ends.values())}  ({ends or 'none'}; "
            f"restarted by a takeover: {self.runs_restarted})",
            f"  reconnects           {self.reconnects}",
            f"  events checked       {self.events_checked}",
            f"  gaps                 {self.gaps}",
            f"  duplicates           {self.duplicates}",
            f"  resyncs              {self.resyncs}",
            f"  ends told again      {self.ends_again}",
            f"  mismatched           {len(self.mismatched)}",
            f"  server log errors    {len(self.server_errors)}",
        ]
        for title, items in (("mismatched", self.mismatched), ("not acked", self.sends_unacked),
                             ("server log errors", self.server_errors)):
            if items:
                lines.append(f"{title} (first 20):")
                lines += [f"  {item}" for item in items[:20]]
        lines.append("RESULT: " + ("ok" if self.ok else "FAILED"))
        return "\n".join(lines)


@dataclass
class Device:
    user: str
    client: ChorusClient
    route: str  # "node-a", "node-b" or "nginx": where it connects


@dataclass
class Acked:
    user: str
    client_id: str
    text: str
    ack: dict[str, Any]


def is_live(client: ChorusClient) -> bool:
    """Holds an open socket that said hello (every ended socket appends one close code)."""
    return client.hello is not None and len(client.close_codes) < client.connects


async def first_of(clients: list[ChorusClient], predicate: Callable[[ChorusClient], bool],
                   timeout_s: float) -> ChorusClient | None:
    """The first client for which `predicate` holds, waiting up to `timeout_s`; None on timeout."""
    for client in clients:
        if predicate(client):
            return client
    pending = {asyncio.create_task(_holds(c, predicate, timeout_s)) for c in clients}
    try:
        while pending:  # bounded: every task ends by its own timeout
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is None:
                    return task.result()
        return None
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _holds(
    client: ChorusClient, predicate: Callable[[ChorusClient], bool], timeout_s: float
) -> ChorusClient:
    await client.wait_for(lambda: predicate(client), timeout_s)
    return client


class Soak:
    """One soak over a started cluster: `connect`, then `chat` per user and `inject_faults`
    until `stop` is set, then `heal`, `settle` and `check` (which fills `report`)."""

    def __init__(self, config: SoakConfig, cluster: LocalCluster) -> None:
        self.config = config
        self.cluster = cluster
        self.rng = random.Random(config.seed)
        self.report = SoakReport()
        self.devices: dict[str, list[Device]] = {}
        self.acked: list[Acked] = []
        self.final_seq: dict[str, int] = {}  # each user's stream position once traffic stopped
        self.stop = asyncio.Event()

    # Set-up

    def _routes(self, index: int) -> list[tuple[str, str]]:
        node = [(f"node-{chr(ord('a') + i)}", f"ws://127.0.0.1:{port}/ws")
                for i, port in enumerate(self.cluster.node_ports)]
        first, second = node[index % len(node)], node[(index + 1) % len(node)]
        routes = [first, second]
        if index % 2 == 0:
            routes.append(("nginx", self.cluster.ws_url))
        return routes

    async def connect(self) -> None:
        for index in range(self.config.users):
            user = f"soak{index}-{self.rng.getrandbits(32):08x}"
            token = self.cluster.token(user, ttl_s=24 * 3600)
            devices = [Device(user, ChorusClient(url, token, device=f"{route}-{n}"), route)
                       for n, (route, url) in enumerate(self._routes(index))]
            for device in devices:
                await device.client.connect()
            self.devices[user] = devices
        self.report.devices = sum(len(d) for d in self.devices.values())

    # Traffic

    async def chat(self, user: str) -> None:
        clients = [d.client for d in self.devices[user]]
        conversation: str | None = None
        for turn in itertools.count(1):
            if self.stop.is_set():
                return
            client_id = f"{user}-t{turn}"
            text = f"turn {turn} from {user}: tell me about reconnects"
            ack = await self._send(clients, client_id, text, conversation)
            if ack is None:
                self.report.sends_unacked.append(f"{client_id}: no ack within {SEND_DEADLINE_S:.0f} s")
                continue
            conversation = ack["conversation"]
            self.acked.append(Acked(user, client_id, text, ack))
            await first_of(clients, _ended(ack["run"]), RUN_END_WAIT_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.rng.uniform(0, 0.5))

    async def _send(self, clients: list[ChorusClient], client_id: str, text: str,
                    conversation: str | None) -> dict[str, Any] | None:
        """Send from a random live device, retrying with the same id (the idempotency key) after
        any failure, from whichever device is live, until acked or `SEND_DEADLINE_S` passes."""
        deadline = time.monotonic() + SEND_DEADLINE_S
        for attempt in itertools.count():
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            live = [c for c in clients if is_live(c)]
            client = self.rng.choice(live) if live else await first_of(clients, is_live, left)
            if client is None:
                return None
            try:
                return await client.send(text, conversation=conversation, id=client_id,
                                          timeout_s=min(10.0, max(left, 0.1)))
            except (ConnectionError, TimeoutError, aiohttp.ClientError):
                pass  # first: the socket closing before the reply (ConnectionLost) is a ClientError too
            except ClientError as exc:
                if exc.code not in RETRYABLE_CODES:
                    self.report.sends_unacked.append(f"{client_id}: {exc}")
                    return None
            self.report.send_retries += 1
            # Backoff before the retry (the reply was an error or the socket died: no event to await).
            await asyncio.sleep(min(1.0, 0.05 * 2**attempt))
        raise AssertionError("unreachable")

    # Faults

    async def inject_faults(self) -> None:
        order = list(self.config.faults)
        self.rng.shuffle(order)
        for kind in itertools.cycle(order):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.config.fault_every_s)
            if self.stop.is_set():
                return
            started = time.monotonic()
            detail = await asyncio.to_thread(self._inject, kind)
            self.report.faults[kind] += 1
            print(f"  fault {kind:<13} {detail} ({time.monotonic() - started:.1f}s)", flush=True)

    def _inject(self, kind: str) -> str:
        cluster = self.cluster
        if kind in ("node_kill", "node_term"):
            index = self.rng.randrange(len(cluster.nodes))
            if kind == "node_kill":
                cluster.nodes[index].kill()
            cluster.start_node(index)  # a live node is stopped with SIGTERM (its drain) first
            return cluster.nodes[index].name
        if kind in ("redis_restart", "redis_lossy"):
            assert cluster.redis is not None
            if kind == "redis_restart":
                cluster.redis.restart(keep_data=True)
                return "keep_data"
            with SyncRedis.from_url(cluster.redis_url, socket_timeout=30) as client:
                client.save()
            cluster.redis.stop()  # SIGTERM: with snapshots off, what came after the SAVE is gone
            cluster.redis.start()
            return "SAVE, SIGTERM, start"
        live = [w for w in cluster.workers if w.alive]
        for worker in live:
            worker.kill()
        new = cluster.start_worker()
        return f"{'+'.join(w.name for w in live) or 'none'} -> {new.name}"

    def heal(self) -> None:
        """Every node and one worker running, for the settle phase."""
        for index, node in enumerate(self.cluster.nodes):
            if not node.alive:
                self.cluster.start_node(index)
        if not any(w.alive for w in self.cluster.workers):
            self.cluster.start_worker()

    # Settling and checking

    async def settle(self) -> None:
        """Wait (bounded) until every run any device saw or was acked has ended on every device,
        then until every device holds its user's last seq."""
        deadline = time.monotonic() + self.config.settle_s
        runs_by_user: dict[str, set[str]] = {user: set() for user in self.devices}
        for item in self.acked:
            runs_by_user[item.user].add(item.ack["run"])
        for user, devices in self.devices.items():
            for device in devices:
                runs_by_user[user] |= {e["run"] for e in device.client.events if e["run"]}
        waits = []
        for user, devices in self.devices.items():
            for device in devices:
                waits.append(device.client.wait_for(_all_ended(device.client, runs_by_user[user]),
                                                    max(0.1, deadline - time.monotonic())))
        await asyncio.gather(*waits, return_exceptions=True)
        redis = Redis.from_url(self.cluster.redis_url, decode_responses=True)
        try:
            broker = RedisBroker(redis, Keys())
            # Until the streams stand still: the workers' sweep may still publish (a lost run end
            # published again in a new epoch, `redis_lossy`) after the devices reached a position
            # read earlier, and they then rightly go past it.
            while True:
                finals = {user: (await broker.position(user)).seq for user in self.devices}
                waits = [device.client.wait_for(_at_seq(device.client, finals[user]),
                                                max(0.1, deadline - time.monotonic()))
                         for user, devices in self.devices.items() for device in devices]
                await asyncio.gather(*waits, return_exceptions=True)
                now = {user: (await broker.position(user)).seq for user in self.devices}
                self.final_seq = now
                if now == finals or time.monotonic() >= deadline:
                    break
        finally:
            await redis.aclose()

    def check(self) -> None:
        report = self.report
        report.sends_acked = len(self.acked)
        for user, devices in self.devices.items():
            clients = [d.client for d in devices]
            for client in clients:
                report.events_checked += len(client.events)
                report.gaps += len(client.gaps)
                report.duplicates += client.duplicates
                report.reconnects += max(0, client.connects - 1)
                if client.last_seq != self.final_seq.get(user):
                    report.mismatched.append(f"{user}/{client.device}: stopped at seq {client.last_seq}, "
                                             f"the stream is at {self.final_seq.get(user)}")
                for frame in client.frames:
                    if frame["type"] == FrameType.RESYNC:
                        report.resyncs += 1
                        # Only a lost history justifies one; no other fault here may cause it.
                        if "redis_lossy" not in self.config.faults:
                            report.mismatched.append(f"{user}/{client.device}: resync {frame}")
            reference = clients[0]
            lossy = "redis_lossy" in self.config.faults
            for client in clients[1:]:
                if lossy:
                    # Each device resynced at its own moment, so their event lists differ by
                    # design; what they show must not.
                    if client.shown != reference.shown:
                        report.mismatched.append(f"{user}: {client.device} and {reference.device} show "
                                                 "different answers")
                elif comparable(client.events) != comparable(reference.events):
                    report.mismatched.append(f"{user}: {client.device} and {reference.device} differ: "
                                             f"{describe_difference(client, reference)}")
            self._check_runs(user, reference)
        for item in self.acked:
            reference = self.devices[item.user][0].client
            created = [e for e in reference.events if e["event"] == Event.MESSAGE_CREATED
                       and e["data"].get("client_id") == item.client_id]
            run = item.ack["run"]
            if "redis_lossy" in self.config.faults and _resynced(reference):
                # A device resynced into a new epoch gets it replayed from its start: an event it
                # had already taken live comes again, the same (its store applies it once).
                created = list({(e["seq"], e["run"]): e for e in created}.values())
            if len(created) != 1 or (created[0]["seq"], created[0]["run"]) != (item.ack["seq"], run):
                # Under lost writes the event may be gone, or in the head of a new epoch that a
                # resync skipped: the device reads the message over REST (as `resync` says).
                skipped = not created and "redis_lossy" in self.config.faults and _resynced(reference)
                if not skipped:
                    report.mismatched.append(f"{item.client_id}: ack {item.ack} vs created {created}")
            if reference.run_end(run) is None:
                report.mismatched.append(f"{item.client_id}: acked run {run} never ended")

    def _check_runs(self, user: str, client: ChorusClient) -> None:
        by_run: dict[str, list[dict[str, Any]]] = {}
        for event in client.events:
            if event["run"]:
                by_run.setdefault(event["run"], []).append(event)
        for run, events in by_run.items():
            ends = [e for e in events if e["event"] in END_EVENTS]
            # Under lost writes a run's end is published again in each new epoch of the stream
            # (the worker's sweep, `Worker.republish_lost_ends`): a device that had it may get it
            # again after a resync, telling the same end.
            again = "redis_lossy" in self.config.faults and _resynced(client)
            if len(ends) > 1 and not (again and len({_told(e) for e in ends}) == 1):
                self.report.mismatched.append(f"{user} run {run}: {len(ends)} end events")
            self.report.ends_again += len(ends) - 1 if ends else 0
            if not ends:
                self.report.mismatched.append(f"{user} run {run}: never ended")
                continue
            end = ends[0]
            self.report.run_ends[end["event"]] += 1
            starts = [i for i, e in enumerate(events) if e["event"] == Event.RUN_STARTED]
            self.report.runs_restarted += len(starts) > 1
            if end["event"] == Event.RUN_COMPLETED:
                text = client.run_text(run)
                completed = end["data"]["text"]
                if text != completed:
                    self.report.mismatched.append(
                        f"{user} run {run}: tokens {text[:60]!r}... != completed {completed[:60]!r}...")

    def dump(self, path: Path) -> None:
        """Every device's frames and counters, for a post-mortem of a failed soak."""
        devices = [{"user": user, "device": d.client.device, "route": d.route, "connects": d.client.connects,
                    "close_codes": d.client.close_codes, "gaps": d.client.gaps,
                    "duplicates": d.client.duplicates, "frames": d.client.frames}
                   for user, ds in self.devices.items() for d in ds]
        acked = [{"user": a.user, "client_id": a.client_id, "ack": a.ack} for a in self.acked]
        path.write_text(json.dumps({"devices": devices, "acked": acked}, indent=1, default=str))

    def collect_server_errors(self) -> None:
        for proc in [*self.cluster.nodes, *self.cluster.workers]:
            self.report.server_errors += [f"{proc.name}: {line}" for line in proc.log_text().splitlines()
                                          if SERVER_ERROR.search(line)]


def _resynced(client: ChorusClient) -> bool:
    return any(frame["type"] == FrameType.RESYNC for frame in client.frames)


def _told(end: dict[str, Any]) -> tuple[str, str, Any]:
    """What an end event tells a person: how the run ended, with which answer."""
    return end["event"], end["data"].get("text", ""), end["data"].get("message")


def _ended(run: str) -> Callable[[ChorusClient], bool]:
    return lambda client: client.run_end(run) is not None


def _all_ended(client: ChorusClient, runs: set[str]) -> Callable[[], bool]:
    return lambda: all(client.run_end(run) is not None for run in runs)


def _at_seq(client: ChorusClient, seq: int) -> Callable[[], bool]:
    return lambda: client.last_seq == seq


def comparable(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(e["seq"], e["event"], e["run"], e["conversation"], e["data"]) for e in events]


def describe_difference(a: ChorusClient, b: ChorusClient) -> str:
    left, right = comparable(a.events), comparable(b.events)
    for index, (x, y) in enumerate(zip(left, right, strict=False)):
        if x != y:
            return f"first at index {index}: {x[:3]} vs {y[:3]}"
    return f"{len(left)} vs {len(right)} events"


async def run_soak(config: SoakConfig, workdir: Path) -> SoakReport:
    """Start a cluster in `workdir`, soak it for `config.seconds`, stop it, return the report."""
    cluster_config = ClusterConfig(nodes=2, workers=1, nginx=True, env={**_CLUSTER_ENV, **config.llm_env})
    cluster = LocalCluster(workdir, cluster_config)
    await asyncio.to_thread(cluster.start)
    soak = Soak(config, cluster)
    try:
        await soak.connect()
        print(f"soak: {soak.report.devices} devices of {config.users} users connected; cluster in {workdir}",
              flush=True)
        began = time.monotonic()
        chats = [asyncio.create_task(soak.chat(user)) for user in soak.devices]
        faults = asyncio.create_task(soak.inject_faults())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(faults), config.seconds)  # ends early only on a crash
        soak.stop.set()
        soak.report.seconds = time.monotonic() - began
        await faults  # the fault in progress completes (bounded by the cluster's own timeouts)
        await asyncio.gather(*chats)  # each finishes its turn: at most a send deadline + a run wait
        await asyncio.to_thread(soak.heal)
        await soak.settle()
        soak.check()
        if not soak.report.ok:
            soak.dump(workdir / "transcripts.json")
        return soak.report
    finally:
        await asyncio.gather(*(d.client.close() for ds in soak.devices.values() for d in ds),
                             return_exceptions=True)
        await asyncio.to_thread(cluster.stop)
        soak.collect_server_errors()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.split("\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="traffic duration (default 10)")
    length.add_argument("--seconds", type=float, help="traffic duration in seconds")
    parser.add_argument("--users", type=int, default=4, help="users, each with 2-3 devices (default 4)")
    parser.add_argument("--fault-every", type=float, default=6.0, help="seconds between faults (default 6)")
    parser.add_argument("--settle", type=float, default=120.0,
                        help="seconds allowed after traffic for runs to end and devices to catch up")
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help=f"comma-separated, from {', '.join(FAULTS + OPTIONAL_FAULTS)} "
                             "(default: all but redis_lossy)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--workdir", type=Path, help="keep the cluster's data and logs here")
    args = parser.parse_args(argv)
    faults = tuple(kind for kind in args.faults.split(",") if kind)
    unknown = set(faults) - set(FAULTS + OPTIONAL_FAULTS)
    if unknown:
        parser.error(f"unknown faults: {', '.join(sorted(unknown))}")
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes or 10)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    config = SoakConfig(seconds=seconds, users=args.users, fault_every_s=args.fault_every, seed=seed,
                        settle_s=args.settle, faults=faults,
                        llm_env={name: os.environ[name] for name in _LLM_VARS if os.environ.get(name)})
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chorus-soak-"))
    print(f"soak: seed {seed}, {seconds:.0f} s, model: "
          f"{config.llm_env.get('LLM_BASE_URL', 'built-in demo')}", flush=True)
    report = asyncio.run(run_soak(config, workdir))
    print(report.render(), flush=True)
    if args.workdir is None and report.ok:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not report.ok:
        print(f"logs and transcripts.json kept in {workdir}", flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
