"""The watchdog with several hosts, under the real systemd of tests/systemdns.py.

One stuck host of two must not restart the daemon (that would cut the healthy
host's series too): it shows in the status line instead.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import labkit
import pytest
from systemdns import SERVICE, SystemdNS, booted_for_test
from test_service import install, lab_config, service_dropin, show, wait_status

pytestmark = pytest.mark.lab

WATCHDOG_S = 3


@pytest.fixture
def ns(lab2: Any, tmp_path: Path) -> Iterator[SystemdNS]:
    """A namespace that reaches the second libvirtd's socket, which lies under /var."""
    socket_dir = Path(lab2.hosts[1].uri.split("socket=", 1)[1]).parent
    with booted_for_test(tmp_path, sockets=[socket_dir]) as booted:
        yield booted


def test_one_stuck_host_of_two_shows_in_the_status_and_does_not_trip_the_watchdog(
    ns: SystemdNS, lab2: Any
) -> None:
    first, second = lab2.hosts
    config = lab_config(
        lab2,
        LIBVIRT_URI=f"{first.uri},{second.uri}",
        HOST_TAG="",
        DOMAINS_INCLUDE="",
        LIBVIRT_TIMEOUT="1",
        POLL_INTERVAL="0.5",
    )
    install(ns, lab2, config, service_dropin(WatchdogSec=f"{WATCHDOG_S}s", RestartSec="500ms"))
    ns.systemctl("start", SERVICE)
    wait_status(ns, lambda s: all(h["vms"] > 0 for h in s["hosts"]), 20, "both hosts sampled")
    pid = labkit.host_pid(2)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(3 * WATCHDOG_S)
        props = show(ns, "NRestarts", "ActiveState", "StatusText")
        report = wait_status(ns, lambda s: s["hosts"][1]["last_sample_error"], 10, "hv2's error")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert props["NRestarts"] == "0" and props["ActiveState"] == "active", props
    assert second.uri in props["StatusText"] and "error" in props["StatusText"], props
    assert report["hosts"][0]["last_sample_error"] is None
    assert report["hosts"][0]["last_poll"] > time.time() - 2
    ns.systemctl("stop", SERVICE)
