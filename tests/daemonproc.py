"""Run the real ``vmtelemetryd`` command as a child process, the way systemd would,
and read back what it wrote: from the lab database and from libvirt directly.

Each run gets its own ``HOST_TAG`` so that its points can be told apart from
every other test's in the one lab database. No ``DOMAINS_INCLUDE``: the lab's
libvirtd holds only lab guests, and the unfiltered bulk request is the one
every user runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import labkit
import libvirt

COMMAND = [sys.executable, "-m", "vmtelemetryd"]
# Every variable of DESIGN.md's configuration table, in its order.
DESIGN_VARIABLES = (
    "LIBVIRT_URI",
    "INFLUX_URL",
    "INFLUX_DB",
    "INFLUX_TOKEN",
    "INFLUX_WRITE_API",
    "INFLUX_TOKEN_FILE",
    "POLL_INTERVAL",
    "BATCH_MAX_LINES",
    "BATCH_MAX_SEC",
    "DEVICE_CACHE_TTL",
    "METADATA_TAGS",
    "STATS_SHARDS",
    "LIBVIRT_TIMEOUT",
    "SPOOL_DIR",
    "SPOOL_MAX_BYTES",
    "DOMAINS_INCLUDE",
    "DOMAINS_EXCLUDE",
    "FEATURE_WINDOW",
    "HOST_TAG",
    "LOG_LEVEL",
)


def clean_environment() -> dict[str, str]:
    """This process's environment without anything that would configure the daemon."""
    ours = {*DESIGN_VARIABLES, "CREDENTIALS_DIRECTORY", "RUNTIME_DIRECTORY"}
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ours and not k.startswith(("INFLUX_", "LIBVIRT_"))
    }
    env.pop("NOTIFY_SOCKET", None)
    return env


def lab_environment(lab: Any, workdir: Path, **overrides: object) -> dict[str, str]:
    """The daemon's configuration for one test: the lab's URIs, a private spool and status.

    An override of None leaves that variable unset.
    """
    env = clean_environment()
    env.update(
        LIBVIRT_URI=lab.libvirt_uri,
        INFLUX_URL=lab.influx_url,
        INFLUX_DB=lab.influx_db,
        INFLUX_TOKEN=lab.influx_token,
        INFLUX_WRITE_API=lab.write_api,
        HOST_TAG=f"test-{uuid.uuid4().hex[:10]}",
        SPOOL_DIR=str(workdir / "spool"),
        RUNTIME_DIRECTORY=str(workdir / "run"),
        POLL_INTERVAL="0.5",
        BATCH_MAX_SEC="0.5",
        LOG_LEVEL="info",
    )
    env.update({k: str(v) for k, v in overrides.items() if v is not None})
    for name in [k for k, v in overrides.items() if v is None]:
        env.pop(name, None)
    (workdir / "run").mkdir(parents=True, exist_ok=True)
    return env


def missing_ticks(times_ms: list[int], interval_s: float) -> list[int]:
    """Ticks of the poll grid, counted from the first sample, with no sample stored."""
    ticks = {round((t - times_ms[0]) / 1000 / interval_s) for t in times_ms}
    return sorted(set(range(max(ticks) + 1)) - ticks)


def run_verb(
    env: Mapping[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], env=dict(env), capture_output=True, text=True, timeout=timeout
    )


@dataclass
class DaemonProcess:
    """``vmtelemetryd run`` in the background, its output kept in a file."""

    env: dict[str, str]
    workdir: Path
    config: Path | None = None  # --config: a file a reload re-reads (the environment wins)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "daemon.log"

    @property
    def host(self) -> str:
        return self.env["HOST_TAG"]

    def start(self) -> DaemonProcess:
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [*COMMAND, *self.config_args(), "run"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def config_args(self) -> list[str]:
        return ["--config", str(self.config)] if self.config is not None else []

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, as systemctl stop sends it; returns the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def status(self) -> dict[str, Any]:
        path = Path(self.env["RUNTIME_DIRECTORY"]) / "status.json"
        report: dict[str, Any] = json.loads(path.read_text())
        return report

    def wait_for(self, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
        """Poll status.json until ``predicate(status)`` holds."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.output()
            try:
                last = self.status()
            except (OSError, ValueError):
                last = {}
            if last and predicate(last):
                return last
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; last status {last}\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def series_of(
    host: str, measurement_field: str, vm: str | None = None, **labels: str
) -> list[tuple[int, float]]:
    """(ms, value) pairs the lab database holds for one daemon run (one guest's, given ``vm``)."""
    if vm is not None:
        labels = {"vm": vm, **labels}
    selector = ",".join(
        [f'__name__="{measurement_field}"', f'host="{_q(host)}"']
        + [f'{k}="{_q(v)}"' for k, v in labels.items()]
    )
    rows = labkit.query("{" + selector + "}")
    pairs = [(t, v) for row in rows for t, v in zip(row["timestamps"], row["values"], strict=True)]
    return sorted(pairs)


def stored_vms(host: str) -> set[str]:
    """The guests any ``vm_*`` point of one daemon run names."""
    rows = labkit.query(f'{{__name__=~"vm_.+",host="{_q(host)}"}}')
    return {row["metric"]["vm"] for row in rows}


def _q(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def libvirt_devices(uri: str, name: str) -> list[tuple[str, str]]:
    """(kind, target) of every NIC and disk, from the domain's own XML."""
    conn = libvirt.openReadOnly(uri)
    try:
        root = ET.fromstring(conn.lookupByName(name).XMLDesc())
    finally:
        conn.close()
    nics = [("nic", t.get("dev", "")) for t in root.findall("./devices/interface/target")]
    disks = [("disk", t.get("dev", "")) for t in root.findall("./devices/disk/target")]
    return sorted(nics + disks)


def active_domains(uri: str) -> set[str]:
    """The names of the running and paused domains libvirt has now."""
    conn = libvirt.openReadOnly(uri)
    try:
        return {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)}
    finally:
        conn.close()
