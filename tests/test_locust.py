"""Locust itself, headless, against the suite's cluster: persons with a device on each node, every
run judged by the oracle inside Locust, two Locust processes (`--processes 2`).

What it shows, from Locust's own CSV and from Postgres:
- runs completed and the oracle judged them (`ORACLE,run` has requests) with zero failures, and no
  other request failed either; every device connected;
- ids do not collide across the two processes: every person sent as a Chorus user of its own
  (distinct users in Postgres = persons spawned), from devices on both nodes. The old locustfile
  numbered users with a module-level counter, which the forked processes share: 6 persons in
  2 processes were then 3 users.
"""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from loadtest.cluster import LocalCluster
from loadtest.procs import REPO_ROOT
from tests.support import unique

LOCUST = Path(sys.executable).with_name("locust")
PERSONS = 6
RUN_S = 15


def stats_rows(prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


@pytest.mark.timeout(90)
async def test_locust_persons_two_nodes_two_processes(cluster: LocalCluster, tmp_path: Path) -> None:
    if not LOCUST.exists():
        pytest.skip(f"no locust next to {sys.executable}")
    prefix = unique("lt")
    env = {
        **os.environ,
        "CHORUS_TOKEN_SECRET": cluster.config.jwt_secret,
        "CHORUS_NODE_URLS": ",".join(cluster.node_ws_urls),
        "CHORUS_USER_PREFIX": prefix,
        "CHORUS_SEND_EVERY_S": "1",
        "CHORUS_RUN_TIMEOUT_S": "8",
    }
    report = tmp_path / "locust"
    argv = [
        str(LOCUST), "-f", str(REPO_ROOT / "loadtest" / "locustfile.py"), "--headless",
        "-u", str(PERSONS), "-r", str(PERSONS), "-t", f"{RUN_S}s", "--processes", "2",
        "--host", cluster.ws_url, "--csv", str(report), "--only-summary",
    ]  # fmt: skip
    # No --stop-timeout: with --processes the master waits only 0.5 s for its workers' last stats
    # after the quit, so a worker that first let its persons finish their runs would report too late.
    locust = await asyncio.create_subprocess_exec(*argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT)
    try:
        stdout, _ = await asyncio.wait_for(locust.communicate(), RUN_S + 40)
    finally:
        if locust.returncode is None:
            locust.kill()
            await locust.wait()
    output = "\n".join(stdout.decode(errors="replace").splitlines()[-60:])
    assert locust.returncode == 0, output

    rows = stats_rows(report)
    oracle = rows[("ORACLE", "run")]
    assert int(oracle["Request Count"]) >= PERSONS, output
    assert int(oracle["Failure Count"]) == 0, output
    assert ("ORACLE", "stream") not in rows, output
    assert int(rows[("WS", "connect")]["Request Count"]) == 2 * PERSONS, output
    assert int(rows[("REST", "messages")]["Request Count"]) == int(oracle["Request Count"]), output
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0, output

    connection = await asyncpg.connect(cluster.database_url)
    try:
        users, devices = await connection.fetchrow(
            "SELECT count(DISTINCT user_id), count(DISTINCT (user_id, device)) FROM messages"
            " WHERE role = 'user' AND user_id LIKE $1", f"{prefix}-%")
    finally:
        await connection.close()
    assert users == PERSONS, f"{users} Chorus users for {PERSONS} persons: ids collided\n{output}"
    assert devices == 2 * PERSONS, output  # each person sent from both its devices
