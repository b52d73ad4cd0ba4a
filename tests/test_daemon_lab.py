"""The daemon end to end against the lab: real libvirtd, real guests, real database."""

from __future__ import annotations

import os
import re
import signal
import statistics
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import labkit
import libvirt
import pytest
from daemonproc import (
    DaemonProcess,
    lab_environment,
    libvirt_devices,
    missing_ticks,
    run_verb,
    series_of,
)
from lineparse import Line, parse_lines

pytestmark = pytest.mark.lab

MARGIN_MS = 250
MEASUREMENTS = {"vm_metrics", "vm_devices", "vm_totals", "vm_features"}
OWN = "vmtelemetryd"
# Longest a line may wait before the database has it: a batch, a poll, a request, a busy host.
DELIVERY_SLACK_MS = 4000


def libvirt_stats(uri: str, names: Iterable[str]) -> tuple[float, dict[str, dict[str, Any]]]:
    """A direct bulk read, with the wall-clock time (ms) it was taken."""
    conn = libvirt.openReadOnly(uri)
    try:
        domains = [conn.lookupByName(n) for n in names]
        before = time.time()
        pairs = conn.domainListGetStats(domains, 0, 0)
        taken_ms = (before + time.time()) / 2 * 1000
    finally:
        conn.close()
    return taken_ms, {dom.name(): stats for dom, stats in pairs}


def test_once_prints_all_four_measurements_for_every_lab_guest(lab: Any, tmp_path: Path) -> None:
    result = run_verb(lab_environment(lab, tmp_path), "once")
    assert result.returncode == 0, result.stderr
    points = parse_lines(result.stdout)
    for guest in lab.guests:
        mine = [p for p in points if p.tags["vm"] == guest]
        assert {p.measurement for p in mine} == MEASUREMENTS, guest
        devices = sorted(
            (p.tags["kind"], p.tags["device"]) for p in mine if p.measurement == "vm_devices"
        )
        assert devices == libvirt_devices(lab.libvirt_uri, guest)
        totals = next(p for p in mine if p.measurement == "vm_totals")
        assert totals.fields["nics"] == sum(1 for k, _ in devices if k == "nic")
        assert totals.fields["disks"] == sum(1 for k, _ in devices if k == "disk")
        assert all(isinstance(v, int) for v in _of(mine, "vm_metrics").fields.values())
        assert all(isinstance(v, float) for v in _of(mine, "vm_features").fields.values())


def _of(points: list[Line], measurement: str) -> Line:
    return next(p for p in points if p.measurement == measurement)


def test_run_writes_what_libvirt_reports(lab: Any, tmp_path: Path) -> None:
    busy, paused = lab.busy_guests[0], lab.paused_guests[0]
    daemon = DaemonProcess(lab_environment(lab, tmp_path), tmp_path).start()
    try:
        daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")
        t_start, start = libvirt_stats(lab.libvirt_uri, [busy, paused])
        time.sleep(8)
        t_end, end = libvirt_stats(lab.libvirt_uri, [busy, paused])
    finally:
        assert daemon.stop() == 0, daemon.output()
    host = daemon.host

    # A paused guest's counters stand still: the database holds exactly libvirt's values.
    for target, key in (("vda", "wr_bytes"), ("vdb", "rd_bytes")):
        stored = series_of(host, f"vm_devices_{key}", paused, device=target, kind="disk")
        index = _block_index(end[paused], target)
        assert stored[-1][1] == end[paused][f"block.{index}.{key.replace('_', '.')}"]
    stored_max = series_of(host, "vm_metrics_mem_max_kib", paused)
    assert stored_max[-1][1] == end[paused]["balloon.maximum"]

    # The busy guest's counters grow: what the daemon stored between two direct reads
    # lies between their values.
    written = series_of(host, "vm_totals_disk_wr_bytes", busy)
    # Margins: a sample is stamped before its call, which reads the counters a little later.
    inside = [v for t, v in written if t_start + MARGIN_MS < t < t_end - MARGIN_MS]
    assert len(inside) >= 10
    low, high = _sum(start[busy], "block", "wr.bytes"), _sum(end[busy], "block", "wr.bytes")
    assert all(low <= v <= high for v in inside), (low, inside, high)

    # Rates agree with the load the guest makes, measured independently over the same span.
    seconds = (t_end - t_start) / 1000
    expected = {
        "disk_wr_bps": (high - low) / seconds,
        "net_tx_bps": (_sum(end[busy], "net", "tx.bytes") - _sum(start[busy], "net", "tx.bytes"))
        / seconds,
        "cpu_pct": (end[busy]["cpu.time"] - start[busy]["cpu.time"])
        / seconds
        / 1e9
        / end[busy]["vcpu.current"]
        * 100,
    }
    for field, want in expected.items():
        values = [
            v for t, v in series_of(host, f"vm_features_{field}", busy) if t_start < t < t_end
        ]
        assert want > 0, field
        assert statistics.fmean(values) == pytest.approx(want, rel=0.35), (field, values)


def _block_index(stats: dict[str, Any], target: str) -> int:
    return next(i for i in range(stats["block.count"]) if stats[f"block.{i}.name"] == target)


def _sum(stats: dict[str, Any], group: str, key: str) -> int:
    return sum(stats.get(f"{group}.{i}.{key}", 0) for i in range(stats.get(f"{group}.count", 0)))


ODD = 'odd name,with=eq "q" back\\slash ünïcødé, =x'


def test_hostile_vm_and_device_names_come_back_exactly(lab: Any, tmp_path: Path) -> None:
    name = lab.prefix + ODD
    nic = 'vt,x="y\\z'
    disks = [tmp_path / f'disk {i}, "a=b" \\ ü.qcow2' for i in (1, 2)]
    labkit.create_guest(name, nic_dev=nic, disk_paths=disks)
    try:
        env = lab_environment(lab, tmp_path)
        once = run_verb(env, "once")
        assert once.returncode == 0, once.stderr
        printed = [p for p in parse_lines(once.stdout) if p.tags["vm"] == name]
        assert {p.measurement for p in printed} == MEASUREMENTS
        assert {p.tags["device"] for p in printed if p.measurement == "vm_devices"} == {
            nic,
            "vda",
            "vdb",
        }
        daemon = DaemonProcess(env, tmp_path).start()
        try:
            daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")
        finally:
            assert daemon.stop() == 0, daemon.output()
        stored = labkit.query(f'{{__name__="vm_devices_rx_bytes",host="{daemon.host}"}}')
        labels = {(row["metric"]["vm"], row["metric"]["device"]) for row in stored}
        assert (name, nic) in labels, labels
    finally:
        labkit.destroy_guest(name)


def test_daemon_reconnects_after_libvirtd_restarts(lab: Any, tmp_path: Path) -> None:
    daemon = DaemonProcess(lab_environment(lab, tmp_path), tmp_path).start()
    try:
        daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")
        labkit.restart_libvirtd()
        restarted_ms = time.time() * 1000
        daemon.wait_for(
            lambda s: s["reconnects"] >= 1 and s["last_sample_error"] is None and s["vms"] > 0,
            60,
            "a reconnect",
        )
        time.sleep(2)
    finally:
        assert daemon.stop() == 0, daemon.output()
    after = series_of(daemon.host, "vm_metrics_state", lab.busy_guests[0])
    assert any(t > restarted_ms for t, _ in after), "no points after libvirtd came back"


def test_guests_created_and_destroyed_while_running(lab: Any, tmp_path: Path) -> None:
    name = lab.prefix + "churn"
    daemon = DaemonProcess(lab_environment(lab, tmp_path), tmp_path).start()
    try:
        base = daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")["vms"]
        for _ in range(2):
            labkit.create_guest(name)
            daemon.wait_for(lambda s: s["vms"] == base + 1, 30, "the new guest")
            labkit.destroy_guest(name)
            daemon.wait_for(lambda s: s["vms"] == base, 30, "the guest gone")
    finally:
        assert daemon.stop() == 0, daemon.output()
    output = daemon.output()
    assert not re.search(r"\[(warning|error|critical)\s*\]", output), output
    stored = series_of(daemon.host, "vm_metrics_state", name)
    assert stored, "the short-lived guest's points are missing"


def test_a_guest_whose_qemu_hangs_does_not_stop_sampling_the_others(
    lab: Any, tmp_path: Path
) -> None:
    name = lab.prefix + "stuck"
    labkit.create_guest(name)
    qemu = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
    env = lab_environment(lab, tmp_path, LIBVIRT_TIMEOUT="2")
    daemon = DaemonProcess(env, tmp_path).start()
    try:
        daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")
        os.kill(qemu, signal.SIGSTOP)
        stopped = time.time()
        daemon.wait_for(
            lambda s: s["last_sample_error"] is None and s["last_poll"] > stopped + 3,
            30,
            "sampling to go on past the stuck guest",
        )
        time.sleep(2)
    finally:
        os.kill(qemu, signal.SIGCONT)
        assert daemon.stop() == 0, daemon.output()
        labkit.destroy_guest(name)
    assert "timed out" in daemon.output()
    busy = series_of(daemon.host, "vm_metrics_state", lab.busy_guests[0])
    assert sum(1 for t, _ in busy if t > (stopped + 3) * 1000) >= 3


def test_reloads_keep_the_poll_grid(lab: Any, tmp_path: Path) -> None:
    daemon = DaemonProcess(lab_environment(lab, tmp_path, POLL_INTERVAL="1"), tmp_path).start()
    try:
        daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")
        for _ in range(4):
            daemon.signal(signal.SIGHUP)
            time.sleep(1.3)
        status = daemon.wait_for(lambda s: s["generation"] == 5, 10, "four reloads")
        time.sleep(1.5)
    finally:
        assert daemon.stop() == 0, daemon.output()
    times = series_of(daemon.host, "vm_metrics_state", lab.busy_guests[0])
    assert len(missing_ticks([t for t, _ in times], 1.0)) <= status["overruns"], times


def libvirt_hostname(uri: str) -> str:
    conn = libvirt.openReadOnly(uri)
    try:
        return str(conn.getHostname())
    finally:
        conn.close()


@pytest.mark.parametrize("host_tag", ["", None], ids=["empty", "unset"])
def test_without_host_tag_once_tags_points_with_libvirts_hostname(
    lab: Any, tmp_path: Path, host_tag: str | None
) -> None:
    """HOST_TAG= (empty) and no HOST_TAG both mean libvirt's hostname, never an empty tag."""
    result = run_verb(lab_environment(lab, tmp_path, HOST_TAG=host_tag), "once")
    assert result.returncode == 0, result.stderr
    points = parse_lines(result.stdout)
    assert {p.tags["vm"] for p in points} >= set(lab.guests)
    assert {p.tags["host"] for p in points} == {libvirt_hostname(lab.libvirt_uri)}


def test_without_host_tag_run_writes_libvirts_hostname(lab: Any, tmp_path: Path) -> None:
    """The same through run and the database. Other runs may share the hostname tag, so this
    run's points are the ones of a guest only it has seen."""
    name = f"{lab.prefix}hosttag-{uuid.uuid4().hex[:8]}"
    labkit.create_guest(name)
    try:
        daemon = DaemonProcess(lab_environment(lab, tmp_path, HOST_TAG=None), tmp_path).start()
        try:
            daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")
        finally:
            assert daemon.stop() == 0, daemon.output()
    finally:
        labkit.destroy_guest(name)
    rows = labkit.query(f'{{__name__=~"vm_.+",vm="{name}"}}')
    assert any(row["metric"]["__name__"] == "vm_metrics_state" for row in rows), rows
    assert {row["metric"]["host"] for row in rows} == {libvirt_hostname(lab.libvirt_uri)}


def test_the_daemons_own_figures_reach_the_database(lab: Any, tmp_path: Path) -> None:
    """DESIGN Health: the daemon's figures go to the database as the measurement
    vmtelemetryd, and they agree with the points the same run stored."""
    daemon = DaemonProcess(lab_environment(lab, tmp_path), tmp_path).start()
    try:
        daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")
        time.sleep(10)
    finally:
        assert daemon.stop() == 0, daemon.output()
    host = daemon.host
    lines = _stored_lines(host)

    # vms: the domains of that very sample, as its vm_metrics lines name them.
    vms = series_of(host, f"{OWN}_vms")
    assert len(vms) >= 15, vms
    for t, count in vms:
        names = {dict(tags)["vm"] for measurement, tags in lines[t] if measurement == "vm_metrics"}
        assert set(lab.guests) <= names and all(n.startswith(lab.prefix) for n in names)
        assert count == len(names), (t, names)

    # points_written: lines the database had been sent before that sample, give or take
    # the lines of the last few seconds, which may still have been on their way.
    written = series_of(host, f"{OWN}_points_written")
    assert [v for _, v in written] == sorted(v for _, v in written)
    assert written[-1][1] > written[0][1]
    for t, value in written:
        older = sum(len(batch) for ts, batch in lines.items() if ts < t - DELIVERY_SLACK_MS)
        before = sum(len(batch) for ts, batch in lines.items() if ts < t)
        assert older <= value <= before, (t, older, value, before)
    assert sum(len(b) for ts, b in lines.items() if ts < written[-1][0] - DELIVERY_SLACK_MS)

    durations = [v for _, v in series_of(host, f"{OWN}_poll_duration_s")]
    assert len(durations) >= len(vms) - 1 and all(0 < d < 30 for d in durations), durations
    assert {v for _, v in series_of(host, f"{OWN}_points_dropped")} == {0}


def _stored_lines(host: str) -> dict[int, set[tuple[str, frozenset[tuple[str, str]]]]]:
    """The lines of one run the database holds, by millisecond: (measurement, tags) each.

    victoria-metrics keeps a line as one series per field; a line is its tags at a time.
    """
    known = (*MEASUREMENTS, "vm_info", "vm_events", OWN)
    lines: dict[int, set[tuple[str, frozenset[tuple[str, str]]]]] = defaultdict(set)
    for row in labkit.query(f'{{host="{host}"}}'):
        labels = dict(row["metric"])
        name = labels.pop("__name__")
        measurement = next(m for m in known if name.startswith(m + "_"))
        for t in row["timestamps"]:
            lines[t].add((measurement, frozenset(labels.items())))
    return lines
