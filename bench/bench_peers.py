"""Host CPU and coverage of vmtelemetryd next to its peers, side by side in one run.

Needs the lab (``tests/lab/lab up``). Each collector runs alone against the
same lab guests for the same window (``--seconds``, 30), sampling once a
second:

* bare: ``getAllDomainStats`` with the daemon's groups and NOWAIT in a loop
  (the floor: what one bulk request costs, nothing else);
* vmtelemetryd: ``vmtelemetryd run``, POLL_INTERVAL=1, writing to the lab
  database under a host tag of its own;
* prometheus-libvirt-exporter (Debian, per-domain calls), on its own
  127.0.0.1 port, scraped once a second by this script;
* collectd with the virt plugin only, Interval 1, writing csv to a scratch dir.

CPU is utime+stime from /proc/PID/stat, of the collector's process and of the
lab's libvirtd, over the window only (after a warm-up); it is reported per VM
per sample, where VMs and samples are what each collector really read (counted
from its own output). RSS is the collector's largest VmRSS seen in the window.
"values/VM" counts what each emits for one running guest in one sample.

Missing peers are installed from Debian (``apt-get update`` once,
``--no-install-recommends``); any daemon their maintainer scripts started is
stopped again, by PID. Extra guests (``--busy``, 3 by default, since collectd
reads running guests only; ``--paused``) are created for the run and destroyed
afterwards. The machine is shared: the run waits while another
``python -m pytest`` runs, and a window during which one started or libvirtd
was restarted is measured again. About 3 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import libvirt
from benchkit import (
    TICK_MS,
    WARMUP_S,
    Collector,
    DaemonRun,
    active_domains,
    add_max_wait_argument,
    clean_env,
    extra_guests,
    idle_libvirtd,
    lab_for,
    labkit,
    loadavg,
    pids_running,
    run_window,
    stop_pid,
    wait_for_quiet,
)

from vmtelemetryd.sampler import ACTIVE_ONLY, STATS_FLAGS, STATS_GROUPS

IDLE_MAX_S = 10.0
# collectd reads running guests only, and the default lab runs one: boot a few
# more (tiny TCG Linux, ~7 s each to come up) so that its figures are per VM too
DEFAULT_EXTRA_BUSY = 3

EXPORTER_BIN = "/usr/bin/prometheus-libvirt-exporter"
COLLECTD_BIN = "/usr/sbin/collectd"
PEER_PACKAGES = {"prometheus-libvirt-exporter": EXPORTER_BIN, "collectd-core": COLLECTD_BIN}
# what a peer package's maintainer scripts could leave running
PEER_DAEMONS = (EXPORTER_BIN, COLLECTD_BIN, "/usr/sbin/collectdmon", "/usr/bin/daemon")

BARE_LOOP = r"""
import signal, sys, time
import libvirt
uri, groups, flags = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
libvirt.registerErrorHandler(lambda *_: None, None)
conn = libvirt.openReadOnly(uri)
print("ready", len(conn.getAllDomainStats(groups, flags)), flush=True)
tick = time.monotonic()
while True:
    tick += 1.0
    time.sleep(max(0.0, tick - time.monotonic()))
    started = time.time()
    count = len(conn.getAllDomainStats(groups, flags))
    print(f"{started:.6f} {count}", flush=True)
"""

COLLECTD_CONF = """\
Hostname "bench-peers"
FQDNLookup false
Interval 1
BaseDir "{base}"
PIDFile "{base}/collectd.pid"
PluginDir "/usr/lib/collectd"
TypesDB "/usr/share/collectd/types.db"
AutoLoadPlugin false
LoadPlugin logfile
<Plugin logfile>
  LogLevel info
  File "{base}/collectd.log"
</Plugin>
LoadPlugin csv
<Plugin csv>
  DataDir "{base}/csv"
  StoreRates false
</Plugin>
LoadPlugin virt
<Plugin virt>
  Connection "{uri}"
  RefreshInterval 60
  HostnameFormat name
{extra}</Plugin>
"""


# --------------------------------------------------------------------------- packages


def _dpkg_version(pkg: str) -> str | None:
    cp = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Status} ${Version}", pkg],
        capture_output=True,
        text=True,
        check=False,
    )
    status, _, version = cp.stdout.partition(" ")
    return version if cp.returncode == 0 and status == "installed" else None


def ensure_peers() -> dict[str, str]:
    """Install the peers that are missing; stop whatever their postinst started.
    Returns why a peer cannot run (package -> reason), empty when all can."""
    missing = [
        p for p, exe in PEER_PACKAGES.items() if not (_dpkg_version(p) and Path(exe).exists())
    ]
    if not missing:
        return {}
    if not shutil.which("apt-get"):
        return dict.fromkeys(missing, "not installed, and no apt-get")
    before = {exe: pids_running(exe) for exe in PEER_DAEMONS}
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"installing {' '.join(missing)} (apt-get)", file=sys.stderr, flush=True)
    failed: dict[str, str] = {}
    steps = (
        ["apt-get", "update", "-q"],
        [
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
            *missing,
        ],
    )
    for argv in steps:
        cp = subprocess.run(
            argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        if cp.returncode != 0:
            tail = (cp.stdout + cp.stderr).strip().splitlines()[-1:]
            failed = dict.fromkeys(missing, f"{argv[1]} failed: {' '.join(tail)}")
            break
    for exe in PEER_DAEMONS:
        for pid, start in pids_running(exe).items():
            if before[exe].get(pid) != start:
                print(f"stopping {exe} (pid {pid}), started by its package", file=sys.stderr)
                stop_pid(pid, start)
    return failed


# --------------------------------------------------------------------------- line protocol


def _split_unescaped(text: str, sep: str) -> list[str]:
    """Split line protocol at ``sep`` outside backslash escapes and double quotes."""
    parts, current, quoted, escaped = [], [], False, False
    for ch in text:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            current.append(ch)
            escaped = True
        elif ch == '"':
            current.append(ch)
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def lp_fields(line: str) -> tuple[str, dict[str, str], list[str]]:
    """(measurement, tags, field names) of one line-protocol line."""
    head, fields = _split_unescaped(line, " ")[:2]
    measurement, *tags = _split_unescaped(head, ",")
    tag_map = dict(t.split("=", 1) for t in tags)
    return measurement, tag_map, [f.split("=", 1)[0] for f in _split_unescaped(fields, ",")]


# --------------------------------------------------------------------------- collectors


class Bare(Collector):
    def __init__(self, scratch: Path, uri: str) -> None:
        super().__init__("bare getAllDomainStats", scratch)
        self.uri = uri

    def command(self) -> tuple[list[str], dict[str, str]]:
        flags = ACTIVE_ONLY | STATS_FLAGS
        argv = [sys.executable, "-c", BARE_LOOP, self.uri, str(STATS_GROUPS), str(flags)]
        return argv, clean_env()

    def ready(self) -> bool:
        return self.output().startswith("ready")

    def count(self, t0: float, t1: float) -> tuple[int, int]:
        rows = [line.split() for line in self.output().splitlines()]
        calls = [(float(r[0]), int(r[1])) for r in rows if len(r) == 2 and r[0] != "ready"]
        inside = [n for t, n in calls if t0 <= t < t1]
        return len(inside), max(inside, default=0)

    def count_values(self, vm: str) -> None:
        conn = libvirt.openReadOnly(self.uri)
        try:
            dom = conn.lookupByName(vm)
            stats = conn.domainListGetStats([dom], STATS_GROUPS, STATS_FLAGS)
        finally:
            conn.close()
        self.values = len(stats[0][1]) if stats else 0
        self.values_note = "raw libvirt keys"


class Vmtelemetryd(DaemonRun):
    def __init__(self, scratch: Path, lab: labkit.LabInfo) -> None:
        super().__init__(
            "vmtelemetryd",
            scratch,
            lab,
            tag="bench-peers",
            env={"DOMAINS_INCLUDE": f"{lab.prefix}*"},
        )

    def count_values(self, vm: str) -> None:
        cp = subprocess.run(
            self.argv("once"),
            env=self.environment(DOMAINS_INCLUDE=vm),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        raw = derived = 0
        for line in cp.stdout.splitlines():
            measurement, tags, names = lp_fields(line)
            if tags.get("vm") != vm:
                continue
            if measurement in ("vm_metrics", "vm_devices"):
                raw += len(names)
            else:
                derived += len(names)
        self.values = raw + derived
        self.values_note = f"{raw} raw + {derived} derived"


class Exporter(Collector):
    def __init__(self, scratch: Path, uri: str) -> None:
        super().__init__("prometheus-libvirt-exporter", scratch)
        self.uri = uri
        self.port = _free_port()
        self.scrapes: list[float] = []
        self.last = ""

    def command(self) -> tuple[list[str], dict[str, str]]:
        argv = [
            EXPORTER_BIN,
            f"--web.listen-address=127.0.0.1:{self.port}",
            f"--libvirt.uri={self.uri}",
        ]
        return argv, clean_env()

    def _scrape(self) -> str:
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as answer:
            body: str = answer.read().decode()
        return body

    def ready(self) -> bool:
        try:
            self.last = self._scrape()
        except OSError:
            return False
        return True

    def tick(self) -> None:
        started = time.time()
        self.last = self._scrape()
        self.scrapes.append(started)

    def count(self, t0: float, t1: float) -> tuple[int, int]:
        domains = set(re.findall(r'[{,]domain="((?:[^"\\]|\\.)*)"', self.last))
        return sum(t0 <= t < t1 for t in self.scrapes), len(domains)

    def count_values(self, vm: str) -> None:
        mark = re.compile(r'[{,]domain="' + re.escape(vm) + r'"[,}]')
        rows = [r for r in self.last.splitlines() if not r.startswith("#") and mark.search(r)]
        self.values = len(rows)
        self.values_note = "metric samples"


class Collectd(Collector):
    def __init__(self, scratch: Path, uri: str, extra_stats: str) -> None:
        super().__init__("collectd virt", scratch)
        self.uri = uri
        self.extra_stats = extra_stats
        self.vms_note = "running only"

    def command(self) -> tuple[list[str], dict[str, str]]:
        extra = f'  ExtraStats "{self.extra_stats}"\n' if self.extra_stats else ""
        conf = self.scratch / "collectd.conf"
        self.scratch.mkdir(parents=True, exist_ok=True)
        conf.write_text(COLLECTD_CONF.format(base=self.scratch, uri=self.uri, extra=extra))
        return [COLLECTD_BIN, "-f", "-C", str(conf)], clean_env()

    def _rows(self, vm_dir: Path, pattern: str) -> Iterator[tuple[Path, list[str]]]:
        for path in sorted(vm_dir.glob(pattern)):
            lines = path.read_text().splitlines()
            for row in lines[1:]:
                yield path, row.split(",")

    def ready(self) -> bool:
        return any((self.scratch / "csv").glob("*/virt/virt_cpu_total-*"))

    def count(self, t0: float, t1: float) -> tuple[int, int]:
        per_vm = []
        for vm_dir in (self.scratch / "csv").glob("*/virt"):
            rows = self._rows(vm_dir, "virt_cpu_total-*")
            per_vm.append(sum(t0 <= float(row[0]) < t1 for _, row in rows))
        per_vm = [n for n in per_vm if n]
        return max(per_vm, default=0), len(per_vm)

    def count_values(self, vm: str) -> None:
        vm_dir = self.scratch / "csv" / vm / "virt"
        if not vm_dir.is_dir():
            self.values, self.values_note = 0, f"{vm} not read"
            return
        # one read of collectd's writes each file's row a few ms apart: per read (a
        # virt_cpu_total row), add up the columns of every file with a row that close
        files = []
        for path in sorted(vm_dir.iterdir()):
            lines = path.read_text().splitlines()
            stamps = [float(row.split(",")[0]) for row in lines[1:]]
            files.append((len(lines[0].split(",")) - 1, stamps))
        reads = [float(row[0]) for _, row in self._rows(vm_dir, "virt_cpu_total-*")]
        self.values = max(
            (sum(n for n, stamps in files if any(abs(t - r) < 0.5 for t in stamps)) for r in reads),
            default=0,
        )
        self.values_note = "csv values" + (
            f", ExtraStats {self.extra_stats}" if self.extra_stats else ""
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- measuring


# --------------------------------------------------------------------------- report


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}"


def report(colls: list[Collector], conditions: list[str], notes: list[str]) -> None:
    base = next((c for c in colls if isinstance(c, Vmtelemetryd) and not c.unavailable), None)
    b_total = b_own = b_rss = b_vals = None
    if base is not None:
        r = base.result
        b_own = r.per_vm_sample(r.own_ticks)
        b_total = r.per_vm_sample(r.own_ticks + r.libvirtd_ticks)
        b_rss, b_vals = float(r.rss_kib), base.values
    print("Host CPU per VM per sample in ms: the collector's own + libvirtd's = total;")
    print("core %: the same total as a share of one core; x: ratio to vmtelemetryd's figure")
    for line in conditions:
        print(f"  {line}")
    head = (
        f"{'collector':<28}{'VMs':>4}{'samples':>8}{'own':>7}{'libvirtd':>9}{'total':>7}"
        f"{'x':>6}{'own x':>7}{'core %':>7}{'RSS MiB':>8}{'x':>6}{'values/VM':>10}{'x':>6}"
    )
    print(head)
    print("-" * len(head))
    for c in colls:
        if c.unavailable:
            print(f"{c.name:<28}  not measured: {c.unavailable}")
            continue
        r = c.result
        own = r.per_vm_sample(r.own_ticks)
        lvd = r.per_vm_sample(r.libvirtd_ticks)
        total = own + lvd
        rss = r.rss_kib / 1024
        core = (r.own_ticks + r.libvirtd_ticks) * TICK_MS / (r.seconds * 10)
        print(
            f"{c.name:<28}{r.vms:>4}{r.samples:>8}{own:>7.3f}{lvd:>9.3f}{total:>7.3f}"
            f"{_ratio(total, b_total):>6}{_ratio(own, b_own):>7}{core:>7.2f}{rss:>8.1f}"
            f"{_ratio(r.rss_kib, b_rss):>6}{c.values if c.values is not None else '-':>10}"
            f"{_ratio(c.values, b_vals):>6}"
        )
    print()
    for c in colls:
        details = [d for d in (c.vms_note, c.values_note) if d]
        if not c.unavailable and details:
            print(f"  {c.name}: {'; '.join(details)}")
    for note in notes:
        print(f"  {note}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30, help="window per collector (30)")
    ap.add_argument(
        "--rounds", type=int, default=1, help="split each window into N interleaved rounds"
    )
    ap.add_argument(
        "--busy",
        type=int,
        default=DEFAULT_EXTRA_BUSY,
        help=f"extra busy (running) guests for this run ({DEFAULT_EXTRA_BUSY})",
    )
    ap.add_argument("--paused", type=int, default=0, help="extra paused guests for this run")
    ap.add_argument(
        "--collectd-extra-stats",
        default="",
        metavar="LIST",
        help="collectd virt ExtraStats (default: none, the plugin's defaults)",
    )
    add_max_wait_argument(ap)
    args = ap.parse_args(argv)
    if args.seconds < 1 or args.rounds < 1 or args.busy < 0 or args.paused < 0:
        ap.error("--seconds >= 1, --rounds >= 1, --busy/--paused >= 0")
    began = time.monotonic()
    lab = lab_for("bench_peers")
    if lab is None:
        return 1
    quiet_note = wait_for_quiet(args.max_wait)
    load_start = loadavg()
    cannot = ensure_peers()
    notes = [quiet_note] if quiet_note else []
    with (
        tempfile.TemporaryDirectory(prefix="bench-peers-", dir="/var/tmp") as tmp,
        extra_guests(lab, args.busy, args.paused),
    ):
        scratch = Path(tmp)
        uri = lab.libvirt_uri
        colls: list[Collector] = [
            Bare(scratch / "bare", uri),
            Vmtelemetryd(scratch / "vmtelemetryd", lab),
            Exporter(scratch / "exporter", uri),
            Collectd(scratch / "collectd", uri, args.collectd_extra_stats),
        ]
        for coll, pkg in ((colls[2], "prometheus-libvirt-exporter"), (colls[3], "collectd-core")):
            coll.unavailable = cannot.get(pkg, "")
        doms = active_domains(uri)
        running = sorted(n for n, s in doms.items() if s == libvirt.VIR_DOMAIN_RUNNING)
        if not running and not colls[3].unavailable:
            colls[3].unavailable = "no running guest (it reads running guests only): use --busy N"
        ref = next((n for n in running if n.startswith(lab.prefix)), None) or min(doms, default="")
        idle = idle_libvirtd(min(IDLE_MAX_S, args.seconds))
        window = args.seconds / args.rounds
        for rnd in range(args.rounds):
            order = colls if rnd % 2 == 0 else colls[::-1]
            for coll in order:
                if not coll.unavailable:
                    notes += run_window(coll, window, rnd + 1, args.max_wait)
        for coll in colls:
            if coll.unavailable or not ref:
                continue
            try:
                coll.count_values(ref)
            except (OSError, ValueError, libvirt.libvirtError) as exc:
                coll.values_note = f"values not counted: {exc}"
        doms_after = active_domains(uri)

    paused = sum(s == libvirt.VIR_DOMAIN_PAUSED for s in doms.values())
    others = sorted(n for n in doms if not n.startswith(lab.prefix))
    versions = {p: _dpkg_version(p) or "?" for p in ("libvirt-daemon", *PEER_PACKAGES)}
    conditions = [
        f"guests: {len(doms)} active ({len(running)} running, {paused} paused), "
        f"each 1 NIC + 2 disks; values/VM counted for {ref or '-'}",
        f"window: {args.seconds:g} s per collector in {args.rounds} round(s), 1 sample/s, "
        f"after {WARMUP_S:g} s warm-up; {os.cpu_count()} CPUs",
        f"load average at start: {load_start}; at end: {loadavg()}",
        f"libvirtd idle: {idle:.2f} ms CPU/s before the windows (not subtracted)",
        "versions: " + ", ".join(f"{p} {v}" for p, v in versions.items()),
    ]
    if others:
        notes.append(
            f"non-lab domains also active (the bare loop and the peers read them): {others}"
        )
    if doms_after.keys() != doms.keys():
        notes.append("the set of active domains changed during the run")
    measured = [c.result for c in colls if not c.unavailable and c.result.samples]
    if measured:
        worst = max(TICK_MS / (r.samples * r.vms) for r in measured)
        notes.append(
            f"CPU comes from /proc/PID/stat in {TICK_MS:.0f} ms ticks: up to "
            f"±{worst:.3f} ms per VM per sample of resolution on a row"
        )
    report(colls, conditions, notes)
    print(f"  ran {time.monotonic() - began:.0f} s")
    return 0 if all(not c.unavailable for c in colls) else 1


if __name__ == "__main__":
    sys.exit(main())
