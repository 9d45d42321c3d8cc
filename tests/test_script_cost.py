"""`loadtest.script_cost` against a real Redis and redis-benchmark: every kind is measured, and the
publish script costs Redis more than the parts it is made of cost alone, and less per event when
a call carries many. And `loadtest.batch_cost`, the publish batch's own code with no Redis."""

from __future__ import annotations

import argparse
import asyncio
import shutil

import pytest

from loadtest import batch_cost
from loadtest.batch_cost import cost_us
from loadtest.script_cost import run


def test_every_kind_is_measured_and_the_script_costs_more_than_a_publish() -> None:
    args = argparse.Namespace(commands=100_000, pipeline=32, users=200, benchmark=shutil.which("redis-benchmark"))
    rows = dict(run(args))
    assert len(rows) == 9 and all(ns > 0 for ns in rows.values()), rows
    assert rows["publish.lua, 1 per call"] > rows["PUBLISH"] + rows["XADD MAXLEN ~ 1000"], rows
    # Many events per call share the call's cost.
    assert rows["publish.lua, 16 per call"] < rows["publish.lua, 1 per call"], rows


async def test_the_batch_cost_benchmark_publishes_every_event_and_prints_a_figure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`loadtest.batch_cost`: its stand-in pipe answers every call, so every publish returns."""
    assert 0 < await asyncio.wait_for(cost_us(publishers=8, each=25), 30) < 1000
    await asyncio.to_thread(batch_cost.main, ["--publishers", "4", "--each", "10", "--runs", "1"])
    assert "CPU-µs per publish" in capsys.readouterr().out
