"""Feature stage: rates, percents and trend angles against hand-computed values."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest

from vmtelemetryd.features import Features
from vmtelemetryd.model import DeviceKind, DeviceSample, Sample, VmSample

UUID = "11111111-2222-3333-4444-555555555555"


def vm(
    metrics: Mapping[str, int] | None = None,
    devices: tuple[DeviceSample, ...] = (),
    counts: Mapping[DeviceKind, int] | None = None,
    *,
    uuid: str = UUID,
    instance: int = 1,
) -> VmSample:
    return VmSample("vm1", uuid, instance, metrics or {}, devices, counts or {})


def sample(monotonic: float, *vms: VmSample) -> Sample:
    return Sample("hv1", 1_700_000_000_000_000_000 + int(monotonic * 1e9), monotonic, vms)


def nic(name: str, **counters: int) -> DeviceSample:
    return DeviceSample("nic", name, counters)


def disk(name: str, **counters: int) -> DeviceSample:
    return DeviceSample("disk", name, counters)


def cpu(time_ns: int, vcpus: int = 1) -> dict[str, int]:
    return {"cpu_time_ns": time_ns, "vcpus": vcpus}


def mem(available: int, usable: int) -> dict[str, int]:
    return {"mem_available_kib": available, "mem_usable_kib": usable}


def fields_of(features: Features, s: Sample, uuid: str = UUID) -> Mapping[str, float]:
    return features.derive(s)[uuid].fields


# --- rates and percents ------------------------------------------------------


def test_cpu_pct_is_cpu_time_over_elapsed_time_of_all_vcpus() -> None:
    f = Features(5)
    f.derive(sample(100.0, vm(cpu(10_000_000_000, vcpus=2))))
    # 1.5e9 ns of CPU in 1 s on 2 vCPUs: 0.75 of the VM's capacity
    assert fields_of(f, sample(101.0, vm(cpu(11_500_000_000, vcpus=2))))["cpu_pct"] == 75.0
    # 4e9 ns in 2 s on 4 vCPUs (vCPUs from the current sample): 50 %
    assert fields_of(f, sample(103.0, vm(cpu(15_500_000_000, vcpus=4))))["cpu_pct"] == 50.0


def test_cpu_pct_needs_vcpus() -> None:
    f = Features(5)
    f.derive(sample(0.0, vm({"cpu_time_ns": 0})))
    assert "cpu_pct" not in fields_of(f, sample(1.0, vm({"cpu_time_ns": 10**9})))


def test_cpu_steal_pct_is_vcpu_delay_over_elapsed_time_of_all_vcpus() -> None:
    f = Features(5)
    f.derive(sample(100.0, vm({"cpu_delay_ns": 7_000_000_000, "vcpus": 4})))
    # 1e9 ns waited for a host CPU in 2 s by 4 vCPUs: 12.5 % of their time
    later = fields_of(f, sample(102.0, vm({"cpu_delay_ns": 8_000_000_000, "vcpus": 4})))
    assert later["cpu_steal_pct"] == 12.5 and "cpu_pct" not in later


def test_cpu_steal_pct_has_no_value_across_a_counter_reset() -> None:
    f = Features(5)
    f.derive(sample(0.0, vm({"cpu_delay_ns": 5 * 10**9, "vcpus": 1})))
    assert "cpu_steal_pct" not in fields_of(f, sample(1.0, vm({"cpu_delay_ns": 10**6, "vcpus": 1})))


def test_first_sample_has_no_rates_but_has_mem_used_pct() -> None:
    f = Features(5)
    fields = fields_of(f, sample(0.0, vm({**cpu(10**9), **mem(8_000_000, 2_000_000)})))
    # 100 * (8e6 - 2e6) / 8e6
    assert fields == {"mem_used_pct": 75.0}


@pytest.mark.parametrize(
    "metrics",
    [
        {"mem_available_kib": 8_000_000},
        {"mem_usable_kib": 2_000_000},
        {"mem_available_kib": 0, "mem_usable_kib": 0},
    ],
)
def test_mem_used_pct_needs_both_values_and_available_memory(metrics: dict[str, int]) -> None:
    assert "mem_used_pct" not in fields_of(Features(5), sample(0.0, vm(metrics)))


def test_device_rates_are_summed_over_devices_of_a_kind_per_second() -> None:
    f = Features(5)
    counts: dict[DeviceKind, int] = {"nic": 2, "disk": 1}
    f.derive(
        sample(
            10.0,
            vm(
                devices=(
                    nic("vnet0", rx_bytes=1000, tx_bytes=100, rx_packets=10, tx_packets=1),
                    nic("vnet1", rx_bytes=500, tx_bytes=50, rx_packets=5, tx_packets=2),
                    disk("vda", rd_bytes=4096, wr_bytes=0, rd_reqs=1, wr_reqs=0),
                ),
                counts=counts,
            ),
        )
    )
    fields = fields_of(
        f,
        sample(
            12.0,
            vm(
                devices=(
                    # listed in another order: devices are matched by name
                    nic("vnet1", rx_bytes=1500, tx_bytes=50, rx_packets=9, tx_packets=2),
                    nic("vnet0", rx_bytes=3000, tx_bytes=300, rx_packets=20, tx_packets=7),
                    disk("vda", rd_bytes=12288, wr_bytes=8192, rd_reqs=5, wr_reqs=2),
                ),
                counts=counts,
            ),
        ),
    )
    assert fields == {
        "net_rx_bps": 1500.0,  # (2000 + 1000) B / 2 s
        "net_tx_bps": 100.0,  # (200 + 0) / 2
        "net_rx_pps": 7.0,  # (10 + 4) / 2
        "net_tx_pps": 3.0,  # (6 + 0) / 2
        "disk_rd_bps": 4096.0,  # 8192 / 2
        "disk_wr_bps": 4096.0,
        "disk_rd_iops": 2.0,
        "disk_wr_iops": 1.0,
    }


def test_every_value_is_a_float_even_when_whole() -> None:
    """The encoder writes repr(value): only a float comes out as ``12.0`` (an int as ``12``,
    which our strict parser refuses, a bool as ``True``)."""
    f = Features(2)
    devices = (nic("vnet0", rx_bytes=0, tx_bytes=0), disk("vda", rd_bytes=0, wr_reqs=0))
    counts: dict[DeviceKind, int] = {"nic": 1, "disk": 1}
    for t in (1.0, 2.0, 3.0):
        metrics = {**cpu(int(t) * 10**9), "cpu_delay_ns": 0, **mem(100, 50)}
        fields = fields_of(f, sample(t, vm(metrics, devices, counts)))
    assert {"cpu_pct", "cpu_steal_pct", "net_rx_bps", "disk_wr_iops_angle_deg"} <= fields.keys()
    assert fields["net_rx_bps_angle_deg"] == 0.0  # a window whose mean is 0
    assert {name: type(value) for name, value in fields.items()} == dict.fromkeys(fields, float)


def test_counter_reset_gives_no_rate_never_a_negative_one() -> None:
    f = Features(5)
    counts: dict[DeviceKind, int] = {"nic": 2}
    before = (nic("vnet0", rx_bytes=5000, tx_bytes=10), nic("vnet1", rx_bytes=10, tx_bytes=10))
    after = (nic("vnet0", rx_bytes=100, tx_bytes=20), nic("vnet1", rx_bytes=20, tx_bytes=30))
    f.derive(sample(0.0, vm(cpu(9 * 10**9), before, counts)))
    fields = fields_of(f, sample(1.0, vm(cpu(1 * 10**9), after, counts)))
    assert "cpu_pct" not in fields
    assert "net_rx_bps" not in fields  # vnet0 went down: no partial or negative sum
    assert fields["net_tx_bps"] == 30.0  # the other counter still counts


def test_unchanged_counter_is_a_rate_of_zero() -> None:
    f = Features(5)
    f.derive(sample(0.0, vm(cpu(10**9))))
    assert fields_of(f, sample(1.0, vm(cpu(10**9))))["cpu_pct"] == 0.0


def test_missing_stats_group_gives_no_rate_and_no_zero() -> None:
    f = Features(5)
    devices = (disk("vda", rd_bytes=0, wr_bytes=0, rd_reqs=0, wr_reqs=0),)
    f.derive(sample(0.0, vm(devices=devices, counts={"disk": 1})))
    # libvirt skipped the busy domain's block group this cycle: no devices, no count
    fields = fields_of(f, sample(1.0, vm(counts={})))
    assert not any(name.startswith("disk_") for name in fields)
    # and the cycle after it has nothing to compare with
    fields = fields_of(f, sample(2.0, vm(devices=devices, counts={"disk": 1})))
    assert not any(name.startswith("disk_") for name in fields)


def test_counter_missing_in_either_sample_gives_no_rate() -> None:
    f = Features(5)
    counts: dict[DeviceKind, int] = {"nic": 2}
    f.derive(sample(0.0, vm(devices=(nic("a", rx_bytes=0), nic("b", rx_bytes=0)), counts=counts)))
    partial = (nic("a", rx_bytes=10, tx_bytes=5), nic("b", tx_bytes=5))
    fields = fields_of(f, sample(1.0, vm(devices=partial, counts=counts)))
    assert "net_rx_bps" not in fields  # b did not report it now
    assert "net_tx_bps" not in fields  # neither reported it before
    full = (nic("a", rx_bytes=30, tx_bytes=5), nic("b", rx_bytes=5, tx_bytes=8))
    fields = fields_of(f, sample(2.0, vm(devices=full, counts=counts)))
    assert "net_rx_bps" not in fields  # b did not report it before
    assert fields["net_tx_bps"] == 3.0


def test_hot_plugged_or_unplugged_device_gives_no_rate_that_cycle() -> None:
    f = Features(5)
    one = (nic("vnet0", rx_bytes=100),)
    two = (nic("vnet0", rx_bytes=200), nic("vnet7", rx_bytes=1_000_000))
    f.derive(sample(0.0, vm(devices=one, counts={"nic": 1})))
    assert "net_rx_bps" not in fields_of(f, sample(1.0, vm(devices=two, counts={"nic": 2})))
    two_later = (nic("vnet0", rx_bytes=300), nic("vnet7", rx_bytes=1_000_050))
    fields = fields_of(f, sample(2.0, vm(devices=two_later, counts={"nic": 2})))
    assert fields["net_rx_bps"] == 150.0
    one_later = (nic("vnet0", rx_bytes=400),)
    assert "net_rx_bps" not in fields_of(f, sample(3.0, vm(devices=one_later, counts={"nic": 1})))


def test_ambiguous_device_names_give_no_rate() -> None:
    f = Features(5)
    twins = (nic("", rx_bytes=100), nic("", rx_bytes=200))
    f.derive(sample(0.0, vm(devices=twins, counts={"nic": 2})))
    assert "net_rx_bps" not in fields_of(f, sample(1.0, vm(devices=twins, counts={"nic": 2})))


def test_vm_without_devices_of_a_kind_moves_zero_bytes() -> None:
    f = Features(5)
    f.derive(sample(0.0, vm(counts={"nic": 0})))
    fields = fields_of(f, sample(1.0, vm(counts={"nic": 0})))
    assert fields["net_rx_bps"] == 0.0
    assert "disk_rd_bps" not in fields  # the disk group was never reported


def test_time_standing_still_gives_no_rate() -> None:
    f = Features(5)
    f.derive(sample(5.0, vm(cpu(0))))
    assert "cpu_pct" not in fields_of(f, sample(5.0, vm(cpu(10**9))))


def test_disk_rates_of_a_vm_asked_again_are_timed_by_when_its_disks_were_read() -> None:
    def busy(t: float, read: int, late: float) -> Sample:
        devices = (nic("vnet0", rx_bytes=read), disk("vda", rd_bytes=read))
        asked_again = VmSample("vm1", UUID, 1, {}, devices, {"nic": 1, "disk": 1}, late)
        return sample(t, asked_again)

    f = Features(5)
    f.derive(busy(100.0, 0, 0.0))
    # its disks were read 0.25 s after its NIC, whose counters span the whole 1 s
    later = fields_of(f, busy(101.0, 1250, 0.25))
    assert later["disk_rd_bps"] == 1000.0 and later["net_rx_bps"] == 1250.0
    # back in step: the disks' span is 0.75 s
    assert fields_of(f, busy(102.0, 2000, 0.0))["disk_rd_bps"] == 1000.0


# --- instances and forgetting ------------------------------------------------


def test_restarted_vm_starts_afresh() -> None:
    f = Features(2)
    f.derive(sample(0.0, vm(cpu(10**9), instance=7)))
    f.derive(sample(1.0, vm(cpu(2 * 10**9), instance=7)))
    fields = fields_of(f, sample(2.0, vm(cpu(3 * 10**9), instance=8)))
    assert "cpu_pct" not in fields  # counters grew, but across a restart
    fields = fields_of(f, sample(3.0, vm(cpu(4 * 10**9), instance=8)))
    assert fields["cpu_pct"] == 100.0
    # window 2: the old instance's cpu_pct (100 at 1 s) must not fill it
    assert "cpu_pct_angle_deg" not in fields
    fields = fields_of(f, sample(4.0, vm(cpu(5 * 10**9), instance=8)))
    assert fields["cpu_pct_angle_deg"] == 0.0


def test_a_vm_listed_twice_in_one_sample_is_derived_once() -> None:
    f = Features(5)
    for t in (0.0, 1.0, 2.0):
        twice = sample(t, vm(cpu(int(t) * 10**9)), vm(cpu(int(t) * 10**9 // 2)))
        fields = fields_of(f, twice)
    assert fields["cpu_pct"] == 100.0  # the first of the two
    (history,) = f.snapshot().values()
    assert history.windows == {"cpu_pct": ((1.0, 100.0), (2.0, 100.0))}


def test_vm_absent_from_a_sample_is_forgotten() -> None:
    f = Features(5)
    other = vm(cpu(0), uuid="other")
    f.derive(sample(0.0, vm(cpu(10**9)), other))
    derived = f.derive(sample(1.0, other))
    assert set(derived) == {"other"}
    # back with the same instance, yet not consecutive: no rate spanning the gap
    assert "cpu_pct" not in fields_of(f, sample(2.0, vm(cpu(3 * 10**9)), other))


def test_every_vm_of_the_sample_gets_an_entry() -> None:
    derived = Features(5).derive(sample(0.0, vm(uuid="a"), vm(uuid="b")))
    assert {u: dict(v.fields) for u, v in derived.items()} == {"a": {}, "b": {}}
    assert derived["a"].uuid == "a"


# --- angles ------------------------------------------------------------------


def mem_pct_sample(t: float, pct: int) -> Sample:
    """A sample whose mem_used_pct is ``pct`` (available 100 kib)."""
    return sample(t, vm(mem(100, 100 - pct)))


def test_percent_angle_is_atan_of_slope_in_points_per_second_after_window_values() -> None:
    f = Features(3)
    assert "mem_used_pct_angle_deg" not in fields_of(f, mem_pct_sample(0.0, 10))
    assert "mem_used_pct_angle_deg" not in fields_of(f, mem_pct_sample(1.0, 11))
    # 10, 11, 12 % at 0, 1, 2 s: +1 point per second
    assert fields_of(f, mem_pct_sample(2.0, 12))["mem_used_pct_angle_deg"] == pytest.approx(45.0)
    # window of 3: 11, 12, 10 at 1, 2, 3 s: slope -0.5 point/s
    angle = fields_of(f, mem_pct_sample(3.0, 10))["mem_used_pct_angle_deg"]
    assert angle == pytest.approx(math.degrees(math.atan(-0.5)))  # -26.565...


def test_cpu_pct_angle() -> None:
    f = Features(3)
    f.derive(sample(0.0, vm(cpu(0))))
    # cpu_pct 20, 22, 24 (2e8, 2.2e8, 2.4e8 ns per 1 s on 1 vCPU): +2 points/s
    elapsed_ns = 0
    for t, pct in ((1.0, 20), (2.0, 22), (3.0, 24)):
        elapsed_ns += pct * 10_000_000
        fields = fields_of(f, sample(t, vm(cpu(elapsed_ns))))
    assert fields["cpu_pct"] == pytest.approx(24.0)
    assert fields["cpu_pct_angle_deg"] == pytest.approx(math.degrees(math.atan(2.0)))  # 63.43...


def rx_sample(t: float, rx_bytes: int) -> Sample:
    return sample(t, vm(devices=(nic("vnet0", rx_bytes=rx_bytes),), counts={"nic": 1}))


@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        ((99, 100, 101), 45.0),  # +1 B/s per s on a mean of 100: +1 % per second
        ((101, 100, 99), -45.0),
        ((100, 100, 100), 0.0),
        ((0, 0, 0), 0.0),  # mean 0
        ((50, 100, 150), math.degrees(math.atan(50.0))),  # +50 B/s/s on 100: 50 %/s
    ],
)
def test_rate_angle_uses_slope_relative_to_window_mean(
    rates: tuple[int, int, int], expected: float
) -> None:
    f = Features(3)
    total = 1000
    f.derive(rx_sample(0.0, total))
    for t, rate in enumerate(rates, start=1):
        total += rate
        fields = fields_of(f, rx_sample(float(t), total))
    assert fields["net_rx_bps"] == rates[-1]
    assert fields["net_rx_bps_angle_deg"] == pytest.approx(expected)


def test_angle_uses_each_value_own_time_across_a_missing_value() -> None:
    f = Features(3)
    f.derive(mem_pct_sample(0.0, 10))
    f.derive(mem_pct_sample(1.0, 11))
    fields = fields_of(f, sample(2.0, vm({})))  # no memory stats this cycle
    assert "mem_used_pct_angle_deg" not in fields  # no value, so no (stale) angle either
    # 10, 11, 13 at 0, 1, 3 s lie on one line of slope 1 (at 0, 1, 2 s it would be 1.5)
    assert fields_of(f, mem_pct_sample(3.0, 13))["mem_used_pct_angle_deg"] == pytest.approx(45.0)


def test_window_at_a_single_instant_has_no_angle() -> None:
    f = Features(2)
    f.derive(mem_pct_sample(5.0, 10))
    fields = fields_of(f, mem_pct_sample(5.0, 20))
    assert fields["mem_used_pct"] == 20.0
    assert "mem_used_pct_angle_deg" not in fields


def test_vertical_trend_has_no_angle_rather_than_90() -> None:
    f = Features(2)
    f.derive(mem_pct_sample(0.0, 10))
    # +90 points in 1e-15 s: atan(9e16) rounds to exactly pi/2
    assert "mem_used_pct_angle_deg" not in fields_of(f, mem_pct_sample(1e-15, 100))


def test_an_angle_written_as_90_is_left_out() -> None:
    f = Features(2)
    f.derive(mem_pct_sample(1000.0, 0))
    # +100 points in 1e-11 s: 90 - 6e-12 degrees, which FLOAT_DIGITS digits write as 90
    steep = mem_pct_sample(1000.0 + 1e-11, 100)
    assert math.degrees(math.atan(100 / (steep.monotonic - 1000.0))) < 90
    assert "mem_used_pct_angle_deg" not in fields_of(f, steep)


def test_angles_stay_within_open_interval_for_steep_real_trends() -> None:
    f = Features(2)
    f.derive(mem_pct_sample(1000.0, 0))
    angle = fields_of(f, mem_pct_sample(1000.001, 100))["mem_used_pct_angle_deg"]
    assert 89.99 < angle < 90.0


# --- window size -------------------------------------------------------------


def test_growing_the_window_keeps_the_values_held() -> None:
    f = Features(4)
    f.derive(mem_pct_sample(0.0, 10))
    f.derive(mem_pct_sample(1.0, 11))
    f.resize(3)
    assert fields_of(f, mem_pct_sample(2.0, 12))["mem_used_pct_angle_deg"] == pytest.approx(45.0)


def test_shrinking_the_window_keeps_the_newest_values() -> None:
    f = Features(3)
    for t, pct in ((0.0, 50), (1.0, 10), (2.0, 11)):
        f.derive(mem_pct_sample(t, pct))
    f.resize(2)
    # window now 11, 20 at 2, 3 s: slope 9 (10, 11, 20 would give 5)
    angle = fields_of(f, mem_pct_sample(3.0, 20))["mem_used_pct_angle_deg"]
    assert angle == pytest.approx(math.degrees(math.atan(9.0)))


@pytest.mark.parametrize("window", [0, 1])
def test_window_below_two_is_refused(window: int) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        Features(window)
    with pytest.raises(ValueError, match="at least 2"):
        Features(5).resize(window)
