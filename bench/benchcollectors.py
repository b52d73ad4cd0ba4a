"""What a benchmark runs and what one window of it cost: ``Collector`` (how to start
one, when it is warm, what it read), ``DaemonRun`` (``vmtelemetryd run`` of a
source tree) and ``Window``; benchkit measures them and re-exports these."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import labkit
from benchlab import TICK_MS

REPO = Path(__file__).resolve().parents[1]
WARMUP_S = 3.0


@dataclass
class Window:
    """What one collector cost over one window, or summed over its windows.

    ``companion_ticks``: CPU of the other processes the collector causes (see
    ``Collector.companions``), by name; ``spans``: the windows' (start, end) wall times."""

    seconds: float = 0.0
    samples: int = 0
    vms: int = 0
    own_ticks: int = 0
    libvirtd_ticks: int = 0
    rss_kib: int = 0
    anon_kib: int = 0
    companion_ticks: dict[str, int] = field(default_factory=dict)
    spans: list[tuple[float, float]] = field(default_factory=list)

    def per_vm_sample(self, ticks: int) -> float:
        return ticks * TICK_MS / max(1, self.samples * self.vms)

    def per_sample(self, ticks: int) -> float:
        return ticks * TICK_MS / max(1, self.samples)

    def add(self, other: Window) -> None:
        self.seconds += other.seconds
        self.samples += other.samples
        self.vms = max(self.vms, other.vms)
        self.own_ticks += other.own_ticks
        self.libvirtd_ticks += other.libvirtd_ticks
        self.rss_kib = max(self.rss_kib, other.rss_kib)
        self.anon_kib = max(self.anon_kib, other.anon_kib)
        for name, ticks in other.companion_ticks.items():
            self.companion_ticks[name] = self.companion_ticks.get(name, 0) + ticks
        self.spans += other.spans


@dataclass
class Collector:
    """One collector: how to start it, when it is warm, and what it read."""

    name: str
    scratch: Path
    proc: subprocess.Popen[bytes] | None = None
    values: int | None = None
    values_note: str = ""
    vms_note: str = ""
    unavailable: str = ""
    warmup: float = WARMUP_S
    result: Window = field(default_factory=Window)
    windows: list[Window] = field(default_factory=list)

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def ready(self) -> bool:
        return True

    def tick(self) -> None:
        """Called once a second during the window."""

    def count(self, t0: float, t1: float) -> tuple[int, int]:
        """(samples, VMs) this collector took in [t0, t1), from its own output."""
        raise NotImplementedError

    def count_values(self, vm: str) -> None:
        """Set ``values``: what this collector emits for ``vm`` in one sample."""

    def pid(self) -> int:
        """The process whose CPU is the collector's own."""
        assert self.proc is not None
        return self.proc.pid

    def returncode(self) -> int | None:
        """None while the collector runs, else how it ended."""
        return self.proc.poll() if self.proc is not None else None

    def companions(self) -> dict[str, int]:
        """Other processes whose CPU this collector causes (name -> PID), measured alongside."""
        return {}

    def start(self) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        argv, env = self.command()
        log = (self.scratch / "stdout.log").open("wb")
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def output(self) -> str:
        return (self.scratch / "stdout.log").read_text(errors="replace")


def clean_env() -> dict[str, str]:
    """This environment without anything that would make a child talk to a service manager."""
    drop = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "RUNTIME_DIRECTORY", "JOURNAL_STREAM")
    return {k: v for k, v in os.environ.items() if k not in drop}


class DaemonRun(Collector):
    """``vmtelemetryd run`` of the package in ``source`` (this checkout by default),
    POLL_INTERVAL=1, writing to the lab database under a host tag of its own, with
    its spool and status file in its scratch dir. ``env`` adds or overrides settings."""

    def __init__(
        self,
        name: str,
        scratch: Path,
        lab: labkit.LabInfo,
        *,
        tag: str,
        source: Path = REPO,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(name, scratch)
        self.lab = lab
        self.source = source
        self.settings = dict(env or {})
        self.host_tag = f"{tag}-{uuid.uuid4().hex[:8]}"

    def environment(self, **extra: str) -> dict[str, str]:
        env = clean_env() | self.lab.env()
        env |= {
            "PYTHONPATH": str(self.source),
            "HOST_TAG": self.host_tag,
            "SPOOL_DIR": str(self.scratch / "spool"),
            "RUNTIME_DIRECTORY": str(self.scratch / "run"),
            "POLL_INTERVAL": "1",
            "LOG_LEVEL": "info",
        }
        merged: dict[str, str] = env | self.settings | extra
        return merged

    def argv(self, verb: str, *args: str) -> list[str]:
        config = self.scratch / "empty.env"  # not /etc/vmtelemetryd's, if a machine has one
        config.parent.mkdir(parents=True, exist_ok=True)
        config.touch()
        # -P: the package comes from PYTHONPATH (source), never from the working directory
        return [sys.executable, "-P", "-m", "vmtelemetryd", "--config", str(config), verb, *args]

    def command(self) -> tuple[list[str], dict[str, str]]:
        return self.argv("run"), self.environment()

    def ready(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        time.sleep(2.0)  # let the last batch of the window reach the database
        super().stop()

    def count(self, t0: float, t1: float) -> tuple[int, int]:
        series = labkit.query(f'vm_metrics_state{{host="{self.host_tag}"}}')
        per_vm = [sum(t0 <= ts / 1000 < t1 for ts in s["timestamps"]) for s in series]
        per_vm = [n for n in per_vm if n]
        return max(per_vm, default=0), len(per_vm)

    def own_series(self, name: str) -> list[tuple[float, float]]:
        """(wall time in s, value) of one field of the daemon's own ``vmtelemetryd``
        measurement, oldest first, over every run under this host tag."""
        points: list[tuple[float, float]] = []
        for s in labkit.query(f'vmtelemetryd_{name}{{host="{self.host_tag}"}}'):
            points += [(ts / 1000, v) for ts, v in zip(s["timestamps"], s["values"], strict=True)]
        return sorted(points)
