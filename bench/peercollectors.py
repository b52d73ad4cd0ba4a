"""The collectors bench_peers.py runs side by side: the bare bulk request, vmtelemetryd,
prometheus-libvirt-exporter and collectd's virt plugin, each counting what it read;
and the Debian packages of the peers, installed when missing."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import libvirt
from benchkit import (
    Collector,
    DaemonRun,
    clean_env,
    labkit,
    pids_running,
    stop_pid,
)

from vmtelemetryd.sampler import ACTIVE_ONLY, STATS_FLAGS, STATS_GROUPS

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


def dpkg_version(pkg: str) -> str | None:
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
        p for p, exe in PEER_PACKAGES.items() if not (dpkg_version(p) and Path(exe).exists())
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
