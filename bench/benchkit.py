"""What the side-by-side benchmarks share: host CPU from /proc, collectors run one at a time
against the lab, windows measured again when something else disturbed them, extra guests.

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
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "lab"))

import labkit as labkit  # re-exported: the bench scripts reach the lab through here
from lab_libvirtd import pids_here

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
TICK_MS = 1000 / CLK_TCK
WARMUP_S = 3.0
READY_TIMEOUT_S = 60.0
RETRIES = 2
LIBVIRTD_SETTLE_S = 30.0
PYTEST_POLL_S = 20.0


class BenchError(RuntimeError):
    """A collector could not be run or measured."""


class Disturbed(BenchError):
    """Something else loaded libvirtd during a window: measure it again."""


# --------------------------------------------------------------------------- /proc


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


def _larger(seen: tuple[int, int], now: tuple[int, int]) -> tuple[int, int]:
    return max(seen[0], now[0]), max(seen[1], now[1])


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


def add_max_wait_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--max-wait",
        type=float,
        default=1800,
        help="seconds to wait for running pytest processes to end first (1800)",
    )


def lab_for(bench: str) -> labkit.LabInfo | None:
    """The lab, with SIGTERM ending ``bench`` through its cleanups (guests destroyed,
    collectors stopped); None, and why on stderr, when the lab is not up."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return labkit.info()
    except labkit.LabError as exc:
        print(f"{bench}: {exc}", file=sys.stderr)
        return None


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --------------------------------------------------------------------------- collectors


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


# --------------------------------------------------------------------------- guests


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
