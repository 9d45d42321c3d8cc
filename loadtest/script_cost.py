"""What a publish costs Redis, piece by piece: ``python -m loadtest.script_cost``.

One fresh Redis (`loadtest.procs.RedisServer`, no subscribers) and Debian's ``redis-benchmark``
sending `--commands` of each kind, `--pipeline` at a time, one kind after the other; Redis CPU
(psutil, user+system of redis-server) over each kind, per command. The kinds: a plain `PUBLISH`
of a ~150-byte payload; `EVALSHA` of a script that only returns, with no arguments and with the
publish script's 16 (4 keys, 12 arguments: each becomes a Lua string); the history append
(`XADD ... MAXLEN ~`) and the seq (`HINCRBY`) alone; and the publish script itself
(`fanout/publish.lua`) on one user. It tells what trimming the script could save against the
goal of issue 14 (Redis CPU per delivery at most 2x a plain PUBLISH's): docs/performance.md.
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
SCRIPT_ARGS = ["1000", "86400", "e1", "", "0", "", "0", "", "", "0"]  # publish.lua's ARGV[3..12]


def kinds(trivial: str, publish: str) -> list[tuple[str, list[str]]]:
    """(what, the command): ``__rand_int__`` is a user among `--users`, drawn per occurrence."""
    keys = ["m:__rand_int__", "h:__rand_int__", "p:__rand_int__", "f:__rand_int__"]
    return [
        ("PUBLISH", ["PUBLISH", "ch:__rand_int__", PAYLOAD]),
        ("EVALSHA `return 1`, no arguments", ["EVALSHA", trivial, "0"]),
        ("EVALSHA `return 1`, 16 arguments", ["EVALSHA", trivial, "4", *keys, "ch:__rand_int__", PAYLOAD,
                                              *SCRIPT_ARGS]),
        ("XADD MAXLEN ~ 1000", ["XADD", "h:__rand_int__", "MAXLEN", "~", "1000", "*", "f", PAYLOAD]),
        ("HINCRBY", ["HINCRBY", "m:__rand_int__", "seq", "1"]),
        # One user: the script's keys must be one user's (its seq is the history's entry id).
        ("publish.lua, one user", ["EVALSHA", publish, "4", "m:1", "h:1", "p:1", "f:1", "ch:1", PAYLOAD,
                                   *SCRIPT_ARGS]),
    ]


def measure(port: int, pid: int, command: list[str], args: argparse.Namespace) -> float:
    """Redis CPU-nanoseconds per command over `args.commands` of `command`."""
    redis_cpu = psutil.Process(pid)
    before: float = sum(redis_cpu.cpu_times()[:2])
    subprocess.run([args.benchmark, "-p", str(port), "-q", "-n", str(args.commands), "-P", str(args.pipeline),
                    "-r", str(args.users), *command], check=True, capture_output=True, timeout=600)
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
            return [(what, measure(server.port, server.proc.pid, command, args))
                    for what, command in kinds(trivial, publish)]
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
    print(f"Redis CPU per command, {args.commands} of each, {args.pipeline} pipelined, no subscribers")
    for what, ns in rows:
        print(f"  {what:<36} {ns / 1000:6.2f} us  {ns / publish_ns:5.1f}x PUBLISH")
    return 0


if __name__ == "__main__":
    sys.exit(main())
