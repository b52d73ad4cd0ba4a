"""A poll cycle's cost next to the bare libvirt bulk stats call, side by side in one run.

Needs the lab (``tests/lab/lab up``). For each round it times, interleaved so
that machine noise hits both alike:

* bare: ``getAllDomainStats`` for the same groups and flags, nothing else;
* cycle: what the daemon's main loop does per tick: ``Sampler.sample()``
  (the same call plus parsing), ``Features.derive`` and ``encode``.

Wall time includes libvirtd's work; CPU time is this process's own. A second
table scales the pure stages to 1000 synthetic VMs, where the collector's own
CPU matters most.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "lab"))

import labkit

from vmtelemetryd.features import Features
from vmtelemetryd.lineprotocol import encode
from vmtelemetryd.model import DISK_FIELDS, NIC_FIELDS, DeviceSample, Sample, VmSample
from vmtelemetryd.sampler import ACTIVE_ONLY, STATS_FLAGS, STATS_GROUPS, Sampler

ROUNDS = 40


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000


def lab_rounds(uri: str) -> None:
    conn = libvirt.openReadOnly(uri)
    sampler = Sampler(
        uri, timeout=30, wants_domain=lambda _: True, filtered=False, host_tag="bench"
    )
    features = Features(5)
    vms = len(conn.getAllDomainStats(STATS_GROUPS, ACTIVE_ONLY | STATS_FLAGS))

    def cycle() -> None:
        sample = sampler.sample()
        encode(sample, features.derive(sample))

    bare: list[tuple[float, float]] = []
    ours: list[tuple[float, float]] = []
    for _ in range(ROUNDS):
        bare.append(timed(lambda: conn.getAllDomainStats(STATS_GROUPS, ACTIVE_ONLY | STATS_FLAGS)))
        ours.append(timed(cycle))
    sampler.close()
    conn.close()
    print(f"lab: {vms} running/paused guests, {ROUNDS} interleaved rounds, median (p90)")
    print(f"{'':28}{'wall ms':>16}{'own CPU ms':>16}")
    for name, rows in (("bare getAllDomainStats", bare), ("daemon cycle", ours)):
        print(f"{name:<28}{_fmt([w for w, _ in rows]):>16}{_fmt([c for _, c in rows]):>16}")
    ratio = statistics.median(w for w, _ in ours) / statistics.median(w for w, _ in bare)
    extra = statistics.median(c for _, c in ours) - statistics.median(c for _, c in bare)
    print(f"cycle/bare wall ratio {ratio:.2f}; own CPU added per VM {extra / vms:.3f} ms\n")


def synthetic_vm(i: int, t: int) -> VmSample:
    grow = 1000 * t + i
    nic = DeviceSample("nic", "vnet0", dict.fromkeys(NIC_FIELDS, grow))
    disks = tuple(DeviceSample("disk", d, dict.fromkeys(DISK_FIELDS, grow)) for d in ("vda", "vdb"))
    metrics = {
        "state": 1,
        "cpu_time_ns": grow * 10**6,
        "vcpus": 2,
        "mem_available_kib": 4_000_000,
        "mem_usable_kib": 1_000_000 + i,
    }
    return VmSample(f"vm-{i}", f"uuid-{i}", 1, metrics, (nic, *disks), {"nic": 1, "disk": 2})


def synthetic_rounds(count: int) -> None:
    features = Features(5)
    samples = [
        Sample("bench", t * 10**9, float(t), tuple(synthetic_vm(i, t) for i in range(count)))
        for t in range(12)
    ]
    costs = []
    for sample in samples:
        costs.append(timed(lambda s=sample: encode(s, features.derive(s)))[1])
    steady = costs[6:]
    lines = len(encode(samples[-1], features.derive(samples[-1])))
    print(f"pure stages, {count} synthetic VMs (1 NIC, 2 disks), {lines} lines per cycle")
    print(
        f"features + encode: median {statistics.median(steady):.1f} ms CPU per cycle, "
        f"{statistics.median(steady) / count * 1000:.1f} µs per VM"
    )


def _fmt(values: list[float]) -> str:
    ordered = sorted(values)
    return f"{statistics.median(ordered):.2f} ({ordered[int(len(ordered) * 0.9) - 1]:.2f})"


if __name__ == "__main__":
    lab_rounds(labkit.info().libvirt_uri)
    synthetic_rounds(1000)
