"""systemd/vmtelemetryd.service under a real systemd 252, against the real lab.

Each test boots its own systemd as PID 1 of private namespaces (tests/systemdns.py,
a fraction of a second), installs the service there as the package would, from this
checkout, and drives it with systemctl and journalctl: readiness, status, logs,
reload, the watchdog, a bad configuration, and the flush on stop.

The service user must exist where libvirtd runs, not only inside the namespace:
libvirtd names each client after its uid and refuses one it cannot name ("Failed to
find user record"). On a real host the package's sysusers.d entry creates it; here
the lab (``labkit.up``) creates it on the machine from the same file.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import labkit
import pytest
from systemdns import (
    CONFIG_PATH,
    REPO,
    SERVICE,
    STATUS_PATH,
    TOKEN_PATH,
    SystemdNS,
    booted_for_test,
    dotenv,
    install_vmtelemetryd,
    lab_service_config,
    wait_for,
)

UNIT_FILE = REPO / "systemd" / SERVICE
MAX_EXPOSURE = 2.0

T = TypeVar("T")


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
def ns(lab: Any, tmp_path: Path) -> Iterator[SystemdNS]:
    with booted_for_test(tmp_path) as booted:
        yield booted


def lab_config(lab: Any, **overrides: object) -> dict[str, str]:
    return lab_service_config(lab, "svc", **overrides)


def install(
    ns: SystemdNS, lab: Any, config: dict[str, str], dropins: dict[str, str] | None = None
) -> None:
    install_vmtelemetryd(ns, config, token=lab.influx_token, dropins=dropins)


def service_dropin(**settings: str) -> dict[str, str]:
    text = "[Service]\n" + "".join(f"{k}={v}\n" for k, v in settings.items())
    return {"50-test.conf": text}


def rewrite_config(ns: SystemdNS, config: dict[str, str]) -> None:
    ns.write(CONFIG_PATH, dotenv(config), mode=0o640, owner="root:vmtelemetry")


def status(ns: SystemdNS) -> dict[str, Any] | None:
    """status.json as the service last wrote it; None if there is none."""
    result = ns.run("cat", STATUS_PATH, check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def show(ns: SystemdNS, *properties: str) -> dict[str, str]:
    return ns.show(SERVICE, *properties)


def wait_status(
    ns: SystemdNS, check: Callable[[dict[str, Any]], bool], timeout: float, what: str
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        report = status(ns)
        return report if report is not None and check(report) else None

    return wait_for(probe, timeout, what)


def poll_times(ns: SystemdNS, seconds: float) -> list[float]:
    """The distinct last_poll stamps status.json shows over ``seconds``."""
    seen: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        report = status(ns)
        if report and report["last_poll"] and (not seen or report["last_poll"] != seen[-1]):
            seen.append(report["last_poll"])
        time.sleep(0.03)
    return seen


def journal_entries(ns: SystemdNS, *args: str) -> list[dict[str, Any]]:
    out = ns.journal("-u", SERVICE, "-o", "json", *args)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def journal_text(ns: SystemdNS, *args: str) -> str:
    return ns.journal("-u", SERVICE, "-o", "cat", *args)


# ---------------------------------------------------------------------- the unit file


def test_security_exposure_is_ok(capsys: pytest.CaptureFixture[str]) -> None:
    """`systemd-analyze security --offline=yes` rates the shipped unit at most 2.0, "OK"."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNIT_FILE)],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_COLORS": "0"},
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    with capsys.disabled():
        print(f"\n[systemd-analyze security] {SERVICE}: {match[1]} {match[2]}")
    assert float(match[1]) <= MAX_EXPOSURE and match[2] == "OK", result.stdout


@pytest.mark.lab
def test_unit_verifies_where_it_is_installed(ns: SystemdNS, lab: Any) -> None:
    install(ns, lab, lab_config(lab))
    # Inside the namespace /usr/bin/vmtelemetryd and the user exist, as after a package install.
    result = ns.run("systemd-analyze", "verify", str(UNIT_FILE), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == "", result.stdout + result.stderr
    groups = ns.run("id", "-nG", "vmtelemetry").stdout.split()
    assert groups == ["vmtelemetry"], "the service user must not be in the libvirt group"


# ---------------------------------------------------------------------- start and status


@pytest.mark.lab
def test_start_is_active_only_once_the_first_poll_is_done(ns: SystemdNS, lab: Any) -> None:
    install(ns, lab, lab_config(lab))
    ns.systemctl("start", "--no-block", SERVICE)
    states: list[str] = []
    deadline = time.monotonic() + 60
    while True:
        state = show(ns, "ActiveState")["ActiveState"]
        if not states or states[-1] != state:
            states.append(state)
        if state == "active":
            # READY=1 came after the first poll and its status.json.
            first = status(ns)
            break
        assert state in ("inactive", "activating"), states
        assert time.monotonic() < deadline, states
        time.sleep(0.02)
    assert "activating" in states, states
    assert first is not None, "active without a status.json"
    assert first["last_poll"] is not None and first["last_sample_error"] is None, first
    assert first["vms"] >= len(lab.guests) and first["libvirt_connected"], first

    props = show(ns, "SubState", "StatusText", "MainPID", "NRestarts", "Type", "WatchdogUSec")
    assert props["SubState"] == "running" and props["Type"] == "notify", props
    assert re.match(r"\d+ VMs, poll \d+\.\d\d s, \d+ queued", props["StatusText"]), props
    assert props["NRestarts"] == "0" and props["WatchdogUSec"] == "1min", props

    # `systemctl status` shows the daemon's own summary line.
    shown = ns.systemctl("status", SERVICE).stdout
    assert re.search(r'Status: "\d+ VMs, poll', shown), shown

    # `vmtelemetryd status` (as root, outside the service) reads /run/vmtelemetryd/status.json.
    report = ns.run("vmtelemetryd", "status").stdout
    assert re.search(rf"^pid: {props['MainPID']}$", report, re.M), report
    assert re.search(r"^vms: \d+$", report, re.M), report

    # The daemon runs as vmtelemetry, unprivileged and filtered, on the read-only socket.
    proc = ns.read(f"/proc/{props['MainPID']}/status")
    uid = ns.run("id", "-u", "vmtelemetry").stdout.strip()
    assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s+{uid}$", proc, re.M), proc
    for line in ("CapEff:\t0000000000000000", "NoNewPrivs:\t1", "Seccomp:\t2"):
        assert line in proc, proc

    # Its log lines reach the journal with their priorities.
    started = [e for e in journal_entries(ns) if e.get("MESSAGE", "").startswith("event=started")]
    assert started and started[0]["PRIORITY"] == "6", started


# ---------------------------------------------------------------------- reload


@pytest.mark.lab
def test_reload_applies_a_new_poll_interval(ns: SystemdNS, lab: Any) -> None:
    config = lab_config(lab, POLL_INTERVAL="1.0")
    install(ns, lab, config)
    ns.systemctl("start", SERVICE)
    pid = show(ns, "MainPID")["MainPID"]
    before = status(ns)
    assert before is not None and before["generation"] == 1, before

    config["POLL_INTERVAL"] = "0.25"
    rewrite_config(ns, config)
    ns.systemctl("reload", SERVICE)
    # ExecReload= only sends SIGHUP; the daemon reloads between two polls.
    wait_status(ns, lambda s: s["generation"] == 2, 15, "generation 2 in status.json")
    stamps = poll_times(ns, 2.5)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert len(gaps) >= 5 and statistics.median(gaps) == pytest.approx(0.25, abs=0.08), gaps

    after = show(ns, "ActiveState", "MainPID", "NRestarts")
    assert after == {"ActiveState": "active", "MainPID": pid, "NRestarts": "0"}, after
    assert "configuration reloaded" in journal_text(ns)


@pytest.mark.lab
def test_reload_with_a_broken_file_keeps_the_running_configuration(ns: SystemdNS, lab: Any) -> None:
    config = lab_config(lab)
    install(ns, lab, config)
    ns.systemctl("start", SERVICE)
    pid = show(ns, "MainPID")["MainPID"]

    rewrite_config(ns, {**config, "POLL_INTERVAL": "soon"})
    ns.systemctl("reload", SERVICE)
    report = wait_status(ns, lambda s: s["config_error"] is not None, 15, "config_error")
    assert "POLL_INTERVAL" in report["config_error"] and report["generation"] == 1, report

    # Still running, on the old configuration, and saying why in its status line.
    props = show(ns, "ActiveState", "SubState", "MainPID", "StatusText")
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["MainPID"] == pid, props
    assert "error: POLL_INTERVAL" in props["StatusText"], props
    stamps = poll_times(ns, 2.0)
    assert len(stamps) >= 3, stamps

    # journalctl -p err shows the rejection and leaves the info lines out.
    errors = journal_text(ns, "-p", "err")
    assert "reload rejected" in errors and "POLL_INTERVAL" in errors, errors
    assert "event=started" not in errors, errors
    rejected = [e for e in journal_entries(ns) if "reload rejected" in e.get("MESSAGE", "")]
    assert rejected and rejected[0]["PRIORITY"] == "3", rejected

    # Fixed, the next reload clears the error.
    rewrite_config(ns, config)
    ns.systemctl("reload", SERVICE)
    report = wait_status(ns, lambda s: s["generation"] == 2, 15, "generation 2")
    assert report["config_error"] is None, report
    assert "error:" not in show(ns, "StatusText")["StatusText"]


# ---------------------------------------------------------------------- failures


@pytest.mark.lab
def test_a_bad_configuration_fails_the_start_with_78_and_no_restarts(
    ns: SystemdNS, lab: Any
) -> None:
    # A short RestartSec= so that a restart, were there one, would show within the test.
    install(ns, lab, lab_config(lab, POLL_INTERVAL="0"), service_dropin(RestartSec="500ms"))
    result = ns.systemctl("start", SERVICE, check=False)
    assert result.returncode != 0, result.stdout
    time.sleep(2)
    props = show(ns, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert props == {
        "ActiveState": "failed",
        "Result": "exit-code",
        "ExecMainStatus": "78",
        "NRestarts": "0",
    }, props
    assert "status=78/CONFIG" in ns.systemctl("status", SERVICE, check=False).stdout
    errors = journal_text(ns, "-p", "err")
    assert "configuration error: POLL_INTERVAL" in errors, errors


@pytest.mark.lab
def test_a_missing_token_file_fails_the_start_once(ns: SystemdNS, lab: Any) -> None:
    install(ns, lab, lab_config(lab), service_dropin(RestartSec="500ms"))
    ns.remove(TOKEN_PATH)
    result = ns.systemctl("start", SERVICE, check=False)
    assert result.returncode != 0, result.stdout
    time.sleep(2)
    props = show(ns, "ActiveState", "ExecMainStatus", "NRestarts")
    assert props == {"ActiveState": "failed", "ExecMainStatus": "243", "NRestarts": "0"}, props


@pytest.mark.lab
def test_the_watchdog_restarts_the_service_when_libvirtd_hangs(ns: SystemdNS, lab: Any) -> None:
    install(
        ns,
        lab,
        lab_config(lab, LIBVIRT_TIMEOUT="1", POLL_INTERVAL="0.5"),
        service_dropin(WatchdogSec="3s", RestartSec="500ms"),
    )
    ns.systemctl("start", SERVICE)
    first_pid = show(ns, "MainPID")["MainPID"]
    wait_status(ns, lambda s: s["vms"] > 0 and s["last_sample_error"] is None, 15, "a good poll")

    libvirtd = labkit.status()["procs"].get("libvirtd") or {}
    pid = libvirtd.get("pid")
    if not libvirtd.get("alive") or Path(f"/proc/{pid}/comm").read_text().strip() != "libvirtd":
        pytest.skip("the running libvirtd was not started by the lab: not stopping it")
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: show(ns, "NRestarts")["NRestarts"] != "0", 30, "a watchdog restart")
    finally:
        os.kill(pid, signal.SIGCONT)

    assert "Watchdog timeout" in journal_text(ns)
    report = wait_status(
        ns,
        lambda s: str(s["pid"]) != first_pid and s["vms"] > 0 and s["last_sample_error"] is None,
        60,
        "the restarted daemon polling again",
    )
    props = show(ns, "ActiveState", "MainPID", "NRestarts")
    assert props["ActiveState"] == "active" and props["MainPID"] == str(report["pid"]), props
    assert props["NRestarts"] == "1", props


@pytest.mark.lab
def test_the_watchdog_tolerates_a_poll_interval_longer_than_itself(ns: SystemdNS, lab: Any) -> None:
    install(ns, lab, lab_config(lab, POLL_INTERVAL="3"), service_dropin(WatchdogSec="2s"))
    ns.systemctl("start", SERVICE)
    stamps = poll_times(ns, 7.0)
    assert len(stamps) >= 2, stamps
    props = show(ns, "ActiveState", "NRestarts")
    assert props == {"ActiveState": "active", "NRestarts": "0"}, props
    assert "Watchdog timeout" not in journal_text(ns)


# ---------------------------------------------------------------------- stop


@pytest.mark.lab
def test_stop_flushes_what_was_sampled_to_the_database(ns: SystemdNS, lab: Any) -> None:
    # Nothing leaves before the stop: a batch waits up to a minute.
    config = lab_config(lab, BATCH_MAX_SEC="60", BATCH_MAX_LINES="100000")
    install(ns, lab, config)
    ns.systemctl("start", SERVICE)
    stamps = poll_times(ns, 2.5)
    before = status(ns)
    assert before is not None and len(stamps) >= 3, stamps
    assert before["written"] == 0 and before["queued"] > 0, before

    ns.systemctl("stop", SERVICE)
    props = show(ns, "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    stopped = next(line for line in journal_text(ns).splitlines() if "event=stopped" in line)
    assert re.search(r"\bspooled=0\b", stopped) and not re.search(r"\bwritten=0\b", stopped)

    # Every guest's last sample before the stop is in the lab database.
    last_sample_ms = (before["last_poll"] - before["last_poll_duration_s"]) * 1000
    rows = labkit.query(f'{{__name__="vm_metrics_state",host="{config["HOST_TAG"]}"}}')
    stored = {row["metric"]["vm"]: row["timestamps"] for row in rows}
    for guest in lab.guests:
        assert guest in stored, (guest, sorted(stored))
        assert len(stored[guest]) >= len(stamps), (guest, stored[guest], stamps)
        assert max(stored[guest]) >= last_sample_ms - 1, (guest, stored[guest], last_sample_ms)
