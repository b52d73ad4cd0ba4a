"""The values that flow between the pipeline's stages.

sampler -> ``Sample`` -> features -> ``VmFeatures`` -> lineprotocol -> lines (str)
writer -> ``WriterStatus`` (with its ``DeliveryCounts`` and ``Delivery``) -> daemon, health

Every value is frozen: a stage may keep what it was given (the feature stage
keeps windows of past values) without fearing that another stage changes it.
Field names inside the mappings are already the schema's names
(``cpu_time_ns``, ``rx_bytes``, ...): no libvirt key leaks past the sampler.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
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

FLOAT_DIGITS = 12
"""Significant digits of each derived value written. A rate is good to a few digits at
most: one bulk request reads the VMs' counters one after another, over its whole
duration (228 ms for 60 guests), against one timestamp. Python's shortest repr (up to
17 digits) took 1.7x as long to write: 8.3 against 5.0 µs for a VM's 22 values."""
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
    ``monitor_late_s``: how much later than the rest its memory figures and
    disk counters were read, when the VM was asked for them again (monitorgroups).
    """

    name: str
    uuid: str
    instance: int
    metrics: Mapping[str, int]
    devices: tuple[DeviceSample, ...]
    device_counts: Mapping[DeviceKind, int]
    monitor_late_s: float = 0.0


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


class Delivery(enum.Enum):
    """status.json's ``delivery``: what an operator needs to know about the database."""

    OK = "ok"
    RETRYING = "retrying"  # away or failing: it will come back on its own
    REFUSED = "refused"  # 401/403/404: an operator must act
    SPOOL_UNUSABLE = "spool-unusable"  # lines are held in memory only


@dataclass(frozen=True, slots=True)
class DeliveryCounts:
    """Counters that only grow; a writer rebuilt by a reload starts from the old one's."""

    written: int = 0
    dropped: int = 0
    dead_lettered: int = 0
    write_errors: int = 0

    def __add__(self, other: DeliveryCounts) -> DeliveryCounts:
        return DeliveryCounts(
            written=self.written + other.written,
            dropped=self.dropped + other.dropped,
            dead_lettered=self.dead_lettered + other.dead_lettered,
            write_errors=self.write_errors + other.write_errors,
        )


@dataclass(frozen=True, slots=True)
class WriterStatus:
    """A consistent snapshot for status.json and the daemon's own measurement.

    ``queued`` counts every line that lives only in memory (the write in
    flight included) and ``spooled`` every line on disk: a line is in exactly
    one of them.
    """

    queued: int
    spooled: int
    counts: DeliveryCounts
    delivery: Delivery
    last_write_wall: float | None
    last_error: str | None
    spool_error: str | None


@dataclass(frozen=True, slots=True)
class WriterSettings:
    batch_max_lines: int
    batch_max_sec: float
    spool_dir: Path
    spool_max_bytes: int
