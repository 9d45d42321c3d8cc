"""The local cluster as an operator runs it: ``./chorus.sh up -d``, ``status``, ``logs``, ``down``
(``python -m loadtest.cluster``, which chorus.sh runs in the venv)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from loadtest.procs import REPO_ROOT

TIMEOUT_S = 120


def chorus(home: Path, *args: str, timeout_s: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """``./chorus.sh <args>`` with its state in `home` and the venv this test runs in."""
    env = {**os.environ, "CHORUS_HOME": str(home), "CHORUS_VENV": str(Path(sys.executable).parent.parent)}
    return subprocess.run([str(REPO_ROOT / "chorus.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_status_logs_down(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert chorus(home, "status").returncode == 3  # nothing running yet

    # `up` would install first; the detached cluster itself is what is tested here.
    up = subprocess.run([sys.executable, "-m", "loadtest.cluster", "--home", str(home), "up", "--detach",
                         "--nodes", "1", "--workers", "0", "--no-nginx"],
                        capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    state = json.loads((home / "cluster.json").read_text())
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        for part in ("Redis", "Postgres", "migrations", "1 ws nodes"):  # progress, step by step
            assert any(line.strip().startswith(part) and line.rstrip().endswith(" s") for line in
                       up.stdout.splitlines()), (part, up.stdout)
        assert "Chorus local cluster is up" in up.stdout and "--device phone" in up.stdout
        assert "--device laptop" in up.stdout

        again = chorus(home, "up", "--detach")
        assert again.returncode == 1 and "already running" in again.stderr

        status = chorus(home, "status")
        assert status.returncode == 0, status.stdout
        node_line = next(line for line in status.stdout.splitlines() if "node-a" in line)
        assert "running" in node_line and "ready" in node_line

        unknown = chorus(home, "logs", "nope")
        assert unknown.returncode == 2 and "node-a" in unknown.stderr
        with subprocess.Popen([str(REPO_ROOT / "chorus.sh"), "logs", "node-a"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "CHORUS_HOME": str(home),
                                   "CHORUS_VENV": str(Path(sys.executable).parent.parent)}) as logs:
            assert logs.stdout is not None
            try:
                lines = [logs.stdout.readline() for _ in range(3)]
            finally:
                logs.kill()
        assert any("ws_node" in line for line in lines), lines
    finally:
        down = chorus(home, "down")
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert not any(alive(p["pid"]) for p in state["processes"]) and not alive(state["pid"])
    assert chorus(home, "status").returncode == 3
    assert (home / "run" / "node-a.log").exists()  # the logs outlive the cluster
