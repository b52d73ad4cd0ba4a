"""Steal time against the lab: a guest that wants its whole vCPU, pinned beside a hog.

The guest spins (lab_tinylinux, vmtlab.spin=1), so it is runnable all the time:
alone it gets a host CPU whenever it asks, pinned to CPU 0 with a CPU hog it
waits about half the time. A daemon that took steal from another counter
(cpu_time_ns falls under the hog while it rises) or mixed up the time base
fails here, on real scheduler counters and on what the database holds.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import labkit
import pytest
from daemonproc import DaemonProcess, lab_environment, series_of

pytestmark = pytest.mark.lab

POLL_S = 0.5
PHASE_S = 4.0  # steal values measured per phase: 8 polls
SETTLE_S = 1.0  # after a change of affinity, before its phase is measured
# Steal under the hog must exceed the idle and the after value by this much and
# this factor. Measured here: idle 0-0.5 %, hog ~48 %, after 0-0.1 %.
MIN_RISE_PP = 20.0
MIN_RISE_FACTOR = 5.0
# The daemon's Δt is monotonic and the stored timestamps are wall-clock ms:
# 1 ms of rounding in a 500 ms interval is 0.2 %.
REL_TOLERANCE = 0.01
ABS_TOLERANCE_PP = 0.05


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def measure(seconds: float) -> tuple[int, int]:
    """The wall-clock window (ms) of one phase, waited through."""
    start = now_ms()
    time.sleep(seconds)
    return start, now_ms()


def pin_all_threads(pid: int, cpus: str) -> None:
    """Every thread of the process, the vCPU thread included (taskset -a)."""
    subprocess.run(["taskset", "-a", "-pc", cpus, str(pid)], check=True, capture_output=True)


def median_in(points: list[tuple[int, float]], window: tuple[int, int]) -> float:
    values = [v for t, v in points if window[0] <= t <= window[1]]
    assert len(values) >= PHASE_S / POLL_S / 2, (window, points)
    return statistics.median(values)


def expected_steal(host: str, vm: str) -> dict[int, float]:
    """100 * Δcpu_delay_ns / (Δt * 1e9 * vcpus) of consecutive stored vm_metrics points,
    by the later point's timestamp."""
    delay = series_of(host, "vm_metrics_cpu_delay_ns", vm)
    vcpus = dict(series_of(host, "vm_metrics_vcpus", vm))
    return {
        t: 100 * (d - d0) / ((t - t0) / 1000 * 1e9 * vcpus[t])
        for (t0, d0), (t, d) in pairwise(delay)
    }


def test_steal_rises_under_a_pinned_hog_and_agrees_with_the_stored_delay(
    lab: Any, tmp_path: Path
) -> None:
    name = lab.prefix + "spin"
    labkit.create_guest(name, busy=True, spin=True)
    hog: subprocess.Popen[bytes] | None = None
    try:
        labkit.wait_busy_ready([name])
        qemu = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
        affinity = ",".join(map(str, sorted(os.sched_getaffinity(qemu))))
        daemon = DaemonProcess(lab_environment(lab, tmp_path, POLL_INTERVAL=POLL_S), tmp_path)
        daemon.start()
        try:
            daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")
            idle = measure(PHASE_S)
            pin_all_threads(qemu, "0")
            hog = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", "while True: pass"])
            time.sleep(SETTLE_S)
            pinned = measure(PHASE_S)
            hog.kill()
            hog.wait()
            pin_all_threads(qemu, affinity)
            time.sleep(SETTLE_S)
            after = measure(PHASE_S)
        finally:
            assert daemon.stop() == 0, daemon.output()
    finally:
        if hog is not None and hog.poll() is None:
            hog.kill()
            hog.wait()
        labkit.destroy_guest(name)

    steal = series_of(daemon.host, "vm_features_cpu_steal_pct", name)
    figures = {
        w: median_in(steal, window)
        for w, window in (("idle", idle), ("hog", pinned), ("after", after))
    }
    for calm in ("idle", "after"):
        assert figures["hog"] - figures[calm] > MIN_RISE_PP, figures
        assert figures["hog"] > MIN_RISE_FACTOR * figures[calm], figures

    expected = expected_steal(daemon.host, name)
    assert len(steal) >= 3 * PHASE_S / POLL_S, steal
    for t, value in steal:
        want = expected[t]
        assert abs(value - want) <= REL_TOLERANCE * want + ABS_TOLERANCE_PP, (t, value, want)
