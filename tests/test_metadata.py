"""Who a VM is: the domain XML parser and the cache that spreads the reads (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape

import pytest
from lineparse import parse_lines

from vmtelemetryd.lineprotocol import encode_info
from vmtelemetryd.metadata import parse_metadata
from vmtelemetryd.metadatacache import MIN_READS_PER_CYCLE, MetadataCache
from vmtelemetryd.model import Sample, VmSample


def one_xml(name: str, owner: str = "oneadmin", group: str = "users") -> str:
    return f"""<domain type='kvm'>
  <name>one-4242</name><title>{escape(name)} title</title>
  <metadata>
    <one:vm xmlns:one="http://opennebula.org/xmlns/libvirt/1.0">
      <one:system_datastore><![CDATA[/var/lib/one//datastores/0/4242]]></one:system_datastore>
      <one:name><![CDATA[{name}]]></one:name>
      <one:uname><![CDATA[{owner}]]></one:uname><one:uid>0</one:uid>
      <one:gname><![CDATA[{group}]]></one:gname><one:gid>1</one:gid>
    </one:vm>
  </metadata>
</domain>"""


def nova_xml(version: str) -> str:
    return f"""<domain type='kvm'><name>instance-0000002a</name><metadata>
  <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/{version}">
    <nova:package version="27.1.0"/>
    <nova:name>web-1</nova:name>
    <nova:creationTime>2026-11-30 10:00:00</nova:creationTime>
    <nova:flavor name="m1.small"><nova:memory>2048</nova:memory><nova:vcpus>1</nova:vcpus>
    </nova:flavor>
    <nova:owner>
      <nova:user uuid="8d3c">alice</nova:user>
      <nova:project uuid="f00d">shop</nova:project>
    </nova:owner>
  </nova:instance></metadata></domain>"""


def test_an_opennebula_domain() -> None:
    assert parse_metadata("one-4242", one_xml("my vm")) == {
        "one_vm_id": "4242",
        "title": "my vm title",
        "one_name": "my vm",
        "one_owner": "oneadmin",
        "one_group": "users",
    }


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_a_nova_domain(version: str) -> None:
    assert parse_metadata("instance-0000002a", nova_xml(version)) == {
        "nova_name": "web-1",
        "nova_flavor": "m1.small",
        "nova_project": "shop",
        "nova_project_id": "f00d",
        "nova_user": "alice",
        "nova_user_id": "8d3c",
    }


HOSTILE = 'a,b c="d"=e\\f\nline two\tx ' + "ü" * 3


def test_tenant_text_comes_back_exact_and_empty_values_are_left_out() -> None:
    keys = parse_metadata("one-1", one_xml(HOSTILE, owner="", group="   "))
    assert keys["one_name"] == HOSTILE
    assert "one_owner" not in keys and keys["one_group"] == "   "


def test_xml_that_does_not_parse_keeps_what_the_name_says() -> None:
    assert parse_metadata("one-9", "<domain><oops") == {"one_vm_id": "9"}
    assert parse_metadata("one-x", "<domain/>") == {}
    assert parse_metadata("xone-1", "<domain/>") == {}


def test_vm_info_carries_each_key_as_a_tag_exactly() -> None:
    vm = VmSample("one-1", "u-1", 1, {}, (), {})
    keys = parse_metadata("one-1", one_xml(HOSTILE))
    (line,) = parse_lines("\n".join(encode_info(Sample("hv1", 5, 1.0, (vm,)), {"u-1": keys})))
    assert line.measurement == "vm_info" and line.fields == {"info": 1} and line.ts == 5
    # What line protocol cannot carry (newline, tab) becomes U+FFFD; everything else is exact.
    assert line.tags["one_name"] == HOSTILE.replace("\n", "\ufffd").replace("\t", "\ufffd")
    assert line.tags["vm"] == "one-1" and line.tags["one_vm_id"] == "1"


def sample_of(count: int, now: float) -> Sample:
    vms = tuple(VmSample(f"vm-{i}", f"u-{i}", 1, {}, (), {}) for i in range(count))
    return Sample("hv1", 0, now, vms)


class Reader:
    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def __call__(self, uuids: Sequence[str]) -> Mapping[str, str]:
        self.asked.append(list(uuids))
        return {u: f"<domain><title>{u}</title></domain>" for u in uuids}


def test_reads_are_spread_over_cycles_never_all_at_once() -> None:
    cache, reader = MetadataCache(ttl=300, poll_interval=1.0), Reader()
    for cycle in range(30):
        cache.refresh(sample_of(200, float(cycle)), reader)
    assert max(len(batch) for batch in reader.asked) == MIN_READS_PER_CYCLE
    assert sorted(u for batch in reader.asked for u in batch) == sorted(
        f"u-{i}" for i in range(200)
    ), "every domain read exactly once within its TTL"
    assert cache.tags(["title"])["u-7"] == {"title": "u-7"}


def test_a_domain_is_read_again_after_its_ttl_or_at_once_when_marked_stale() -> None:
    cache, reader = MetadataCache(ttl=10, poll_interval=1.0), Reader()
    cache.refresh(sample_of(2, 0.0), reader)
    assert cache.refresh(sample_of(2, 5.0), reader) == {}
    cache.mark_stale("u-1")
    assert set(cache.refresh(sample_of(2, 6.0), reader)) == {"u-1"}
    assert set(cache.refresh(sample_of(2, 10.0), reader)) == {"u-0"}


def test_domains_gone_are_forgotten_and_one_the_reader_skips_is_asked_again() -> None:
    cache = MetadataCache(ttl=300, poll_interval=1.0)
    cache.refresh(sample_of(3, 0.0), lambda uuids: {u: "<domain/>" for u in uuids if u != "u-2"})
    assert cache.due(["u-0", "u-1", "u-2"], 1.0) == ["u-2"]
    cache.refresh(sample_of(1, 2.0), Reader())
    assert cache.keys("u-1") is None and cache.keys("u-0") == {}
