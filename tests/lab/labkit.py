"""The real test lab: a libvirtd with KVM/TCG guests and a line-protocol database.

Standard library only: ``tests/lab/lab`` runs this before any venv exists.
This module is the lab's front door (``up``, ``info``, ``down``, ``status``,
the ``lab`` command) and re-exports the names tests use from the modules that
do the work (see /work/shared/LAB.md for why each piece is the way it is):

* lab_state: the lab dir, the lock, state.json, running commands, and the
  PIDs of what the lab started (only those are ever stopped);
* lab_apt: the Debian packages, installed when missing;
* lab_tinylinux: the busy guests' kernel + initramfs and the /init workload;
* lab_libvirtd: /etc/libvirt config (QEMU as root for /dev/kvm, a read-only
  socket without polkit), virtlogd + libvirtd when none answers, virsh;
* lab_guests: N paused guests (no OS; KVM when /dev/kvm exists, else TCG) and
  M busy guests (TCG tiny Linux writing vda, reading vdb, pinging on eth0 and
  holding memory), each with one real tap NIC and two qcow2 disks (vda, vdb);
* lab_database: victoria-metrics on a 127.0.0.1 port, storage in the lab dir;
* lab_hosts: further hypervisors (``up(hosts=2)``): a libvirtd each with its own
  hostname, sockets and paused guests, in a mount + UTS namespace.

Everything lives under ``VMT_LAB_DIR`` (default /var/lib/vmtelemetryd-lab);
every guest name starts with ``VMT_LAB_PREFIX`` (default ``vmtlab-``). The lab
only ever touches domains with that prefix and processes it started itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

from lab_apt import PACKAGES, ensure_packages
from lab_database import (
    FLUSH_SERIES,
    INFLUX_DB,
    INFLUX_TOKEN,
    WRITE_API,
    database_running,
    export_raw,
    flush,
    influx_url,
    query,
    start_database,
    stop_database,
    write_lines,
)
from lab_guests import (
    BUSY_READ_BYTES_SEC,
    BUSY_READY_TIMEOUT,
    BUSY_WRITE_BYTES_SEC,
    DISK_SIZE,
    GUEST_MEMORY_MIB,
    TCG_TB_CACHE_MIB,
    cleanup_guest_files,
    create_guest,
    default_nic_dev,
    destroy_guest,
    domain_xml,
    kvm_available,
    lab_domains,
    wait_busy_ready,
)
from lab_hosts import (
    HOST_GUESTS,
    HostInfo,
    ensure_guests,
    ensure_hosts,
    host_info,
    host_pid,
    hosts_status,
    stop_hosts,
)
from lab_libvirtd import (
    LIBVIRT_URI,
    SYSUSERS_FILE,
    ensure_libvirtd,
    ensure_service_user,
    libvirt_answers,
    list_domains,
    restart_libvirtd,
)
from lab_state import (
    DEFAULT_LAB_DIR,
    DEFAULT_PREFIX,
    LabError,
    alive,
    lab_dir,
    lab_path,
    load_state,
    locked,
    log,
    prefix,
    save_state,
    stop_pid,
    which,
)
from lab_tinylinux import BUSY_READY_MARK, INIT_SCRIPT, VIRTIO_MODULES, ensure_tiny_linux

__all__ = [
    "BUSY_READY_MARK",
    "BUSY_READY_TIMEOUT",
    "BUSY_READ_BYTES_SEC",
    "BUSY_WRITE_BYTES_SEC",
    "DEFAULT_BUSY",
    "DEFAULT_GUESTS",
    "DEFAULT_LAB_DIR",
    "DEFAULT_PREFIX",
    "DISK_SIZE",
    "FLUSH_SERIES",
    "GUEST_MEMORY_MIB",
    "HOST_GUESTS",
    "INFLUX_DB",
    "INFLUX_TOKEN",
    "INIT_SCRIPT",
    "LIBVIRT_URI",
    "PACKAGES",
    "SYSUSERS_FILE",
    "TCG_TB_CACHE_MIB",
    "VIRTIO_MODULES",
    "WRITE_API",
    "HostInfo",
    "LabError",
    "LabInfo",
    "can_run",
    "create_guest",
    "database_running",
    "default_nic_dev",
    "destroy_guest",
    "domain_xml",
    "down",
    "ensure_libvirtd",
    "ensure_packages",
    "ensure_service_user",
    "ensure_tiny_linux",
    "env_vars",
    "export_raw",
    "flush",
    "host_pid",
    "influx_url",
    "info",
    "kvm_available",
    "lab_dir",
    "lab_domains",
    "list_domains",
    "log",
    "main",
    "prefix",
    "query",
    "restart_libvirtd",
    "start_database",
    "status",
    "stop_database",
    "up",
    "wait_busy_ready",
    "write_lines",
]

DEFAULT_GUESTS = 3
DEFAULT_BUSY = 1


@dataclasses.dataclass(frozen=True)
class LabInfo:
    """Where the lab's pieces are. ``guests`` is every lab guest made by up()
    on the default host (paused ones first, then busy ones); ``busy_guests``
    the booted subset. ``hosts``: every hypervisor, hosts[0] the default one
    (``libvirt_uri``, ``guests``), then those up(hosts=N) added (paused guests)."""

    libvirt_uri: str
    influx_url: str
    influx_db: str
    influx_token: str
    write_api: str
    prefix: str
    lab_dir: str
    guests: tuple[str, ...]
    busy_guests: tuple[str, ...]
    hosts: tuple[HostInfo, ...]

    @property
    def paused_guests(self) -> tuple[str, ...]:
        return tuple(g for g in self.guests if g not in self.busy_guests)

    def env(self) -> dict[str, str]:
        """The daemon's configuration for this lab, as environment variables."""
        return env_vars(self.influx_url)


def can_run() -> tuple[bool, str]:
    """Whether this machine can run the lab at all (root, and QEMU present or
    installable). Anything else that goes wrong in up() is an error, not a skip."""
    if os.geteuid() != 0:
        return False, "the lab needs root (it runs libvirtd and QEMU)"
    if not sys.platform.startswith("linux"):
        return False, "the lab needs Linux"
    if which("qemu-system-x86_64") is None and (
        which("apt-get") is None or which("dpkg-query") is None
    ):
        return False, "no qemu-system-x86_64 and no apt-get to install it"
    return True, ""


def env_vars(url: str | None = None) -> dict[str, str]:
    return {
        "LIBVIRT_URI": LIBVIRT_URI,
        "INFLUX_URL": url or influx_url(),
        "INFLUX_DB": INFLUX_DB,
        "INFLUX_TOKEN": INFLUX_TOKEN,
        "INFLUX_WRITE_API": WRITE_API,
        "VMT_LAB_PREFIX": prefix(),
        "VMT_LAB_DIR": os.fspath(lab_dir()),
    }


def _guest_names(guests: int, busy: int) -> tuple[list[str], list[str]]:
    return (
        [f"{prefix()}paused-{i}" for i in range(1, guests + 1)],
        [f"{prefix()}busy-{i}" for i in range(1, busy + 1)],
    )


def up(guests: int = DEFAULT_GUESTS, busy: int = DEFAULT_BUSY, hosts: int = 1) -> LabInfo:
    """Bring the lab up (idempotent: what runs is reused) and say where it is.
    ``hosts`` > 1 also brings up hosts 2..N (lab_hosts), each with HOST_GUESTS
    paused guests; the default is the machine's one libvirtd alone."""
    if guests < 0 or busy < 0:
        raise ValueError("guest counts must be >= 0")
    if hosts < 1:
        raise ValueError("hosts must be >= 1")
    ok, why = can_run()
    if not ok:
        raise LabError(why)
    t0 = time.monotonic()
    with locked():
        lab_dir().mkdir(parents=True, exist_ok=True)
        ensure_packages()
        if busy:
            ensure_tiny_linux()
        state = load_state()
        ensure_libvirtd(state)
        save_state(state)
        ensure_service_user()
        url = start_database()
        state = load_state()

        paused_names, busy_names = _guest_names(guests, busy)
        made = ensure_guests(paused_names, busy_names)
        if busy_names:
            wait_busy_ready(busy_names)
        more_hosts, made_there = ensure_hosts(state, hosts)
        extra = sorted(set(lab_domains()) - set(paused_names) - set(busy_names))
        if extra:
            log(f"also running with the lab prefix (left alone): {len(extra)} guest(s)")
        state["last_up"] = {"guests": guests, "busy": busy, "hosts": hosts}
        save_state(state)
        info = LabInfo(
            libvirt_uri=LIBVIRT_URI,
            influx_url=url,
            influx_db=INFLUX_DB,
            influx_token=INFLUX_TOKEN,
            write_api=WRITE_API,
            prefix=prefix(),
            lab_dir=os.fspath(lab_dir()),
            guests=tuple(paused_names + busy_names),
            busy_guests=tuple(busy_names),
            hosts=(host_info(1, paused_names + busy_names), *more_hosts),
        )
    log(
        f"lab up: {guests} paused + {busy} busy guest(s) ({made} created), "
        f"{hosts - 1} more host(s) ({made_there} guest(s) created there), db {url}, "
        f"in {time.monotonic() - t0:.1f}s"
    )
    return info


def info() -> LabInfo:
    """LabInfo for a lab that is already up (no changes made)."""
    state = load_state()
    last = state.get("last_up", {"guests": DEFAULT_GUESTS, "busy": DEFAULT_BUSY})
    p, b = _guest_names(last["guests"], last["busy"])
    hosts = range(2, last.get("hosts", 1) + 1)
    return LabInfo(
        LIBVIRT_URI,
        influx_url(state),
        INFLUX_DB,
        INFLUX_TOKEN,
        WRITE_API,
        prefix(),
        os.fspath(lab_dir()),
        tuple(p + b),
        tuple(b),
        (host_info(1, p + b), *(host_info(n) for n in hosts)),
    )


def down(purge: bool = False) -> None:
    """Remove every guest with the lab prefix, stop what the lab started (by
    recorded PID: further hosts first) and remove the guests' disks. Other
    domains stay untouched. ``purge`` also removes the lab dir (database, kernel cache)."""
    t0 = time.monotonic()
    with locked():
        state = load_state()
        stop_hosts(state)
        save_state(state)
        have_libvirt = libvirt_answers(timeout=15) if which("virsh") else False
        if have_libvirt:
            for n in sorted(lab_domains()):
                log(f"destroying {n}")
                destroy_guest(n)
        for reg in lab_path("guests").glob("*.json") if lab_path("guests").exists() else []:
            with contextlib.suppress(ValueError, OSError):
                cleanup_guest_files(json.loads(reg.read_text())["name"])
        shutil.rmtree(lab_path("disks"), ignore_errors=True)
        procs = state.get("procs", {})
        stop_pid(procs.get("victoria-metrics") or {}, "victoria-metrics")
        if alive(procs.get("libvirtd")) and have_libvirt:
            others = [n for n in list_domains() if not n.startswith(prefix())]
            if others:
                log(f"note: {len(others)} non-lab domain(s) keep running without libvirtd")
        stop_pid(procs.get("libvirtd") or {}, "libvirtd")
        stop_pid(procs.get("virtlogd") or {}, "virtlogd")
        state["procs"] = {}
        save_state(state)
        if purge:
            keep = {"lock"}
            for child in lab_dir().iterdir():
                if child.name in keep:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
    log(f"lab down in {time.monotonic() - t0:.1f}s")


def status() -> dict[str, Any]:
    state = load_state()
    procs = {k: {"pid": v.get("pid"), "alive": alive(v)} for k, v in state.get("procs", {}).items()}
    doms = lab_domains() if libvirt_answers(timeout=5) else {}
    return {
        "lab_dir": os.fspath(lab_dir()),
        "prefix": prefix(),
        "db_port": state.get("db_port"),
        "procs": procs,
        "guests": doms,
        "hosts": hosts_status(state),
    }


def _quote(v: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_@%+:,./-]*", v):
        return v
    return "'" + v.replace("'", "'\\''") + "'"


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="lab", description="vmtelemetryd's real test lab")
    sub = ap.add_subparsers(dest="verb", required=True)
    u = sub.add_parser("up", help="install, start libvirtd, guests and the database")
    u.add_argument("--guests", type=int, default=DEFAULT_GUESTS, help="paused guests")
    u.add_argument("--busy", type=int, default=DEFAULT_BUSY, help="booted TCG guests")
    u.add_argument("--hosts", type=int, default=1, help="hypervisors (2: also hv2)")
    sub.add_parser("env", help="print the daemon's configuration for this lab")
    d = sub.add_parser("down", help="remove lab guests, stop what the lab started")
    d.add_argument("--purge", action="store_true", help="also delete the lab dir")
    q = sub.add_parser("query", help="export series from the lab database (JSONL)")
    q.add_argument("match", nargs="?", default='{__name__=~"vm.*"}')
    sub.add_parser("status", help="what runs")
    a = ap.parse_args(argv)
    try:
        if a.verb == "up":
            up(a.guests, a.busy, a.hosts)
        elif a.verb == "env":
            for k, v in env_vars().items():
                print(f"{k}={_quote(v)}")
        elif a.verb == "down":
            down(purge=a.purge)
        elif a.verb == "query":
            sys.stdout.write(export_raw(a.match))
        elif a.verb == "status":
            print(json.dumps(status(), indent=2, ensure_ascii=False))
    except (LabError, ValueError, OSError) as e:
        print(f"lab {a.verb}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
