"""What the side-by-side benchmarks share: collectors run one at a time against the lab,
windows measured again when something else disturbed them. The scripts import from here
alone: it re-exports ``benchcollectors`` (what runs, what a window cost) and ``benchlab``
(/proc figures, extra guests).

Host CPU of a collector is its own utime+stime plus the lab libvirtd's, over a
window only (after a warm-up), from /proc/PID/stat. ``measure`` runs one
``Collector`` alone for one window and adds what it cost to the collector's
``result`` (and to ``windows``, one entry per window); ``run_window`` measures
a window again while a pytest run or a libvirtd restart disturbed it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "lab"))

import labkit as labkit  # re-exported: the bench scripts reach the lab through here
from benchcollectors import (  # re-exported, as benchlab's names
    REPO as REPO,
)
from benchcollectors import (
    WARMUP_S as WARMUP_S,
)
from benchcollectors import (
    Collector as Collector,
)
from benchcollectors import (
    DaemonRun as DaemonRun,
)
from benchcollectors import (
    Window as Window,
)
from benchcollectors import (
    clean_env as clean_env,
)
from benchlab import (  # re-exported: the scripts reach these through here
    CLK_TCK as CLK_TCK,
)
from benchlab import (
    TICK_MS as TICK_MS,
)
from benchlab import (
    BenchError as BenchError,
)
from benchlab import (
    active_domains as active_domains,
)
from benchlab import (
    alive as alive,
)
from benchlab import (
    all_domains as all_domains,
)
from benchlab import (
    cpu_ticks as cpu_ticks,
)
from benchlab import (
    extra_guests as extra_guests,
)
from benchlab import (
    libvirtd_pid as libvirtd_pid,
)
from benchlab import (
    loadavg as loadavg,
)
from benchlab import (
    memory_kib as memory_kib,
)
from benchlab import (
    pids_running as pids_running,
)
from benchlab import (
    proc_stat as proc_stat,
)
from benchlab import (
    pytest_running as pytest_running,
)
from benchlab import (
    stop_pid as stop_pid,
)

READY_TIMEOUT_S = 60.0
RETRIES = 2
LIBVIRTD_SETTLE_S = 30.0
PYTEST_POLL_S = 20.0


class Disturbed(BenchError):
    """Something else loaded libvirtd during a window: measure it again."""


# --------------------------------------------------------------------------- the command line


def add_max_wait_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--max-wait",
        type=float,
        default=1800,
        help="seconds to wait for running pytest processes to end first (1800)",
    )


def ratio(value: float | None, base: float | None, digits: int = 2) -> str:
    """``value / base`` for a report's column; ``-`` without either."""
    if value is None or not base:
        return "-"
    return f"{value / base:.{digits}f}"


def lab_for(bench: str) -> labkit.LabInfo | None:
    """The lab, with SIGTERM ending ``bench`` through its cleanups (guests destroyed,
    collectors stopped); None, and why on stderr, when the lab is not up."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return labkit.info()
    except labkit.LabError as exc:
        print(f"{bench}: {exc}", file=sys.stderr)
        return None


# --------------------------------------------------------------------------- measuring


def _wait(coll: Collector) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not coll.ready():
        if (code := coll.returncode()) is not None:
            raise BenchError(f"{coll.name} exited with {code} before it was ready")
        if time.monotonic() > deadline:
            raise BenchError(f"{coll.name} not ready after {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.2)


def libvirtd_now() -> tuple[int, str]:
    """The lab's libvirtd: (PID, start time), to tell a restart during a window."""
    pid = libvirtd_pid()
    return pid, proc_stat(pid)[19]


def libvirt_clients() -> dict[int, str]:
    """PID -> command of each process connected to libvirtd now (virt-admin), if it can tell."""
    found: dict[int, str] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        ids = subprocess.run(
            ["virt-admin", "srv-clients-list", "libvirtd"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.splitlines()[2:]
        for client in (row.split()[0] for row in ids if row.strip()):
            info = subprocess.run(
                ["virt-admin", "client-info", "libvirtd", client],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout
            if m := re.search(r"unix_process_id\s*:\s*(\d+)", info):
                pid = int(m.group(1))
                with contextlib.suppress(OSError):
                    found[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
    return found


def settle_libvirtd() -> None:
    """Wait until libvirtd has run LIBVIRTD_SETTLE_S: a fresh one reconnects to every QEMU."""
    age = float(Path("/proc/uptime").read_text().split()[0])
    age -= int(proc_stat(libvirtd_pid())[19]) / CLK_TCK
    if age < LIBVIRTD_SETTLE_S:
        print(f"libvirtd started {age:.0f} s ago: waiting", file=sys.stderr, flush=True)
        time.sleep(LIBVIRTD_SETTLE_S - age)


def _larger(seen: tuple[int, int], now: tuple[int, int]) -> tuple[int, int]:
    return max(seen[0], now[0]), max(seen[1], now[1])


def measure(coll: Collector, seconds: float, alone: bool = False) -> list[str]:
    """Run ``coll`` alone, warm it up (``coll.warmup``), and add one window's cost to
    ``coll.result`` and ``coll.windows``. Raises Disturbed when a pytest started or
    libvirtd restarted meanwhile, and with ``alone`` also when another libvirt client
    was connected around the window (its requests would count as libvirtd's CPU);
    else returns notes about such clients."""
    settle_libvirtd()
    coll.start()
    try:
        _wait(coll)
        time.sleep(coll.warmup)
        if (code := coll.returncode()) is not None:
            raise BenchError(f"{coll.name} exited with {code}")
        pid = coll.pid()
        companions = coll.companions()
        ours = {pid, os.getpid(), *companions.values()}
        others = {p: c for p, c in libvirt_clients().items() if p not in ours}
        if alone and others:
            raise Disturbed(f"other libvirt clients connected: {others}")
        rss, anon = memory_kib(pid)
        lvd, lvd_start = libvirtd_now()
        t0, own0, lv0 = time.time(), cpu_ticks(pid), cpu_ticks(lvd)
        side0 = {name: cpu_ticks(p) for name, p in companions.items()}
        start = time.monotonic()
        for second in range(1, int(seconds) + 1):
            coll.tick()
            rss, anon = _larger((rss, anon), memory_kib(pid))
            if tests := pytest_running():
                raise Disturbed(f"pytest started (PIDs {tests})")
            time.sleep(max(0.0, start + second - time.monotonic()))
        t1, own1 = time.time(), cpu_ticks(pid)
        side = {name: cpu_ticks(p) - side0[name] for name, p in companions.items()}
        try:
            lv1 = cpu_ticks(lvd)
        except OSError:
            lv1 = -1
        if lv1 < 0 or libvirtd_now() != (lvd, lvd_start):
            raise Disturbed("libvirtd was restarted")
        rss, anon = _larger((rss, anon), memory_kib(pid))
        if (code := coll.returncode()) is not None:
            raise BenchError(f"{coll.name} exited with {code} during the window")
        others |= {p: c for p, c in libvirt_clients().items() if p not in ours}
        if alone and others:
            raise Disturbed(f"other libvirt clients connected: {others}")
    finally:
        coll.stop()
    samples, vms = coll.count(t0, t1)
    if not samples:
        raise BenchError(f"{coll.name} took no sample in the window:\n{coll.output()[-800:]}")
    if coll.result.vms and coll.result.vms != vms:
        coll.vms_note = (coll.vms_note + "; " if coll.vms_note else "") + "VM count changed"
    window = Window(t1 - t0, samples, vms, own1 - own0, lv1 - lv0, rss, anon, side, [(t0, t1)])
    coll.windows.append(window)
    coll.result.add(window)
    return [f"{coll.name}: other libvirt clients connected: {others}"] if others else []


def idle_libvirtd(seconds: float) -> float:
    """libvirtd's CPU in ms per second with no collector running."""
    lvd = libvirtd_pid()
    before, started = cpu_ticks(lvd), time.monotonic()
    time.sleep(seconds)
    return (cpu_ticks(lvd) - before) * TICK_MS / (time.monotonic() - started)


def wait_for_quiet(max_wait: float, alone: bool = False) -> str:
    """Wait (polling every 20 s) until no other pytest runs, and with ``alone`` until no
    other process is connected to libvirtd. Returns a note if one still is."""
    deadline = time.monotonic() + max_wait
    while busy := _others_busy(alone):
        if time.monotonic() > deadline:
            return f"{busy} after waiting {max_wait:.0f} s"
        print(f"waiting: {busy}", file=sys.stderr, flush=True)
        time.sleep(PYTEST_POLL_S)
    return ""


def _others_busy(alone: bool) -> str:
    if pids := pytest_running():
        return f"pytest running (PIDs {pids})"
    if alone and (clients := {p: c for p, c in libvirt_clients().items() if p != os.getpid()}):
        return f"other libvirt clients connected: {clients}"
    return ""


def run_window(
    coll: Collector, seconds: float, rnd: int, max_wait: float, alone: bool = False
) -> list[str]:
    """One window of ``coll``, measured again (up to RETRIES times) if it was disturbed.
    ``alone``: see ``measure``."""
    notes: list[str] = []
    for attempt in range(1 + RETRIES):
        if note := wait_for_quiet(max_wait, alone):
            notes.append(f"{coll.name}: {note}")
        print(f"round {rnd}: {coll.name} for {seconds:g} s", file=sys.stderr, flush=True)
        try:
            return notes + measure(coll, seconds, alone)
        except Disturbed as exc:
            print(f"  disturbed ({exc}): again", file=sys.stderr, flush=True)
            if attempt == RETRIES:
                coll.unavailable = f"disturbed {RETRIES + 1} times, last: {exc}"
        except (BenchError, OSError, labkit.LabError) as exc:
            coll.unavailable = str(exc).splitlines()[0]
            break
    return notes
