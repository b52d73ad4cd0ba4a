"""Run the real ``vmtelemetryd`` command as a child process, the way systemd would.

Each run gets its own ``HOST_TAG`` so that its points can be told apart from
every other test's in the one lab database.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COMMAND = [sys.executable, "-m", "vmtelemetryd"]


def lab_environment(lab: Any, workdir: Path, **overrides: object) -> dict[str, str]:
    """The daemon's configuration for one test: the lab's URIs, a private spool and status."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFLUX_", "LIBVIRT_"))}
    env.pop("NOTIFY_SOCKET", None)
    env.update(
        LIBVIRT_URI=lab.libvirt_uri,
        INFLUX_URL=lab.influx_url,
        INFLUX_DB=lab.influx_db,
        INFLUX_TOKEN=lab.influx_token,
        INFLUX_WRITE_API=lab.write_api,
        HOST_TAG=f"test-{uuid.uuid4().hex[:10]}",
        DOMAINS_INCLUDE=f"{lab.prefix}*",
        SPOOL_DIR=str(workdir / "spool"),
        RUNTIME_DIRECTORY=str(workdir / "run"),
        POLL_INTERVAL="0.5",
        BATCH_MAX_SEC="0.5",
        LOG_LEVEL="info",
    )
    env.update({k: str(v) for k, v in overrides.items()})
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
                [*COMMAND, "run"], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        return self

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
