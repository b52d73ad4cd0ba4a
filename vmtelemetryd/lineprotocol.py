r"""Line protocol for the measurements of DESIGN.md "Schema".

Escaping: what the parsers we write to actually do
---------------------------------------------------
Read in their sources (not only in the docs, which have disagreed over time):

* InfluxDB 3 (crate ``influxdb_line_protocol``, ``src/lib.rs`` in
  influxdata/influxdb3_core): in tag keys, tag values and field keys the
  escapes ``\\ \, \= \ `` stand for the character after the backslash; any
  other backslash is a literal one (``a\b`` reads ``a\b``). Tab and newline
  end a tag value and cannot be escaped (``\<tab>`` reads as a backslash and
  a tab). An empty tag value is an error. A measurement, key or tag value
  whose *unescaped* text ends in a backslash is rejected
  (``EndsWithBackslash``), however it is escaped.
* VictoriaMetrics (``lib/protoparser/influx/parser.go``): the same
  unescaping; a separator counts as escaped when an odd number of
  backslashes precedes it; lines are split at every ``\n``; empty tags
  are skipped.
* InfluxDB 1.x/2.x, Go (``models/points.go``): unescapes only ``\, \= \ ``
  (``\\`` stays two backslashes) and takes a separator as escaped when the
  one byte before it is a backslash; an unescaped ``=`` in a tag value is an
  error.
* The InfluxDB 2.1+ and 3 docs: escape comma and space in measurements;
  comma, equals and space in tag keys, tag values and field keys; two
  backslashes read as one; newlines are not supported; tag values cannot be
  empty, omit the tag instead.

What we write, so that a name comes back as the value it was and never as
an extra line, tag or field:

* comma, space (and in keys and tag values, equals) get a backslash;
* a backslash is doubled only where a parser would otherwise take it as an
  escape: before a backslash, comma, equals or space. Elsewhere it is
  written as it is, which every parser above reads back unchanged, the Go one
  included (doubling every backslash would show ``back\\slash`` there);
* what line protocol cannot carry becomes U+FFFD (the Unicode replacement
  character): newline, carriage return and tab (they end a line or a value
  and no escape brings them back; CR is also split on by line-oriented
  tools), lone surrogates (not encodable as UTF-8), and a backslash ending a
  value: InfluxDB 3 rejects such a line outright, and the Go parser would
  read the separator after it as escaped. A VM called ``trailing\`` is thus
  written as ``trailing<U+FFFD>``: a visible mark, and every point of the VM
  still lands (the ``uuid`` tag identifies it exactly);
* an empty tag value omits the tag, an empty field set omits the line;
* a tag value longer than ``MAX_TAG_CHARS`` characters (metadata is tenant
  text: a VM's name in OpenNebula is its user's) is cut to that length, its
  last character U+2026 (``…``): a series key stays bounded, and the cut
  shows.

With this, InfluxDB 3 and VictoriaMetrics read every other value back
exactly. The Go parser reads a backslash written before ``\ , = space`` as
two backslashes: such a name is stored with one extra backslash, still as one
tag value.

Numbers: counters are integers (``i``) and must fit in int64 (InfluxDB 3
rejects the whole line otherwise); derived values are floats written with
``FLOAT_DIGITS`` significant digits (``12``, ``0.333333333333``, ``1e+16``: a
number without the ``i`` suffix is a float), finite only.
A value that cannot be written is left out, like a value libvirt did not
report.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vmtelemetryd.model import (
    DEVICE_FIELDS,
    FLOAT_DIGITS,
    TOTAL_PREFIX,
    DeviceKind,
    DeviceSample,
    Sample,
    VmFeatures,
    VmSample,
)

REPLACEMENT = "\ufffd"
MAX_TAG_CHARS = 1024

_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1

_NEEDS_WORK = re.compile(r"[\\ ,=\t\n\r\ud800-\udfff]")
_UNCARRIABLE = re.compile(r"[\t\n\r\ud800-\udfff]")
_BACKSLASH_BEFORE_ESCAPABLE = re.compile(r"\\(?=[\\ ,=])")
_KEY_SPECIALS = re.compile(r"([ ,=])")
_MEASUREMENT_SPECIALS = re.compile(r"([ ,])")

_FLOAT_FIELD = f"%s=%.{FLOAT_DIGITS}g"
_COUNT_FIELD: Mapping[DeviceKind, str] = {"nic": "nics", "disk": "disks"}
_TOTAL_FIELDS: Mapping[DeviceKind, tuple[tuple[str, str], ...]] = {
    kind: tuple((name, TOTAL_PREFIX[kind] + name) for name in names)
    for kind, names in DEVICE_FIELDS.items()
}


def encode(
    sample: Sample,
    features: Mapping[str, VmFeatures],
    tags: Mapping[str, Mapping[str, str]] | None = None,
    series: SeriesCache | None = None,
) -> list[str]:
    """Lines of ``vm_metrics``, ``vm_devices``, ``vm_totals`` and ``vm_features``, VM by VM.

    ``tags`` adds, by uuid, tags to every point of that VM (METADATA_TAGS).
    ``series``: the escaped tag sets of the host's previous sample, to build on.
    """
    taken = (series if series is not None else SeriesCache()).take(sample, tags or {})
    ts = str(sample.wall_ns)
    lines: list[str] = []
    for vm, vm_series in zip(sample.vms, taken, strict=True):
        vm_tags = vm_series.tags
        _append(lines, "vm_metrics" + vm_tags, _int_fields(vm.metrics), ts)
        for device in vm.devices:
            device_tags = vm_series.device_tags(device)
            _append(lines, "vm_devices" + device_tags, _int_fields(device.counters), ts)
        _append(lines, "vm_totals" + vm_tags, _int_fields(_totals(vm)), ts)
        derived = features.get(vm.uuid)
        if derived is not None:
            _append(lines, "vm_features" + vm_tags, _float_fields(derived.fields), ts)
    return lines


class SeriesCache:
    """Each VM's escaped tag sets, kept from one sample of a host to the next.

    A VM's host, uuid, name and metadata tags hardly ever change, yet escaping
    and sorting them for each of its lines was a fifth of the encoder's time
    (bench_cycle.py). An entry is made again as soon as any of them differs.
    Bounded by what is monitored: the VMs of the last sample, each with the
    devices of its last two.
    """

    def __init__(self) -> None:
        self._vms: dict[str, _VmSeries] = {}

    def __len__(self) -> int:
        """Tag sets held: one per VM and one per device of it."""
        return sum(1 + len(entry.devices) for entry in self._vms.values())

    def take(self, sample: Sample, tags: Mapping[str, Mapping[str, str]]) -> list[_VmSeries]:
        """The tag sets of each VM of ``sample``, in its order; the other VMs are forgotten."""
        taken: list[_VmSeries] = []
        kept: dict[str, _VmSeries] = {}
        for vm in sample.vms:
            extra = tags.get(vm.uuid, {})
            entry = self._vms.get(vm.uuid)
            if entry is None or not entry.matches(sample.host, vm, extra):
                entry = _VmSeries.of(sample.host, vm, extra)
            elif len(entry.devices) > len(vm.devices):
                entry.devices.clear()  # a device is gone: forget those not seen again
            taken.append(entry)
            kept[vm.uuid] = entry
        self._vms = kept
        return taken


@dataclass(slots=True)
class _VmSeries:
    """One VM's tag sets, with the raw values they were escaped from (the cache key)."""

    host: str
    name: str
    extra: Mapping[str, str]
    pairs: list[tuple[str, str]]
    tags: str
    devices: dict[tuple[DeviceKind, str], str] = field(default_factory=dict)

    @classmethod
    def of(cls, host: str, vm: VmSample, extra: Mapping[str, str]) -> _VmSeries:
        pairs = _vm_pairs(escape_tag(host), vm.uuid, vm.name, extra)
        # Tag pairs are written in key order, as line protocol wants them sorted.
        return cls(host, vm.name, dict(extra), pairs, _tag_set(sorted(pairs)))

    def matches(self, host: str, vm: VmSample, extra: Mapping[str, str]) -> bool:
        return self.host == host and self.name == vm.name and self.extra == extra

    def device_tags(self, device: DeviceSample) -> str:
        key = (device.kind, device.name)
        tags = self.devices.get(key)
        if tags is None:
            pairs = [*self.pairs, ("device", escape_tag(device.name)), ("kind", device.kind)]
            tags = self.devices[key] = _tag_set(sorted(pairs))
        return tags


def encode_info(sample: Sample, metadata: Mapping[str, Mapping[str, str]]) -> list[str]:
    """``vm_info`` lines, one per VM of ``sample`` whose uuid ``metadata`` holds."""
    host = escape_tag(sample.host)
    lines: list[str] = []
    for vm in sample.vms:
        keys = metadata.get(vm.uuid)
        if keys is not None:
            series = "vm_info" + _tag_set(sorted(_vm_pairs(host, vm.uuid, vm.name, keys)))
            _append(lines, series, "info=1i", str(sample.wall_ns))
    return lines


def _vm_pairs(host: str, uuid: str, name: str, extra: Mapping[str, str]) -> list[tuple[str, str]]:
    """A VM's escaped tag pairs, unsorted; ``extra`` keys are schema names (identifiers)."""
    pairs = [("host", host), ("uuid", escape_tag(uuid)), ("vm", escape_tag(name))]
    pairs.extend((key, escape_tag(value)) for key, value in extra.items())
    return pairs


def encode_line(
    measurement: str, tags: Mapping[str, str], fields: Mapping[str, int | float], ts_ns: int
) -> str | None:
    """One line, or None if no field can be written.

    The Python type of each value decides the field type: ``int`` is written
    as an integer, anything else as a float, so pass ``float(x)`` for a
    derived value that happens to be whole (a field keeps its type forever).
    """
    tag_set = _tag_set((escape_key(k), escape_tag(v)) for k, v in sorted(tags.items()))
    written = [
        _int_fields({escape_key(key): value})
        if type(value) is int
        else _float_fields({escape_key(key): float(value)})
        for key, value in fields.items()
    ]
    field_set = ",".join(text for text in written if text)
    if not field_set:
        return None
    return f"{escape_measurement(measurement)}{tag_set} {field_set} {ts_ns}"


def escape_measurement(text: str) -> str:
    """A measurement name: ``=`` stays bare, InfluxDB 3 would keep ``\\=`` as two characters."""
    return _escape(text, _MEASUREMENT_SPECIALS)


def escape_key(text: str) -> str:
    """A tag or field key. Identifiers (every schema name) are returned as they are."""
    return text if text.isidentifier() else _escape(text, _KEY_SPECIALS)


def escape_tag(text: str) -> str:
    """A tag value; "" stays "" and makes ``_tag_set`` leave the tag out."""
    if len(text) > MAX_TAG_CHARS:
        text = text[: MAX_TAG_CHARS - 1] + "\u2026"
    return _escape(text, _KEY_SPECIALS)


def _escape(text: str, specials: re.Pattern[str]) -> str:
    """See the module docstring. Backslashes are doubled before ``specials`` get theirs,
    so that only backslashes that were in the text are judged by what follows them."""
    if _NEEDS_WORK.search(text) is None:
        return text
    text = _UNCARRIABLE.sub(REPLACEMENT, text)
    if text.endswith("\\"):
        text = text[:-1] + REPLACEMENT
    text = _BACKSLASH_BEFORE_ESCAPABLE.sub(r"\\\\", text)
    return specials.sub(r"\\\1", text)


def _tag_set(escaped: Iterable[tuple[str, str]]) -> str:
    """``,k=v`` for each pair (already escaped, sorted by key) whose value is not empty."""
    return "".join(f",{key}={value}" for key, value in escaped if value)


def _append(lines: list[str], series: str, field_set: str, ts: str) -> None:
    if field_set:
        lines.append(f"{series} {field_set} {ts}")


def _int_fields(values: Mapping[str, int]) -> str:
    """``key=123i,...``, leaving out a value outside int64 (InfluxDB 3 would reject the line).

    Keys are written as they are: schema names (sampler.py and model.py map libvirt's
    keys to them), which need no escape, or keys ``encode_line`` escaped.
    One expression per field, no call: it runs for some 50 fields per VM each cycle.
    """
    return ",".join([f"{k}={v}i" for k, v in values.items() if _I64_MIN <= v <= _I64_MAX])


def _float_fields(values: Mapping[str, float]) -> str:
    """``key=12.5,...`` for finite values, keys as in ``_int_fields``.

    The values must be floats (features.py makes only floats): ``float(v)``
    on each was a third of this function's time (bench_cycle.py). One format
    of a template made once per set of keys: 2.6 against 3.7 µs for 22 values.
    """
    written = tuple(values.values())
    if all(map(math.isfinite, written)):
        return _float_template(tuple(values)) % written
    return ",".join([_FLOAT_FIELD % (k, v) for k, v in values.items() if math.isfinite(v)])


@functools.lru_cache(maxsize=256)
def _float_template(keys: tuple[str, ...]) -> str:
    """Few sets of keys: the derived values a VM has, with or without some angles."""
    return ",".join(_FLOAT_FIELD.replace("%s", key.replace("%", "%%"), 1) for key in keys)


def _totals(vm: VmSample) -> dict[str, int]:
    """``vm_totals`` fields: per kind libvirt reported, each counter every device reported."""
    totals: dict[str, int] = {}
    for kind, count in vm.device_counts.items():
        counters = [device.counters for device in vm.devices if device.kind == kind]
        for counter, total_name in _TOTAL_FIELDS[kind]:
            total = 0
            for of_device in counters:
                value = of_device.get(counter)
                if value is None:
                    break
                total += value
            else:
                totals[total_name] = total
        totals[_COUNT_FIELD[kind]] = count
    return totals
