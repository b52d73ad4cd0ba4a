"""The operator's verbs: ``vms``, ``show-config`` and ``status``, run as the real command.

``vms`` and ``status`` are checked against what libvirt and a running daemon
say independently; ``show-config`` against the file and environment given.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import libvirt
import pytest
from daemonproc import (
    DESIGN_VARIABLES,
    DaemonProcess,
    active_domains,
    clean_environment,
    lab_environment,
    libvirt_devices,
    run_verb,
)

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}
# DESIGN.md: status shows "VMs, last poll, queued and spooled points, last write, last error",
# and status.json carries `delivery`.
STATUS_KEYS = {"vms", "last_poll", "queued", "spooled", "last_write", "written", "delivery"}


def vms_listing(stdout: str) -> tuple[dict[str, tuple[str, list[tuple[str, str]]]], int, int]:
    """``vms`` output as {first word: (its line, [(kind, device)])}, the number of VM lines
    and the count it states."""
    *body, summary = stdout.rstrip("\n").split("\n")
    stated = re.fullmatch(r"(\d+) VMs? on \S+", summary)
    assert stated, summary
    listing: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current: list[tuple[str, str]] = []
    heads = 0
    for line in body:
        if line[:1].isspace():
            kind, device = line.split(None, 1)
            current.append((kind, device.strip()))
        else:
            current, heads = [], heads + 1
            listing[line.split()[0]] = (line, current)
    return listing, heads, int(stated.group(1))


def shown_state(line: str) -> str:
    """The state a ``vms`` line gives: ``state=X``, or a state's name among its words."""
    given = re.search(r"\bstate=(\w+)", line)
    if given:
        return given.group(1)
    names = [word for word in line.split() if word in STATE_NAMES.values()]
    assert len(names) == 1, line
    return names[0]


@pytest.mark.lab
def test_vms_lists_every_guest_with_its_uuid_state_and_devices(lab: Any, tmp_path: Path) -> None:
    """What an operator checks first: every guest, told apart by uuid, in libvirt's state,
    with the devices its XML defines."""
    result = run_verb(lab_environment(lab, tmp_path), "vms")
    assert result.returncode == 0, result.stderr
    listing, heads, stated = vms_listing(result.stdout)
    assert stated == heads >= len(lab.guests)
    conn = libvirt.openReadOnly(lab.libvirt_uri)
    try:
        truth = {g: conn.lookupByName(g) for g in lab.guests}
        states = {g: dom.state()[0] for g, dom in truth.items()}
        uuids = {g: dom.UUIDString() for g, dom in truth.items()}
    finally:
        conn.close()
    for guest in lab.guests:
        line, devices = listing[guest]
        assert uuids[guest] in line.split(), line
        assert shown_state(line) in {str(states[guest]), STATE_NAMES[states[guest]]}, line
        assert sorted(devices) == libvirt_devices(lab.libvirt_uri, guest)
    # The lab's two kinds of guest: the listing must not blur them into one state.
    paused, busy = lab.paused_guests[0], lab.busy_guests[0]
    assert (states[paused], states[busy]) == (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_RUNNING)
    assert shown_state(listing[paused][0]) != shown_state(listing[busy][0])


def show_config(tmp_path: Path, file_text: str, **environ: str) -> dict[str, str]:
    """``show-config`` with a config file and environment, as NAME -> value; the token
    (always the unique word ``secret-…``) must appear in none of its output."""
    path = tmp_path / "vmtelemetryd.env"
    path.write_text(file_text)
    result = run_verb({**clean_environment(), **environ}, "--config", str(path), "show-config")
    assert result.returncode == 0, result.stderr
    assert "secret-" not in result.stdout + result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines())


def test_show_config_reflects_file_and_environment_with_the_token_masked(tmp_path: Path) -> None:
    """The effective configuration: the file's values, the environment's where it wins,
    defaults for the rest, and *** for the token."""
    file_text = (
        "INFLUX_URL=http://127.0.0.1:9999\n"
        "INFLUX_DB=from-file\n"
        f"INFLUX_TOKEN=secret-{uuid.uuid4().hex}\n"
        "POLL_INTERVAL=2.5\n"
        "DOMAINS_EXCLUDE=test-*,tmp-?\n"
        "HOST_TAG=hv-from-file\n"
        "SPOOL_DIR=/var/tmp/vmt-spool\n"
    )
    environ = {
        "INFLUX_TOKEN": f"secret-{uuid.uuid4().hex}",
        "POLL_INTERVAL": "0.75",
        "BATCH_MAX_LINES": "123",
        "LOG_LEVEL": "debug",
    }
    shown = show_config(tmp_path, file_text, **environ)
    assert shown["INFLUX_TOKEN"] == "***"
    assert {
        k: shown[k] for k in ("LIBVIRT_URI", "INFLUX_URL", "INFLUX_DB", "INFLUX_WRITE_API")
    } == {
        "LIBVIRT_URI": "qemu:///system",
        "INFLUX_URL": "http://127.0.0.1:9999",
        "INFLUX_DB": "from-file",
        "INFLUX_WRITE_API": "v3",
    }
    numbers = ("POLL_INTERVAL", "BATCH_MAX_LINES", "BATCH_MAX_SEC", "LIBVIRT_TIMEOUT")
    assert {k: float(shown[k]) for k in numbers} == {
        "POLL_INTERVAL": 0.75,
        "BATCH_MAX_LINES": 123,
        "BATCH_MAX_SEC": 1.0,
        "LIBVIRT_TIMEOUT": 30.0,
    }
    assert float(shown["DEVICE_CACHE_TTL"]) == 300 and int(shown["SPOOL_MAX_BYTES"]) == 2**30
    assert shown["DOMAINS_INCLUDE"] == "" and shown["DOMAINS_EXCLUDE"] == "test-*,tmp-?"
    assert (shown["HOST_TAG"], shown["SPOOL_DIR"]) == ("hv-from-file", "/var/tmp/vmt-spool")
    assert (shown["FEATURE_WINDOW"], shown["LOG_LEVEL"]) == ("5", "debug")


def test_show_config_prints_every_design_variable(tmp_path: Path) -> None:
    """DESIGN.md's table is the list an operator compares a host against."""
    token = tmp_path / "token"
    token.write_text(f"secret-{uuid.uuid4().hex}\n")
    file_text = (
        "INFLUX_URL=http://127.0.0.1:9999\nINFLUX_DB=db\n"
        f"INFLUX_TOKEN_FILE={token}\nMETADATA_TAGS=one_name,one_owner\nSTATS_SHARDS=2\n"
    )
    shown = show_config(tmp_path, file_text)
    assert [name for name in shown if name in DESIGN_VARIABLES] == list(DESIGN_VARIABLES)
    assert shown["INFLUX_TOKEN"] == "***" and shown["INFLUX_TOKEN_FILE"] == str(token)
    assert (shown["METADATA_TAGS"], shown["STATS_SHARDS"]) == ("one_name,one_owner", "2")


def status_json(env: dict[str, str]) -> dict[str, Any]:
    result = run_verb(env, "status", "--json")
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


@pytest.mark.lab
def test_status_json_reports_the_running_daemon(lab: Any, tmp_path: Path) -> None:
    """``status --json`` is what monitoring scrapes: its figures must be the daemon's own,
    live: the VMs libvirt has, a write count that grows, and delivery ok, the one field an
    alert needs to tell a database away from a token refused."""
    env = lab_environment(lab, tmp_path)
    daemon = DaemonProcess(env, tmp_path).start()
    try:
        daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")
        before = active_domains(lab.libvirt_uri)
        listed = time.time()
        daemon.wait_for(lambda s: s["last_poll"] > listed, 10, "a poll after the listing")
        first = status_json(env)
        after = active_domains(lab.libvirt_uri)
        time.sleep(2)
        second = status_json(env)
    finally:
        assert daemon.stop() == 0, daemon.output()
    assert first.keys() >= STATUS_KEYS and any("error" in key for key in first), first
    # Another session's guest may come or go meanwhile: vms lies between the two listings.
    assert set(lab.guests) <= before & after
    assert len(before & after) <= first["vms"] <= len(before | after), (first, before, after)
    assert second["written"] > first["written"] > 0
    assert (first["delivery"], second["delivery"]) == ("ok", "ok")
    assert second["last_poll"] > first["last_poll"] >= listed


@pytest.mark.parametrize("flags", [(), ("--json",)], ids=["text", "json"])
def test_status_without_a_daemon_is_a_clear_error(tmp_path: Path, flags: tuple[str, ...]) -> None:
    """No daemon has run here: say so, where it looked, and fail, so scripts can tell."""
    env = {**clean_environment(), "RUNTIME_DIRECTORY": str(tmp_path)}
    result = run_verb(env, "status", *flags)
    assert result.returncode != 0 and result.stdout == ""
    assert str(tmp_path / "status.json") in result.stderr and "Traceback" not in result.stderr


@pytest.mark.lab
def test_status_after_the_daemon_stopped_is_an_error(lab: Any, tmp_path: Path) -> None:
    """Run by hand (no systemd to remove RUNTIME_DIRECTORY), a stopped daemon leaves its
    status file: ``status`` must not report a dead daemon as running."""
    env = lab_environment(lab, tmp_path)
    daemon = DaemonProcess(env, tmp_path).start()
    try:
        daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")
    finally:
        assert daemon.stop() == 0, daemon.output()
    result = run_verb(env, "status")
    assert result.returncode != 0, result.stdout
    assert "not running" in result.stderr and result.stdout == "", result.stderr
