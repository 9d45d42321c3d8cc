"""S4 (reconnect storm) and S5 (slow consumers) run for real, small, on Chorus and on the raw probe
(no peer install): the load generators' reconnect with resume and their stalled devices work, and
the figures say what happened. The benchmark's own numbers are not asserted here (they are
measured, docs/performance.md); what Chorus promises is: a storm loses nothing and doubles nothing,
and a stalled device never costs a healthy one an event."""

from __future__ import annotations

from pathlib import Path

from loadtest.scenarios import s4, s5

SYSTEMS = ("chorus", "raw-probe")


def test_storm_figures_count_the_reconnects() -> None:
    row = {"missing": 3, "duplicates": 0}
    taken = [{"reconnect_ms": [30.0, 10.0], "reconnect_failed": 0, "resyncs": 1},
             {"reconnect_ms": [20.0], "reconnect_failed": 1, "resyncs": 0}]
    figures = s4.storm_figures(row, taken, dropped=4)
    assert figures["reconnected"] == 3 and figures["reconnect_failed"] == 1 and figures["resyncs"] == 1
    assert figures["reconnect_p50_ms"] == 20.0 and figures["all_back_ms"] == 30.0
    assert figures["missing"] == 3 and figures["dropped"] == 4


async def test_a_reconnect_storm_loses_nothing_on_chorus(tmp_path: Path) -> None:
    config = s4.S4Config(users=60, rate=300, step_s=3.0, kill_at_s=1.0, systems=SYSTEMS, loadgens=2)
    figures = await s4.s4(config, tmp_path)
    assert figures["errors"] == [], figures["errors"]
    chorus, probe = figures["systems"]["chorus"], figures["systems"]["raw-probe"]
    for result in (chorus, probe):
        assert result["dropped"] == 60 and result["reconnected"] == 60, result
        assert result["published"] > 600 and result["misrouted"] == 0
    # Chorus's devices resumed where they were: every event on both devices, once.
    assert chorus["missing"] == 0 and chorus["duplicates"] == 0 and chorus["resyncs"] == 0
    # The probe has nothing to resume with: what was published while its devices were away is lost.
    assert probe["missing"] > 0
    assert "S4 reconnect storm" in s4.render(figures, config)


async def test_stalled_devices_are_dropped_and_cost_the_healthy_ones_nothing(tmp_path: Path) -> None:
    # 250 events of 16 KB a second per user: a stalled device's loopback buffers (a few MB) fill
    # within a second or two, then its queue (64 frames here, 1,024 by default) overflows: closed
    # with 4008.
    config = s5.S5Config(users=4, slow_users=2, rate=1000, step_s=4.0, payload_bytes=16_000,
                         systems=("chorus",), loadgens=2, chorus_env={"SEND_QUEUE_MAX_FRAMES": "64"})
    figures = await s5.s5(config, tmp_path)
    assert figures["errors"] == [], figures["errors"]
    result = figures["systems"]["chorus"]
    assert result["slow_sockets"] == 2 and result["slow_closed_by_server"] == 2
    assert result["published"] > 2000 and result["missing"] == 0 and result["duplicates"] == 0
    assert "S5 slow consumers" in s5.render(figures, config)
