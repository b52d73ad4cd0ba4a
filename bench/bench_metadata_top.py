"""What the metadata stage costs a daemon cycle, and what ``vmtelemetryd top`` costs, side by side.

Needs the lab (``tests/lab/lab up``). Paused guests (``vmtlab-bench-meta-*``) are
added up to ``--guests`` (60) for the run and destroyed afterwards. Then, one at a
time, interleaved over ``--rounds`` rounds (5), the order reversed every other round:

* before: ``vmtelemetryd run`` of ``--before`` (8cfbb29, the parent of the metadata
  stage's commit 40f84c2: no domain XML reads, no state-only request for inactive
  domains);
* after: ``vmtelemetryd run`` of ``--after`` (HEAD; ``worktree``: the working tree
  as it is when the run starts);
* top: ``vmtelemetryd top --interval 1`` of the after code, in a 120x64 tmux terminal
  of its own (every guest drawn), ``--top-seconds`` (30) in all.

Each tree's package is copied into a temp dir first (``git archive``), so that edits
made meanwhile change nothing. Both daemons run with the defaults (no
DOMAINS_INCLUDE: the unfiltered bulk request; POLL_INTERVAL=1; DEVICE_CACHE_TTL 300 s),
writing to the lab database under host tags of their own. Their windows
(``--seconds``, 25) start once the after daemon has read every domain's XML (at most
8 a cycle), so both compare steady cycles; what the reads add comes apart:

* XML reads: the after daemon alone for ``--xml-minutes`` (6: the first minute, when
  every domain is read once, then one whole DEVICE_CACHE_TTL), counted minute by
  minute from its own measurement (``vmtelemetryd``, field ``xml_reads``);
* one read's host CPU: the daemon's ``MetadataCache.refresh`` through
  ``Sampler.domain_xml``, for every domain, ``XML_PASSES`` times.

Host CPU is the process's own utime+stime plus libvirtd's, from /proc, per cycle (per
refresh for top) and per VM-sample. The machine is shared: before each window (and
the read cost) the run waits while another ``python -m pytest`` runs or another process
is connected to libvirtd, whose CPU would count as ours, and a window during which one
was, or libvirtd restarted, is measured again (benchkit). About 17 minutes with the
defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import libvirt
from benchkit import (
    REPO,
    TICK_MS,
    WARMUP_S,
    BenchError,
    DaemonRun,
    Window,
    add_max_wait_argument,
    all_domains,
    extra_guests,
    idle_libvirtd,
    lab_for,
    labkit,
    loadavg,
    ratio,
    run_window,
    wait_for_quiet,
)
from metadataruns import (
    TOP_INTERVAL_S,
    TOP_SIZE,
    Top,
    XmlReads,
    reads_in_windows,
    xml_read_cost,
    xml_reads_run,
)

from vmtelemetryd.config import Config
from vmtelemetryd.metadatacache import MIN_READS_PER_CYCLE

BEFORE = "8cfbb29"
DEFAULT_GUESTS = 60
POLL_INTERVAL_S = 1.0  # DaemonRun's
IDLE_S = 10.0


# --------------------------------------------------------------------------- code


def default_ttl() -> float:
    """DEVICE_CACHE_TTL when it is not set, as these runs leave it."""
    ttl = next(f for f in dataclasses.fields(Config) if f.name == "device_cache_ttl")
    return float(cast(float, ttl.default))


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def export_tree(ref: str, dest: Path) -> str:
    """The vmtelemetryd package of ``ref`` (``worktree``: the working tree now), copied
    under ``dest``; returns what it is, for the report."""
    dest.mkdir(parents=True)
    if ref == "worktree":
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(REPO / "vmtelemetryd", dest / "vmtelemetryd", ignore=ignore)
        changed = [
            row[3:] for row in _git("status", "--porcelain", "--", "vmtelemetryd").splitlines()
        ]
        head = _git("rev-parse", "--short", "HEAD")
        return f"working tree of {head}" + (f" + changed: {', '.join(changed)}" if changed else "")
    commit = _git("rev-parse", "--short", f"{ref}^{{commit}}")
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "vmtelemetryd"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


# --------------------------------------------------------------------------- report


def own_per_vm(w: Window) -> float:
    return w.per_vm_sample(w.own_ticks)


def host_per_vm(w: Window) -> float:
    return w.per_vm_sample(w.own_ticks + w.libvirtd_ticks)


def host_per_cycle(w: Window) -> float:
    return w.per_sample(w.own_ticks + w.libvirtd_ticks)


def _cpu_row(name: str, w: Window, per_vm: bool = True) -> str:
    own, lvd = w.per_sample(w.own_ticks), w.per_sample(w.libvirtd_ticks)
    row = f"{name:<26}{w.vms:>4}{w.samples:>8}{own:>9.2f}{lvd:>10.2f}{own + lvd:>9.2f}"
    if per_vm:
        row += f"{own_per_vm(w):>9.3f}{host_per_vm(w):>9.3f}"
    return row


def report_cycles(before: DaemonRun, after: DaemonRun, rounds: int, seconds: float) -> None:
    print(f"1. Daemon cycle, before and after the metadata stage: {rounds} interleaved rounds")
    print(f"   of {seconds:g} s each; host CPU in ms = own + libvirtd's")
    head = f"{'':26}{'VMs':>4}{'cycles':>8}{'own':>9}{'libvirtd':>10}{'host':>9}"
    head += f"{'own/VM':>9}{'host/VM':>9}"
    print(f"{'':38}{'--- per cycle ---':^28}{'per VM-sample':^18}")
    print(head)
    print("-" * len(head))
    for d in (before, after):
        if d.unavailable:
            print(f"{d.name:<26}  not measured: {d.unavailable}")
        else:
            print(_cpu_row(d.name, d.result))
    if before.unavailable or after.unavailable:
        return
    b, a = before.result, after.result
    own = ratio(own_per_vm(a), own_per_vm(b), 3)
    print(f"after/before per VM-sample: own {own}, host {ratio(host_per_vm(a), host_per_vm(b), 3)}")
    pairs = list(zip(before.windows, after.windows, strict=False))  # as many unless one gave up
    for what, per_vm in (("own", own_per_vm), ("host", host_per_vm)):
        ratios = [per_vm(wa) / per_vm(wb) for wb, wa in pairs if per_vm(wb)]
        listed = ", ".join(f"{r:.3f}" for r in ratios)
        median = statistics.median(ratios)
        print(f"  {what} after/before round by round: {listed} (median {median:.3f})")
    print(f"  XML reads inside the after windows: {reads_in_windows(after)}")


def report_xml(
    xml: XmlReads, cost: tuple[int, float, float], before: DaemonRun, after: DaemonRun
) -> None:
    minutes = len(xml.per_minute)
    ttl = default_ttl()
    budget = max(MIN_READS_PER_CYCLE, math.ceil(xml.vms * POLL_INTERVAL_S / ttl))
    print()
    print(f"2. XML reads of the after daemon alone, {minutes} min from its first cycle,")
    print(
        f"   DEVICE_CACHE_TTL={ttl:g} (default), POLL_INTERVAL={POLL_INTERVAL_S:g}, {xml.vms} VMs"
    )
    print(f"  minute by minute: {' '.join(str(n) for n in xml.per_minute)}")
    print(
        f"  first minute: {xml.per_minute[0]} (every domain once), in {xml.first_minute_cycles} "
        f"cycles; at most {xml.max_per_cycle} in a cycle (budget max({MIN_READS_PER_CYCLE}, "
        f"ceil(N*POLL_INTERVAL/TTL)) = {budget})"
    )
    steady = xml.per_minute[1:]
    expected = xml.vms * 60 / ttl
    rate = sum(steady) / len(steady) if steady else expected
    if steady:
        print(
            f"  steady state (minutes 2-{minutes}): {rate:.1f} per minute "
            f"(N*60/TTL = {expected:.1f}), in bursts: the domains read together expire together"
        )
        if len(steady) * 60 < ttl:
            print("  (steady state shorter than DEVICE_CACHE_TTL: it may hold no refresh at all)")
    reads, own, lvd = cost
    print(
        f"  one XML read (the daemon's refresh, {reads} reads): own {own:.3f} + libvirtd "
        f"{lvd:.3f} = {own + lvd:.3f} ms host CPU"
    )
    if before.unavailable or after.unavailable:
        return
    per_cycle = rate / 60 * POLL_INTERVAL_S
    added = per_cycle * (own + lvd)
    host_a, host_b = host_per_cycle(after.result), host_per_cycle(before.result)
    print(
        f"  amortized over the TTL: {per_cycle:.2f} reads per cycle = +{added:.3f} ms host CPU "
        f"per cycle ({100 * added / host_a:.2f} % of an after cycle); first minute: "
        f"+{xml.max_per_cycle * (own + lvd):.2f} ms in each of its {xml.first_minute_cycles} "
        "reading cycles"
    )
    amortized = ratio(host_a + added, host_b, 3)
    print(f"  after/before host CPU per cycle, amortized reads included: {amortized}")


def report_top(top: Top, after: DaemonRun, seconds: float) -> None:
    print()
    print(
        f"3. vmtelemetryd top --interval {TOP_INTERVAL_S:g} in a {TOP_SIZE[0]}x{TOP_SIZE[1]} "
        f"tmux terminal, {seconds:g} s in all, interleaved with the daemons"
    )
    head = f"{'':26}{'VMs':>4}{'n':>8}{'own':>9}{'libvirtd':>10}{'host':>9}{'tmux':>9}"
    print(f"{'':30}{'n: refreshes (top), cycles (daemon); ms per refresh or cycle':^60}")
    print(head)
    print("-" * len(head))
    if top.unavailable:
        print(f"{top.name:<26}  not measured: {top.unavailable}")
        return
    w = top.result
    print(_cpu_row(top.name, w, per_vm=False) + f"{w.per_sample(w.companion_ticks['tmux']):>9.2f}")
    if after.unavailable:
        return
    a = after.result
    print(_cpu_row(after.name, a, per_vm=False))
    own = ratio(w.per_sample(w.own_ticks), a.per_sample(a.own_ticks), 3)
    host = ratio(host_per_cycle(w), host_per_cycle(a), 3)
    print(f"top refresh / daemon cycle: own {own}, host {host}")
    print(
        "  tmux: the terminal's server, drawing top's output (and answering this script's "
        "capture-pane once a second)"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=DEFAULT_GUESTS, help="domains in all (60)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    ap.add_argument("--seconds", type=float, default=25, help="window per daemon per round (25)")
    ap.add_argument("--top-seconds", type=float, default=30, help="top's windows in all (30)")
    ap.add_argument("--xml-minutes", type=int, default=6, help="the XML reads run (6)")
    ap.add_argument("--before", default=BEFORE, help=f"git ref of before ({BEFORE})")
    ap.add_argument("--after", default="HEAD", help="git ref of after, or worktree (HEAD)")
    add_max_wait_argument(ap)
    args = ap.parse_args(argv)
    top_window = args.top_seconds / max(1, args.rounds)
    if args.rounds < 1 or args.seconds < 1 or top_window < 1 or args.xml_minutes < 1:
        ap.error("--rounds, --seconds, --top-seconds per round and --xml-minutes must be >= 1")
    began = time.monotonic()
    lab = lab_for("bench_metadata_top")
    if lab is None:
        return 1
    uri = lab.libvirt_uri
    notes = [note] if (note := wait_for_quiet(args.max_wait)) else []
    load_start = loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-metadata-", dir="/var/tmp") as tmp:
        scratch = Path(tmp)
        before_code = export_tree(args.before, scratch / "before-src")
        after_code = export_tree(args.after, scratch / "after-src")
        extra = max(0, args.guests - len(all_domains(uri)))
        with extra_guests(lab, 0, extra, label="bench-meta"):
            doms = all_domains(uri)
            before = DaemonRun(
                f"before {before_code}",
                scratch / "before",
                lab,
                tag="bench-meta-before",
                source=scratch / "before-src",
            )
            after = DaemonRun(
                f"after {args.after if args.after == 'worktree' else after_code}",
                scratch / "after",
                lab,
                tag="bench-meta-after",
                source=scratch / "after-src",
            )
            # the after daemon reads every domain's XML in its first ceil(N / 8) cycles
            reading = math.ceil(len(doms) / MIN_READS_PER_CYCLE) * POLL_INTERVAL_S
            before.warmup = after.warmup = reading + WARMUP_S
            top = Top(scratch / "top", lab, scratch / "after-src")
            idle = idle_libvirtd(IDLE_S)
            for rnd in range(args.rounds):
                order = [before, after, top] if rnd % 2 == 0 else [top, after, before]
                for coll in order:
                    if not coll.unavailable:
                        window = top_window if coll is top else args.seconds
                        notes += run_window(coll, window, rnd + 1, args.max_wait, alone=True)
            xml: XmlReads | None = None
            try:
                if note := wait_for_quiet(args.max_wait, alone=True):
                    notes.append(f"XML read cost: {note}")
                cost = xml_read_cost(uri, scratch / "after-src")
                xml = xml_reads_run(lab, scratch / "xml", scratch / "after-src", args.xml_minutes)
            except (BenchError, OSError, labkit.LabError) as exc:
                notes.append(f"XML reads not measured: {str(exc).splitlines()[0]}")
            doms_after = all_domains(uri)

    states = list(doms.values())
    running = states.count(libvirt.VIR_DOMAIN_RUNNING)
    paused = states.count(libvirt.VIR_DOMAIN_PAUSED)
    print("Host CPU of the daemon's cycle before/after the metadata stage, and of top's refresh")
    print(
        f"  guests: {len(doms)} domains ({running} running, {paused} paused, "
        f"{len(doms) - running - paused} other), {extra} of them made for this run; "
        "each 1 NIC + 2 disks"
    )
    print(f"  code: before {before_code}; after {after_code}")
    print(
        f"  daemon windows start {before.warmup:g} s after start ({reading:g} s of initial "
        f"XML reads + {WARMUP_S:g} s); {os.cpu_count()} CPUs"
    )
    print(f"  load average at start: {load_start}; at end: {loadavg()}")
    print(f"  libvirtd idle: {idle:.2f} ms CPU/s before the windows (not subtracted)")
    if doms_after.keys() != doms.keys():
        notes.append("the set of domains changed during the run")
    measured = [c.result for c in (before, after, top) if not c.unavailable and c.result.samples]
    if measured:
        worst = max(TICK_MS / r.samples for r in measured)
        notes.append(
            f"CPU comes from /proc/PID/stat in {TICK_MS:.0f} ms ticks: up to ±{worst:.2f} ms "
            "per cycle or refresh of resolution on a row"
        )
    print()
    report_cycles(before, after, args.rounds, args.seconds)
    if xml is not None:
        report_xml(xml, cost, before, after)
    report_top(top, after, args.top_seconds)
    print()
    for line in notes:
        print(f"  {line}")
    print(f"  ran {time.monotonic() - began:.0f} s")
    return 0 if not any(c.unavailable for c in (before, after, top)) else 1


if __name__ == "__main__":
    sys.exit(main())
