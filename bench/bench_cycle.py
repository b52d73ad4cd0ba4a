"""A poll cycle's own CPU per VM-sample, and the pure pipeline's cost per VM at 1000 VMs.

Lab part (needs ``tests/lab/lab up``): rounds interleaved so that machine
noise hits both alike, each timed in wall time and in this process's CPU
time (every thread: the shares' and libvirt calls' threads included):

* bare: the two bulk requests libvirt must answer anyway (every group of the
  running domains, the state of the others), on one connection, nothing else;
* cycle: what the daemon does per tick and host, with ``STATS_SHARDS=auto``
  and with one share: ``HostSampler.sample()``
  (from ``stages.open_hosts``: shares, parsing), ``HostPipeline.lines`` and
  ``Writer.submit`` to a started writer that delivers to the lab database.
  Its deliveries (gzip, HTTP: bench_write.py) run between the timed runs:
  each starts once the writer holds no line (``BATCH_MAX_SEC`` 0.05 here).

Then the whole ``vmtelemetryd run`` process, deliveries, metadata and
status included, for one window with ``auto`` and one with one share.

It first waits for other sessions' guests (``vmtlab-bench*`` or any other
domain: they would load libvirtd under both) and pytest runs (they count the
lab's domains) to be gone, measures with the lab's own guests, then with
``--guests`` in all: extra paused guests ``vmtlab-cyc-N``, created for it
and destroyed at the end.

Pure part: features, encode and submit timed separately (CPU of the main
thread only, so the writer thread's deliveries are not counted) for 1000
synthetic VMs, against the 30 µs per VM target. RSS and RssAnon (what the
process itself allocated, without file-backed pages) follow each part.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
from benchkit import DaemonRun, labkit, pytest_running, run_window

from vmtelemetryd.config import Config, load_config
from vmtelemetryd.features import Features
from vmtelemetryd.hostpipeline import HostPipeline
from vmtelemetryd.hostsampler import HostSampler
from vmtelemetryd.lineprotocol import SeriesCache, encode
from vmtelemetryd.logs import configure_logging
from vmtelemetryd.model import DISK_FIELDS, NIC_FIELDS, DeviceSample, Sample, VmSample
from vmtelemetryd.sampler import ACTIVE_ONLY, INACTIVE_ONLY, STATE_ONLY, STATS_FLAGS, STATS_GROUPS
from vmtelemetryd.stages import open_hosts, open_writer
from vmtelemetryd.writer import Writer

ROUNDS = 40
WARMUP = 10  # metadata reads (8 a cycle) and the shard count settle first
PURE_VMS = 1000
PURE_CYCLES = 16
PURE_WARMUP = 6  # the trend windows fill (FEATURE_WINDOW 5)
PURE_INTERVAL_S = 1.0  # the daemon's pace: the writer keeps up, as it would
TARGET_PIPELINE_US = 30.0
TARGET_CPU_MS = 0.1
HOST_TAG = "bench-cycle"
EXTRA_PREFIX = "cyc-"
WAIT_POLL_S = 30
WAIT_MAX_S = 20 * 60
DAEMON_WINDOW_S = 40
BATCH_MAX_SEC = 0.05  # the in-process writer delivers between the timed runs

Timing = tuple[float, float]  # (wall ms, CPU ms)


def timed(fn: Callable[[], object]) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000


def bench_config(spool_dir: Path, uri: str) -> Config:
    """The daemon's configuration, pointed at the lab, with an empty file (no /etc)."""
    lab = labkit.info()
    env_file = spool_dir / "bench.env"
    env_file.write_text("")
    environ = {
        "LIBVIRT_URI": uri,
        "INFLUX_URL": lab.influx_url,
        "INFLUX_DB": lab.influx_db,
        "INFLUX_TOKEN": lab.influx_token,
        "INFLUX_WRITE_API": lab.write_api,
        "HOST_TAG": HOST_TAG,
        "SPOOL_DIR": str(spool_dir / "spool"),
        "BATCH_MAX_SEC": str(BATCH_MAX_SEC),
    }
    return load_config(env_file, environ)


def lab_rounds(config: Config, writer: Writer) -> None:
    """Bare requests, the daemon's cycle with ``STATS_SHARDS=auto`` and with 1, interleaved."""
    conn = libvirt.openReadOnly(config.libvirt_uris[0])
    auto = "daemon cycle, auto"
    cycles = {auto: config, "daemon cycle, 1 share": dataclasses.replace(config, stats_shards=1)}
    vm_samples: list[int] = []

    def bare() -> None:
        conn.getAllDomainStats(STATS_GROUPS, ACTIVE_ONLY | STATS_FLAGS)
        conn.getAllDomainStats(STATE_ONLY, INACTIVE_ONLY)

    def daemon_cycle(variant: Config) -> Callable[[], None]:
        (host,) = open_hosts(variant)
        hosts.append(host)
        pipeline = HostPipeline(
            variant.feature_window, variant.device_cache_ttl, variant.poll_interval
        )

        def cycle() -> None:
            sample = host.sample()
            writer.submit(pipeline.lines(sample, host.domain_xml, variant.metadata_tags))
            vm_samples.append(len(sample.vms))

        return cycle

    hosts: list[HostSampler] = []
    runs = {"bare libvirt requests": bare} | {
        name: daemon_cycle(variant) for name, variant in cycles.items()
    }
    for _ in range(WARMUP):
        for run in runs.values():
            run()
    rows: dict[str, list[Timing]] = {name: [] for name in runs}
    for _ in range(ROUNDS):
        for name, run in runs.items():
            while writer.status().queued:  # its deliveries would count as this run's CPU
                time.sleep(0.01)
            rows[name].append(timed(run))
    shards = hosts[0].shards
    for host in hosts:
        host.close()
    conn.close()
    vms = statistics.median(vm_samples[WARMUP * len(cycles) :])
    print(f"lab: {vms:.0f} domains, auto chose {shards} share(s), {ROUNDS} interleaved rounds")
    print(f"{'median (p90)':28}{'wall ms':>16}{'own CPU ms':>16}{'CPU ms/VM':>12}")
    for name, timings in rows.items():
        cpu = [c for _, c in timings]
        per_vm = statistics.median(cpu) / vms
        print(f"{name:<28}{_fmt([w for w, _ in timings]):>16}{_fmt(cpu):>16}{per_vm:>12.3f}")
    cycle_cpu, bare_cpu = (
        statistics.median(c for _, c in rows[name]) / vms
        for name in (auto, "bare libvirt requests")
    )
    verdict = "met" if cycle_cpu <= TARGET_CPU_MS else "MISSED"
    print(
        f"own CPU per VM-sample, auto: {cycle_cpu:.3f} ms (target {TARGET_CPU_MS} ms: {verdict}), "
        f"{cycle_cpu - bare_cpu:.3f} ms above the bare requests"
    )
    print_memory()


def daemon_processes(scratch: Path) -> None:
    """The whole ``vmtelemetryd run`` process, with ``STATS_SHARDS=auto`` and with 1, one
    window each (benchkit): all of its CPU per VM-sample (sampling, metadata, features,
    encoding, delivery, status), the lab libvirtd's, and its largest RSS and RssAnon."""
    print(f"vmtelemetryd run, one {DAEMON_WINDOW_S} s window each, one after the other")
    print(f"{'':28}{'own CPU ms/VM':>16}{'libvirtd ms/VM':>16}{'RSS MiB':>10}{'RssAnon':>10}")
    for name, settings in (("auto", {}), ("1 share", {"STATS_SHARDS": "1"})):
        run = DaemonRun(
            f"daemon, {name}",
            scratch / name.replace(" ", "-"),
            labkit.info(),
            tag=HOST_TAG,
            env=settings,
        )
        run_window(run, DAEMON_WINDOW_S, 1, WAIT_MAX_S)
        w = run.result
        print(
            f"{'daemon, ' + name + f' ({w.vms} VMs)':<28}{w.per_vm_sample(w.own_ticks):>16.3f}"
            f"{w.per_vm_sample(w.libvirtd_ticks):>16.3f}{w.rss_kib / 1024:>10.1f}"
            f"{w.anon_kib / 1024:>10.1f}"
        )
    print()


@contextlib.contextmanager
def extra_guests(total: int) -> Iterator[None]:
    """Paused guests ``vmtlab-cyc-N`` up to ``total`` running domains, destroyed on the way out."""
    prefix = labkit.info().prefix + EXTRA_PREFIX
    for stale in [n for n in labkit.list_domains() if n.startswith(prefix)]:
        labkit.destroy_guest(stale)  # left by an interrupted run
    running = sum(state in ("running", "paused") for state in labkit.list_domains().values())
    made: list[str] = []
    print(f"creating {max(0, total - running)} paused guests {prefix}N", file=sys.stderr)
    try:
        for n in range(1, total - running + 1):
            made.append(f"{prefix}{n}")
            labkit.create_guest(made[-1])
        yield
    finally:
        print(f"destroying {len(made)} guests", file=sys.stderr)
        for name in made:
            with contextlib.suppress(labkit.LabError):
                labkit.destroy_guest(name)


def wait_for_other_bench() -> None:
    """Another session's guests (``vmtlab-bench*``, or any domain that is neither the lab's
    own nor ours) would load libvirtd under both benchmarks, and a pytest run counts the
    lab's domains that ours would add: wait until both are gone."""
    lab = labkit.info()
    deadline = time.monotonic() + WAIT_MAX_S
    while True:
        try:
            names = labkit.list_domains()
        except labkit.LabError:  # a test restarting libvirtd
            names = ["(libvirtd not answering)"]
        ours = lab.prefix + EXTRA_PREFIX
        others = [n for n in names if n not in lab.guests and not n.startswith(ours)]
        tests = pytest_running()
        if not others and not tests:
            return
        if time.monotonic() > deadline:
            raise SystemExit(
                f"{len(others)} other domains, {len(tests)} pytest runs after {WAIT_MAX_S} s"
            )
        print(f"waiting for {len(others)} other domains, {len(tests)} pytest runs", file=sys.stderr)
        time.sleep(WAIT_POLL_S)


def synthetic_vm(i: int, t: int) -> VmSample:
    grow = 1000 * t + i
    nic = DeviceSample("nic", "vnet0", dict.fromkeys(NIC_FIELDS, grow))
    disks = tuple(DeviceSample("disk", d, dict.fromkeys(DISK_FIELDS, grow)) for d in ("vda", "vdb"))
    metrics = {
        "state": 1,
        "cpu_time_ns": grow * 10**6,
        "cpu_delay_ns": grow * 10**4,
        "vcpus": 2,
        "mem_available_kib": 4_000_000,
        "mem_usable_kib": 1_000_000 + i,
    }
    return VmSample(f"vm-{i}", f"uuid-{i}", 1, metrics, (nic, *disks), {"nic": 1, "disk": 2})


def pure_rounds(writer: Writer, count: int) -> None:
    """The stages one after another, as HostPipeline.lines runs them, each timed alone.

    Every VM carries one metadata tag (METADATA_TAGS=one_name) whose value needs escaping.
    """
    features, series = Features(5), SeriesCache()
    tags = {f"uuid-{i}": {"one_name": f"web server {i}"} for i in range(count)}
    gc.collect()
    gc.freeze()  # as Daemon.run does after its first cycle
    costs: dict[str, list[float]] = {"features": [], "encode": [], "submit": []}
    lines: list[str] = []
    for t in range(PURE_CYCLES):
        time.sleep(PURE_INTERVAL_S - time.monotonic() % PURE_INTERVAL_S)
        vms = tuple(synthetic_vm(i, t) for i in range(count))
        sample = Sample(HOST_TAG, time.time_ns(), time.monotonic(), vms)
        start = time.thread_time()
        derived = features.derive(sample)
        encoded = time.thread_time()
        lines = encode(sample, derived, tags, series)
        submitted = time.thread_time()
        writer.submit(lines)
        done = time.thread_time()
        if t >= PURE_WARMUP:
            costs["features"].append((encoded - start) * 1e6 / count)
            costs["encode"].append((submitted - encoded) * 1e6 / count)
            costs["submit"].append((done - submitted) * 1e6 / count)
    print(f"pure stages, {count} synthetic VMs (1 NIC, 2 disks, 1 tag), {len(lines)} lines a cycle")
    print(f"median of {PURE_CYCLES - PURE_WARMUP} cycles, main-thread CPU, µs per VM")
    total = 0.0
    for name, per_vm in costs.items():
        total += statistics.median(per_vm)
        print(f"  {name:<10}{statistics.median(per_vm):8.1f}")
    verdict = "met" if total <= TARGET_PIPELINE_US else "MISSED"
    print(f"  {'together':<10}{total:8.1f}   (target {TARGET_PIPELINE_US:.0f}: {verdict})")
    print_memory()


def print_memory() -> None:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    print(f"memory: RSS {status['VmRSS'].strip()}, RssAnon {status['RssAnon'].strip()}\n")


def _fmt(values: list[float]) -> str:
    ordered = sorted(values)
    return f"{statistics.median(ordered):.2f} ({ordered[int(len(ordered) * 0.9) - 1]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pure-only", action="store_true", help="only the 1000 synthetic VMs")
    parser.add_argument("--guests", type=int, default=60, help="running domains, second lab run")
    args = parser.parse_args()
    configure_logging("warning")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        config = bench_config(Path(scratch), labkit.info().libvirt_uri)
        writer = open_writer(config)
        try:
            if not args.pure_only:
                wait_for_other_bench()
                lab_rounds(config, writer)
                daemon_processes(Path(scratch) / "lab")
                with extra_guests(args.guests):
                    lab_rounds(config, writer)
                    daemon_processes(Path(scratch) / "more")
            pure_rounds(writer, PURE_VMS)
        finally:
            writer.stop(10)


if __name__ == "__main__":
    main()
