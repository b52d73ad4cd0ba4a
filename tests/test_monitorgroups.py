"""Telling a domain NOWAIT found busy, and merging its second answer (monitorgroups).

The dicts have the shapes libvirt 9.0 returned here; the lab test
(test_sampler_lab) makes another client hold a real guest's job.
"""

from __future__ import annotations

import time

import pytest

from vmtelemetryd.monitorgroups import (
    ask_again_if_busy,
    monitor_skipped,
    read_at,
    with_monitor_groups,
)

# A running guest with two disks and a NIC, its job held by another client's call:
# CPU, vCPU and NIC figures, the balloon's size, disk names; no memory stats, no
# disk counters.
BUSY = {
    "state.state": 1,
    "cpu.time": 5_000_000_000,
    "balloon.current": 131072,
    "balloon.maximum": 131072,
    "block.count": 2,
    "block.0.name": "vda",
    "block.1.name": "vdb",
    "net.count": 1,
    "net.0.name": "vnet0",
    "net.0.rx.bytes": 100,
}
# The same guest asked again a moment later, its job free.
WHOLE = BUSY | {
    "cpu.time": 5_100_000_000,
    "net.0.rx.bytes": 180,
    "balloon.rss": 60000,
    "balloon.usable": 90000,
    "block.0.rd.reqs": 4,
    "block.0.wr.bytes": 4096,
    "block.1.rd.reqs": 9,
}


def test_a_running_domain_without_its_rss_was_skipped() -> None:
    assert monitor_skipped(BUSY)
    assert not monitor_skipped(WHOLE)


def test_a_domain_without_balloon_device_or_disks_still_tells() -> None:
    # seen here with <memballoon model='none'/> and no disk: rss comes with the job
    assert not monitor_skipped({"balloon.current": 1, "balloon.maximum": 1, "balloon.rss": 5})
    assert monitor_skipped({"balloon.current": 1, "balloon.maximum": 1, "block.count": 0})


def test_the_merge_takes_monitor_groups_from_the_second_answer_the_rest_from_the_first() -> None:
    merged = with_monitor_groups(BUSY, WHOLE)
    assert merged["cpu.time"] == 5_000_000_000 and merged["net.0.rx.bytes"] == 100
    assert merged["balloon.rss"] == 60000 and merged["block.1.rd.reqs"] == 9
    assert merged.keys() == WHOLE.keys()


def test_a_monitor_key_the_second_answer_lacks_is_not_kept_from_the_first() -> None:
    # a disk unplugged in between: the block group is the second answer's alone
    second = {k: v for k, v in WHOLE.items() if not k.startswith("block.1.")} | {"block.count": 1}
    merged = with_monitor_groups(BUSY, second)
    assert merged["block.count"] == 1 and "block.1.name" not in merged


def test_no_second_ask_once_the_deadline_is_too_near() -> None:
    def ask(domains: list[object]) -> list[tuple[object, dict[str, object]]]:
        pytest.fail("asked again past the deadline")

    running = [(None, BUSY), (None, WHOLE)]
    now = time.monotonic()
    assert ask_again_if_busy(running, (now - 1, now), ask, now + 0.01) == (running, {})


def test_a_domain_is_taken_as_read_at_its_place_in_its_request() -> None:
    # four domains over 8 ms: the third was read about 5 ms in
    assert read_at((10.0, 10.008), 2, 4) == pytest.approx(10.005)
    assert read_at((10.0, 10.008), 0, 1) == pytest.approx(10.004)
