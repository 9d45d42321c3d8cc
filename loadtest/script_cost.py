"""What a publish costs Redis, piece by piece: ``python -m loadtest.script_cost``.

One fresh Redis (`loadtest.procs.RedisServer`, no subscribers) and Debian's ``redis-benchmark``
sending `--commands` of each kind, `--pipeline` at a time, one kind after the other; Redis CPU
(psutil, user+system of redis-server) over each kind, per command. The kinds: a plain `PUBLISH`
of a ~150-byte payload; `EVALSHA` of a script that only returns, with no arguments and with the
publish script's 16 (4 keys, 12 arguments: each becomes a Lua string); the history append
(`XADD ... MAXLEN ~`) and the seq (`HINCRBY`) alone; and the publish script itself
(`fanout/publish.lua`) with 1, 4, 16 and 64 events per call, each to a user of its own (the
broker sends a loop turn's publishes as one call: `fanout.publish_batch`). Figures are per event.
It tells what a publish costs Redis against the goal of issue 14 (Redis CPU per delivery at most
2x a plain PUBLISH's): docs/performance.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import psutil
from redis import Redis

from loadtest.procs import RedisServer

PAYLOAD = '{"event":"token","run":"r_0123456789abcdef","text":"' + "x" * 96 + '"}'
OLD_ARGS = ["1000", "86400", "e1", "", "0", "", "0", "", "", "0"]  # the old script's ARGV[3..12]
HEAD = ["1000", "86400", "e1"]  # publish.lua's ARGV[1..3]: history length, TTL, new epoch
BATCHES = (1, 4, 16, 64)  # events per call of publish.lua


def kinds(trivial: str, publish: str) -> list[tuple[str, int, list[str]]]:
    """(what, events per command, the command): ``__rand_int__`` is a user among `--users`, drawn
    per occurrence."""
    keys = ["m:__rand_int__", "h:__rand_int__", "p:__rand_int__", "f:__rand_int__"]
    out = [
        ("PUBLISH", 1, ["PUBLISH", "ch:__rand_int__", PAYLOAD]),
        ("EVALSHA `return 1`, no arguments", 1, ["EVALSHA", trivial, "0"]),
        ("EVALSHA `return 1`, 16 arguments", 1, ["EVALSHA", trivial, "4", *keys, "ch:__rand_int__", PAYLOAD,
                                                 *OLD_ARGS]),
        ("XADD MAXLEN ~ 1000", 1, ["XADD", "h:__rand_int__", "MAXLEN", "~", "1000", "*", "f", PAYLOAD]),
        ("HINCRBY", 1, ["HINCRBY", "m:__rand_int__", "seq", "1"]),
    ]
    for events in BATCHES:  # each event to a user drawn on its own: its keys are one prefix
        users = ["c:{u:__rand_int__}:" for _ in range(events)]
        per_event = [part for _ in range(events) for part in (PAYLOAD, "0")]
        out.append((f"publish.lua, {events} per call", events,
                    ["EVALSHA", publish, str(events), *users, *HEAD, *per_event]))
    return out


def measure(port: int, pid: int, events: int, command: list[str], args: argparse.Namespace) -> float:
    """Redis CPU-nanoseconds per event over `args.commands` events of `command`."""
    redis_cpu = psutil.Process(pid)
    before: float = sum(redis_cpu.cpu_times()[:2])
    subprocess.run([args.benchmark, "-p", str(port), "-q", "-n", str(args.commands // events),
                    "-P", str(args.pipeline), "-r", str(args.users), *command],
                   check=True, capture_output=True, timeout=600)
    after: float = sum(redis_cpu.cpu_times()[:2])
    return (after - before) / int(args.commands) * 1e9  # CPU times tick in 10 ms: send 100,000 or more


def run(args: argparse.Namespace) -> list[tuple[str, float]]:
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(Path(workdir))
        server.start()
        try:
            client = Redis(port=server.port)
            trivial = client.script_load("return 1")
            publish = client.script_load(resources.files("fanout").joinpath("publish.lua").read_text())
            client.close()
            return [(what, measure(server.port, server.proc.pid, events, command, args))
                    for what, events, command in kinds(trivial, publish)]
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=300_000, help="commands of each kind")
    parser.add_argument("--pipeline", type=int, default=32, help="commands in flight (redis-benchmark -P)")
    parser.add_argument("--users", type=int, default=2000, help="users the keys and channels are drawn from")
    parser.add_argument("--benchmark", default=shutil.which("redis-benchmark") or "redis-benchmark",
                        help="the redis-benchmark binary (Debian's redis-tools)")
    args = parser.parse_args(argv)
    rows = run(args)
    publish_ns = rows[0][1]
    print(f"Redis CPU per event, {args.commands} events of each kind, {args.pipeline} commands pipelined, "
          "no subscribers")
    for what, ns in rows:
        print(f"  {what:<36} {ns / 1000:6.2f} us  {ns / publish_ns:5.1f}x PUBLISH")
    return 0


if __name__ == "__main__":
    sys.exit(main())
