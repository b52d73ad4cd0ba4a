"""Rates, percents and trend angles of each VM (DESIGN.md "Features: rate and angle").

Pure: the output depends only on the sample given and on what ``Features``
kept from earlier samples of the same VM instance. No value is ever invented:
a rate that cannot be computed honestly (counter missing, reset, device set
changed) is left out rather than written as 0 or as a negative number.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vmtelemetryd.model import DeviceKind, Sample, VmFeatures, VmSample

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

Point = tuple[float, float]
"""(monotonic seconds, value): one entry of a trend window."""

Counters = Mapping[str, int]


@dataclass(slots=True)
class _VmState:
    """What one VM instance leaves behind for the next sample."""

    instance: int
    monotonic: float
    last: VmSample
    windows: dict[str, deque[Point]]


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

    def resize(self, window: int) -> None:
        """Change the trend window (config reload) keeping the newest values already held."""
        self._window = _checked_window(window)
        for state in self._states.values():
            state.windows = {
                name: deque(points, maxlen=self._window) for name, points in state.windows.items()
            }

    def snapshot(self) -> dict[str, VmHistory]:
        """What the next sample of each VM would build on, by uuid."""
        return {
            uuid: VmHistory(
                state.instance,
                state.monotonic,
                state.last,
                {name: tuple(points) for name, points in state.windows.items()},
            )
            for uuid, state in self._states.items()
        }

    def restore(self, histories: Mapping[str, VmHistory]) -> None:
        """Replace the state with a ``snapshot()``, e.g. an earlier process's of the same boot.

        Monotonic stamps are only comparable within one boot: the caller checks
        that. derive() uses an entry only for the same VM instance, so one that
        restarted meanwhile starts afresh; windows keep their newest values.
        """
        self._states = {
            uuid: _VmState(
                history.instance,
                history.monotonic,
                history.last,
                {
                    name: deque(points, maxlen=self._window)
                    for name, points in history.windows.items()
                },
            )
            for uuid, history in histories.items()
        }

    def derive(self, sample: Sample) -> dict[str, VmFeatures]:
        """Features of every VM of ``sample``, by uuid; VMs absent from it are forgotten."""
        states: dict[str, _VmState] = {}
        derived: dict[str, VmFeatures] = {}
        for vm in sample.vms:
            state = self._states.get(vm.uuid)
            if state is not None and state.instance == vm.instance:
                values = _values(vm, state.last, sample.monotonic - state.monotonic)
                windows = state.windows
            else:
                values = _values(vm, None, 0.0)
                windows = {}
            fields = dict(values)
            fields.update(self._push_and_angle(windows, values, sample.monotonic))
            states[vm.uuid] = _VmState(vm.instance, sample.monotonic, vm, windows)
            derived[vm.uuid] = VmFeatures(vm.uuid, fields)
        self._states = states
        return derived

    def _push_and_angle(
        self, windows: dict[str, deque[Point]], values: Mapping[str, float], now: float
    ) -> dict[str, float]:
        """Append each new value to its window; the angles of the windows now full.

        A field without a value this cycle gets no angle either: repeating the
        previous angle would pass a stale trend off as a current one.
        """
        angles: dict[str, float] = {}
        for name, value in values.items():
            points = windows.get(name)
            if points is None:
                points = windows[name] = deque(maxlen=self._window)
            points.append((now, value))
            if len(points) == self._window:
                angle = _angle_deg(points, relative=name not in PERCENT_FIELDS)
                if angle is not None:
                    angles[name + ANGLE_SUFFIX] = angle
        return angles


def _checked_window(window: int) -> int:
    if window < 2:
        raise ValueError(f"a trend line needs a window of at least 2 samples, got {window}")
    return window


def _values(current: VmSample, previous: VmSample | None, elapsed: float) -> dict[str, float]:
    """cpu_pct, mem_used_pct and the device rates that can be computed honestly."""
    values: dict[str, float] = {}
    if previous is not None and elapsed > 0:
        values.update(_rates(current, previous, elapsed))
    mem_used = _mem_used_pct(current.metrics)
    if mem_used is not None:
        values["mem_used_pct"] = mem_used
    return values


def _rates(current: VmSample, previous: VmSample, elapsed: float) -> dict[str, float]:
    rates: dict[str, float] = {}
    for name, counter in (("cpu_pct", "cpu_time_ns"), ("cpu_steal_pct", "cpu_delay_ns")):
        share = _vcpu_share_pct(current.metrics, previous.metrics, counter, elapsed)
        if share is not None:
            rates[name] = share
    matched = {kind: _matched_devices(current, previous, kind) for kind in ("nic", "disk")}
    for name, kind, counter in DEVICE_RATES:
        pairs = matched[kind]
        delta = None if pairs is None else _summed_delta(pairs, counter)
        if delta is not None:
            rates[name] = delta / elapsed
    return rates


def _vcpu_share_pct(
    current: Counters, previous: Counters, counter: str, elapsed: float
) -> float | None:
    """A nanosecond counter's growth as a percent of the vCPUs the VM has now: CPU time
    used (cpu_pct, 100 = all busy) or time waited for a host CPU (cpu_steal_pct)."""
    vcpus = current.get("vcpus")
    delta = _delta(current, previous, counter)
    if delta is None or vcpus is None or vcpus <= 0:
        return None
    return delta / (elapsed * 1e9 * vcpus) * 100


def _mem_used_pct(metrics: Counters) -> float | None:
    available = metrics.get("mem_available_kib")
    usable = metrics.get("mem_usable_kib")
    if available is None or usable is None or available <= 0:
        return None
    return 100 * (available - usable) / available


def _delta(current: Counters, previous: Counters, key: str) -> int | None:
    """How much a counter grew; None if either sample lacks it or it went down (reset)."""
    now = current.get(key)
    before = previous.get(key)
    if now is None or before is None or now < before:
        return None
    return now - before


def _matched_devices(
    current: VmSample, previous: VmSample, kind: DeviceKind
) -> list[tuple[Counters, Counters]] | None:
    """(current, previous) counters of each device of ``kind``, matched by name.

    None unless both samples reported the group and hold the same uniquely
    named devices: after a hot-plug or unplug a sum over devices would leave
    out one device's traffic and look like a real drop.
    """
    if kind not in current.device_counts or kind not in previous.device_counts:
        return None
    now = current.devices_of(kind)
    before = previous.devices_of(kind)
    now_by_name = {d.name: d.counters for d in now}
    before_by_name = {d.name: d.counters for d in before}
    if (
        len(now_by_name) != len(now)
        or len(before_by_name) != len(before)
        or now_by_name.keys() != before_by_name.keys()
    ):
        return None
    return [(counters, before_by_name[name]) for name, counters in now_by_name.items()]


def _summed_delta(pairs: list[tuple[Counters, Counters]], key: str) -> int | None:
    """Sum of a counter's growth over devices; None if any device cannot give it."""
    total = 0
    for current, previous in pairs:
        delta = _delta(current, previous, key)
        if delta is None:
            return None
        total += delta
    return total


def _angle_deg(points: Sequence[Point], *, relative: bool) -> float | None:
    """Angle in degrees, in (-90, 90), of the least-squares line through ``points``.

    ``relative``: the slope is taken in percent of the window's mean per
    second, so that the angle of a rate does not depend on its magnitude; a
    window whose mean is 0 has angle 0. Otherwise the slope is used as is
    (percentage points per second). None when the time span is degenerate or
    the line is vertical to float precision.
    """
    fit = _least_squares(points)
    if fit is None:
        return None
    slope, mean = fit
    if relative:
        if mean == 0:
            return 0.0
        slope = 100 * slope / mean
    angle = math.degrees(math.atan(slope))
    return angle if -90 < angle < 90 else None


def _least_squares(points: Sequence[Point]) -> tuple[float, float] | None:
    """(slope, mean value) of the fit of value on time; None if all times are equal.

    Times are taken from the window's first one: monotonic seconds are large
    and their squares would cancel catastrophically; offsets of a few seconds
    do not. One pass, as it runs for every field of every VM every second.
    """
    n = len(points)
    t0 = points[0][0]
    sum_t = sum_v = sum_tt = sum_tv = 0.0
    for t, v in points:
        t -= t0
        sum_t += t
        sum_v += v
        sum_tt += t * t
        sum_tv += t * v
    sxx = sum_tt - sum_t * sum_t / n
    if sxx <= 0:
        return None
    return (sum_tv - sum_t * sum_v / n) / sxx, sum_v / n
