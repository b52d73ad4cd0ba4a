"""The values that flow between the pipeline's stages.

sampler -> ``Sample`` -> features -> ``VmFeatures`` -> lineprotocol -> lines (str)

Every value is frozen: a stage may keep what it was given (the feature stage
keeps windows of past values) without fearing that another stage changes it.
Field names inside the mappings are already the schema's names
(``cpu_time_ns``, ``rx_bytes``, ...): no libvirt key leaks past the sampler.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

DeviceKind = Literal["disk", "nic"]

VM_METRIC_FIELDS: tuple[str, ...] = (
    "state",
    "cpu_time_ns",
    "cpu_user_ns",
    "cpu_system_ns",
    "cpu_delay_ns",
    "vcpus",
    "mem_max_kib",
    "mem_current_kib",
    "mem_rss_kib",
    "mem_usable_kib",
    "mem_available_kib",
    "mem_unused_kib",
    "mem_disk_caches_kib",
    "swap_in_kib",
    "swap_out_kib",
    "major_faults",
    "minor_faults",
)

NIC_FIELDS: tuple[str, ...] = (
    "rx_bytes",
    "rx_packets",
    "rx_errors",
    "rx_drops",
    "tx_bytes",
    "tx_packets",
    "tx_errors",
    "tx_drops",
)

DISK_FIELDS: tuple[str, ...] = (
    "rd_reqs",
    "rd_bytes",
    "wr_reqs",
    "wr_bytes",
    "fl_reqs",
    "rd_time_ns",
    "wr_time_ns",
    "capacity_bytes",
    "allocation_bytes",
)

# libvirt's virDomainState: vm_metrics keeps the number, people read the name.
STATE_NAMES: Mapping[int, str] = {
    0: "nostate",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",  # being shut down
    5: "shutoff",
    6: "crashed",
    7: "pmsuspended",
}


def state_name(state: int | None) -> str:
    """``running``, ``paused``, ...; ``-`` when libvirt did not say."""
    if state is None:
        return "-"
    return STATE_NAMES.get(state, f"state{state}")


DEVICE_FIELDS: Mapping[DeviceKind, tuple[str, ...]] = {"nic": NIC_FIELDS, "disk": DISK_FIELDS}
TOTAL_PREFIX: Mapping[DeviceKind, str] = {"nic": "net_", "disk": "disk_"}


@dataclass(frozen=True, slots=True)
class DeviceSample:
    """One NIC or disk of one VM, as libvirt reported it this cycle.

    ``counters`` holds only what libvirt reported: a missing key means "not
    reported", never zero.
    """

    kind: DeviceKind
    name: str
    counters: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class VmSample:
    """One VM at one instant.

    ``instance`` tells two runs of the same domain apart (libvirt's domain id
    changes on every start), so rates never span a restart.
    ``device_counts`` has a kind only when libvirt reported that stats group
    this cycle: a missing kind is "unknown", ``0`` is "has none".
    """

    name: str
    uuid: str
    instance: int
    metrics: Mapping[str, int]
    devices: tuple[DeviceSample, ...]
    device_counts: Mapping[DeviceKind, int]

    def devices_of(self, kind: DeviceKind) -> tuple[DeviceSample, ...]:
        return tuple(d for d in self.devices if d.kind == kind)


@dataclass(frozen=True, slots=True)
class Sample:
    """Every monitored VM of one host from one bulk stats request.

    ``wall_ns`` stamps the points; ``monotonic`` measures the time between
    samples, immune to clock steps.
    """

    host: str
    wall_ns: int
    monotonic: float
    vms: tuple[VmSample, ...]


@dataclass(frozen=True, slots=True)
class VmFeatures:
    """Derived values of one VM for one sample: rates, percents and angles."""

    uuid: str
    fields: Mapping[str, float]
