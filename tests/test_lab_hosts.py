"""The lab's second hypervisor (hv2): a host of its own for the daemon's
several-hosts tests, with its own name and guests, and a hang that is its alone."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import labkit
import libvirt
import pytest

from vmtelemetryd.sampler import STATS_GROUPS

pytestmark = pytest.mark.lab

# one key each group gives for a paused guest with no OS
GROUP_KEYS = (
    "state.state",
    "cpu.time",
    "balloon.current",
    "vcpu.current",
    "net.0.rx.bytes",
    "block.1.capacity",
)


def test_second_host_has_its_own_name_and_guests(lab2: labkit.LabInfo) -> None:
    first, second = lab2.hosts
    assert first.uri == lab2.libvirt_uri and first.guests == lab2.guests
    assert second.hostname == "hv2" and len(second.guests) == labkit.HOST_GUESTS
    c1, c2 = libvirt.openReadOnly(first.uri), libvirt.openReadOnly(second.uri)
    try:
        assert c2.getHostname() == "hv2"
        assert c1.getHostname() != "hv2"
        names1 = {d.name() for d in c1.listAllDomains()}
        names2 = {d.name() for d in c2.listAllDomains()}
    finally:
        c1.close()
        c2.close()
    assert set(second.guests) <= names2 and set(first.guests) <= names1
    assert not names1 & names2


def test_second_host_reports_every_stats_group(lab2: labkit.LabInfo) -> None:
    second = lab2.hosts[1]
    conn = libvirt.openReadOnly(second.uri)
    try:
        stats = {d.name(): s for d, s in conn.getAllDomainStats(STATS_GROUPS, 0)}
    finally:
        conn.close()
    for name in second.guests:
        s: dict[str, Any] = stats[name]
        assert s["state.state"] == libvirt.VIR_DOMAIN_PAUSED, name
        missing = [k for k in GROUP_KEYS if k not in s]
        assert not missing, (name, missing)
        assert s["balloon.current"] == labkit.GUEST_MEMORY_MIB * 1024
        assert os.path.exists(f"/sys/class/net/{s['net.0.name']}"), name


def test_stopped_second_host_hangs_alone(lab2: labkit.LabInfo) -> None:
    """SIGSTOP of hv2's libvirtd: a call on it does not return, the first host
    still answers at once; SIGCONT: the waiting call completes."""
    first, second = lab2.hosts
    pid = labkit.host_pid(2)
    c1, c2 = libvirt.openReadOnly(first.uri), libvirt.openReadOnly(second.uri)
    got: list[str] = []
    call = threading.Thread(target=lambda: got.append(c2.getHostname()), daemon=True)
    try:
        os.kill(pid, signal.SIGSTOP)
        try:
            call.start()
            call.join(1.0)
            assert call.is_alive() and not got, "a call on the stopped host returned"
            t0 = time.monotonic()
            assert c1.getHostname() != "hv2"
            assert len(c1.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, 0)) >= 1
            assert time.monotonic() - t0 < 1.0
        finally:
            os.kill(pid, signal.SIGCONT)
        call.join(10)
        assert got == ["hv2"]
        assert c2.getHostname() == "hv2"
    finally:
        c1.close()
        c2.close()


def test_up_reuses_the_second_host_and_one_host_up_leaves_it_running(
    lab2: labkit.LabInfo,
) -> None:
    pid = labkit.host_pid(2)
    t0 = time.monotonic()
    assert labkit.up(labkit.DEFAULT_GUESTS, labkit.DEFAULT_BUSY, hosts=2) == lab2
    assert time.monotonic() - t0 < 15
    assert labkit.info() == lab2
    status = labkit.status()["hosts"]["hv2"]
    assert status["answers"] and status["procs"]["libvirtd"] == {"pid": pid, "alive": True}
    assert set(lab2.hosts[1].guests) <= set(status["guests"])
    try:
        one = labkit.up(labkit.DEFAULT_GUESTS, labkit.DEFAULT_BUSY)
        assert [h.number for h in one.hosts] == [1]
        assert labkit.host_pid(2) == pid
    finally:
        labkit.up(labkit.DEFAULT_GUESTS, labkit.DEFAULT_BUSY, hosts=2)
