"""The daemon's poll of ~200 paused guests (and the busy one) against one bare bulk call.

Issue target: with 200 paused lab guests and the busy one at 1 Hz, the daemon's
poll (``HostSampler`` with ``STATS_SHARDS=auto``, from ``stages.open_host``)
lasts at most 0.65x one bare ``getAllDomainStats`` (the daemon's groups and
flags, one connection), measured in the same run, and its host CPU per
VM-sample is at most 1.15x the bare call's.

Host CPU = this process's CPU (every thread: the shares' threads, libvirt's
calls, parsing) + the lab libvirtd's utime+stime from /proc (PID from
``labkit.status()``); the guests' QEMU processes are not counted. Each
measurement starts on a 1 s tick, as the daemon polls; the configurations
(bare, auto, fixed 1/2/4/8 shards) run interleaved, in a rotated order each
round, each with its own connections kept from round to round, after a
warm-up. The machines are noisy 2-core boxes: figures are medians over the
rounds (min-max beside them).

It first waits (every 20 s, at most ``--max-wait``) until no other session's
benchmark guests (``vmtlab-bench*``, ``vmtlab-cyc*``) exist, then creates
``--guests`` paused guests ``vmtlab-big-N`` and destroys them at the end,
Ctrl-C or SIGTERM included (both ignored while it destroys them).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import libvirt
from bench_cycle import bench_config
from benchkit import TICK_MS, cpu_ticks, labkit, loadavg

from vmtelemetryd.config import Config
from vmtelemetryd.hostsampler import AUTO_RULE, HostSampler
from vmtelemetryd.logs import configure_logging
from vmtelemetryd.sampler import ACTIVE_ONLY, STATS_FLAGS, STATS_GROUPS
from vmtelemetryd.stages import open_host

EXTRA = "big-"
OTHER_BENCHES = ("vmtlab-bench", "vmtlab-cyc")
WAIT_POLL_S = 20
FIXED_SHARDS = (1, 2, 4, 8)
TARGET_WALL = 0.65
TARGET_CPU = 1.15
BARE = "bare call"
AUTO = "poll auto"

Measure = tuple[float, float, int]  # wall ms, host CPU ms, VMs


def domain_names() -> list[str]:
    cp = subprocess.run(
        ["virsh", "-c", labkit.info().libvirt_uri, "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [n for n in cp.stdout.splitlines() if n]


def wait_for_other_benches(max_wait: float, start_by: datetime.datetime | None) -> None:
    deadline = time.monotonic() + max_wait
    while True:
        others = [n for n in domain_names() if n.startswith(OTHER_BENCHES)]
        if not others:
            return
        now = datetime.datetime.now(datetime.UTC)
        if time.monotonic() > deadline or (start_by is not None and now > start_by):
            raise SystemExit(f"{len(others)} other benchmark guests still there: not started")
        print(f"{now:%H:%M:%S} waiting for {len(others)} other benchmark guests", file=sys.stderr)
        time.sleep(WAIT_POLL_S)


@contextlib.contextmanager
def big_guests(count: int) -> Iterator[None]:
    """``count`` paused guests ``vmtlab-big-N``, destroyed on the way out."""
    prefix = labkit.info().prefix + EXTRA
    made = [n for n in domain_names() if n.startswith(prefix)]  # left by an interrupted run
    try:
        print(f"creating {count} paused guests {prefix}N", file=sys.stderr, flush=True)
        for n in range(1, count + 1):
            name = f"{prefix}{n}"
            if name not in made:
                made.append(name)
                labkit.create_guest(name)
            if n % 25 == 0:
                print(f"  {n} created", file=sys.stderr, flush=True)
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not leave guests
            signal.signal(sig, signal.SIG_IGN)
        print(f"destroying {len(made)} guests {prefix}N", file=sys.stderr, flush=True)
        for name in made:
            with contextlib.suppress(labkit.LabError, ValueError):
                labkit.destroy_guest(name)
        print(f"destroyed ({datetime.datetime.now(datetime.UTC):%H:%M:%S} UTC)", file=sys.stderr)


def measured(lvd: int, fn: Callable[[], int]) -> Measure:
    """Wall ms, host CPU ms (this process + libvirtd) and VMs of one call of ``fn``."""
    ticks, cpu, wall = cpu_ticks(lvd), time.process_time(), time.perf_counter()
    vms = fn()
    wall_ms = (time.perf_counter() - wall) * 1000
    host_ms = (time.process_time() - cpu) * 1000 + (cpu_ticks(lvd) - ticks) * TICK_MS
    return wall_ms, host_ms, vms


def polled(host: HostSampler) -> Callable[[], int]:
    return lambda: len(host.sample().vms)


def on_tick() -> None:
    time.sleep(1 - time.monotonic() % 1)


def run(config: Config, rounds: int, warmup: int) -> None:
    uri = config.libvirt_uris[0]
    lvd = labkit.status()["procs"]["libvirtd"]["pid"]
    conn = libvirt.openReadOnly(uri)
    samplers: dict[str, HostSampler] = {AUTO: open_host(config, uri)}
    for n in FIXED_SHARDS:
        fixed = dataclasses.replace(config, stats_shards=n)
        samplers[f"poll {n} shard{'s' if n > 1 else ''}"] = open_host(fixed, uri)

    def bare() -> int:
        return len(conn.getAllDomainStats(STATS_GROUPS, ACTIVE_ONLY | STATS_FLAGS))

    calls: dict[str, Callable[[], int]] = {BARE: bare}
    for name, host in samplers.items():
        calls[name] = polled(host)
    rows: dict[str, list[Measure]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(warmup + rounds):
        turn = names[r % len(names) :] + names[: r % len(names)]
        for name in turn:
            on_tick()
            m = measured(lvd, calls[name])
            if r >= warmup:
                rows[name].append(m)
        if r >= warmup:
            print(f"round {r - warmup + 1}/{rounds}, load {loadavg()}", file=sys.stderr)
    chose = samplers[AUTO].shards
    for host in samplers.values():
        host.close()
    conn.close()
    report(rows, chose, rounds)


def report(rows: dict[str, list[Measure]], chose: int, rounds: int) -> None:
    def med(values: list[float]) -> str:
        return f"{statistics.median(values):8.1f} ({min(values):.0f}-{max(values):.0f})"

    vms = statistics.median(m[2] for m in rows[BARE])
    print(f"{vms:.0f} running domains, {rounds} interleaved rounds at 1 s ticks; medians (min-max)")
    print(f"auto chose {chose} shard(s) (hostsampler.py: {AUTO_RULE})")
    print(f"{'':18}{'wall ms':>20}{'host CPU ms':>22}{'host CPU ms/VM-sample':>24}")
    per_vm: dict[str, float] = {}
    wall: dict[str, float] = {}
    for name, ms in rows.items():
        wall[name] = statistics.median(m[0] for m in ms)
        per_vm[name] = statistics.median(m[1] / max(1, m[2]) for m in ms)
        walls, cpus = [m[0] for m in ms], [m[1] for m in ms]
        print(f"{name:<18}{med(walls):>20}{med(cpus):>22}{per_vm[name]:>24.3f}")
    wall_ratio = wall[AUTO] / wall[BARE]
    cpu_ratio = per_vm[AUTO] / per_vm[BARE]
    for what, ratio, target in (("wall", wall_ratio, TARGET_WALL), ("CPU", cpu_ratio, TARGET_CPU)):
        verdict = "met" if ratio <= target else "MISSED"
        print(f"poll auto / bare, {what:<4}: {ratio:.2f}x (target <= {target}x: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=196, help="extra paused guests to create")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="rounds not counted (auto settles)")
    parser.add_argument("--max-wait", type=float, default=15 * 60, help="s, for other benches")
    parser.add_argument("--start-by", help="HH:MM UTC: do not start waiting past this")
    args = parser.parse_args()
    start_by = None
    if args.start_by:
        hh, mm = map(int, args.start_by.split(":"))
        now = datetime.datetime.now(datetime.UTC)
        start_by = now.replace(hour=hh, minute=mm, second=0, microsecond=0)

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    configure_logging("warning")
    wait_for_other_benches(args.max_wait, start_by)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        config = bench_config(Path(scratch), labkit.info().libvirt_uri)
        assert config.stats_shards == "auto"
        config = dataclasses.replace(config, libvirt_timeout=max(config.libvirt_timeout, 30.0))
        with big_guests(args.guests):
            run(config, args.rounds, args.warmup)


if __name__ == "__main__":
    main()
