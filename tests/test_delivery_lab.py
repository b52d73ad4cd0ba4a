"""No point lost: outages, a crash and steady state, with the lab's real database."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import labkit
import pytest
from daemonproc import DaemonProcess, lab_environment, missing_ticks

pytestmark = pytest.mark.lab

INTERVAL_S = 0.5
BATCH_S = 0.5


def sample_times(host: str, vm: str) -> list[int]:
    """Millisecond timestamps of one guest's samples in the database, duplicates kept."""
    rows = labkit.query(f'{{__name__="vm_metrics_state",host="{host}",vm="{vm}"}}')
    return sorted(t for row in rows for t in row["timestamps"])


def daemon(lab: Any, workdir: Path, **overrides: object) -> DaemonProcess:
    env = lab_environment(
        lab, workdir, POLL_INTERVAL=INTERVAL_S, BATCH_MAX_SEC=BATCH_S, **overrides
    )
    return DaemonProcess(env, workdir)


@pytest.fixture
def database_restored() -> Any:
    """Whatever a test does to the database, the next test finds it running."""
    yield
    if not labkit.database_running():
        labkit.start_database()


def test_a_minute_long_outage_loses_no_sample(
    lab: Any, tmp_path: Path, database_restored: None
) -> None:
    guest = lab.busy_guests[0]
    run = daemon(lab, tmp_path).start()
    try:
        run.wait_for(lambda s: s["written"] > 0, 30, "a first write")
        labkit.stop_database()
        time.sleep(60)
        during = run.status()
        labkit.start_database()
        after = run.wait_for(
            lambda s: s["spooled"] == 0 and s["written"] > during["written"],
            120,
            "the spool drained",
        )
        time.sleep(2)
    finally:
        assert run.stop() == 0, run.output()
    assert during["spooled"] > 0 and during["write_errors"] > 0, (during, run.output())
    times = sample_times(run.host, guest)
    assert len(times) == len(set(times)), "a sample was stored twice"
    overruns = run.status()["overruns"]
    missing = missing_ticks(times, INTERVAL_S)
    assert len(missing) <= overruns, (missing, overruns)
    assert len(times) >= 60 / INTERVAL_S, len(times)
    assert after["dropped"] == 0


def test_sigkill_loses_at_most_one_batch_and_the_spool_survives(
    lab: Any, tmp_path: Path, database_restored: None
) -> None:
    guest = lab.busy_guests[0]
    first = daemon(lab, tmp_path).start()
    first.wait_for(lambda s: s["written"] > 0, 30, "a first write")
    labkit.stop_database()
    first.wait_for(lambda s: s["spooled"] > 20, 30, "lines in the spool")
    first.kill()
    killed_ms = time.time() * 1000
    labkit.start_database()
    time.sleep(3)
    second = DaemonProcess(first.env, tmp_path)
    second.start()
    restarted_ms = time.time() * 1000
    try:
        second.wait_for(lambda s: s["spooled"] == 0 and s["written"] > 0, 60, "the spool drained")
        time.sleep(2)
    finally:
        assert second.stop() == 0, second.output()
    times = sample_times(first.host, guest)
    before = [t for t in times if t < killed_ms]
    assert missing_ticks(before, INTERVAL_S) == [], "a sample spooled before the kill is missing"
    lost_ms = killed_ms - before[-1]
    assert lost_ms <= (BATCH_S + 2 * INTERVAL_S) * 1000, f"{lost_ms:.0f} ms lost before the kill"
    assert any(t > restarted_ms for t in times), "nothing written after the restart"


def test_steady_state_writes_nothing_to_the_spool(lab: Any, tmp_path: Path) -> None:
    run = daemon(lab, tmp_path).start()
    try:
        run.wait_for(lambda s: s["written"] > 0, 30, "a first write")
        time.sleep(5)
        status = run.status()
    finally:
        assert run.stop() == 0, run.output()
    assert status["write_errors"] == 0 and status["spooled"] == 0
    spool = tmp_path / "spool"
    assert not spool.exists() or list(spool.iterdir()) == [], list(spool.iterdir())
    assert not (tmp_path / "dead-letters.jsonl").exists()
