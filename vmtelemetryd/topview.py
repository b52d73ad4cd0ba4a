"""What ``vmtelemetryd top`` shows, as lines of text: pure, so it is tested without a terminal.

A row per VM comes from the same ``Sample`` and ``VmFeatures`` the daemon
encodes, so the view shows exactly the numbers the database gets. A value
libvirt did not report, or a rate that has no previous sample yet, shows as
``-``, never as 0.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from vmtelemetryd.model import Sample, VmFeatures, state_name

SORTS: tuple[str, ...] = ("cpu", "steal", "mem", "net", "disk", "name")
MIN_WIDTH = 80
MIN_HEIGHT = 5  # the header, the column titles and at least one VM
HEADER_LINES = 3
TITLE_LINE = 2  # the column titles, under the two header lines

_RATE_UNITS = ("B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s")


@dataclass(frozen=True, slots=True)
class Row:
    host: str
    name: str
    state: int | None
    cpu_pct: float | None
    steal_pct: float | None
    mem_pct: float | None
    net_rx_bps: float | None
    net_tx_bps: float | None
    disk_rd_bps: float | None
    disk_wr_bps: float | None


@dataclass(frozen=True, slots=True)
class Frame:
    """One refresh: the rows of every host, or why there are none this time."""

    hosts: tuple[str, ...]
    rows: tuple[Row, ...]
    poll_s: float
    wall: float
    error: str | None = None


def rows_of(sample: Sample, features: Mapping[str, VmFeatures]) -> list[Row]:
    rows = []
    for vm in sample.vms:
        derived = features.get(vm.uuid)
        fields = derived.fields if derived is not None else {}
        rows.append(
            Row(
                host=sample.host,
                name=vm.name,
                state=vm.metrics.get("state"),
                cpu_pct=fields.get("cpu_pct"),
                steal_pct=fields.get("cpu_steal_pct"),
                mem_pct=fields.get("mem_used_pct"),
                net_rx_bps=fields.get("net_rx_bps"),
                net_tx_bps=fields.get("net_tx_bps"),
                disk_rd_bps=fields.get("disk_rd_bps"),
                disk_wr_bps=fields.get("disk_wr_bps"),
            )
        )
    return rows


def _total(*values: float | None) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


_SORT_VALUE: Mapping[str, Callable[[Row], float | None]] = {
    "cpu": lambda r: r.cpu_pct,
    "steal": lambda r: r.steal_pct,
    "mem": lambda r: r.mem_pct,
    "net": lambda r: _total(r.net_rx_bps, r.net_tx_bps),
    "disk": lambda r: _total(r.disk_rd_bps, r.disk_wr_bps),
}


def sorted_rows(rows: Sequence[Row], sort: str) -> list[Row]:
    """Busiest first (unknown values last), names A to Z; ties by name and host."""
    by_name = sorted(rows, key=lambda r: (r.name, r.host))
    if sort == "name":
        return by_name
    value = _SORT_VALUE[sort]
    return sorted(by_name, key=lambda r: (value(r) is None, -(value(r) or 0.0)))


def next_sort(sort: str) -> str:
    return SORTS[(SORTS.index(sort) + 1) % len(SORTS)]


def human_rate(bps: float | None) -> str:
    """``812 B/s``, ``12.3 KiB/s``, ``4.50 MiB/s``: three significant digits at most."""
    if bps is None:
        return "-"
    unit = 0
    while bps >= 1024 and unit < len(_RATE_UNITS) - 1:
        bps /= 1024
        unit += 1
    digits = 0 if unit == 0 or bps >= 100 else 1 if bps >= 10 else 2
    return f"{bps:.{digits}f} {_RATE_UNITS[unit]}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# (title, width); the name column (and the host column, with several hosts) take the rest.
_COLUMNS: tuple[tuple[str, int], ...] = (
    ("STATE", 11),
    ("CPU%", 6),
    ("STEAL%", 6),
    ("MEM%", 5),
    ("NET RX", 10),
    ("NET TX", 10),
    ("DISK RD", 10),
    ("DISK WR", 10),
)


def _cells(row: Row) -> tuple[str, ...]:
    return (
        state_name(row.state),
        _percent(row.cpu_pct),
        _percent(row.steal_pct),
        _percent(row.mem_pct),
        human_rate(row.net_rx_bps),
        human_rate(row.net_tx_bps),
        human_rate(row.disk_rd_bps),
        human_rate(row.disk_wr_bps),
    )


def table(rows: Sequence[Row], name_width: int, host_width: int) -> list[str]:
    """The column titles, then one line per row; names longer than the column are cut.
    ``host_width`` 0: no host column (one host)."""

    def line(name: str, host: str, cells: Sequence[str]) -> str:
        head = _fit(name, name_width) + (" " + _fit(host, host_width) if host_width else "")
        left, *numbers = cells
        widths = [width for _, width in _COLUMNS[1:]]
        rest = " ".join(cell.rjust(width) for cell, width in zip(numbers, widths, strict=True))
        return f"{head} {left:<{_COLUMNS[0][1]}} {rest}"

    titles = [title for title, _ in _COLUMNS]
    return [line("NAME", "HOST", titles)] + [line(r.name, r.host, _cells(r)) for r in rows]


def _fit(text: str, width: int) -> str:
    return text[: width - 1] + "~" if len(text) > width else text.ljust(width)


def host_width(frame: Frame | None) -> int:
    """The host column's width: 0, no column, unless the frame has several hosts."""
    if frame is None or len(frame.hosts) < 2:
        return 0
    return max(4, *(len(host) for host in frame.hosts))


def fixed_width(hosts: int) -> int:
    """Characters a line takes besides the name column, given the host column's width."""
    return sum(width + 1 for _, width in _COLUMNS) + (hosts + 1 if hosts else 0)


def header(frame: Frame | None, sort: str, width: int) -> list[str]:
    """The top two lines: where, how many, how long the poll took, when; then keys or the error."""
    if frame is None:
        return ["vmtelemetryd top: first sample..."[:width], ""]
    stamp = time.strftime("%H:%M:%S", time.localtime(frame.wall))
    hosts = ", ".join(frame.hosts) or "?"
    summary = f"vmtelemetryd top - {hosts} - {len(frame.rows)} VMs - poll {frame.poll_s:.2f} s"
    keys = f"sort: {sort}   s: next sort   q: quit   arrows, PgUp, PgDn: scroll"
    second = f"libvirt, retrying: {frame.error}" if frame.error else keys
    return [f"{summary} - {stamp}"[:width], second.replace("\n", " ")[:width]]


def fits(width: int, height: int) -> bool:
    return width >= MIN_WIDTH and height >= MIN_HEIGHT


def screen(
    frame: Frame | None, sort: str, width: int, height: int, offset: int
) -> tuple[list[str], int]:
    """Every line of a terminal of ``width`` x ``height``, and the scroll offset used
    (clamped, so that scrolling past the end stops at the last row)."""
    if not fits(width, height):
        message = f"terminal too small ({width}x{height}): top needs {MIN_WIDTH}x{MIN_HEIGHT}"
        return textwrap.wrap(message, max(1, width - 1))[:height], 0
    rows = sorted_rows(frame.rows, sort) if frame is not None else []
    visible = height - HEADER_LINES
    offset = max(0, min(offset, len(rows) - visible))
    hosts = host_width(frame)
    lines = header(frame, sort, width)
    lines += table(rows[offset : offset + visible], width - 1 - fixed_width(hosts), hosts)
    return [line[: width - 1] for line in lines], offset


def plain(frame: Frame, sort: str) -> list[str]:
    """For a pipe: the header's first line and the whole table, names never cut."""
    rows = sorted_rows(frame.rows, sort)
    name_width = max([4, *(len(r.name) for r in rows)])
    first = header(frame, sort, 10_000)[0]
    error = [f"libvirt: {frame.error}"] if frame.error else []
    return [first, *error, *table(rows, name_width, host_width(frame))]
