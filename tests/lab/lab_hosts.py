"""The lab's hypervisors: host 1 is the machine's libvirtd; hosts 2.. are more.

A collector that samples several hosts needs hosts that are really apart: each
its own hostname, domain ids, guests, and a hang of its own (SIGSTOP of its
libvirtd stalls that host alone). Host N >= 2 ("hvN") is therefore a libvirtd
of its own in a mount + UTS namespace (LAB.md): private folders under the lab
dir (hosts/hvN/{etc,run,lib,log,cache}) are bind-mounted over libvirt's paths,
its sockets are in hosts/hvN/sock (reachable from outside the namespace), and
its daemons write their pid files to hosts/hvN. state.json records those PIDs
under "hosts", and only those processes are ever signalled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lab_guests import (
    cleanup_guest_files,
    create_guest,
    destroy_guest,
    is_current,
    is_lab_guest,
    lab_domains,
)
from lab_libvirtd import LIBVIRT_URI, libvirt_answers, list_domains, read_pidfile, set_conf
from lab_state import (
    LabError,
    alive,
    lab_path,
    load_state,
    log,
    prefix,
    record,
    run,
    save_state,
    stop_pid,
)

HOST_GUESTS = 2  # paused guests on each host after the first
START_TIMEOUT = 60.0
# libvirt's paths that each further host gets a private folder for
_PRIVATE = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
}
# Arguments: $1 hostname, $2 host dir, then pairs of (private folder, libvirt
# path). The new namespace (unshare) gets its hostname, folders and virtlogd;
# libvirtd is started in it then, or later in the one that virtlogd keeps (nsenter).
_ARGS = """h=$1; d=$2; shift 2
"""
_NEW_NAMESPACE = """hostname "$h"
while [ $# -gt 0 ]; do mount --bind "$1" "$2"; shift 2; done
virtlogd -d -p "$d/virtlogd.pid"
"""
_LIBVIRTD = """export LIBVIRT_LOG_OUTPUTS=3:file:/var/log/libvirt/libvirtd.log
libvirtd -d -p "$d/libvirtd.pid"
"""


@dataclasses.dataclass(frozen=True)
class HostInfo:
    """One hypervisor of the lab. ``uri`` is read-only (what a collector
    needs); ``rw_uri`` is what the lab creates guests with."""

    number: int
    hostname: str
    uri: str
    rw_uri: str
    guests: tuple[str, ...]


def host_name(n: int) -> str:
    return f"hv{n}"


def host_dir(n: int) -> Path:
    return lab_path("hosts", host_name(n))


def host_uris(n: int) -> tuple[str, str]:
    """Read-only and read-write URIs of host n >= 2 (its sockets' folder)."""
    sock = os.fspath(host_dir(n) / "sock")
    if len(sock.encode()) + len("/libvirt-sock-ro") > 107:
        raise LabError(f"lab dir too long for a unix socket path: {sock}")
    base = "qemu+unix:///system?socket=" + urllib.parse.quote(sock, safe="/")
    return f"{base}/libvirt-sock-ro", f"{base}/libvirt-sock"


def host_guest_names(n: int, count: int = HOST_GUESTS) -> list[str]:
    return [f"{prefix()}{host_name(n)}-paused-{i}" for i in range(1, count + 1)]


def host_info(n: int, guests: Sequence[str] = ()) -> HostInfo:
    """Where host n is (no changes made). Host 1's guests are the caller's."""
    if n == 1:
        return HostInfo(1, socket.gethostname(), LIBVIRT_URI, LIBVIRT_URI, tuple(guests))
    ro, rw = host_uris(n)
    return HostInfo(n, host_name(n), ro, rw, tuple(host_guest_names(n)))


def ensure_guests(paused: Sequence[str], busy: Sequence[str], uri: str = LIBVIRT_URI) -> int:
    """Reuse each guest on ``uri`` that runs as create_guest() would make it now;
    replace the others (unknown to this lab dir, whose wipe took the disks
    along, or made from an older XML or /init). Returns how many were created."""
    existing = lab_domains(uri)
    made = 0
    for n, is_busy in [(n, False) for n in paused] + [(n, True) for n in busy]:
        st = existing.get(n)
        # A paused busy guest is made anew: libvirt cannot resume it (see lab_guests).
        if (st == "running" or (st == "paused" and not is_busy)) and is_current(n):
            continue
        if st is not None:
            destroy_guest(n, uri=uri)
        create_guest(n, busy=is_busy, uri=uri)
        made += 1
    return made


def _resume(rec: dict[str, Any] | None) -> None:
    """SIGCONT a process of ours that a test left stopped (to hang its host)."""
    if rec is None or not alive(rec):
        return
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{rec['pid']}/stat").read_text()
        if stat[stat.rfind(")") + 2 :].split()[0] in ("T", "t"):
            log(f"{rec['comm']} (pid {rec['pid']}) was stopped: SIGCONT")
            os.kill(rec["pid"], signal.SIGCONT)


def _write_config(n: int) -> bool:
    """Host n's /etc/libvirt: the machine's top-level conf files only (its
    qemu/ holds the first host's domains and autostarted network), with its
    own socket folder and host UUID. True if a setting changed."""
    etc, sock = host_dir(n) / "etc", host_dir(n) / "sock"
    if '"' in os.fspath(sock) or "\\" in os.fspath(sock):
        raise LabError(f"lab dir unusable in libvirtd.conf: {sock}")
    if not etc.exists():
        tmp = etc.with_name(".etc.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in Path("/etc/libvirt").iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        tmp.rename(etc)
    host_uuid = uuid.uuid5(uuid.NAMESPACE_URL, f"vmtelemetryd-lab:{host_dir(n)}")
    changed = set_conf(
        etc / "libvirtd.conf",
        {"unix_sock_dir": f'"{sock}"', "auth_unix_ro": '"none"', "host_uuid": f'"{host_uuid}"'},
    )
    return set_conf(etc / "qemu.conf", {"user": '"root"', "group": '"root"'}) or changed


def _seed_qemu_caps(cache: Path) -> None:
    """The first host's probed QEMU capabilities, if this host has none: else
    its first guest and first cpu_total stats wait ~4 s for a probe. libvirt
    checks each file against the binary and probes again if it does not match."""
    src, dst = Path("/var/cache/libvirt/qemu/capabilities"), cache / "qemu" / "capabilities"
    if src.is_dir() and not dst.exists():
        with contextlib.suppress(OSError):
            shutil.copytree(src, dst)


def _start(n: int, state: dict[str, Any]) -> None:
    """Start host n's libvirtd: in the namespace its virtlogd keeps (QEMUs
    keep their log pipes), else with a virtlogd in a new namespace. Record
    the PIDs at once (even if the start fails half-way), wait until it answers."""
    d = host_dir(n)
    procs: dict[str, Any] = state.setdefault("hosts", {}).setdefault(str(n), {})
    if alive(procs.get("virtlogd")):
        new = []
        argv = ["nsenter", "-t", str(procs["virtlogd"]["pid"]), "--mount", "--uts"]
        script = _ARGS + _LIBVIRTD
    else:
        new = ["virtlogd"]
        argv = ["unshare", "--mount", "--uts", "--propagation", "private"]
        script = _ARGS + _NEW_NAMESPACE + _LIBVIRTD
        for sub in [*_PRIVATE, "sock", "log/qemu"]:
            (d / sub).mkdir(parents=True, exist_ok=True)
        for path in _PRIVATE.values():
            os.makedirs(path, exist_ok=True)
        _seed_qemu_caps(d / "cache")
    for comm in [*new, "libvirtd"]:
        (d / f"{comm}.pid").unlink(missing_ok=True)
    mounts = [os.fspath(x) for sub, path in _PRIVATE.items() for x in (d / sub, path)]
    cp = run([*argv, "sh", "-ec", script, "sh", host_name(n), d, *mounts], check=False, timeout=60)
    for comm in [*new, "libvirtd"]:
        with contextlib.suppress(LabError):
            wait = 15 if cp.returncode == 0 else 1
            procs[comm] = record(read_pidfile([os.fspath(d / f"{comm}.pid")], comm, wait, False))
    save_state(state)
    if cp.returncode != 0 or "libvirtd" not in procs:
        raise LabError(f"{host_name(n)}: starting libvirtd failed: {cp.stdout}{cp.stderr}")
    log(f"started {host_name(n)}: libvirtd pid {procs['libvirtd']['pid']}")
    ro, _ = host_uris(n)
    deadline = time.monotonic() + START_TIMEOUT
    while not libvirt_answers(timeout=5, uri=ro):
        if time.monotonic() > deadline or not alive(procs["libvirtd"]):
            logf = d / "log" / "libvirtd.log"
            tail = logf.read_text(errors="replace")[-2000:] if logf.exists() else ""
            raise LabError(f"{host_name(n)}'s libvirtd does not answer on {ro}\n{tail}")
        time.sleep(0.2)


def _stop_daemons(procs: dict[str, Any], n: int, comms: Sequence[str]) -> None:
    for comm in comms:
        _resume(procs.get(comm))
        stop_pid(procs.get(comm) or {}, f"{host_name(n)}'s {comm}")


def ensure_host(state: dict[str, Any], n: int) -> tuple[HostInfo, int]:
    """Host n >= 2 up with its guests, reusing what runs. Returns its
    HostInfo and how many guests were created."""
    procs = state.get("hosts", {}).get(str(n), {})
    changed = _write_config(n)
    ro, rw = host_uris(n)
    _resume(procs.get("libvirtd"))
    if changed or not alive(procs.get("libvirtd")) or not libvirt_answers(timeout=10, uri=ro):
        if alive(procs.get("libvirtd")):
            log(f"{host_name(n)}: config changed or no answer: restarting its libvirtd")
        _stop_daemons(procs, n, ["libvirtd"])
        _start(n, state)
    made = ensure_guests(host_guest_names(n), [], uri=rw)
    return host_info(n), made


def ensure_hosts(state: dict[str, Any], hosts: int) -> tuple[tuple[HostInfo, ...], int]:
    """Hosts 2..``hosts`` up (host 1 is lab_libvirtd's); further hosts that
    run are left alone, as up() leaves further guests alone."""
    infos, made = [], 0
    for n in range(2, hosts + 1):
        info, m = ensure_host(state, n)
        infos.append(info)
        made += m
    running = state.get("hosts", {})
    extra = [k for k, p in running.items() if int(k) > hosts and alive(p.get("libvirtd"))]
    if extra:
        log(f"also running (left alone): host(s) {', '.join(sorted(extra))}")
    return tuple(infos), made


def host_pid(n: int) -> int:
    """PID of host n's libvirtd, if the lab started it and it runs (tests
    SIGSTOP/SIGCONT it to hang that host)."""
    state = load_state()
    rec = state.get("procs", {}) if n == 1 else state.get("hosts", {}).get(str(n), {})
    if not alive(rec.get("libvirtd")):
        raise LabError(f"host {n}'s libvirtd is not one the lab started and runs")
    return int(rec["libvirtd"]["pid"])


def _kill_orphans(n: int) -> None:
    """Stop the QEMUs of lab guests host n's libvirtd left behind (it died, or
    does not answer): their pid files are in that host's private run folder."""
    for pidfile in (host_dir(n) / "run" / "qemu").glob("*.pid"):
        name = pidfile.name[: -len(".pid")]
        with contextlib.suppress(OSError, ValueError):
            rec = record(int(pidfile.read_text().strip()))
            if is_lab_guest(name) and rec["comm"].startswith("qemu-system"):
                stop_pid(rec, f"{host_name(n)}'s guest {name}")
                cleanup_guest_files(name)


def stop_hosts(state: dict[str, Any]) -> None:
    """Remove the lab's guests on every host >= 2 the lab started, stop its
    daemons (by recorded PID) and remove its folder. Other domains there are
    left alone: their QEMUs keep running, and the folder stays for them."""
    for key, procs in sorted(state.get("hosts", {}).items()):
        n = int(key)
        _, rw = host_uris(n)
        _resume(procs.get("libvirtd"))
        others: list[str] = []
        if alive(procs.get("libvirtd")) and libvirt_answers(timeout=15, uri=rw):
            for name in sorted(lab_domains(rw)):
                log(f"destroying {name} on {host_name(n)}")
                destroy_guest(name, uri=rw)
            others = [d for d in list_domains(rw) if not is_lab_guest(d)]
            if others:
                log(f"note: {len(others)} non-lab domain(s) on {host_name(n)} keep running")
        else:
            _kill_orphans(n)
        _stop_daemons(procs, n, ["libvirtd", "virtlogd"])
        if not others:
            shutil.rmtree(host_dir(n), ignore_errors=True)
    state["hosts"] = {}


def hosts_status(state: dict[str, Any]) -> dict[str, Any]:
    """What runs on each host >= 2 the lab recorded."""
    out = {}
    for key, procs in sorted(state.get("hosts", {}).items()):
        n = int(key)
        ro, _ = host_uris(n)
        answers = libvirt_answers(timeout=5, uri=ro)
        out[host_name(n)] = {
            "uri": ro,
            "answers": answers,
            "procs": {c: {"pid": r.get("pid"), "alive": alive(r)} for c, r in procs.items()},
            "guests": lab_domains(ro) if answers else {},
        }
    return out
