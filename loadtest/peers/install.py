"""The peers' own software, installed by the benchmark on first use, outside Chorus's dependencies.

    python -m loadtest.peers.install        # both, now (the benchmark does it when it needs them)

- Python peers (python-socketio, Django Channels, uvicorn, matplotlib for the plots) go into a venv
  of their own under the cache dir (``$CHORUS_BENCH_CACHE``, default ``~/.cache/chorus-bench``),
  made with an upgraded pip; a marker file holding the requirement list makes a changed list
  rebuild it.
- Node Socket.IO comes from ``loadtest/peers/node/package.json`` and its committed lock file:
  ``npm ci`` into ``loadtest/peers/node/node_modules`` (ignored by git), again only when the lock
  changed since the last install.

The probes need neither: they run on Chorus's own interpreter (aiohttp, redis-py, hiredis).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PEERS_DIR = Path(__file__).resolve().parent
NODE_DIR = PEERS_DIR / "node"
PYTHON_REQUIREMENTS = (
    "python-socketio>=5.11",
    "aiohttp>=3.9",
    "redis>=5.0",
    "django>=5.0",
    "channels>=4.1",
    "channels-redis>=4.2",
    "uvicorn[standard]>=0.30",
    "matplotlib>=3.8",
)
_INSTALL_TIMEOUT_S = 900


def cache_dir() -> Path:
    return Path(os.environ.get("CHORUS_BENCH_CACHE") or Path.home() / ".cache" / "chorus-bench")


def _run(argv: list[str], cwd: Path | None = None) -> None:
    print(f"[peers] {' '.join(argv)}", file=sys.stderr, flush=True)
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT_S,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-3000:]}"
                           f"\n{done.stderr[-3000:]}")


def peers_python() -> Path:
    """The peers venv's interpreter, creating or updating the venv first when needed."""
    venv = cache_dir() / "peers-venv"
    python = venv / "bin" / "python"
    marker = venv / "chorus-requirements.txt"
    wanted = "\n".join(PYTHON_REQUIREMENTS) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    if not python.exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "venv", "--clear", str(venv)])
    _run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    _run([str(python), "-m", "pip", "install", "--quiet", *PYTHON_REQUIREMENTS])
    marker.write_text(wanted)
    return python


def node_binary() -> str:
    found = shutil.which("node")
    if found is None:
        raise RuntimeError("node is not installed: the Node Socket.IO peer needs Node.js 18+ and npm")
    return found


def node_peer_dir() -> Path:
    """``loadtest/peers/node`` with its ``node_modules`` installed from the lock file."""
    node_binary()
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed: the Node Socket.IO peer needs it")
    lock = NODE_DIR / "package-lock.json"
    stamp = NODE_DIR / "node_modules" / ".chorus-lock"
    if stamp.exists() and stamp.read_text() == lock.read_text():
        return NODE_DIR
    _run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR)
    stamp.write_text(lock.read_text())
    return NODE_DIR


if __name__ == "__main__":
    print(peers_python())
    print(node_peer_dir())
