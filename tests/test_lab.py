"""The lab itself: real guests give the stats the collector needs, and the lab
database stores line protocol as written."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import labkit
import libvirt
import pytest

pytestmark = pytest.mark.lab

# what the tag value vm=odd\ vm\,a\=b\ back\slash\ ü in line protocol stands for
ODD = "odd vm,a=b back\\slash ü"

LAB_CMD = Path(__file__).resolve().parent / "lab" / "lab"
STATS = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_INTERFACE
    | libvirt.VIR_DOMAIN_STATS_BLOCK
    | libvirt.VIR_DOMAIN_STATS_BALLOON
)


def all_domain_stats(uri: str, names: set[str]) -> dict[str, dict[str, Any]]:
    conn = libvirt.openReadOnly(uri)
    try:
        return {d.name(): s for d, s in conn.getAllDomainStats(STATS, 0) if d.name() in names}
    finally:
        conn.close()


def disk(stats: dict[str, Any], target: str) -> dict[str, Any]:
    """One disk's block.N.* stats, by target name (vda, vdb)."""
    for i in range(stats["block.count"]):
        if stats[f"block.{i}.name"] == target:
            p = f"block.{i}."
            return {k[len(p) :]: v for k, v in stats.items() if k.startswith(p)}
    raise AssertionError(f"no disk {target} in {sorted(stats)}")


def test_every_lab_guest_reports_net_and_block(lab: labkit.LabInfo) -> None:
    assert len(lab.paused_guests) == labkit.DEFAULT_GUESTS
    assert len(lab.busy_guests) == labkit.DEFAULT_BUSY
    stats = all_domain_stats(lab.libvirt_uri, set(lab.guests))
    assert sorted(stats) == sorted(lab.guests)
    for name, s in stats.items():
        expected = (
            libvirt.VIR_DOMAIN_RUNNING if name in lab.busy_guests else libvirt.VIR_DOMAIN_PAUSED
        )
        assert s["state.state"] == expected, name
        net = {k: v for k, v in s.items() if k.startswith("net.")}
        assert net["net.count"] >= 1, name
        tap = net["net.0.name"]
        assert 0 < len(tap) <= 15 and os.path.exists(f"/sys/class/net/{tap}"), (name, tap)
        for field in ("rx.bytes", "rx.pkts", "tx.bytes", "tx.pkts"):
            assert isinstance(net[f"net.0.{field}"], int), (name, field)
        block = {k: v for k, v in s.items() if k.startswith("block.")}
        assert block["block.count"] == 2, name
        for target in ("vda", "vdb"):
            d = disk(s, target)
            assert d["path"].endswith(".qcow2") and os.path.exists(d["path"]), (name, d)
            assert d["capacity"] == 16 * 1024 * 1024, (name, d)
            assert {"rd.reqs", "rd.bytes", "wr.reqs", "wr.bytes"} <= d.keys(), (name, d)


def test_busy_guest_counters_grow_and_balloon_reports_memory(lab: labkit.LabInfo) -> None:
    busy = lab.busy_guests[0]
    first = all_domain_stats(lab.libvirt_uri, {busy})[busy]

    def grown(now: dict[str, Any]) -> dict[str, bool]:
        return {
            "vda written": disk(now, "vda")["wr.bytes"] > disk(first, "vda")["wr.bytes"],
            "vda write reqs": disk(now, "vda")["wr.reqs"] > disk(first, "vda")["wr.reqs"],
            "vdb read": disk(now, "vdb")["rd.bytes"] > disk(first, "vdb")["rd.bytes"],
            # libvirt reports a type='ethernet' NIC from the guest's side: tx = what it sent
            "net sent": now["net.0.tx.pkts"] > first["net.0.tx.pkts"],
            "net bytes": now["net.0.tx.bytes"] > first["net.0.tx.bytes"],
            "net received": now["net.0.rx.bytes"] > first["net.0.rx.bytes"],
        }

    deadline = time.monotonic() + 30
    while True:
        time.sleep(3)
        now = all_domain_stats(lab.libvirt_uri, {busy})[busy]
        growth = grown(now)
        if all(growth.values()) or time.monotonic() > deadline:
            break
    assert all(growth.values()), growth

    assert now["state.state"] == libvirt.VIR_DOMAIN_RUNNING
    for key in ("balloon.current", "balloon.usable", "balloon.available", "balloon.unused"):
        assert key in now, (key, sorted(k for k in now if k.startswith("balloon.")))
    assert now["balloon.current"] == labkit.GUEST_MEMORY_MIB * 1024
    # the guest holds 32 MiB in a tmpfs: usable is well below available
    assert 0 < now["balloon.usable"] < now["balloon.available"] <= now["balloon.current"]


def test_busy_guest_rates_are_steady_and_tell_directions_apart(lab: labkit.LabInfo) -> None:
    """vda is only written, vdb only read, at 3:1; the NIC sends 3x what it gets:
    tests of the daemon can then tell a swapped device or direction."""
    busy = lab.busy_guests[0]
    t0, first = time.monotonic(), all_domain_stats(lab.libvirt_uri, {busy})[busy]
    time.sleep(5)
    t1, now = time.monotonic(), all_domain_stats(lab.libvirt_uri, {busy})[busy]

    def rate(get: Any) -> float:
        return float(get(now) - get(first)) / (t1 - t0)

    wr = rate(lambda s: disk(s, "vda")["wr.bytes"])
    rd = rate(lambda s: disk(s, "vdb")["rd.bytes"])
    tx, rx = rate(lambda s: s["net.0.tx.bytes"]), rate(lambda s: s["net.0.rx.bytes"])
    assert rate(lambda s: disk(s, "vdb")["wr.bytes"]) == 0
    assert rate(lambda s: disk(s, "vda")["rd.bytes"]) == 0
    # the guest keeps up with its disks' <iotune> limits
    assert wr == pytest.approx(labkit.BUSY_WRITE_BYTES_SEC, rel=0.2)
    assert rd == pytest.approx(labkit.BUSY_READ_BYTES_SEC, rel=0.2)
    assert rx > 0 and tx / rx == pytest.approx(3, rel=0.2), (tx, rx)


def test_busy_guest_tap_routes_to_its_guest_alone(lab: labkit.LabInfo) -> None:
    """The host answers the guest on the tap's own address; nothing else is
    routed there, and the tap is on no bridge."""
    busy = lab.busy_guests[0]
    conn = libvirt.openReadOnly(lab.libvirt_uri)
    try:
        xml = conn.lookupByName(busy).XMLDesc(0)
    finally:
        conn.close()
    tap = all_domain_stats(lab.libvirt_uri, {busy})[busy]["net.0.name"]
    cmdline = ET.fromstring(xml).findtext("os/cmdline", "").split()
    guest = dict(a.split("=", 1) for a in cmdline if a.startswith("vmtlab."))

    def ip(*args: str) -> list[str]:
        out = subprocess.run(["ip", *args], capture_output=True, text=True, check=True)
        return [" ".join(line.split()) for line in out.stdout.splitlines()]

    assert ip("-4", "route", "show", "dev", tap) == [
        f"{guest['vmtlab.addr']} proto kernel scope link src {guest['vmtlab.peer']}"
    ]
    (addr,) = ip("-4", "-o", "addr", "show", "dev", tap)
    assert f"inet {guest['vmtlab.peer']} peer {guest['vmtlab.addr']}/32 " in addr
    assert not os.path.exists(f"/sys/class/net/{tap}/master")


def write_v2(lab: labkit.LabInfo, body: str) -> int:
    query = urllib.parse.urlencode({"bucket": lab.influx_db, "precision": "ns"})
    req = urllib.request.Request(
        f"{lab.influx_url}/api/v2/write?{query}",
        data=body.encode(),
        method="POST",
        headers={
            "Authorization": f"Token {lab.influx_token}",
            "Content-Type": "text/plain; charset=utf-8",
        },
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(resp.status)


def test_line_protocol_written_over_http_reads_back(lab: labkit.LabInfo) -> None:
    assert lab.write_api == "v2"
    assert lab.influx_url.startswith("http://127.0.0.1:")
    run = uuid.uuid4().hex
    t = time.time_ns() - 2_000_000_000  # in the past: export ends at "now" by default
    body = (
        f"labcheck,run={run},vm=plain value=1i,ratio=0.5 {t}\n"
        f"labcheck,run={run},vm=plain value=3i,ratio=0.25 {t + 1_000_000_000}\n"
        f"labcheck,run={run},vm=odd\\ vm\\,a\\=b\\ back\\slash\\ ü value=2.5 {t}\n"
    )
    assert write_v2(lab, body) == 204

    rows = labkit.query(f'{{__name__=~"labcheck_.*",run="{run}"}}')
    got = {(r["metric"]["__name__"], r["metric"]["vm"]): r for r in rows}
    assert sorted(got) == [
        ("labcheck_ratio", "plain"),
        ("labcheck_value", ODD),
        ("labcheck_value", "plain"),
    ]
    ms = t // 1_000_000
    plain = got[("labcheck_value", "plain")]
    assert plain["values"] == [1, 3]
    assert plain["timestamps"] == [ms, ms + 1000]
    assert got[("labcheck_ratio", "plain")]["values"] == [0.5, 0.25]
    assert got[("labcheck_value", ODD)]["values"] == [2.5]
    assert labkit.query(f'{{__name__="labcheck_value",run="x{run}"}}') == []


def test_guest_with_hostile_name_and_disk_paths(lab: labkit.LabInfo, tmp_path: Path) -> None:
    name = lab.prefix + "odd, name=x \"q\" 's' back\\slash Ünïcödé"
    folder = Path(lab.lab_dir) / f'odd dir, a=b "{uuid.uuid4().hex[:6]}" \\ ü'
    disks = [folder / 'vda a,b=c "1".qcow2', folder / "vdb \\ ß 'x'.qcow2"]
    tap = labkit.create_guest(name, disk_paths=disks)
    try:
        assert name in labkit.lab_domains()
        s = all_domain_stats(lab.libvirt_uri, {name})[name]
        assert s["state.state"] == libvirt.VIR_DOMAIN_PAUSED
        assert s["net.0.name"] == tap
        assert [disk(s, t)["path"] for t in ("vda", "vdb")] == [str(d) for d in disks]
    finally:
        labkit.destroy_guest(name)
    assert name not in labkit.lab_domains()
    assert not any(d.exists() for d in disks)
    folder.rmdir()


def test_up_again_reuses_everything_and_env_matches(lab: labkit.LabInfo) -> None:
    t0 = time.monotonic()
    again = labkit.up(labkit.DEFAULT_GUESTS, labkit.DEFAULT_BUSY)
    assert again == lab
    assert time.monotonic() - t0 < 15
    out = subprocess.run([LAB_CMD, "env"], capture_output=True, text=True, check=True).stdout
    printed = dict(line.split("=", 1) for line in out.splitlines())
    assert printed == {
        "LIBVIRT_URI": "qemu:///system",
        "INFLUX_URL": lab.influx_url,
        "INFLUX_DB": "lab",
        "INFLUX_TOKEN": "lab-token",
        "INFLUX_WRITE_API": "v2",
        "VMT_LAB_PREFIX": lab.prefix,
        "VMT_LAB_DIR": lab.lab_dir,
    }
