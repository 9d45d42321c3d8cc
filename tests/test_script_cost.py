"""`loadtest.script_cost` against a real Redis and redis-benchmark: every kind is measured, and the
publish script costs Redis more than the parts it is made of cost alone, and less per event when
a call carries many."""

from __future__ import annotations

import argparse
import shutil

from loadtest.script_cost import run


def test_every_kind_is_measured_and_the_script_costs_more_than_a_publish() -> None:
    args = argparse.Namespace(commands=100_000, pipeline=32, users=200, benchmark=shutil.which("redis-benchmark"))
    rows = dict(run(args))
    assert len(rows) == 9 and all(ns > 0 for ns in rows.values()), rows
    assert rows["publish.lua, 1 per call"] > rows["PUBLISH"] + rows["XADD MAXLEN ~ 1000"], rows
    # Many events per call share the call's cost.
    assert rows["publish.lua, 16 per call"] < rows["publish.lua, 1 per call"], rows
