"""Who a VM is and what happened to it, against real guests: metadata from the domain
XML (OpenNebula and Nova blocks), lifecycle events, and defined domains that do not run."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import labkit
import libvirt
import pytest
from daemonproc import DaemonProcess, lab_environment, run_verb, series_of
from fakeinflux import DATABASE, TOKEN, FakeInflux3, serve
from lineparse import Line, parse_lines

pytestmark = pytest.mark.lab

# Tenant text: what an OpenNebula user may name a VM. Newline and tab cannot be carried
# by line protocol (U+FFFD, lineprotocol.py); everything else must come back exact.
HOSTILE = 'shop, "prod"=1 \\ a=b,c d ünïcødé =x'
ONE = """<one:vm xmlns:one="http://opennebula.org/xmlns/libvirt/1.0">
  <one:name>{name}</one:name><one:uname>alice</one:uname><one:uid>7</one:uid>
  <one:gname>users</one:gname><one:gid>100</one:gid></one:vm>"""
NOVA = """<nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
  <nova:package version="27.1.0"/><nova:name>web-1</nova:name>
  <nova:flavor name="m1.small"><nova:memory>128</nova:memory><nova:vcpus>1</nova:vcpus>
  </nova:flavor>
  <nova:owner><nova:user uuid="3f9a">bob</nova:user><nova:project uuid="77aa">shop</nova:project>
  </nova:owner></nova:instance>"""


@pytest.fixture
def identified(lab: Any) -> Iterator[tuple[str, str]]:
    one, nova = "one-4242", "instance-0000002a"
    labkit.create_guest(
        one, named_freely=True, title="db primary", metadata=ONE.format(name=escape(HOSTILE))
    )
    try:
        labkit.create_guest(nova, named_freely=True, metadata=NOVA)
        yield one, nova
    finally:
        for name in (one, nova):
            labkit.destroy_guest(name)


def labels(host: str, series: str, vm: str) -> dict[str, str]:
    """The labels of a VM's one series by that name: several would mean points differ."""
    rows = labkit.query(f'{{__name__="{series}",host="{host}",vm="{vm}"}}')
    assert len(rows) == 1, (series, vm, [row["metric"] for row in rows])
    return dict(rows[0]["metric"])


def test_metadata_lands_in_vm_info_and_as_tags_on_every_point(
    lab: Any, tmp_path: Path, identified: tuple[str, str]
) -> None:
    one, nova = identified
    env = lab_environment(lab, tmp_path, METADATA_TAGS="one_name,nova_project")
    daemon = DaemonProcess(env, tmp_path).start()
    try:
        daemon.wait_for(lambda s: s["written"] > 200, 30, "writes")
        time.sleep(1)
    finally:
        assert daemon.stop() == 0, daemon.output()
    info = labels(daemon.host, "vm_info_info", one)
    assert info["one_vm_id"] == "4242" and info["title"] == "db primary"
    assert info["one_name"] == HOSTILE, info
    assert (info["one_owner"], info["one_group"]) == ("alice", "users")
    nova_info = labels(daemon.host, "vm_info_info", nova)
    expected = {
        "nova_name": "web-1",
        "nova_flavor": "m1.small",
        "nova_project": "shop",
        "nova_project_id": "77aa",
        "nova_user": "bob",
        "nova_user_id": "3f9a",
    }
    assert {k: nova_info.get(k) for k in expected} == expected, nova_info
    assert "one_vm_id" not in nova_info
    # METADATA_TAGS: the named keys on the VM's other measurements, and only those.
    for series in ("vm_metrics_state", "vm_features_cpu_pct", "vm_devices_rx_bytes"):
        tagged = labels(daemon.host, series, one)
        assert tagged["one_name"] == HOSTILE and "one_owner" not in tagged, (series, tagged)
        assert labels(daemon.host, series, nova)["nova_project"] == "shop", series
    assert "one_name" not in labels(daemon.host, "vm_metrics_state", lab.paused_guests[0])


def test_a_defined_domain_that_does_not_run_writes_its_state_each_poll(
    lab: Any, tmp_path: Path
) -> None:
    name = lab.prefix + "shutoff"
    labkit.create_guest(name, start=False)
    try:
        daemon = DaemonProcess(lab_environment(lab, tmp_path), tmp_path).start()
        try:
            daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")
            time.sleep(3)
        finally:
            assert daemon.stop() == 0, daemon.output()
    finally:
        labkit.destroy_guest(name)
    states = series_of(daemon.host, "vm_metrics_state", name)
    busy = series_of(daemon.host, "vm_metrics_state", lab.busy_guests[0])
    assert len(states) >= 6 and {v for _, v in states} == {5.0}, states
    assert [t for t, _ in states] == [t for t, _ in busy], "not sampled every poll"
    assert series_of(daemon.host, "vm_devices_rx_bytes", name) == []


def events_of(database: FakeInflux3, vm: str) -> list[Line]:
    lines = parse_lines("".join(line + "\n" for line in database.accepted))
    return [p for p in lines if p.measurement == "vm_events" and p.tags["vm"] == vm]


def described(points: list[Line]) -> list[tuple[str, str, int | float]]:
    return [(p.tags["event"], p.tags["detail"], p.fields["state"]) for p in points]


def wait_for_event(database: FakeInflux3, vm: str, count: int, timeout: float) -> list[Line]:
    deadline = time.monotonic() + timeout
    while len(found := events_of(database, vm)) < count:
        assert time.monotonic() < deadline, f"{len(found)} events of {vm}, wanted {count}"
        time.sleep(0.05)
    return found


def test_lifecycle_events_arrive_within_two_seconds_and_survive_an_outage(
    lab: Any, tmp_path: Path
) -> None:
    name = lab.prefix + "events"
    labkit.create_guest(name)
    database = FakeInflux3()
    try:
        with serve(database) as url:
            port = int(url.rsplit(":", 1)[1])
            env = lab_environment(
                lab, tmp_path, INFLUX_URL=url, INFLUX_DB=DATABASE, INFLUX_TOKEN=TOKEN
            )
            env["INFLUX_WRITE_API"] = "v3"
            daemon = DaemonProcess(env, tmp_path).start()
            daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")
            conn = libvirt.open(lab.libvirt_uri)
            domain = conn.lookupByName(name)
            acted: list[float] = []
            for action in (domain.resume, domain.suspend):
                acted.append(time.time())
                action()
                wait_for_event(database, name, len(acted), 2.0)
        # The database is gone: the next events wait in the spool.
        domain.resume()
        domain.destroy()
        conn.close()
        daemon.wait_for(lambda s: s["delivery"] == "retrying", 20, "the failed writes")
        back = FakeInflux3()
        with serve(back, port):
            wait_for_event(back, name, 3, 20)
            assert daemon.stop() == 0, daemon.output()
    finally:
        if name in labkit.lab_domains():
            labkit.destroy_guest(name)
    assert described(events_of(database, name)) == [
        ("resumed", "unpaused", 1),
        ("suspended", "paused", 3),
    ]
    for point, when in zip(events_of(database, name), acted, strict=True):
        assert 0 <= point.ts / 1e9 - when < 2.0
    # libvirt 9.0 tells a destroy as a host-initiated shutdown, then the stop.
    assert described(events_of(back, name)) == [
        ("resumed", "unpaused", 1),
        ("shutdown", "host", 4),
        ("stopped", "destroyed", 5),
    ]


def test_vms_shows_states_by_name_and_metadata(
    lab: Any, tmp_path: Path, identified: tuple[str, str]
) -> None:
    one, nova = identified
    result = run_verb(lab_environment(lab, tmp_path), "vms")
    assert result.returncode == 0, result.stderr
    blocks = {
        block.splitlines()[0].split()[0]: block
        for block in re.split(r"\n(?=\S)", result.stdout.strip())
    }
    assert blocks[one].splitlines()[0].endswith(" paused"), blocks[one]
    assert f"    one_name={HOSTILE!r}" in blocks[one].splitlines(), blocks[one]
    assert "    one_vm_id='4242'" in blocks[one].splitlines()
    assert "    nova_project='shop'" in blocks[nova].splitlines(), blocks[nova]
    assert blocks[lab.busy_guests[0]].splitlines()[0].endswith(" running")
