"""Several hypervisors in one daemon: the lab's two libvirtds (tests/lab/lab_hosts.py).

The FAKE InfluxDB 3 endpoint is the database here: every line it holds is
this run's, so each host's samples can be counted exactly.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import labkit
import libvirt
import pytest
from daemonproc import DaemonProcess, lab_environment, run_verb
from fakeinflux import DATABASE, TOKEN, FakeInflux3, serve
from lineparse import Line, parse_lines

pytestmark = pytest.mark.lab

INTERVAL_S = 0.5
HANG_S = 20


def two_hosts(lab2: Any, workdir: Path, url: str, **overrides: object) -> dict[str, str]:
    first, second = lab2.hosts
    return lab_environment(
        lab2,
        workdir,
        LIBVIRT_URI=f"{first.uri},{second.uri}",
        HOST_TAG=None,
        INFLUX_URL=url,
        INFLUX_DB=DATABASE,
        INFLUX_TOKEN=TOKEN,
        INFLUX_WRITE_API="v3",
        POLL_INTERVAL=INTERVAL_S,
        **overrides,
    )


def states(database: FakeInflux3) -> list[Line]:
    lines = parse_lines("".join(line + "\n" for line in database.accepted))
    return [p for p in lines if p.measurement == "vm_metrics"]


def times_of(points: list[Line], vm: str) -> list[float]:
    return sorted(p.ts / 1e9 for p in points if p.tags["vm"] == vm)


def test_a_hung_host_costs_the_other_no_sample_and_is_sampled_again_after(
    lab2: Any, tmp_path: Path
) -> None:
    first, second = lab2.hosts
    pid = labkit.host_pid(2)
    database = FakeInflux3()
    with serve(database) as url:
        env = two_hosts(lab2, tmp_path, url, LIBVIRT_TIMEOUT="5")
        daemon = DaemonProcess(env, tmp_path).start()
        try:
            daemon.wait_for(lambda s: all(h["vms"] > 0 for h in s["hosts"]), 30, "both hosts")
            os.kill(pid, signal.SIGSTOP)
            stopped = time.time()
            try:
                during = daemon.wait_for(
                    lambda s: s["hosts"][1]["busy"] or s["hosts"][1]["last_sample_error"],
                    HANG_S,
                    "the second host reported stuck",
                )
                shown = run_verb(env, "status").stdout
                time.sleep(max(0.0, stopped + HANG_S - time.time()))
            finally:
                os.kill(pid, signal.SIGCONT)
            resumed = time.time()
            daemon.wait_for(
                lambda s: (
                    s["hosts"][1]["last_poll"] > resumed + 1
                    and s["hosts"][1]["last_sample_error"] is None
                ),
                60,
                "the second host sampled again",
            )
            time.sleep(1)
        finally:
            assert daemon.stop() == 0, daemon.output()
        final = daemon.status()
    points = states(database)
    # Each host's points carry libvirt's name for that host.
    hosts_of = {p.tags["vm"]: p.tags["host"] for p in points}
    assert {hosts_of[g] for g in first.guests} == {first.hostname}, hosts_of
    assert {hosts_of[g] for g in second.guests} == {"hv2"}, hosts_of
    # The first host lost no tick while the second hung.
    busy = times_of(points, lab2.busy_guests[0])
    hung = [t for t in busy if stopped - 1 < t < resumed + 1]
    assert len(hung) >= (HANG_S + 1) / INTERVAL_S - final["overruns"], (len(hung), final)
    assert len(busy) == len(set(busy)), "a sample delivered twice"
    # The second one was stuck, said so, and came back.
    assert during["hosts"][1]["uri"] == second.uri, during
    theirs = times_of(points, second.guests[0])
    assert any(t > resumed for t in theirs) and not [
        t for t in theirs if stopped + 6 < t < resumed - 1
    ], "samples of the hung host taken while it hung"
    assert final["hosts"][0]["host"] == first.hostname and final["hosts"][1]["host"] == "hv2"
    # `vmtelemetryd status` shows each host under its URI, the hung one as such.
    section = shown.split(f"host {second.uri}:\n", 1)[1].split("\nhost ", 1)[0]
    assert "    busy: True" in section or "    last_sample_error: -" not in section, shown
    assert f"host {first.uri}:\n" in shown, shown


def test_events_and_metadata_are_kept_per_host(lab2: Any, tmp_path: Path) -> None:
    second = lab2.hosts[1]
    database = FakeInflux3()
    with serve(database) as url:
        daemon = DaemonProcess(two_hosts(lab2, tmp_path, url), tmp_path).start()
        try:
            daemon.wait_for(lambda s: all(h["vms"] > 0 for h in s["hosts"]), 30, "both hosts")
            conn = libvirt.open(second.rw_uri)
            try:
                guest = conn.lookupByName(second.guests[0])
                guest.resume()
                guest.suspend()
            finally:
                conn.close()
            deadline = time.monotonic() + 5
            while len(events(database, second.guests[0])) < 2:
                assert time.monotonic() < deadline, database.accepted[-5:]
                time.sleep(0.1)
            everyone = {*second.guests, *lab2.hosts[0].guests}
            while not everyone <= set(infos(database)):  # a few XML reads per poll
                assert time.monotonic() < deadline + 30, set(infos(database))
                time.sleep(0.2)
        finally:
            assert daemon.stop() == 0, daemon.output()
    happened = events(database, second.guests[0])
    assert [(p.tags["host"], p.tags["event"]) for p in happened] == [
        ("hv2", "resumed"),
        ("hv2", "suspended"),
    ]
    info = infos(database)
    assert {info[g] for g in second.guests} == {"hv2"}, info
    assert {info[g] for g in lab2.hosts[0].guests} == {lab2.hosts[0].hostname}, info


def events(database: FakeInflux3, vm: str) -> list[Line]:
    lines = parse_lines("".join(line + "\n" for line in database.accepted))
    return [p for p in lines if p.measurement == "vm_events" and p.tags["vm"] == vm]


def infos(database: FakeInflux3) -> dict[str, str]:
    """The host tag of each VM's vm_info lines."""
    lines = parse_lines("".join(line + "\n" for line in database.accepted))
    return {p.tags["vm"]: p.tags["host"] for p in lines if p.measurement == "vm_info"}
