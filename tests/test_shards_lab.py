"""STATS_SHARDS against the lab's libvirtd: shares on connections of their own, asked at once.

Every domain must be in exactly one share, whatever each shard's own listing
says, and a domain whose QEMU hangs may stall only the share it is in.
"""

from __future__ import annotations

import os
import signal
import time
import zlib
from pathlib import Path
from typing import Any

import labkit
import pytest
from daemonproc import lab_environment, run_verb
from lineparse import parse_lines

from vmtelemetryd.hostsampler import HostSampler

pytestmark = pytest.mark.lab


def host(lab: Any, shards: int | None, timeout: float = 10.0) -> HostSampler:
    return HostSampler(
        lab.libvirt_uri,
        shards=shards,
        timeout=timeout,
        wants_domain=lambda name: True,
        filtered=False,
        host_tag=None,
    )


def by_uuid(sampler: HostSampler) -> dict[str, Any]:
    sample = sampler.sample()
    uuids = [vm.uuid for vm in sample.vms]
    assert len(uuids) == len(set(uuids)), "a domain sampled twice"
    return {vm.uuid: vm for vm in sample.vms}


def test_three_shares_sample_every_domain_once_with_the_same_values(lab: Any) -> None:
    whole, split = host(lab, 1), host(lab, 3)
    try:
        one, three = by_uuid(whole), by_uuid(split)
        assert split.shards == 3 and split.share_error is None
    finally:
        whole.close()
        split.close()
    assert set(three) == set(one) and len(one) >= len(lab.guests)
    for uuid in one:
        if one[uuid].name in lab.paused_guests:  # counters that stand still
            assert three[uuid].metrics.keys() == one[uuid].metrics.keys()
            assert three[uuid].devices == one[uuid].devices
            assert three[uuid].metrics["mem_max_kib"] == one[uuid].metrics["mem_max_kib"]


def test_auto_keeps_one_share_for_a_few_domains(lab: Any) -> None:
    sampler = host(lab, None)
    try:
        for _ in range(2):
            sampler.sample()
        assert sampler.shards == 1
    finally:
        sampler.close()


def test_a_hung_domain_stalls_only_its_own_share(lab: Any) -> None:
    name = lab.prefix + "stuck-share"
    labkit.create_guest(name)
    qemu = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text())
    sampler = host(lab, 3, timeout=2.0)
    try:
        everyone = by_uuid(sampler)
        stuck = next(uuid for uuid, vm in everyone.items() if vm.name == name)
        share = zlib.crc32(stuck.encode()) % 3
        others = {u for u in everyone if zlib.crc32(u.encode()) % 3 != share}
        os.kill(qemu, signal.SIGSTOP)
        started = time.monotonic()
        first = by_uuid(sampler)  # the hung share times out; the others answer
        took = time.monotonic() - started
        assert set(first) >= others and stuck not in first, (set(first), others)
        assert sampler.share_error is not None and "timed out" in sampler.share_error
        later = by_uuid(sampler)  # NOWAIT: the share answers again, that domain in it
        assert set(later) == set(everyone) and sampler.share_error is None, sampler.share_error
        assert "mem_rss_kib" not in later[stuck].metrics  # its monitor groups left out
    finally:
        os.kill(qemu, signal.SIGCONT)
        sampler.close()
        labkit.destroy_guest(name)
    assert 1.5 < took < 5


def test_once_with_shares_prints_every_guest_once(lab: Any, tmp_path: Path) -> None:
    result = run_verb(lab_environment(lab, tmp_path, STATS_SHARDS="3"), "once")
    assert result.returncode == 0, result.stderr
    metrics = [p for p in parse_lines(result.stdout) if p.measurement == "vm_metrics"]
    names = [p.tags["vm"] for p in metrics]
    assert sorted(names) == sorted(set(names)) and set(names) >= set(lab.guests)
