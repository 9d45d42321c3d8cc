"""The S2 plots, drawn in the peers venv (matplotlib is no dependency of Chorus).

    <peers venv>/bin/python -m loadtest.peers.plot s2.json OUT_DIR

Writes ``s2-cpu-per-delivery.png`` and ``s2-p99-latency.png``: one line per system against the
offered rate, and prints their paths.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CHARTS = (
    ("s2-cpu-per-delivery.png", "server_us_per_delivery", "server CPU per delivery (µs, both processes)",
     False),
    ("s2-p99-latency.png", "p99_ms", "p99 latency, publish to arrival (ms, log scale)", True),
)


def main(source: Path, out: Path) -> None:
    figures = json.loads(source.read_text())
    users = figures.get("config", {}).get("users")
    for name, key, label, log in CHARTS:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        for system, result in figures["systems"].items():
            steps = result["steps"]
            if steps:
                ax.plot([2 * s["offered_events_per_s"] for s in steps], [s[key] for s in steps],
                        marker="o", label=system)
        ax.set_xlabel("offered deliveries/s (2 per event)")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.set_ylim(bottom=None if log else 0)
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.set_title(f"S2 fan-out{f', {users} users x 2 devices' if users else ''}")
        fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        print(out / name)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
