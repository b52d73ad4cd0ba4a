"""The libvirtd the lab's guests run under, virsh, and the service user it must know.

One libvirtd serves the whole machine (LAB.md): the lab starts one only when
none answers, records its PID so that only that one is ever stopped or
restarted, and configures it for this machine (QEMU as root for /dev/kvm, a
read-only socket without polkit for a non-root collector).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lab_state import (
    LabError,
    alive,
    command_env,
    lab_path,
    load_state,
    locked,
    log,
    pids_named,
    proc_comm,
    proc_start,
    record,
    run,
    save_state,
    stop_pid,
    which,
    write_atomic,
)

LIBVIRT_URI = "qemu:///system"
SYSUSERS_FILE = Path(__file__).resolve().parents[2] / "systemd" / "vmtelemetryd.sysusers"


def set_conf(path: Path, settings: dict[str, str]) -> bool:
    """Make ``key = value`` lines in a libvirt conf file say what we want:
    comment out any other active setting of the key, append ours. True if changed."""
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines()
    changed = False
    for key, value in settings.items():
        pat = re.compile(rf"^\s*{re.escape(key)}\s*=\s*(.*?)\s*(#.*)?$")
        active = {i: m.group(1) for i, ln in enumerate(lines) if (m := pat.match(ln))}
        if active and all(v == value for v in active.values()):
            continue
        for i in active:
            lines[i] = "#" + lines[i]
        lines += [
            "# set by the vmtelemetryd test lab (tests/lab/lab_libvirtd.py)",
            f"{key} = {value}",
        ]
        changed = True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
        write_atomic(path, "\n".join(lines) + "\n", mode)
    return changed


def libvirt_answers(timeout: float = 10, uri: str = LIBVIRT_URI) -> bool:
    """Whether a libvirtd answers on ``uri`` within ``timeout`` (a SIGSTOPped
    one accepts the connection and then never answers)."""
    try:
        cp = run(["virsh", "-c", uri, "uri"], check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return cp.returncode == 0


def pids_here(comm: str) -> list[int]:
    """PIDs named ``comm`` in this mount namespace: a second host's daemons
    (lab_hosts) run in namespaces of their own and must not count as ours."""
    here = os.readlink("/proc/self/ns/mnt")
    out = []
    for pid in pids_named(comm):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/ns/mnt") == here:
                out.append(pid)
    return out


def read_pidfile(paths: Sequence[str], comm: str, timeout: float = 15, guess: bool = True) -> int:
    """The PID a daemon wrote to one of ``paths``; with ``guess``, the only
    process of that name here if it wrote none."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in paths:
            with contextlib.suppress(OSError, ValueError):
                pid = int(Path(p).read_text().strip())
                if proc_comm(pid) == comm and proc_start(pid):
                    return pid
        time.sleep(0.1)
    pids = pids_here(comm) if guess else []
    if len(pids) == 1:
        return pids[0]
    raise LabError(f"{comm} -d started but no pidfile in {paths}")


def _start_daemon(comm: str, pidfiles: Sequence[str], extra_env: dict[str, str]) -> dict[str, Any]:
    binary = which(comm) or f"/usr/sbin/{comm}"
    env = command_env() | extra_env
    cp = run([binary, "-d"], check=False, env=env, timeout=60)
    if cp.returncode != 0:
        raise LabError(f"{comm} -d failed: {cp.stdout}{cp.stderr}")
    pid = read_pidfile(pidfiles, comm)
    log(f"started {comm} (pid {pid})")
    return record(pid)


def _start_libvirtd(state: dict[str, Any]) -> None:
    """libvirtd -d (and virtlogd -d first, if none runs), until it answers."""
    if not pids_here("virtlogd"):
        state.setdefault("procs", {})["virtlogd"] = _start_daemon(
            "virtlogd", ["/run/virtlogd.pid", "/var/run/virtlogd.pid"], {}
        )
    env = {}
    logf = lab_path("libvirtd.log")
    if not re.search(r"\s", os.fspath(logf)):
        env["LIBVIRT_LOG_OUTPUTS"] = f"3:file:{logf}"
    state.setdefault("procs", {})["libvirtd"] = _start_daemon(
        "libvirtd", ["/run/libvirtd.pid", "/var/run/libvirtd.pid"], env
    )
    deadline = time.monotonic() + 60
    while not libvirt_answers():
        if time.monotonic() > deadline or not alive(state["procs"]["libvirtd"]):
            tail = logf.read_text(errors="replace")[-2000:] if logf.exists() else ""
            raise LabError(f"libvirtd started but does not answer on {LIBVIRT_URI}\n{tail}")
        time.sleep(0.2)


def ensure_libvirtd(state: dict[str, Any]) -> None:
    """A libvirtd answering on qemu:///system; started (with virtlogd) if none runs."""
    qemu_changed = set_conf(Path("/etc/libvirt/qemu.conf"), {"user": '"root"', "group": '"root"'})
    conf_changed = set_conf(Path("/etc/libvirt/libvirtd.conf"), {"auth_unix_ro": '"none"'})
    if qemu_changed or conf_changed:
        log("wrote /etc/libvirt/qemu.conf (user/group root) / libvirtd.conf (auth_unix_ro none)")
    for d in ("/var/log/libvirt", "/var/run/libvirt", "/var/log/libvirt/qemu"):
        os.makedirs(d, exist_ok=True)
    procs = state.setdefault("procs", {})
    if libvirt_answers():
        if qemu_changed or conf_changed:
            if alive(procs.get("libvirtd")):
                log("config changed: restarting the lab's libvirtd")
                stop_pid(procs["libvirtd"], "libvirtd")
                _start_libvirtd(state)
            else:
                log(
                    "WARNING: a libvirtd the lab did not start is running with an older "
                    "config; QEMU may not be able to open /dev/kvm until it restarts"
                )
        return
    if pids_here("libvirtd"):
        # someone is starting one right now: give it a moment before starting ours
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if libvirt_answers():
                return
            time.sleep(0.5)
    _start_libvirtd(state)


def restart_libvirtd() -> int:
    """Stop the libvirtd the lab started (by its recorded PID) and start it again.
    Guests keep running (libvirtd reconnects to them). Returns the new PID."""
    with locked():
        state = load_state()
        rec = state.get("procs", {}).get("libvirtd")
        if not alive(rec):
            raise LabError("the running libvirtd was not started by the lab: not restarting it")
        stop_pid(rec, "libvirtd")
        _start_libvirtd(state)
        save_state(state)
        return int(state["procs"]["libvirtd"]["pid"])


def virsh(
    *args: str, check: bool = True, timeout: float = 120, uri: str = LIBVIRT_URI
) -> subprocess.CompletedProcess[str]:
    """virsh on ``uri``: the default host's libvirtd, or another host's socket."""
    return run(["virsh", "-q", "-c", uri, *args], check=check, timeout=timeout)


def list_domains(uri: str = LIBVIRT_URI) -> dict[str, str]:
    """Every domain libvirt knows on ``uri`` (name -> state word). Names with a
    newline are not supported."""
    cp = virsh("list", "--all", "--name", uri=uri)
    names = [n for n in cp.stdout.split("\n") if n]
    out = {}
    for n in names:
        st = virsh("domstate", n, check=False, uri=uri)
        out[n] = st.stdout.strip() if st.returncode == 0 else "gone"
    return out


def ensure_service_user() -> None:
    """The daemon's system user, made from the package's own sysusers.d file.

    libvirtd names each client after its uid and refuses one it cannot name
    ("Failed to find user record"), so the user must exist on the machine the
    lab's libvirtd runs on, not only inside a test's systemd namespace.
    """
    if subprocess.run(["getent", "passwd", "vmtelemetry"], capture_output=True).returncode:
        run(["systemd-sysusers", str(SYSUSERS_FILE)])
