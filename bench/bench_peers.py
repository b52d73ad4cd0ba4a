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
import sys
import tempfile
import time
from pathlib import Path

import libvirt
from benchkit import (
    TICK_MS,
    WARMUP_S,
    Collector,
    active_domains,
    add_max_wait_argument,
    extra_guests,
    idle_libvirtd,
    lab_for,
    loadavg,
    ratio,
    run_window,
    wait_for_quiet,
)
from peercollectors import (
    PEER_PACKAGES,
    Bare,
    Collectd,
    Exporter,
    Vmtelemetryd,
    dpkg_version,
    ensure_peers,
)

IDLE_MAX_S = 10.0
# collectd reads running guests only, and the default lab runs one: boot a few
# more (tiny TCG Linux, ~7 s each to come up) so that its figures are per VM too
DEFAULT_EXTRA_BUSY = 3


# --------------------------------------------------------------------------- report


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
            f"{ratio(total, b_total):>6}{ratio(own, b_own):>7}{core:>7.2f}{rss:>8.1f}"
            f"{ratio(r.rss_kib, b_rss):>6}{c.values if c.values is not None else '-':>10}"
            f"{ratio(c.values, b_vals):>6}"
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
    versions = {p: dpkg_version(p) or "?" for p in ("libvirt-daemon", *PEER_PACKAGES)}
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
