"""The soak (loadtest/soak.py) for half a minute: users chat from 2-3 devices each, on both nodes
and through nginx, while nodes are SIGKILLed and drained, Redis restarts with its data and the
worker is SIGKILLed; afterwards no device has a gap, a duplicate or a transcript that differs
from its siblings', every acked send's run ended, and every completed run's tokens add up.

Then the opt-in lossy fault alone, for 20 s: Redis restarted from its last SAVE, losing what was
written since. Devices resync; each answer in flight comes back whole (`run.resumed`), a run whose
last tokens were lost is shown whole before its end, and a run whose end was lost, or skipped by a
resync, gets it again from the worker's sweep.

A cluster of the test's own (the soak starts it), running the built-in demo model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.soak import FAULTS, SoakConfig, run_soak


@pytest.mark.timeout(300)
async def test_thirty_seconds_of_chat_under_every_fault_lose_and_double_nothing(tmp_path: Path) -> None:
    config = SoakConfig(seconds=30, users=4, fault_every_s=4, settle_s=90, seed=7)
    report = await run_soak(config, tmp_path)
    print("\n" + report.render())
    assert sorted(report.faults) == sorted(FAULTS), "every kind of fault was injected"
    assert report.sends_acked >= 10 and report.run_ends["run.completed"] >= 10
    assert report.events_checked >= 1000
    assert report.reconnects >= 4, "the faults really cut sockets"
    assert report.gaps == 0
    assert report.duplicates == 0
    assert report.mismatched == []
    assert report.sends_unacked == []


@pytest.mark.timeout(300)
async def test_twenty_seconds_of_redis_losing_its_last_writes_leave_every_device_whole(tmp_path: Path) -> None:
    config = SoakConfig(seconds=20, users=4, fault_every_s=4, settle_s=90, seed=11, faults=("redis_lossy",))
    report = await run_soak(config, tmp_path)
    print("\n" + report.render())
    assert report.faults["redis_lossy"] >= 3
    assert report.sends_acked >= 10 and report.run_ends["run.completed"] >= 10
    assert report.resyncs >= 1, "writes were lost and devices were told"
    assert report.gaps == 0
    assert report.duplicates == 0
    assert report.mismatched == []
    assert report.sends_unacked == []
