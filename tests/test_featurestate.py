"""Feature state across a daemon restart: saved, taken back once, anything doubtful ignored."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs
from test_features import UUID, cpu, disk, fields_of, mem, nic, sample, vm

from vmtelemetryd import featurestate
from vmtelemetryd.features import Features
from vmtelemetryd.model import Sample

OTHER = "99999999-2222-3333-4444-555555555555"
HOST = "qemu:///system"


def busy(t: float, *, instance: int = 1, uuid: str = UUID) -> Sample:
    """A VM with every kind of value, all growing with ``t``, as in a real sample."""
    step = int(t)
    metrics = {**cpu(step * step * 10**8, vcpus=2), **mem(10_000, 9_000 - 10 * step)}
    devices = (
        nic("vnet0", rx_bytes=1000 * step, tx_bytes=10 * step, rx_packets=step, tx_packets=step),
        disk("vda", rd_bytes=512 * step, wr_bytes=4096 * step * step, rd_reqs=step, wr_reqs=step),
    )
    counts = {"nic": 1, "disk": 1}
    return sample(t, vm(metrics, devices, counts, uuid=uuid, instance=instance))


def fed(times: range, window: int = 4) -> Features:
    features = Features(window)
    for t in times:
        features.derive(busy(float(t)))
    return features


def state_file(spool: Path) -> Path:
    return spool / featurestate.FILE_NAME


def test_a_restarted_daemon_goes_on_as_if_it_had_never_stopped(tmp_path: Path) -> None:
    spool = tmp_path / "spool"  # not there yet: save makes it
    running, stopped = fed(range(100, 104)), fed(range(100, 104))
    with capture_logs() as logs:
        featurestate.save({HOST: stopped}, spool)
        started = Features(4)
        featurestate.restore({HOST: started}, spool)
    assert [e["log_level"] for e in logs] == ["info", "info"]

    # From the first sample on, until the windows hold no saved value any more.
    for t in range(104, 108):
        expected = fields_of(running, busy(float(t)))
        assert fields_of(started, busy(float(t))) == expected
        assert {"cpu_pct", "cpu_pct_angle_deg", "net_rx_bps_angle_deg"} <= set(expected)


def test_how_late_a_vms_disks_were_read_is_kept_across_a_restart(tmp_path: Path) -> None:
    first = busy(104.0)
    late = replace(first, vms=(replace(first.vms[0], monitor_late_s=0.3),))
    running, stopped = fed(range(100, 104)), fed(range(100, 104))
    running.derive(late)
    stopped.derive(late)
    featurestate.save({HOST: stopped}, tmp_path)
    started = Features(4)
    featurestate.restore({HOST: started}, tmp_path)
    expected = fields_of(running, busy(105.0))
    assert fields_of(started, busy(105.0)) == expected
    assert expected["disk_rd_bps"] == pytest.approx(512 / 0.7)


def test_the_state_is_taken_back_once(tmp_path: Path) -> None:
    featurestate.save({HOST: fed(range(2))}, tmp_path)
    featurestate.restore({HOST: Features(4)}, tmp_path)
    assert not state_file(tmp_path).exists()
    again = Features(4)
    with capture_logs() as logs:
        featurestate.restore({HOST: again}, tmp_path)
    assert logs == []  # no file: the first start, or the one after a SIGKILL
    assert "cpu_pct" not in fields_of(again, busy(2.0))


def test_saving_replaces_an_older_file_and_leaves_no_temporary_one(tmp_path: Path) -> None:
    state_file(tmp_path).write_text("an older, longer file " * 1000)
    featurestate.save({HOST: fed(range(2))}, tmp_path)
    assert json.loads(state_file(tmp_path).read_bytes())["format"] == featurestate.FORMAT
    assert sorted(p.name for p in tmp_path.iterdir()) == [featurestate.FILE_NAME]


def test_a_vm_that_restarted_meanwhile_starts_afresh_and_the_others_go_on(
    tmp_path: Path,
) -> None:
    features = Features(4)
    for t in (0.0, 1.0):
        features.derive(Sample("hv1", 0, t, busy(t).vms + busy(t, uuid=OTHER).vms))
    featurestate.save({HOST: features}, tmp_path)
    started = Features(4)
    featurestate.restore({HOST: started}, tmp_path)

    # UUID came back with another domain id; the other kept its own.
    derived = started.derive(
        Sample("hv1", 0, 2.0, busy(2.0, instance=2).vms + busy(2.0, uuid=OTHER).vms)
    )
    assert "cpu_pct" not in derived[UUID].fields
    assert "cpu_pct" in derived[OTHER].fields


def vm_of(document: dict[str, Any]) -> dict[str, Any]:
    saved: dict[str, Any] = next(iter(document["hosts"][HOST].values()))
    return saved


Edit = Callable[[dict[str, Any]], object]
EDITS: dict[str, Edit] = {
    "another boot": lambda d: d.update(boot_id="00000000-0000-0000-0000-000000000000"),
    "another format": lambda d: d.update(format=featurestate.FORMAT + 1),
    "no format": lambda d: d.pop("format"),
    "a counter that is text": lambda d: vm_of(d)["last"]["metrics"].update(cpu_time_ns="lots"),
    "a window point that is not a pair": lambda d: vm_of(d)["windows"].update(cpu_pct=[[1.0]]),
    "an unknown device kind": lambda d: vm_of(d)["last"].update(devices=[["gpu", "g0", {}]]),
    "a negative lateness": lambda d: vm_of(d)["last"].update(monitor_late_s=-0.5),
    "an endless lateness": lambda d: vm_of(d)["last"].update(monitor_late_s=math.inf),
    "a lateness that is text": lambda d: vm_of(d)["last"].update(monitor_late_s="0.2"),
    "hosts that are not an object": lambda d: d.update(hosts=[]),
    "a host whose vms are not an object": lambda d: d["hosts"].update({HOST: []}),
}


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_a_doubtful_file_is_ignored_with_one_warning(tmp_path: Path, edit: Edit) -> None:
    featurestate.save({HOST: fed(range(4))}, tmp_path)
    document = json.loads(state_file(tmp_path).read_bytes())
    edit(document)
    state_file(tmp_path).write_text(json.dumps(document))
    _assert_ignored(tmp_path)


BROKEN: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "not JSON": lambda data: b"\x00\xff" + data,
    "not an object": lambda data: b"[1, 2]",
}


@pytest.mark.parametrize("damage", BROKEN.values(), ids=BROKEN.keys())
def test_a_damaged_file_is_ignored_with_one_warning(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    featurestate.save({HOST: fed(range(4))}, tmp_path)
    state_file(tmp_path).write_bytes(damage(state_file(tmp_path).read_bytes()))
    _assert_ignored(tmp_path)


def _assert_ignored(spool: Path) -> None:
    started = Features(4)
    with capture_logs() as logs:
        featurestate.restore({HOST: started}, spool)
    assert [(e["log_level"], e["event"]) for e in logs] == [("warning", "feature state ignored")]
    assert "cpu_pct" not in fields_of(started, busy(4.0))
    assert not state_file(spool).exists()  # never read twice


def test_an_unwritable_spool_dir_costs_one_warning_not_the_stop(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with capture_logs() as logs:
        featurestate.save({HOST: fed(range(2))}, blocker / "spool")  # even root cannot make this
    assert [e["log_level"] for e in logs] == ["warning"]
    assert "Not a directory" in logs[0]["error"]


def test_each_host_gets_back_its_own_state_and_a_host_no_longer_watched_is_dropped(
    tmp_path: Path,
) -> None:
    """Kept by host URI: the same VM on two hosts (a migration) never mixes their counters."""
    featurestate.save({HOST: fed(range(2)), "qemu+ssh://hv2/system": Features(4)}, tmp_path)
    here, there = Features(4), Features(4)
    featurestate.restore({HOST: here, "qemu+ssh://hv3/system": there}, tmp_path)
    assert "cpu_pct" in fields_of(here, busy(2.0))
    assert "cpu_pct" not in fields_of(there, busy(2.0))
