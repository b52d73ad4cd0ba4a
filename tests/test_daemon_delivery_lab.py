"""The daemon's delivery end to end: real guests, the FAKE InfluxDB 3 endpoint as database.

The fake checks the token, the database and the precision as InfluxDB 3 does
and keeps every line it accepted, so a test can tell exactly which samples
arrived and how often: the v3 API, a refused token fixed by a reload, reloads
that rebuild the writer or the libvirt connection, and what the log says.
"""

from __future__ import annotations

import itertools
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemonproc import DaemonProcess, lab_environment, run_verb
from fakeinflux import DATABASE, TOKEN, Answer, FakeInflux3, serve
from lineparse import Line, parse_lines

pytestmark = pytest.mark.lab

INTERVAL_S = 0.5


@pytest.fixture
def fake() -> Iterator[tuple[FakeInflux3, str]]:
    database = FakeInflux3()
    with serve(database) as url:
        yield database, url


def fake_environment(lab: Any, workdir: Path, url: str, **overrides: object) -> dict[str, str]:
    settings: dict[str, object] = {
        "INFLUX_URL": url,
        "INFLUX_DB": DATABASE,
        "INFLUX_TOKEN": TOKEN,
        "INFLUX_WRITE_API": "v3",
        "POLL_INTERVAL": INTERVAL_S,
        **overrides,
    }
    return lab_environment(lab, workdir, **settings)


def accepted(*databases: FakeInflux3) -> list[Line]:
    return parse_lines("".join(line + "\n" for db in databases for line in db.accepted))


def busy_state_times(points: list[Line], busy: str) -> list[int]:
    """Timestamps of the busy guest's vm_metrics lines, duplicates kept."""
    return sorted(p.ts for p in points if p.measurement == "vm_metrics" and p.tags["vm"] == busy)


def gaps(times_ns: list[int]) -> list[float]:
    """Holes in a poll series, in intervals missed."""
    steps = [(b - a) / 1e9 / INTERVAL_S for a, b in itertools.pairwise(times_ns)]
    return [round(step - 1) for step in steps if step > 1.5]


def test_the_v3_api_end_to_end(lab: Any, tmp_path: Path, fake: tuple[FakeInflux3, str]) -> None:
    database, url = fake
    daemon = DaemonProcess(fake_environment(lab, tmp_path, url), tmp_path).start()
    try:
        daemon.wait_for(lambda s: s["written"] > 100, 30, "writes")
    finally:
        assert daemon.stop() == 0, daemon.output()
    final = daemon.status()
    points = accepted(database)
    assert {p.tags["vm"] for p in points if p.measurement == "vm_metrics"} >= set(lab.guests)
    own = [p for p in points if p.measurement == "vmtelemetryd"]
    assert own and {p.tags["host"] for p in own} == {daemon.host}
    assert all(p.startswith("/api/v3/write_lp?") for p in database.paths), database.paths[:3]
    assert len(set(database.accepted)) == len(database.accepted), "a line delivered twice"
    assert final["written"] == len(database.accepted) and final["delivery"] == "ok"


def test_a_refused_token_is_reported_and_a_reload_with_the_right_one_delivers_everything(
    lab: Any, tmp_path: Path, fake: tuple[FakeInflux3, str]
) -> None:
    database, url = fake
    config = tmp_path / "vmtelemetryd.env"
    config.write_text("INFLUX_TOKEN=wrong-token\n")
    env = fake_environment(lab, tmp_path, url, INFLUX_TOKEN=None)
    daemon = DaemonProcess(env, tmp_path, config=config).start()
    try:
        refused = daemon.wait_for(lambda s: s["delivery"] == "refused", 30, "the refusal")
        shown = run_verb(env, "status")
        time.sleep(3)  # samples go on, and are kept
        kept = daemon.status()
        config.write_text(f"INFLUX_TOKEN={TOKEN}\n")
        daemon.signal(signal.SIGHUP)
        fixed = daemon.wait_for(
            lambda s: s["generation"] == 2 and s["delivery"] == "ok" and s["spooled"] == 0,
            30,
            "delivery once the token is fixed",
        )
        time.sleep(1)
    finally:
        assert daemon.stop() == 0, daemon.output()
    assert "401" in refused["last_write_error"] and "wrong-token" not in daemon.output()
    assert shown.returncode == 0 and "delivery: refused" in shown.stdout, shown.stdout
    assert kept["queued"] + kept["spooled"] > refused["queued"] + refused["spooled"]
    assert fixed["dropped"] == 0 and fixed["write_errors"] >= kept["write_errors"]
    times = busy_state_times(accepted(database), lab.busy_guests[0])
    assert len(times) == len(set(times)), "a sample delivered twice"
    # Every sample from the first poll on arrived, the refused ones included.
    assert gaps(times) == [], gaps(times)
    assert times[0] / 1e9 < refused["last_poll"]


def test_a_reload_to_another_database_url_loses_nothing_queued_or_spooled(
    lab: Any, tmp_path: Path, fake: tuple[FakeInflux3, str]
) -> None:
    first, first_url = fake
    second = FakeInflux3()
    config = tmp_path / "vmtelemetryd.env"
    config.write_text(f"INFLUX_URL={first_url}\n")
    env = fake_environment(lab, tmp_path, first_url, INFLUX_URL=None)
    with serve(second) as second_url:
        daemon = DaemonProcess(env, tmp_path, config=config).start()
        try:
            daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")
            with first.lock:
                first.script.extend([Answer(503, {"error": "overloaded"})] * 10_000)
            before = daemon.wait_for(lambda s: s["spooled"] > 0, 30, "lines in the spool")
            config.write_text(f"INFLUX_URL={second_url}\n")
            daemon.signal(signal.SIGHUP)
            after = daemon.wait_for(
                lambda s: s["generation"] == 2 and s["spooled"] == 0 and second.accepted,
                30,
                "the spool drained into the new database",
            )
            time.sleep(1)
        finally:
            assert daemon.stop() == 0, daemon.output()
    times = busy_state_times(accepted(first, second), lab.busy_guests[0])
    assert len(times) == len(set(times)), "a sample delivered twice"
    assert gaps(times) == [], gaps(times)
    # The writer was rebuilt, its counters were not reset.
    assert after["write_errors"] >= before["write_errors"] > 0
    assert after["written"] >= before["written"] > 0
    assert "writer rebuilt" in daemon.output()


def test_a_reload_to_another_libvirt_uri_keeps_sampling(
    lab: Any, tmp_path: Path, fake: tuple[FakeInflux3, str]
) -> None:
    database, url = fake
    config = tmp_path / "vmtelemetryd.env"
    config.write_text(f"LIBVIRT_URI={lab.libvirt_uri}\n")
    env = fake_environment(lab, tmp_path, url, LIBVIRT_URI=None)
    other_uri = "qemu+unix:///system?socket=/var/run/libvirt/libvirt-sock-ro"
    daemon = DaemonProcess(env, tmp_path, config=config).start()
    try:
        daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")
        config.write_text(f"LIBVIRT_URI={other_uri}\n")
        daemon.signal(signal.SIGHUP)
        reloaded_at = time.time()
        daemon.wait_for(lambda s: s["generation"] == 2, 10, "the reload")
        reloaded = daemon.wait_for(lambda s: (s["last_poll"] or 0) > reloaded_at, 10, "a poll")
        daemon.wait_for(lambda s: s["last_poll"] > reloaded_at + 2, 10, "more polls")
    finally:
        assert daemon.stop() == 0, daemon.output()
    assert re.search(r"libvirt connection rebuilt\s+uri='" + re.escape(other_uri), daemon.output())
    final = daemon.status()
    assert final["last_sample_error"] is None and final["vms"] == reloaded["vms"] > 0
    times = busy_state_times(accepted(database), lab.busy_guests[0])
    assert len(gaps(times)) <= final["overruns"], gaps(times)
    assert times[-1] / 1e9 > reloaded_at + 1


def test_debug_logs_each_poll_and_each_batch(
    lab: Any, tmp_path: Path, fake: tuple[FakeInflux3, str]
) -> None:
    _, url = fake
    daemon = DaemonProcess(fake_environment(lab, tmp_path, url, LOG_LEVEL="debug"), tmp_path)
    daemon.start()
    try:
        daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")
        time.sleep(1.5)
    finally:
        assert daemon.stop() == 0, daemon.output()
    output = daemon.output()
    polls = re.findall(r"\[debug\s*\] poll done\s.*lines=(\d+).*vms=(\d+)", output)
    assert len(polls) >= 3, output
    assert all(int(lines) > int(vms) > 0 for lines, vms in polls), polls
    assert re.search(r"\[debug\s*\] batch written\s.*lines=\d+.*source=memory", output), output


def test_a_one_letter_token_leaves_the_log_readable(
    lab: Any, tmp_path: Path, fake: tuple[FakeInflux3, str]
) -> None:
    database, url = fake
    database.token = "t"
    env = fake_environment(lab, tmp_path, url, INFLUX_TOKEN="t")
    daemon = DaemonProcess(env, tmp_path).start()
    try:
        daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")
    finally:
        assert daemon.stop() == 0, daemon.output()
    output = daemon.output()
    assert re.search(r"\] started\s+config='environment only' pid=\d+$", output, re.M), output
    assert "] stopping: flushing queued points timeout_s=20.0" in output, output
    assert re.search(r"\] stopped\s+dead_lettered=0 dropped=0 queued=0", output), output
    assert "***" not in output, output
