"""The lines of ``vmtelemetryd top``, pure: from samples and features to text."""

from __future__ import annotations

import pytest

from vmtelemetryd.features import Features
from vmtelemetryd.model import Sample, VmSample
from vmtelemetryd.topview import (
    MIN_WIDTH,
    Frame,
    Row,
    human_rate,
    next_sort,
    plain,
    rows_of,
    screen,
    sorted_rows,
)


def row(name: str, cpu: float | None = None, host: str = "hv1", **values: float) -> Row:
    fields = {
        "steal_pct": None,
        "mem_pct": None,
        "net_rx_bps": None,
        "net_tx_bps": None,
        "disk_rd_bps": None,
        "disk_wr_bps": None,
        **values,
    }
    return Row(host=host, name=name, state=1, cpu_pct=cpu, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("bps", "text"),
    [
        (None, "-"),
        (0.0, "0 B/s"),
        (812.4, "812 B/s"),
        (1024.0, "1.00 KiB/s"),
        (12.34 * 1024, "12.3 KiB/s"),
        (4.5 * 1024**2, "4.50 MiB/s"),
        (123.4 * 1024**3, "123 GiB/s"),
    ],
)
def test_rates_in_human_units(bps: float | None, text: str) -> None:
    assert human_rate(bps) == text


def test_busiest_first_and_unknown_last() -> None:
    rows = [row("a", None), row("b", 5.0), row("c", 50.0), row("d", 0.0)]
    assert [r.name for r in sorted_rows(rows, "cpu")] == ["c", "b", "d", "a"]
    assert [r.name for r in sorted_rows(rows, "name")] == ["a", "b", "c", "d"]
    net = [row("x", net_rx_bps=10.0), row("y", net_tx_bps=30.0), row("z")]
    assert [r.name for r in sorted_rows(net, "net")] == ["y", "x", "z"]


def test_the_sort_key_cycles_through_every_column() -> None:
    seen = ["cpu"]
    while (following := next_sort(seen[-1])) != "cpu":
        seen.append(following)
    assert seen == ["cpu", "steal", "mem", "net", "disk", "name"]


def test_rows_come_from_the_same_features_the_daemon_writes_and_missing_shows_dash() -> None:
    def vm(cpu_ns: int) -> VmSample:
        return VmSample("one-7", "u-7", 3, {"state": 3, "cpu_time_ns": cpu_ns, "vcpus": 2}, (), {})

    features = Features(5)
    features.derive(Sample("hv1", 0, 10.0, (vm(0),)))
    second = Sample("hv1", 1, 11.0, (vm(10**9),))
    (r,) = rows_of(second, features.derive(second))
    assert (r.host, r.name, r.state, r.cpu_pct, r.mem_pct) == ("hv1", "one-7", 3, 50.0, None)
    lines = plain(Frame(("hv1",), (r,), 0.02, 0.0), "cpu")
    assert lines[2].split() == ["one-7", "paused", "50.0", "-", "-", "-", "-", "-", "-"]


def test_a_screen_never_passes_its_width_and_scrolls_within_the_rows() -> None:
    many = tuple(row(f"vm-{i:02}" + "x" * 80, float(i)) for i in range(30))
    frame = Frame(("hv1",), many, 0.1, 0)
    lines, offset = screen(frame, "cpu", 100, 10, offset=0)
    assert len(lines) == 10 and all(len(line) < 100 for line in lines)
    assert lines[3].startswith("vm-29") and "~" in lines[3]  # busiest first, name cut visibly
    _, offset = screen(frame, "cpu", 100, 10, offset=1000)
    assert offset == 30 - 7


def test_several_hosts_get_a_host_column() -> None:
    frame = Frame(("hv1", "hv2"), (row("a", 1.0, "hv1"), row("a", 2.0, "hv2")), 0.1, 0)
    lines, _ = screen(frame, "cpu", 120, 10, 0)
    assert lines[2].split()[:2] == ["NAME", "HOST"]
    assert [line.split()[1] for line in lines[3:5]] == ["hv2", "hv1"]
    assert "hv1, hv2" in lines[0]


def test_a_terminal_too_small_gets_a_message_that_fits() -> None:
    lines, _ = screen(None, "cpu", 30, 5, 0)
    assert "too small" in " ".join(lines) and all(len(line) < 30 for line in lines)
    assert len(lines) <= 5
    assert screen(None, "cpu", MIN_WIDTH, 5, 0)[0][0].startswith("vmtelemetryd top")
