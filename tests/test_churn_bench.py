"""`loadtest.churn_bench` end to end, small: a real node, sockets replaced round by round (half of
them aborted), and its figures read back from the node's log and /metrics."""

from __future__ import annotations

import argparse
from pathlib import Path

from loadtest.churn_bench import churn
from loadtest.cluster import ClusterConfig, LocalCluster


async def test_a_small_churn_reports_memory_passes_and_stalls(tmp_path: Path) -> None:
    args = argparse.Namespace(sockets=60, rounds=3, per_round=20, abort_share=0.5, settle_s=1.0)
    config = ClusterConfig(nodes=1, workers=0, nginx=False, env={"NEW_CONNECTIONS_PER_SECOND": "0"})
    with LocalCluster(tmp_path, config) as cluster:
        figures = await churn(cluster, args)
    assert len(figures["rss_mb"]) == 2 and all(mb > 10 for mb in figures["rss_mb"]), figures
    assert figures["stalls_count"] >= 100, "the 25 ms loop-lag timer ticked through ~4 s"
    assert figures["full_passes"] == len(figures["pass_ms"]) and figures["gc_count"] > 0
