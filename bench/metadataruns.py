"""What bench_metadata_top.py runs besides the daemons it compares: ``vmtelemetryd top``
in a tmux pane, and the daemon's domain XML reads, counted and costed."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from benchkit import (
    REPO,
    TICK_MS,
    WARMUP_S,
    BenchError,
    DaemonRun,
    alive,
    clean_env,
    labkit,
    libvirtd_pid,
)

TOP_INTERVAL_S = 1.0
TOP_SIZE = (120, 64)  # 61 rows under the header and the column titles
XML_PASSES = 20

# One read's cost, measured in a process of the after code's own: the daemon's cache and
# sampler, the CPU of this process and of libvirtd around the reads only.
XML_COST = r"""
import json, sys, time
from benchkit import cpu_ticks
from vmtelemetryd.metadatacache import MetadataCache
from vmtelemetryd.sampler import Sampler
uri, libvirtd, passes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sampler = Sampler(uri, timeout=30, wants_domain=lambda _: True, filtered=False, host_tag="bench")
sample = sampler.sample()
reads = own = ticks = 0
for _ in range(passes):
    cache = MetadataCache(ttl=0, poll_interval=1)  # TTL 0: every domain due, in one call
    cpu, lvd = time.process_time(), cpu_ticks(libvirtd)
    reads += len(cache.refresh(sample, sampler.domain_xml))
    own += time.process_time() - cpu
    ticks += cpu_ticks(libvirtd) - lvd
sampler.close()
print(json.dumps({"reads": reads, "own_ms": own * 1000, "libvirtd_ticks": ticks}))
"""


# --------------------------------------------------------------------------- top


class Top(DaemonRun):
    """``vmtelemetryd top`` of the package in ``source``, with a DaemonRun's settings, in a
    tmux terminal on a socket of its own (``tmux -L``: the server it starts is ours to
    kill). Refreshes: one per TOP_INTERVAL_S, or per poll when a poll takes longer (the
    poll time is read off the header once a second); the terminal is a companion."""

    def __init__(self, scratch: Path, lab: labkit.LabInfo, source: Path) -> None:
        super().__init__("vmtelemetryd top", scratch, lab, tag="bench-meta-top", source=source)
        self.socket = f"vmt-bench-top-{uuid.uuid4().hex[:8]}"
        self.headers: list[str] = []
        self._pid: int | None = None
        self._socket_path: Path | None = None

    def _tmux(self, *args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, *args], env=env, capture_output=True, text=True, check=check
        )
        return done.stdout

    def start(self) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.headers = []
        argv = self.argv("top", "--interval", f"{TOP_INTERVAL_S:g}")
        stderr = shlex.quote(str(self.scratch / "stderr"))
        width, height = TOP_SIZE
        self._tmux(
            *("new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height)),
            *("sh", "-c", f"exec {shlex.join(argv)} 2>{stderr}"),  # the pane's process is top
            env=self.environment(TERM="screen"),
        )
        self._pid = int(self._tmux("display-message", "-p", "-t", "top", "#{pane_pid}"))
        self._socket_path = Path(self._tmux("display-message", "-p", "#{socket_path}").strip())

    def pid(self) -> int:
        assert self._pid is not None
        return self._pid

    def returncode(self) -> int | None:
        return None if self._pid is not None and alive(self._pid) else -1

    def companions(self) -> dict[str, int]:
        return {"tmux": int(self._tmux("display-message", "-p", "#{pid}"))}

    def _screen(self) -> list[str]:
        return self._tmux("capture-pane", "-p", "-t", "top", check=False).splitlines()

    def ready(self) -> bool:
        lines = self._screen()
        return bool(lines) and lines[0].startswith("vmtelemetryd top - ")

    def tick(self) -> None:
        if lines := self._screen():
            self.headers.append(lines[0])

    def count(self, t0: float, t1: float) -> tuple[int, int]:
        polls = [float(m[1]) for h in self.headers if (m := re.search(r"poll (\d+\.\d+) s", h))]
        vms = [int(m[1]) for h in self.headers if (m := re.search(r" (\d+) VMs ", h))]
        period = statistics.mean(max(TOP_INTERVAL_S, p) for p in polls) if polls else TOP_INTERVAL_S
        return round((t1 - t0) / period), max(vms, default=0)

    def stop(self) -> None:
        if self._pid is not None and alive(self._pid):
            self._tmux("send-keys", "-t", "top", "q", check=False)
            deadline = time.monotonic() + 5
            while alive(self._pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        self._tmux("kill-server", check=False)  # gone already when top quit: harmless
        if self._socket_path is not None:
            self._socket_path.unlink(missing_ok=True)  # tmux leaves it behind

    def output(self) -> str:
        path = self.scratch / "stderr"
        return path.read_text(errors="replace") if path.exists() else ""


# --------------------------------------------------------------------------- XML reads


@dataclasses.dataclass
class XmlReads:
    per_minute: list[int]
    max_per_cycle: int
    first_minute_cycles: int  # cycles of the first minute that read any XML
    vms: int


def xml_reads_run(lab: labkit.LabInfo, scratch: Path, source: Path, minutes: int) -> XmlReads:
    """The after daemon alone for ``minutes`` from its first cycle; its own xml_reads counter."""
    daemon = DaemonRun("after, alone", scratch, lab, tag="bench-meta-xml", source=source)
    print(f"XML reads: the after daemon alone for {minutes} min", file=sys.stderr, flush=True)
    daemon.start()
    try:
        deadline = time.monotonic() + minutes * 60 + WARMUP_S  # its first cycle comes ~2 s late
        while time.monotonic() < deadline:
            if (code := daemon.returncode()) is not None:
                raise BenchError(f"the daemon exited with {code}:\n{daemon.output()[-800:]}")
            time.sleep(1)
    finally:
        daemon.stop()
    points = daemon.own_series("xml_reads")
    if not points:
        raise BenchError("the daemon wrote no xml_reads (a version without the metadata stage?)")
    first = points[0][0]

    def total_before(t: float) -> int:
        return int(max((v for ts, v in points if ts < t), default=0))

    per_minute = [
        total_before(first + 60 * (k + 1)) - total_before(first + 60 * k) for k in range(minutes)
    ]
    steps = [int(points[0][1])] + [int(b - a) for (_, a), (_, b) in itertools.pairwise(points)]
    in_first = [n for (ts, _), n in zip(points, steps, strict=True) if ts < first + 60]
    vms = daemon.own_series("vms")
    return XmlReads(per_minute, max(steps), sum(n > 0 for n in in_first), int(vms[-1][1]))


def reads_in_windows(daemon: DaemonRun) -> int:
    """XML reads the daemon counted inside its measured windows."""
    points = daemon.own_series("xml_reads")
    total = 0
    for t0, t1 in daemon.result.spans:
        inside = [v for ts, v in points if t0 <= ts < t1]
        earlier = [v for ts, v in points if ts < t0]
        if inside:
            total += int(inside[-1] - (earlier[-1] if earlier else 0))
    return total


def xml_read_cost(uri: str, source: Path) -> tuple[int, float, float]:
    """(reads, own ms, libvirtd ms) per XML read, as the daemon reads and parses them."""
    env = clean_env() | {"PYTHONPATH": f"{source}{os.pathsep}{REPO / 'bench'}"}
    argv = [sys.executable, "-P", "-c", XML_COST, uri, str(libvirtd_pid()), str(XML_PASSES)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise BenchError(f"XML read cost: exit {done.returncode}: {done.stderr.strip()[-800:]}")
    got = json.loads(done.stdout.splitlines()[-1])
    reads = max(1, got["reads"])
    return got["reads"], got["own_ms"] / reads, got["libvirtd_ticks"] * TICK_MS / reads
