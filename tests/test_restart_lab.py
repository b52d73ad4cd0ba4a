"""Rates across a daemon restart, against the lab: the feature state saved on stop is taken back.

Each run has its own work directory (its log) and all share one environment:
one HOST_TAG, so the database holds the runs as one series, and one SPOOL_DIR.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import labkit
import pytest
from daemonproc import DaemonProcess, lab_environment

from vmtelemetryd.featurestate import FILE_NAME

pytestmark = pytest.mark.lab

WINDOW = 4
POLL_S = 0.5
# Enough polls for every guest's windows to fill, with a margin for a busy host.
RUN_S = (WINDOW + 3) * POLL_S


def run(env: dict[str, str], workdir: Path) -> DaemonProcess:
    """A daemon started and seen writing, with time for WINDOW samples."""
    workdir.mkdir()
    daemon = DaemonProcess(env, workdir).start()
    daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")
    time.sleep(RUN_S)
    return daemon


def stored_times(host: str) -> dict[tuple[str, str], set[int]]:
    """When each guest has a sample, a cpu_pct and its angle: one query, as each one waits
    for the database to flush."""
    names = "vm_metrics_state|vm_features_cpu_pct(_angle_deg)?"
    rows = labkit.query(f'{{__name__=~"{names}",host="{host}"}}')
    times: dict[tuple[str, str], set[int]] = {}
    for row in rows:
        key = (row["metric"]["__name__"], row["metric"]["vm"])
        times.setdefault(key, set()).update(row["timestamps"])
    return times


def first_sample_ms(times: dict[tuple[str, str], set[int]], guest: str, since_ms: int) -> int:
    return min(t for t in times[("vm_metrics_state", guest)] if t >= since_ms)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_the_first_sample_after_a_restart_has_its_rates_and_angles(
    lab: Any, tmp_path: Path
) -> None:
    env = lab_environment(lab, tmp_path, FEATURE_WINDOW=WINDOW, POLL_INTERVAL=POLL_S)
    state = Path(env["SPOOL_DIR"]) / FILE_NAME
    first = run(env, tmp_path / "first")
    assert first.stop() == 0, first.output()
    assert state.is_file(), first.output()

    restarted_ms = now_ms()
    second = run(env, tmp_path / "second")
    assert not state.exists()  # taken back, and gone: never taken back twice
    assert second.stop() == 0, second.output()
    assert "feature state taken back" in second.output()

    stored = stored_times(first.host)
    for guest in lab.guests:
        at = first_sample_ms(stored, guest, restarted_ms)
        for field in ("vm_features_cpu_pct", "vm_features_cpu_pct_angle_deg"):
            assert at in stored[(field, guest)], (guest, field)


def test_a_killed_daemon_leaves_no_state_behind_and_the_next_start_works(
    lab: Any, tmp_path: Path
) -> None:
    env = lab_environment(lab, tmp_path, FEATURE_WINDOW=WINDOW, POLL_INTERVAL=POLL_S)
    state = Path(env["SPOOL_DIR"]) / FILE_NAME
    first = run(env, tmp_path / "first")
    assert first.stop() == 0, first.output()
    assert state.is_file()

    killed = run(env, tmp_path / "killed")
    killed.kill()
    assert not state.exists()  # the state it took back would be older than the run killed

    started_ms = now_ms()
    third = run(env, tmp_path / "third")
    assert third.stop() == 0, third.output()
    assert "feature state" not in third.output().replace("feature state saved", "")
    assert state.is_file()  # this stop saved again
    stored = stored_times(first.host)
    for guest in lab.guests:
        at = first_sample_ms(stored, guest, started_ms)
        cpu = stored[("vm_features_cpu_pct", guest)]
        assert at not in cpu, guest  # nothing to build on, nothing made up
        assert any(t > at for t in cpu), guest


def test_an_unwritable_spool_dir_costs_a_warning_not_the_stop(lab: Any, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    env = lab_environment(lab, tmp_path, SPOOL_DIR=tmp_path / "a-file" / "spool")
    daemon = run(env, tmp_path / "daemon")
    assert daemon.stop() == 0, daemon.output()
    warnings = [
        line for line in daemon.output().splitlines() if "cannot save the feature state" in line
    ]
    assert len(warnings) == 1 and "Not a directory" in warnings[0], daemon.output()
