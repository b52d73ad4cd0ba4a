"""Rates, percents and trend angles of each VM (DESIGN.md "Features: rate and angle").

Pure: the output depends only on the sample given and on what ``Features``
kept from earlier samples of the same VM instance. No value is ever invented:
a rate that cannot be computed honestly (counter missing, reset, device set
changed) is left out rather than written as 0 or as a negative number.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vmtelemetryd.model import FLOAT_DIGITS, DeviceKind, Sample, VmFeatures, VmSample

PERCENT_FIELDS: tuple[str, ...] = ("cpu_pct", "cpu_steal_pct", "mem_used_pct")

# (feature, device kind, per-device counter summed over the VM's devices of that kind)
DEVICE_RATES: tuple[tuple[str, DeviceKind, str], ...] = (
    ("net_rx_bps", "nic", "rx_bytes"),
    ("net_tx_bps", "nic", "tx_bytes"),
    ("net_rx_pps", "nic", "rx_packets"),
    ("net_tx_pps", "nic", "tx_packets"),
    ("disk_rd_bps", "disk", "rd_bytes"),
    ("disk_wr_bps", "disk", "wr_bytes"),
    ("disk_rd_iops", "disk", "rd_reqs"),
    ("disk_wr_iops", "disk", "wr_reqs"),
)

ANGLE_SUFFIX = "_angle_deg"

_PERCENT = frozenset(PERCENT_FIELDS)
_RATE_NAMES = tuple(name for name, _, _ in DEVICE_RATES)
_VCPU_SHARES = (("cpu_pct", "cpu_time_ns"), ("cpu_steal_pct", "cpu_delay_ns"))
_RATES_BY_KIND: Mapping[DeviceKind, tuple[tuple[str, str], ...]] = {
    kind: tuple((name, counter) for name, of, counter in DEVICE_RATES if of == kind)
    for kind in dict.fromkeys(kind for _, kind, _ in DEVICE_RATES)
}

Point = tuple[float, float]
"""(monotonic seconds, value): one entry of a trend window, as ``VmHistory`` holds it."""

_ANGLE_OF = {
    name: (name + ANGLE_SUFFIX, name not in _PERCENT) for name in (*PERCENT_FIELDS, *_RATE_NAMES)
}
"""Each field's angle name, and whether its slope is taken relative to its mean."""
_DEGREES_PER_RADIAN = 180 / math.pi  # math.degrees' own factor, without its call
_STEEPEST = 90 - 10 ** (2 - FLOAT_DIGITS)
"""The steepest angle kept: ``FLOAT_DIGITS`` digits no longer tell a steeper one from 90."""

Counters = Mapping[str, int]

_Devices = Mapping[DeviceKind, Mapping[str, Counters] | None]
"""A sample's devices of each kind it reported, by name; None for a kind with a name twice."""


@dataclass(slots=True)
class _VmState:
    """What one VM instance leaves behind for the next sample.

    ``devices`` are those of ``last``; ``times`` its newest sample times.
    ``windows`` holds each field's newest values, changed in place (new tuples
    per field and cycle made the stage 17% slower); a window's values were
    taken at ``times``, unless the field missed one of those samples or
    started later: then at ``own_times[field]``.
    """

    instance: int
    monotonic: float
    last: VmSample
    devices: _Devices
    times: tuple[float, ...]
    windows: dict[str, list[float]]
    own_times: dict[str, tuple[float, ...]]


@dataclass(frozen=True, slots=True)
class VmHistory:
    """``_VmState`` frozen, for another owner: kept across a daemon restart (featurestate)."""

    instance: int
    monotonic: float
    last: VmSample
    windows: Mapping[str, tuple[Point, ...]]


class Features:
    """Derives ``VmFeatures`` from consecutive samples, keeping state per VM instance."""

    def __init__(self, window: int) -> None:
        self._window = _checked_window(window)
        self._states: dict[str, _VmState] = {}
        self._times: tuple[float, ...] = ()
        self._weighed: tuple[tuple[float, ...], tuple[float, ...]] = ((), ())

    def resize(self, window: int) -> None:
        """Change the trend window (config reload) keeping the newest values already held."""
        self._window = _checked_window(window)
        self._times = self._times[-window:]
        for state in self._states.values():
            state.times = state.times[-window:]
            for values in state.windows.values():
                del values[:-window]
            state.own_times = {name: t[-window:] for name, t in state.own_times.items()}

    def snapshot(self) -> dict[str, VmHistory]:
        """What the next sample of each VM would build on, by uuid."""
        return {
            uuid: VmHistory(
                state.instance,
                state.monotonic,
                state.last,
                {
                    name: tuple(zip(state.own_times.get(name, state.times), values, strict=True))
                    for name, values in state.windows.items()
                },
            )
            for uuid, state in self._states.items()
        }

    def restore(self, histories: Mapping[str, VmHistory]) -> None:
        """Replace the state with a ``snapshot()``, e.g. an earlier process's of the same boot.

        Monotonic stamps are only comparable within one boot: the caller checks
        that. derive() uses an entry only for the same VM instance, so one that
        restarted meanwhile starts afresh; windows keep their newest values.
        """
        self._states = {}
        for uuid, history in histories.items():
            recent = {name: points[-self._window :] for name, points in history.windows.items()}
            self._states[uuid] = _VmState(
                history.instance,
                history.monotonic,
                history.last,
                _devices(history.last),
                (),
                {name: [v for _, v in points] for name, points in recent.items()},
                {name: tuple(t for t, _ in points) for name, points in recent.items()},
            )

    def derive(self, sample: Sample) -> dict[str, VmFeatures]:
        """Features of every VM of ``sample``, by uuid; VMs absent from it are forgotten."""
        states: dict[str, _VmState] = {}
        derived: dict[str, VmFeatures] = {}
        now = sample.monotonic
        keep = 1 - self._window
        # A VM seen in each of the last samples has the host's sample times: one tuple, and
        # so one set of trend weights, for all of them rather than one per VM.
        host_before = self._times
        host_times = self._times = (*host_before[keep:], now)
        for vm in sample.vms:
            if vm.uuid in states:
                continue  # one sample, one value per window: the first of a uuid listed twice
            devices = _devices(vm)
            state = self._states.get(vm.uuid)
            if state is not None and state.instance == vm.instance:
                fields = _values(vm, devices, state, now - state.monotonic)
                before, windows, own_times = state.times, state.windows, state.own_times
            else:
                fields = _values(vm, devices, None, 0.0)
                before, windows, own_times = (), {}, {}
            if before is host_before or before == host_before:
                times = host_times
            else:
                times = (*before[keep:], now)
            fields.update(self._push_and_angle(windows, own_times, fields, before, times))
            states[vm.uuid] = _VmState(vm.instance, now, vm, devices, times, windows, own_times)
            derived[vm.uuid] = VmFeatures(vm.uuid, fields)
        self._states = states
        return derived

    def _push_and_angle(
        self,
        windows: dict[str, list[float]],
        own_times: dict[str, tuple[float, ...]],
        values: Mapping[str, float],
        before: tuple[float, ...],
        times: tuple[float, ...],
    ) -> dict[str, float]:
        """Append each new value to its window; the angles of the windows now full.

        ``before`` and ``times``: the VM's sample times without and with this one.
        A window with its own times takes ``times`` again once they agree, so
        that the fit's weights are computed once for every window with the same
        times (``_weighed``), rather than per field.
        A field without a value this cycle gets no angle either: repeating the
        previous angle would pass a stale trend off as a current one.

        The angle, in degrees in (-90, 90), is that of the least-squares line of
        value on time. For a rate its slope is taken in percent of the window's
        mean per second, so that the angle does not depend on the rate's
        magnitude; a window whose mean is 0 has angle 0. A percent's slope is
        used as is (percentage points per second). A line vertical to the
        precision written (``_STEEPEST``) has no angle. Inline rather than a
        function per field: it runs for eleven fields per VM every second.
        """
        angles: dict[str, float] = {}
        full = self._window
        keep = 1 - full
        weighed, weights = self._weighed
        now = times[-1]
        for name, value in values.items():
            held = windows.get(name)
            if held is None:
                held = windows[name] = [value]
                if before:  # the VM was sampled before without this field
                    own_times[name] = ()
            else:
                held.append(value)
                if len(held) > full:
                    del held[0]
            if own_times and name in own_times:
                held_times = (*own_times[name][keep:], now)
                if held_times == times:
                    del own_times[name]
                    held_times = times
                else:
                    own_times[name] = held_times
            else:
                held_times = times
            if len(held) < full:
                continue
            if held_times is not weighed:
                weighed, weights = held_times, _trend_weights(held_times)
            if not weights:
                continue
            slope = sum(map(operator.mul, weights, held))
            angle_name, relative = _ANGLE_OF[name]
            if relative:
                mean = sum(held) / full
                if mean == 0:
                    angles[angle_name] = 0.0
                    continue
                slope = 100 * slope / mean
            angle = math.atan(slope) * _DEGREES_PER_RADIAN
            if -_STEEPEST < angle < _STEEPEST:
                angles[angle_name] = angle
        if weighed is not self._weighed[0]:
            self._weighed = (weighed, weights)
        if len(windows) > len(values):  # a window got no value: its times stay as they were
            for name in windows.keys() - values.keys():
                own_times.setdefault(name, before)
        return angles


def _checked_window(window: int) -> int:
    if window < 2:
        raise ValueError(f"a trend line needs a window of at least 2 samples, got {window}")
    return window


def _values(
    current: VmSample, devices: _Devices, previous: _VmState | None, elapsed: float
) -> dict[str, float]:
    """cpu_pct, mem_used_pct and the device rates that can be computed honestly."""
    values: dict[str, float] = {}
    if previous is not None and elapsed > 0:
        _add_rates(values, current, devices, previous, elapsed)
    mem_used = _mem_used_pct(current.metrics)
    if mem_used is not None:
        values["mem_used_pct"] = mem_used
    return values


def _add_rates(
    values: dict[str, float],
    current: VmSample,
    devices: _Devices,
    previous: _VmState,
    elapsed: float,
) -> None:
    vcpus = current.metrics.get("vcpus")
    if vcpus is not None and vcpus > 0:
        # Nanoseconds as a percent of the vCPUs the VM has now: CPU time used
        # (cpu_pct, 100 = all busy) or time waited for a host CPU (cpu_steal_pct).
        pair = [(current.metrics, previous.last.metrics)]
        _add_growth(values, pair, _VCPU_SHARES, elapsed * 1e9 * vcpus, 100)
    for kind, rates in _RATES_BY_KIND.items():
        pairs = _matched(devices, previous.devices, kind)
        if pairs is None:
            continue
        span = elapsed
        if kind == "disk":  # read with the monitor groups: maybe apart from the rest
            span += current.monitor_late_s - previous.last.monitor_late_s
        if span > 0:
            _add_growth(values, pairs, rates, span, 1)


def _mem_used_pct(metrics: Counters) -> float | None:
    available = metrics.get("mem_available_kib")
    usable = metrics.get("mem_usable_kib")
    if available is None or usable is None or available <= 0:
        return None
    return 100 * (available - usable) / available


def _devices(vm: VmSample) -> _Devices:
    """``_Devices`` of ``vm``, grouped once: this sample's rates and the next one's use them."""
    groups: dict[DeviceKind, dict[str, Counters] | None] = {kind: {} for kind in vm.device_counts}
    for device in vm.devices:
        group = groups.get(device.kind)
        if group is None:
            continue
        if device.name in group:
            groups[device.kind] = None
        else:
            group[device.name] = device.counters
    return groups


def _matched(
    current: _Devices, previous: _Devices, kind: DeviceKind
) -> list[tuple[Counters, Counters]] | None:
    """(current, previous) counters of each device of ``kind``, matched by name.

    None unless both samples reported the group and hold the same uniquely
    named devices: after a hot-plug or unplug a sum over devices would leave
    out one device's traffic and look like a real drop.
    """
    now = current.get(kind)
    before = previous.get(kind)
    if now is None or before is None or now.keys() != before.keys():
        return None
    return [(counters, before[name]) for name, counters in now.items()]


def _add_growth(
    values: dict[str, float],
    pairs: list[tuple[Counters, Counters]],
    fields: tuple[tuple[str, str], ...],
    divisor: float,
    scale: int,
) -> None:
    """``values[name]`` = growth / divisor * scale for each (name, counter) of ``fields``,
    its growth summed over (current, previous) pairs of a VM or its devices; left out if
    a pair lacks it on either side or it went down (reset). All fields in one call: it
    runs for ten of them per VM every second."""
    for name, key in fields:
        total = 0
        try:
            for current, previous in pairs:
                growth = current[key] - previous[key]
                if growth < 0:
                    break
                total += growth
            else:
                values[name] = total / divisor * scale
        except KeyError:
            continue


def _trend_weights(times: Sequence[float]) -> tuple[float, ...]:
    """w_i = (t_i - mean t) / Sxx, so that the least-squares slope of any values
    over these times is sum(w_i * v_i); () when all times are equal.

    Taken about the window's own mean, from offsets to its first time: monotonic
    seconds are large, and deviations of a few seconds keep their precision.
    """
    t0 = times[0]
    offsets = [t - t0 for t in times]
    mean = sum(offsets) / len(offsets)
    spreads = [t - mean for t in offsets]
    sxx = sum(map(operator.mul, spreads, spreads))
    if sxx <= 0:
        return ()
    return tuple(d / sxx for d in spreads)
