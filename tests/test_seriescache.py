"""SeriesCache: the escaped tag sets a host's encoder keeps from one sample to the next."""

from __future__ import annotations

from lineparse import parse

from vmtelemetryd.lineprotocol import SeriesCache, encode
from vmtelemetryd.model import DeviceSample, Sample, VmFeatures, VmSample

UUID = "0b6c5ad1-5e4a-4c2b-9d7e-1f0a2b3c4d5e"


def vm(name: str = "web 1", disks: tuple[str, ...] = ("vda",), uuid: str = UUID) -> VmSample:
    devices = tuple(DeviceSample("disk", d, {"rd_bytes": 1}) for d in disks)
    return VmSample(name, uuid, 7, {"state": 1}, devices, {"disk": len(devices)})


def sample(*vms: VmSample, host: str = "hv1") -> Sample:
    return Sample(host, 10**18, 1.0, vms)


def tags_of(lines: list[str]) -> list[dict[str, str]]:
    return [parse(line).tags for line in lines]


def test_lines_are_the_same_with_and_without_the_cache() -> None:
    cache = SeriesCache()
    features = {UUID: VmFeatures(UUID, {"cpu_pct": 2.0})}
    tags = {UUID: {"one_name": "a,b=c d"}}
    for s in (sample(vm()), sample(vm()), sample(vm(disks=("vda", "vdb"))), sample(vm())):
        assert encode(s, features, tags, cache) == encode(s, features, tags)


def test_a_renamed_vm_gets_its_new_name() -> None:
    cache = SeriesCache()
    encode(sample(vm("old name")), {}, None, cache)
    lines = encode(sample(vm("new,name")), {}, None, cache)
    assert {t["vm"] for t in tags_of(lines)} == {"new,name"}


def test_a_changed_metadata_tag_is_written_at_once() -> None:
    cache = SeriesCache()
    encode(sample(vm()), {}, {UUID: {"one_owner": "alice"}}, cache)
    changed = encode(sample(vm()), {}, {UUID: {"one_owner": "bob smith"}}, cache)
    assert {t["one_owner"] for t in tags_of(changed)} == {"bob smith"}
    dropped = encode(sample(vm()), {}, {}, cache)
    assert all("one_owner" not in t for t in tags_of(dropped))


def test_a_changed_host_tag_is_written_at_once() -> None:
    cache = SeriesCache()
    encode(sample(vm(), host="hv1"), {}, None, cache)
    lines = encode(sample(vm(), host="hv 2"), {}, None, cache)
    assert {t["host"] for t in tags_of(lines)} == {"hv 2"}


def test_a_renamed_device_gets_its_new_name() -> None:
    cache = SeriesCache()
    encode(sample(vm(disks=("vda",))), {}, None, cache)
    lines = encode(sample(vm(disks=("sda",))), {}, None, cache)
    assert [t["device"] for t in tags_of(lines) if "device" in t] == ["sda"]


def test_the_cache_holds_only_the_last_samples_vms_and_devices() -> None:
    cache = SeriesCache()
    encode(sample(*(vm(f"vm{i}", uuid=f"u{i}") for i in range(100))), {}, None, cache)
    assert len(cache) == 200  # one tag set per VM and per disk
    for i in range(50):  # a VM whose disk is replaced every cycle
        encode(sample(vm(disks=(f"vd{i}",))), {}, None, cache)
        assert len(cache) <= 1 + 2  # the VM, its disk now and the one before
