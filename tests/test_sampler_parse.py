"""The sampler's pure half: one domain's libvirt stats dict into schema names.

The dicts have the shape libvirt 9.0 returns here (see LAB.md); the lab tests
check the same against real guests.
"""

from __future__ import annotations

from typing import Any

from vmtelemetryd.sampler import parse_vm


def vcpus(*delays: int | None, offline: int = 0) -> dict[str, Any]:
    """The vcpu group for online vCPUs with these delays (None: not reported), then offline."""
    stats: dict[str, Any] = {"vcpu.current": len(delays), "vcpu.maximum": len(delays) + offline}
    for n, delay in enumerate(delays):
        stats |= {f"vcpu.{n}.state": 1, f"vcpu.{n}.time": 10**9 * (n + 1), f"vcpu.{n}.wait": 0}
        if delay is not None:
            stats[f"vcpu.{n}.delay"] = delay
    for n in range(len(delays), len(delays) + offline):
        stats[f"vcpu.{n}.state"] = 0
    return stats


def test_cpu_delay_is_the_sum_over_vcpus() -> None:
    vm = parse_vm("one-7", "u", 3, vcpus(46_322_271, 1_000, 20))
    assert vm.metrics["cpu_delay_ns"] == 46_323_291 and vm.metrics["vcpus"] == 3


def test_an_offline_vcpu_does_not_count() -> None:
    assert parse_vm("a", "u", 1, vcpus(5, 7, offline=2)).metrics["cpu_delay_ns"] == 12


def test_cpu_delay_is_left_out_when_a_running_vcpu_does_not_report_it() -> None:
    assert "cpu_delay_ns" not in parse_vm("a", "u", 1, vcpus(5, None)).metrics
    assert "cpu_delay_ns" not in parse_vm("a", "u", 1, {"state.state": 3}).metrics
