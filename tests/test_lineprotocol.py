r"""Line protocol encoder, checked by parsing its output back.

``parse`` (tests/lineparse.py) is strict and follows InfluxDB 3's rules;
``vm_tags`` and ``go_tags`` model how VictoriaMetrics and
InfluxDB 1.x/2.x (Go) split and unescape the series key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
from lineparse import Line, ParseError, parse

from vmtelemetryd.features import ANGLE_SUFFIX, DEVICE_RATES, PERCENT_FIELDS
from vmtelemetryd.lineprotocol import REPLACEMENT, encode, encode_line, escape_key, escape_tag
from vmtelemetryd.model import (
    DEVICE_FIELDS,
    FLOAT_DIGITS,
    VM_METRIC_FIELDS,
    DeviceKind,
    DeviceSample,
    Sample,
    VmFeatures,
    VmSample,
)
from vmtelemetryd.sampler import DEVICE_KEYS, VM_KEYS

# --- how VictoriaMetrics and Go read the series key ---------------------------


def vm_next_unescaped(text: str, char: str) -> int:
    """VictoriaMetrics: ``char`` counts when an even number of backslashes precedes it."""
    i = text.find(char)
    while i >= 0:
        start = i
        while start > 0 and text[start - 1] == "\\":
            start -= 1
        if (i - start) % 2 == 0:
            return i
        i = text.find(char, i + 1)
    return -1


def vm_unescape(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            if text[i + 1] not in " ,=\\":
                out.append("\\")
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def vm_tags(line: str) -> dict[str, str]:
    series = line[: vm_next_unescaped(line, " ")]
    parts = []
    while (comma := vm_next_unescaped(series, ",")) >= 0:
        parts.append(series[:comma])
        series = series[comma + 1 :]
    parts.append(series)
    tags = {}
    for tag in parts[1:]:
        eq = vm_next_unescaped(tag, "=")
        tags[vm_unescape(tag[:eq])] = vm_unescape(tag[eq + 1 :])
    return tags


def go_tags(line: str) -> dict[str, str]:
    """InfluxDB 1.x/2.x: a separator is escaped iff the one byte before it is a backslash."""

    def unescaped(i: int, chars: str) -> bool:
        return line[i] in chars and line[i - 1] != "\\"

    i = 1
    while not unescaped(i, ", "):
        i += 1
    tags = {}
    while line[i] == ",":
        start = i = i + 1
        while not unescaped(i, "="):
            if unescaped(i, ", "):
                raise ParseError("missing tag value")
            i += 1
        key, start = line[start:i], i + 1
        i = start
        while not unescaped(i, ", "):
            if unescaped(i, "="):
                raise ParseError("invalid tag format")
            i += 1
        tags[go_unescape(key)] = go_unescape(line[start:i])
    return tags


def go_unescape(text: str) -> str:
    return text.replace("\\,", ",").replace("\\ ", " ").replace("\\=", "=")


# --- the parser itself follows the real rules --------------------------------


@pytest.mark.parametrize(
    ("line", "tag"),
    [
        (r"m,t=a\ b\,c\=d x=1i 1", "a b,c=d"),
        (r"m,t=a\\b x=1i 1", "a\\b"),
        (r"m,t=a\b x=1i 1", "a\\b"),  # unknown escape: literal backslash
        (r"m,t=\\\, x=1i 1", "\\,"),
    ],
)
def test_parser_unescapes_like_influxdb3(line: str, tag: str) -> None:
    assert parse(line).tags == {"t": tag}


@pytest.mark.parametrize(
    "line",
    [
        "m,t=trailing\\ x=1i 1",  # the backslash escapes the space: no field set
        "m,t=trailing\\\\ x=1i 1",  # correctly escaped, still rejected by InfluxDB 3
        "m,t= x=1i 1",
        "m,t=a=b x=1i 1",
        "m,t=a\tb x=1i 1",
        "m,b=1,a=2 x=1i 1",
        "m x=1i",
    ],
)
def test_parser_refuses(line: str) -> None:
    with pytest.raises(ParseError):
        parse(line)


# --- samples -----------------------------------------------------------------

UUID = "11111111-2222-3333-4444-555555555555"
WALL_NS = 1_700_000_000_123_456_789


def vm(
    name: str = "vm1",
    metrics: Mapping[str, int] | None = None,
    devices: tuple[DeviceSample, ...] = (),
    counts: Mapping[DeviceKind, int] | None = None,
    uuid: str = UUID,
) -> VmSample:
    return VmSample(name, uuid, 1, metrics or {}, devices, counts or {})


def sample(*vms: VmSample, host: str = "hv1") -> Sample:
    return Sample(host, WALL_NS, 12.5, vms)


def by_measurement(lines: list[str]) -> dict[str, list[Line]]:
    parsed: dict[str, list[Line]] = {}
    for line in lines:
        assert "\n" not in line
        p = parse(line)
        parsed.setdefault(p.measurement, []).append(p)
    return parsed


def full_vm(name: str = "vm1", device: str = "vnet0") -> VmSample:
    return vm(
        name,
        {"state": 1, "cpu_time_ns": 123},
        (DeviceSample("nic", device, {"rx_bytes": 5}),),
        {"nic": 1},
    )


# --- names from outside come back exactly ------------------------------------

HOSTILE = [
    "a b",
    "a,b=c",
    '"q"',
    "back\\slash",
    "ünïcødé",
    "=",
    ",",
    " ",
    "a\\,b",
    "a\\ b",
    "a\\=b",
    "a\\\\b",
    "\\\\x",
    "vm1,host=evil x=1i 1",
    "#comment",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_come_back_exactly_as_one_tag_value(name: str) -> None:
    s = sample(full_vm(name, device=name), host=name)
    lines = encode(s, {UUID: VmFeatures(UUID, {"cpu_pct": 1.5})})
    assert len(lines) == 4  # metrics, one device, totals, features
    parsed = by_measurement(lines)
    assert sorted(parsed) == ["vm_devices", "vm_features", "vm_metrics", "vm_totals"]
    vm_tags_expected = {"host": name, "uuid": UUID, "vm": name}
    for line_text, p in zip(lines, (parse(line) for line in lines), strict=True):
        expected = vm_tags_expected
        if p.measurement == "vm_devices":
            expected = {**vm_tags_expected, "device": name, "kind": "nic"}
        assert p.tags == expected
        assert vm_tags(line_text) == expected
        assert set(go_tags(line_text)) == set(expected)  # Go: never an extra or lost tag
    assert parsed["vm_metrics"][0].fields == {"state": 1, "cpu_time_ns": 123}


@pytest.mark.parametrize("name", ["a b", "a,b=c", '"q"', "back\\slash", "ünïcødé", "="])
def test_go_parser_reads_names_back_unless_a_backslash_precedes_an_escape(name: str) -> None:
    line = encode(sample(full_vm(name)), {})[0]
    assert go_tags(line)["vm"] == name


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("trailing\\", "trailing" + REPLACEMENT),
        ("\\", REPLACEMENT),
        ("a\\\\", "a\\" + REPLACEMENT),
        ("line\nbreak", "line" + REPLACEMENT + "break"),
        ("carriage\rreturn", "carriage" + REPLACEMENT + "return"),
        ("tab\there", "tab" + REPLACEMENT + "here"),
        ("lone\ud800surrogate", "lone" + REPLACEMENT + "surrogate"),
        ("\n", REPLACEMENT),
    ],
)
def test_what_line_protocol_cannot_carry_becomes_a_replacement_character(
    name: str, stored: str
) -> None:
    lines = encode(sample(full_vm(name, device=name), host=name), {})
    assert len(lines) == 3
    for line in lines:
        line.encode("utf-8")  # strict: no lone surrogate left
        p = parse(line)
        assert p.tags["vm"] == p.tags["host"] == stored
        assert vm_tags(line)["vm"] == stored
        assert set(go_tags(line)) == set(p.tags)


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("plain-name_1.2", "plain-name_1.2"),
        ("a b,c=d", "a\\ b\\,c\\=d"),
        ("back\\slash", "back\\slash"),  # a lone backslash needs no escape
        ("a\\,b", "a\\\\\\,b"),  # backslash before an escapable: doubled
        ("a\\\\b", "a\\\\\\b"),
        ("trailing\\", "trailing" + REPLACEMENT),
    ],
)
def test_escaped_tag_values(value: str, escaped: str) -> None:
    assert escape_tag(value) == escaped


def test_empty_tag_values_are_omitted() -> None:
    s = sample(
        vm("", {"state": 1}, (DeviceSample("disk", "", {"rd_reqs": 1}),), {"disk": 1}), host=""
    )
    for p in by_measurement(encode(s, {})).values():
        assert "vm" not in p[0].tags
        assert "host" not in p[0].tags
        assert "device" not in p[0].tags
        assert p[0].tags["uuid"] == UUID


# --- the four measurements ---------------------------------------------------


def test_lines_of_one_vm() -> None:
    s = sample(
        vm(
            "web",
            {"state": 1, "cpu_time_ns": 5_000_000_000, "vcpus": 2},
            (
                DeviceSample("nic", "vnet0", {"rx_bytes": 100, "tx_bytes": 7}),
                DeviceSample("disk", "vda", {"rd_reqs": 3, "capacity_bytes": 10_737_418_240}),
            ),
            {"nic": 1, "disk": 1},
        )
    )
    lines = encode(s, {UUID: VmFeatures(UUID, {"cpu_pct": 12.0, "net_rx_bps": 0.25})})
    tags = f"host=hv1,uuid={UUID},vm=web"
    assert lines == [
        f"vm_metrics,{tags} state=1i,cpu_time_ns=5000000000i,vcpus=2i {WALL_NS}",
        f"vm_devices,device=vnet0,{tags.replace('uuid', 'kind=nic,uuid')}"
        f" rx_bytes=100i,tx_bytes=7i {WALL_NS}",
        f"vm_devices,device=vda,{tags.replace('uuid', 'kind=disk,uuid')}"
        f" rd_reqs=3i,capacity_bytes=10737418240i {WALL_NS}",
        f"vm_totals,{tags} net_rx_bytes=100i,net_tx_bytes=7i,nics=1i,"
        f"disk_rd_reqs=3i,disk_capacity_bytes=10737418240i,disks=1i {WALL_NS}",
        f"vm_features,{tags} cpu_pct=12,net_rx_bps=0.25 {WALL_NS}",
    ]
    for line in lines:
        assert parse(line).ts == WALL_NS


def test_line_count_over_several_vms() -> None:
    devices = (
        DeviceSample("nic", "vnet0", {"rx_bytes": 1}),
        DeviceSample("disk", "vda", {"rd_reqs": 1}),
        DeviceSample("disk", "vdb", {"rd_reqs": 1}),
    )
    busy = vm("a", {"state": 1}, devices, {"nic": 1, "disk": 2}, uuid="a")
    quiet = vm("b", {"state": 5}, uuid="b")  # no stats groups: no devices, no totals
    silent = vm("c", uuid="c")  # nothing reported: nothing written
    lines = encode(sample(busy, quiet, silent), {"a": VmFeatures("a", {"cpu_pct": 1.0})})
    assert len(lines) == 1 + 3 + 1 + 1 + 1
    assert [parse(line).tags["vm"] for line in lines] == ["a"] * 6 + ["b"]


def test_totals_sum_only_counters_every_device_of_a_reported_kind_has() -> None:
    s = sample(
        vm(
            devices=(
                DeviceSample("nic", "vnet0", {"rx_bytes": 100, "tx_bytes": 1, "rx_drops": 2}),
                DeviceSample("nic", "vnet1", {"rx_bytes": 50, "tx_bytes": 3}),
                DeviceSample("disk", "vda", {"rd_reqs": 9}),
            ),
            counts={"nic": 2},  # the block group was not reported this cycle
        )
    )
    totals = by_measurement(encode(s, {}))["vm_totals"][0].fields
    assert totals == {"net_rx_bytes": 150, "net_tx_bytes": 4, "nics": 2}


def test_totals_of_a_kind_the_vm_has_none_of_are_zero() -> None:
    totals = by_measurement(encode(sample(vm(counts={"disk": 0})), {}))["vm_totals"][0].fields
    assert totals["disks"] == 0
    assert totals["disk_rd_bytes"] == 0
    assert not any(name.startswith("net_") for name in totals)


def test_every_schema_field_name_needs_no_escape() -> None:
    """encode() writes field keys as they are: it relies on this. The sampler's names
    must be the schema's, the totals' too."""
    sampled = {*VM_KEYS.values(), "cpu_delay_ns"}
    assert sampled == set(VM_METRIC_FIELDS)
    assert {kind: tuple(keys.values()) for kind, keys in DEVICE_KEYS.items()} == DEVICE_FIELDS
    vm = VmSample("v", UUID, 1, {}, (), {"nic": 0, "disk": 0})
    totals = by_measurement(encode(sample(vm), {}))["vm_totals"][0].fields
    derived = (*PERCENT_FIELDS, *(name for name, _, _ in DEVICE_RATES))
    names = [
        *sampled,
        *(name for fields in DEVICE_FIELDS.values() for name in fields),
        *totals,
        *derived,
        *(name + ANGLE_SUFFIX for name in derived),
    ]
    assert len(totals) == 2 + sum(len(fields) for fields in DEVICE_FIELDS.values())
    assert [name for name in names if escape_key(name) != name] == []


def test_numbers_that_cannot_be_written_are_left_out() -> None:
    s = sample(vm(metrics={"state": 1, "minor_faults": 2**64 - 1, "major_faults": -(2**63)}))
    features = {UUID: VmFeatures(UUID, {"a": math.nan, "b": math.inf, "c": -math.inf, "d": 2.0})}
    parsed = by_measurement(encode(s, features))
    assert parsed["vm_metrics"][0].fields == {"state": 1, "major_faults": -(2**63)}
    assert parsed["vm_features"][0].fields == {"d": 2.0}


def test_derived_values_are_written_with_float_digits() -> None:
    values = {"cpu_pct": 12.0, "big": 1e16, "tiny": 1.5e-7, "third": 1 / 3, "rate": 123456.78901234}
    line = encode(sample(vm()), {UUID: VmFeatures(UUID, values)})[0]
    assert " cpu_pct=12,big=1e+16,tiny=1.5e-07,third=0.333333333333,rate=123456.789012 " in line
    fields = parse(line).fields
    assert {name: type(value) for name, value in fields.items()} == dict.fromkeys(values, float)
    assert fields == pytest.approx(values, rel=0.5 * 10 ** (1 - FLOAT_DIGITS))


def test_vm_without_features_has_no_features_line() -> None:
    lines = encode(sample(vm(metrics={"state": 1})), {"other": VmFeatures("other", {"x": 1.0})})
    assert [parse(line).measurement for line in lines] == ["vm_metrics"]


def test_vm_with_empty_features_has_no_features_line() -> None:
    lines = encode(sample(vm(metrics={"state": 1})), {UUID: VmFeatures(UUID, {})})
    assert len(lines) == 1


# --- encode_line ---------------------------------------------------------------


def test_encode_line_sorts_tags_omits_empty_ones_and_types_fields_by_python_type() -> None:
    line = encode_line(
        "vmtelemetryd",
        {"z": "last", "host": "hv 1", "empty": "", "a=b": "x,y"},
        {"poll_seconds": 0.25, "points_written": 12, "whole": 3.0, "bad": math.nan},
        WALL_NS,
    )
    assert line == (
        f"vmtelemetryd,a\\=b=x\\,y,host=hv\\ 1,z=last "
        f"poll_seconds=0.25,points_written=12i,whole=3 {WALL_NS}"
    )
    assert parse(line).tags == {"a=b": "x,y", "host": "hv 1", "z": "last"}


def test_encode_line_escapes_measurement_and_field_keys() -> None:
    line = encode_line("my meas,x=y", {}, {"a b": 1, "c,d=e": 2.5}, 7)
    assert line == "my\\ meas\\,x=y a\\ b=1i,c\\,d\\=e=2.5 7"
    assert parse(line) == Line("my meas,x=y", {}, {"a b": 1, "c,d=e": 2.5}, 7)


def test_a_percent_sign_in_a_float_key_is_written_as_it_is() -> None:
    # float fields are written through a %-format made from their keys
    line = encode_line("m", {}, {"used_%d": 1.5, "100%%": 2.0}, 7)
    assert line == "m used_%d=1.5,100%%=2 7"
    values = {"a%(x)s": 0.5, "b": math.nan, "c%": 3.25, "d": 1.0}
    line = encode(sample(vm()), {UUID: VmFeatures(UUID, values)})[0]
    assert parse(line).fields == {"a%(x)s": 0.5, "c%": 3.25, "d": 1.0}


def test_encode_line_without_writable_fields_is_none() -> None:
    assert encode_line("m", {"t": "v"}, {}, 1) is None
    assert encode_line("m", {"t": "v"}, {"x": math.nan, "y": 2**63}, 1) is None
