"""`common.batching.Coalesced`: the lookups of one loop turn in one call (the store's runs in
flight go through it: tests/test_lifecycle.py; `PublishBatch`, the other user of the same queue,
is tested in tests/test_fanout.py)."""

from __future__ import annotations

import asyncio

from common.batching import Coalesced


async def test_the_keys_asked_in_one_loop_turn_are_fetched_in_one_call() -> None:
    calls: list[list[str]] = []

    async def fetch(keys: list[str]) -> dict[str, str]:
        calls.append(keys)
        await asyncio.sleep(0)
        return {key: key.upper() for key in keys if key != "gone"}

    coalesced = Coalesced(fetch, missing=lambda: "-", max_keys=3)
    got = await asyncio.gather(*(coalesced.get(key) for key in ["a", "b", "a", "gone", "c"]))
    assert got == ["A", "B", "A", "-", "C"]
    assert calls == [["a", "b"], ["gone", "c"]]  # at most 3 asks a call; a key asked twice is fetched once
    assert await coalesced.get("d") == "D"
    assert calls[-1] == ["d"]


async def test_a_failed_fetch_fails_every_caller_of_its_turn_and_not_the_next() -> None:
    failing = True

    async def fetch(keys: list[str]) -> dict[str, int]:
        if failing:
            raise ConnectionError("away")
        return {key: len(key) for key in keys}

    coalesced = Coalesced(fetch, missing=lambda: 0)
    got = await asyncio.gather(coalesced.get("x"), coalesced.get("yy"), return_exceptions=True)
    assert all(isinstance(result, ConnectionError) for result in got), got
    failing = False
    assert await asyncio.gather(coalesced.get("x"), coalesced.get("yy")) == [1, 2]
