"""The health edge: sd_notify messages and the status file ``vmtelemetryd status`` reads.

Outside systemd (no ``NOTIFY_SOCKET``) notifications are no-ops, so the same
daemon runs in a terminal, a test or a unit.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import sdnotify

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class Health:
    def __init__(self, status_path: Path | None) -> None:
        self._notifier = sdnotify.SystemdNotifier()
        self.status_path = status_path

    def ready(self, status: str) -> None:
        self._notify(f"READY=1\nSTATUS={one_line(status)}")

    def status(self, status: str, *, alive: bool) -> None:
        """Each cycle: the summary line, and a watchdog ping only if the cycle did its work."""
        self._notify(f"STATUS={one_line(status)}" + ("\nWATCHDOG=1" if alive else ""))

    def watchdog(self) -> None:
        self._notify("WATCHDOG=1")

    def watchdog_ping_interval(self) -> float | None:
        """Half of systemd's watchdog timeout (WatchdogSec=), if it is watching this process."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2e6

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self, extend_s: float) -> None:
        self._notify(f"STOPPING=1\nEXTEND_TIMEOUT_USEC={int(extend_s * 1e6)}")

    def write_status(self, report: dict[str, Any]) -> None:
        """Atomically replace the status file: a reader never sees half of it."""
        if self.status_path is None:
            return
        directory = self.status_path.parent
        fd, tmp = tempfile.mkstemp(prefix=".status.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(report, out, indent=2, sort_keys=True)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.status_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _notify(self, message: str) -> None:
        self._notifier.notify(message)


def one_line(text: str) -> str:
    """sd_notify splits on newlines: an error's text (ssh's holds CR LF) must neither cut the
    status short nor smuggle in a line of its own, such as ``WATCHDOG=1``."""
    return _CONTROL.sub(" ", text).strip()


def default_status_path() -> Path | None:
    """``$RUNTIME_DIRECTORY/status.json`` under systemd; none when run by hand."""
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    return Path(runtime.split(":")[0]) / "status.json" if runtime else None


def read_status(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as source:
        report: dict[str, Any] = json.load(source)
    return report
