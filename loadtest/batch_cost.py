"""What `fanout.publish_batch.PublishBatch`'s own code costs per publish, with no Redis:
``python -m loadtest.batch_cost``.

A pipe whose every call is answered at once stands in for Redis, so the figure is the batch's
queueing, argument building and answering alone (the publisher's whole path is
`loadtest.publish_bench`'s, whose run-to-run spread on this box, ~10%, hides a change this size).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import uvloop

from fanout.publish_batch import PublishBatch


class AnsweringPipe:
    """Answers every script call at once: each of its events published as seq 1."""

    async def ready(self) -> None:
        return None

    def send(self, verb: str, script: str, keys: int, *rest: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result([1, 1, "e"] * keys)
        return future


async def cost_us(publishers: int, each: int) -> float:
    """CPU-µs per publish, `publishers` tasks publishing `each` events one after another."""
    batch = PublishBatch(AnsweringPipe(), "sha", "script", lambda: [1000, 3600, "e"])  # type: ignore[arg-type]

    async def publisher(user: int) -> None:
        for _ in range(each):
            await batch.publish(f"chorus:{{u:{user}}}:", '{"type":"token"}', [])

    began = time.process_time()
    await asyncio.gather(*(publisher(user) for user in range(publishers)))
    return (time.process_time() - began) / (publishers * each) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.batch_cost",
                                     description="PublishBatch's own CPU per publish, no Redis")
    parser.add_argument("--publishers", type=int, default=256)
    parser.add_argument("--each", type=int, default=400)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    runs = [uvloop.run(cost_us(args.publishers, args.each)) for _ in range(args.runs)]
    print(f"PublishBatch, {args.publishers} publishers x {args.each}: "
          f"{' / '.join(f'{us:.2f}' for us in runs)} CPU-µs per publish (min {min(runs):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
