"""One connection's sampler against the lab when a QEMU or a libvirtd stops answering.

A request that timed out leaves its connection behind: the next request goes
on a new one, where NOWAIT skips the hung domain. A libvirtd that hangs
itself shows as stuck (the watchdog's business), not as unreachable, and is
sampled again as soon as it answers, without a reconnect backoff.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import labkit
import libvirt
import pytest
from systemdns import wait_for

from vmtelemetryd.events import EventSource, start_event_loop
from vmtelemetryd.monitorgroups import BUSY_RETRY_AFTER_S
from vmtelemetryd.sampler import STATS_GROUPS, Sampler
from vmtelemetryd.timedcalls import SamplerStuck

pytestmark = pytest.mark.lab


def sampler(uri: str, timeout: float, filtered: bool = True) -> Sampler:
    """With events registered on each connection, as the daemon's; filtered by default:
    the listing path, where a request on the connection of a timed-out one was seen to
    hang too."""
    start_event_loop()
    events = EventSource(uri, lambda notice: None)
    return Sampler(
        uri,
        timeout=timeout,
        wants_domain=lambda name: True,
        filtered=filtered,
        host_tag=None,
        on_connect=events.register,
    )


def open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # one closed meanwhile
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def test_after_a_timed_out_request_the_next_ones_answer_on_a_new_connection(lab: Any) -> None:
    name = lab.prefix + "stuck-one"
    labkit.create_guest(name)
    qemu = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
    sockets = open_sockets()
    s = sampler(lab.libvirt_uri, 2.0)
    try:
        everyone = {vm.uuid: vm.name for vm in s.sample().vms}
        os.kill(qemu, signal.SIGSTOP)
        with pytest.raises(SamplerStuck, match="timed out"):
            s.sample()
        later = [{vm.uuid: vm for vm in s.sample().vms} for _ in range(4)]
        assert open_sockets() == sockets + 2  # the new connection, the hung one's
    finally:
        os.kill(qemu, signal.SIGCONT)
        s.close()
        labkit.destroy_guest(name)
    # the hung call closes its connection once it ends, events and all; close() the other
    wait_for(lambda: open_sockets() == sockets, 10, "every connection closed after SIGCONT")
    assert s.reconnects == 1
    for vms in later:
        assert vms.keys() == everyone.keys()
        hung = next(vm for vm in vms.values() if vm.name == name)
        assert "mem_rss_kib" not in hung.metrics  # NOWAIT left its monitor groups out


def test_a_hung_libvirtd_is_stuck_and_sampled_again_once_it_answers(lab2: labkit.LabInfo) -> None:
    second = lab2.hosts[1]
    pid = labkit.host_pid(2)
    s = sampler(second.uri, 1.0)
    try:
        assert {vm.name for vm in s.sample().vms} >= set(second.guests)
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(SamplerStuck, match="stats request timed out"):
                s.sample()
            with pytest.raises(SamplerStuck, match=r"cannot connect .* timed out"):
                s.sample()
            t0 = time.monotonic()
            with pytest.raises(SamplerStuck, match="has not answered"):
                s.sample()  # two calls wait: no third is started
            assert time.monotonic() - t0 < 0.5
        finally:
            os.kill(pid, signal.SIGCONT)
        names: set[str] | None = None
        deadline = time.monotonic() + 5
        while names is None:
            assert time.monotonic() < deadline, "not sampled again within 5 s of SIGCONT"
            try:
                names = {vm.name for vm in s.sample().vms}
            except SamplerStuck:
                time.sleep(0.1)  # the calls that waited are still being answered
        assert names >= set(second.guests)
    finally:
        s.close()


@pytest.mark.parametrize("filtered", [False, True], ids=["bulk", "listing"])
def test_a_guest_another_client_keeps_busy_is_sampled_whole(lab: Any, filtered: bool) -> None:
    """Another collector's stats calls hold the busy guest's job 4 ms in 100 or so, as
    the reader of test_devices_lab did: NOWAIT alone found it busy in 5 of 200 calls
    here. The sampler asks again 20 ms later, long before that collector's next call."""
    busy = lab.busy_guests[0]
    other = libvirt.openReadOnly(lab.libvirt_uri)
    s = sampler(lab.libvirt_uri, 5.0, filtered)
    done = threading.Event()

    def other_collector() -> None:
        dom = other.lookupByName(busy)
        while not done.wait(0.1):
            other.domainListGetStats([dom], STATS_GROUPS, 0)

    thread = threading.Thread(target=other_collector)
    thread.start()
    lateness = []
    try:
        for _ in range(300):
            (vm,) = [vm for vm in s.sample().vms if vm.name == busy]
            assert "mem_rss_kib" in vm.metrics, "the balloon group is missing"
            assert all("rd_reqs" in d.counters for d in vm.devices if d.kind == "disk"), vm
            lateness.append(vm.monitor_late_s)
            time.sleep(random.uniform(0, 0.02))  # never in step with the other collector
    finally:
        done.set()
        thread.join()
        s.close()
        other.close()
    asked_again = [late for late in lateness if late]
    assert asked_again, "the other collector never kept the guest busy: no test"
    # read after the pause, and within the request's own time
    assert all(BUSY_RETRY_AFTER_S < late < 0.5 for late in asked_again), asked_again
