"""The lab's machine as the benchmarks see it: its processes read from /proc (CPU ticks,
memory, liveness, libvirtd, pytest runs) and the extra guests a run makes; benchkit
re-exports it."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import labkit
import libvirt
from lab_libvirtd import pids_here

CLK_TCK = os.sysconf("SC_CLK_TCK")
TICK_MS = 1000 / CLK_TCK


class BenchError(RuntimeError):
    """A collector could not be run or measured."""


def proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (state) on: index 11 is utime, 12 stime, 19 starttime."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rfind(")") + 2 :].split()


def cpu_ticks(pid: int) -> int:
    """utime + stime of every thread of ``pid``, dead ones included, in clock ticks."""
    rest = proc_stat(pid)
    return int(rest[11]) + int(rest[12])


def memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon): all resident memory, and what the process itself allocated
    (without the file-backed pages of its shared libraries); (0, 0) once it is gone."""
    with contextlib.suppress(OSError):
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        return int(fields["VmRSS"].split()[0]), int(fields["RssAnon"].split()[0])
    return 0, 0


def alive(pid: int) -> bool:
    with contextlib.suppress(OSError, IndexError):
        return proc_stat(pid)[0] not in ("Z", "X")
    return False


def pids_running(exe: str) -> dict[int, str]:
    """PID -> start time of every live process whose executable is ``exe``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            if os.readlink(f"/proc/{entry}/exe") == exe:
                rest = proc_stat(int(entry))
                if rest[0] not in ("Z", "X"):
                    found[int(entry)] = rest[19]
    return found


def libvirtd_pid() -> int:
    """The lab's libvirtd: the one in this mount namespace (a second host's, which
    other lab users start, runs in a namespace of its own)."""
    pids: list[int] = sorted(pids_here("libvirtd"))
    if len(pids) != 1:
        raise BenchError(f"expected one libvirtd here, found PIDs {pids or 'none'}")
    return pids[0]


def stop_pid(pid: int, start: str, timeout: float = 10) -> None:
    """SIGTERM (then SIGKILL) one process, if it is still the one that had ``start``."""

    def same() -> bool:
        with contextlib.suppress(OSError, IndexError):
            rest = proc_stat(pid)
            return rest[19] == start and rest[0] not in ("Z", "X")
        return False

    if not same():
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while same() and time.monotonic() < deadline:
        time.sleep(0.1)
    if same():
        os.kill(pid, signal.SIGKILL)


def pytest_running() -> list[int]:
    """PIDs of other processes running ``python -m pytest``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if b"-m" in argv and b"pytest" in argv and b"python" in argv[0]:
                    found.append(int(entry))
    return found


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@contextlib.contextmanager
def extra_guests(
    lab: labkit.LabInfo, busy: int, paused: int, label: str = "peers"
) -> Iterator[list[str]]:
    """Extra lab guests for this run only (``<prefix><label>-<tag>-<kind>-<i>``), destroyed
    on the way out."""
    tag = uuid.uuid4().hex[:4]
    made: list[str] = []
    try:
        for kind, count in (("busy", busy), ("paused", paused)):
            if count:
                print(f"creating {count} extra {kind} guest(s)", file=sys.stderr, flush=True)
            for i in range(1, count + 1):
                name = f"{lab.prefix}{label}-{tag}-{kind}-{i}"
                made.append(name)
                labkit.create_guest(name, busy=kind == "busy")
        booted = [n for n in made if "-busy-" in n]
        if booted:
            print(f"booting {len(booted)} extra busy guest(s)", file=sys.stderr, flush=True)
            labkit.wait_busy_ready(booted)
        yield made
    finally:
        if made:
            print(f"destroying {len(made)} extra guest(s)", file=sys.stderr, flush=True)
        for name in made:
            with contextlib.suppress(labkit.LabError, ValueError):
                labkit.destroy_guest(name)


def active_domains(uri: str) -> dict[str, int]:
    """Active domain name -> state (libvirt.VIR_DOMAIN_*)."""
    conn = libvirt.openReadOnly(uri)
    try:
        return {
            d.name(): d.state()[0]
            for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        }
    finally:
        conn.close()


def all_domains(uri: str) -> dict[str, int]:
    """Every domain libvirt knows (active or only defined), name -> state."""
    conn = libvirt.openReadOnly(uri)
    try:
        return {d.name(): d.state()[0] for d in conn.listAllDomains(0)}
    finally:
        conn.close()
