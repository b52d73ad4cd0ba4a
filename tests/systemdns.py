"""A real systemd as PID 1 of its own namespaces, to test the unit file as systemd runs it.

LAB.md: systemd 252 boots as PID 1 of a new PID namespace on these machines,
where it is not the machine's init. Booted naively it would reach far beyond
that namespace, so ``SystemdNS`` boots it like this:

- ``container=vmtelemetryd-test`` in PID 1's environment. systemd then knows it
  is not the machine's init: without it, it sets the kernel's clock and time
  zone and loads kernel modules at boot, and at power-off turns off the
  machine's swap, detaches its loop and DM devices and remounts its file
  systems read-only. (It also reads its "kernel command line" from its own
  argv instead of the machine's.) ``boot()`` checks that systemd saw it.
- New PID, mount (propagation private), UTS, IPC and cgroup namespaces; the
  network stays the machine's, for the lab's libvirtd and database.
- Private mounts, all in RAM and gone with the namespace: tmpfs on ``/run``
  (systemd's sockets, the journal, status.json) with the machine's
  ``/run/libvirt`` bound into it read-only, tmpfs on ``/tmp`` (its
  systemd-tmpfiles would empty the machine's), overlays on ``/etc``, ``/var``
  and ``/usr/bin`` (so ``systemd-sysusers`` adds the service user to a private
  ``/etc/passwd``, and the unit, the configuration, ``/usr/bin/vmtelemetryd``
  and the spool land in RAM), an empty ``/etc/systemd/system``, and
  ``/dev/console`` bound to a file (``console.log``) instead of the machine's
  console. ``SystemdNS(workdir, packages=True)`` overlays ``/usr`` and ``/opt``
  as well and puts an empty tmpfs on ``/lib/systemd/system``, so that ``dpkg -i``
  (whose database is in ``/var/lib/dpkg``) installs a package there in RAM.
- Its own cgroup: a new child of this process's cgroup2 cgroup, made the root
  of the cgroup namespace and mounted on ``/sys/fs/cgroup`` inside; removed
  after power-off.
- Only the project's own units: ``SYSTEMD_UNIT_PATH=/etc/systemd/system`` (no
  trailing ``:``, so neither /lib/systemd/system nor generators) holding a
  minimal boot target ``vmt-test.target``, journald, empty ``sysinit.target``
  and ``basic.target``, and the power-off chain. Nothing the machine has
  enabled (libvirtd, databases) can start here: ``Wants=`` in the unit under
  test name units that do not exist in the namespace. With ``packages=True``,
  ``/lib/systemd/system`` follows on the path: the emptied one, holding only
  what a package installed there.

Commands run inside through ``nsenter -t PID -p -m``; ``poweroff()`` is
``systemctl poweroff``, with SIGKILL of the namespace's PID 1 as the fallback.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
UNIT_DIR = REPO / "systemd"
SYSTEMD = Path("/lib/systemd/systemd")
SYSTEM_UNITS = Path("/lib/systemd/system")
CONTAINER = "vmtelemetryd-test"
BOOT_TARGET = "vmt-test.target"
CGROUP_PREFIX = "vmt-systemdns-"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Overlaid in RAM in every namespace (and /usr/bin after them).
OVERLAID = ("etc", "var")
# SystemdNS(packages=True): also overlaid, for dpkg to install into; and unit
# directories a package fills, found by systemd, but emptied (a tmpfs) first.
PACKAGE_OVERLAID = ("usr", "opt")
PACKAGE_UNIT_DIRS = ("/lib/systemd/system",)

# Units taken as they are from the machine: journald and the power-off chain.
COPIED_UNITS = (
    "systemd-journald.service",
    "systemd-journald.socket",
    "poweroff.target",
    "systemd-poweroff.service",
    "shutdown.target",
    "umount.target",
    "final.target",
)

OWN_UNITS = {
    "sysinit.target": """\
[Unit]
Description=System Initialization (empty in the test namespace)
DefaultDependencies=no
Conflicts=shutdown.target
Before=shutdown.target
""",
    "basic.target": """\
[Unit]
Description=Basic System (empty in the test namespace)
DefaultDependencies=no
Requires=sysinit.target
After=sysinit.target
Conflicts=shutdown.target
Before=shutdown.target
""",
    BOOT_TARGET: """\
[Unit]
Description=vmtelemetryd test namespace (tests/systemdns.py)
Requires=basic.target
After=basic.target
Wants=systemd-journald.socket systemd-journald.service
AllowIsolate=yes
""",
}

# journald: volatile (the machine's /var/log/journal is overlaid anyway), and
# not a second reader of the machine's kernel log.
JOURNALD_CONF = """\
[Journal]
Storage=volatile
ReadKMsg=no
"""

# Runs as PID 1 of the new namespaces, then becomes systemd. $1 is the stage
# directory (on the machine's /tmp, covered by the private /tmp below, so
# everything is copied out of it first).
LAUNCH = r"""
set -eu
STAGE=$1
# PID 1 writes its early messages to /dev/console: to a file, not the machine's console.
if [ -e /dev/console ]; then mount --bind "$STAGE/console.log" /dev/console; fi
if [ -d /run/libvirt ]; then
    mkdir -p "$STAGE/libvirt"
    mount --bind /run/libvirt "$STAGE/libvirt"
fi
mount -t tmpfs -o mode=0755,nosuid,nodev vmtns-run /run
SCRATCH=/run/vmtns
mkdir -p "$SCRATCH"
cp -a "$STAGE/units" "$SCRATCH/units"
cp -a "$STAGE/etc" "$SCRATCH/etc-add"
# A socket a test listens on under an overlaid path (a second libvirtd's): overlayfs
# would hide the listening socket, so the machine's directory is carried over it.
i=0
for dir in VMT_SOCKETS; do
    i=$((i + 1)); mkdir -p "$STAGE/sockets$i"; mount --bind "$dir" "$STAGE/sockets$i"
done
for dir in VMT_OVERLAYS; do
    name=$(echo "$dir" | tr / _)
    mkdir -p "$SCRATCH/$name.upper" "$SCRATCH/$name.work"
    mount -t overlay -o "lowerdir=/$dir,upperdir=$SCRATCH/$name.upper,workdir=$SCRATCH/$name.work" \
        "vmtns-$name" "/$dir"
done
i=0
for dir in VMT_SOCKETS; do
    i=$((i + 1)); mount --move "$STAGE/sockets$i" "$dir"
done
if [ -d "$STAGE/libvirt" ]; then
    mkdir -p /run/libvirt
    mount --move "$STAGE/libvirt" /run/libvirt
    mount -o remount,bind,ro /run/libvirt
fi
# This checkout and its venv may live under /tmp: carried across the private /tmp.
i=0
for keep in VMT_KEEP; do
    i=$((i + 1)); mkdir -p "$SCRATCH/keep$i"; mount --bind "$keep" "$SCRATCH/keep$i"
done
mount -t tmpfs -o mode=1777,nosuid,nodev vmtns-tmp /tmp
i=0
for keep in VMT_KEEP; do
    i=$((i + 1)); mkdir -p "$keep"; mount --move "$SCRATCH/keep$i" "$keep"
done
mount -t tmpfs -o mode=0755 vmtns-units /etc/systemd/system
for dir in VMT_EMPTIED; do
    mount -t tmpfs -o mode=0755 vmtns-emptied "$dir"
done
cp -a "$SCRATCH/units/." /etc/systemd/system/
cp -a "$SCRATCH/etc-add/." /etc/
mount -t cgroup2 cgroup2 /sys/fs/cgroup
# Shared, as systemd makes "/" on a real host (though not in a container): it
# sets up /run/credentials/UNIT in a child mount namespace that must propagate
# back. These are new peer groups of this namespace's own; nothing reaches
# the machine's mounts, which unshare made private above.
mount --make-rshared /
exec env -i container=VMT_CONTAINER SYSTEMD_UNIT_PATH=VMT_UNITS PATH=VMT_PATH \
    LANG=C.UTF-8 VMT_SYSTEMD --system --unit=VMT_TARGET --log-level=info
"""


class SystemdNSError(RuntimeError):
    """The namespace could not be booted, or a command in it failed."""


def cannot_boot_reason() -> str | None:
    """Why no systemd can boot in a namespace on this machine; None if it can."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, a cgroup)"
    for tool in ("unshare", "nsenter", "setpriv", "systemctl", "journalctl", "systemd-sysusers"):
        if shutil.which(tool, path=PATH) is None:
            return f"{tool} is not installed"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is not installed"
    missing = [u for u in COPIED_UNITS if not (SYSTEM_UNITS / u).exists()]
    if missing:
        return f"systemd's own units are missing from {SYSTEM_UNITS}: {', '.join(missing)}"
    filesystems = Path("/proc/filesystems").read_text()
    if "\toverlay\n" not in filesystems:
        return "the kernel has no overlay file system"
    if _cgroup2() is None:
        return "no cgroup2 hierarchy is mounted"
    return None


def _cgroup2() -> Path | None:
    """This process's cgroup in the cgroup2 hierarchy (a directory), if one is mounted."""
    mount = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[0] == "cgroup2":
            mount = left.split()[4]
            break
    if mount is None:
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return Path(mount) / line[3:].lstrip("/")
    return None


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _ns_pid_one(pid: int) -> bool:
    """Whether host PID ``pid`` is PID 1 of a PID namespace below ours (NSpid: PID 1)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            ids = line.split()[1:]
            return len(ids) == 2 and ids[1] == "1"
    return False


_live: set[SystemdNS] = set()


@atexit.register
def _kill_leftovers() -> None:
    for ns in list(_live):
        ns.close(graceful=False)


class SystemdNS:
    """One booted systemd; ``with SystemdNS(workdir) as ns:`` boots it and powers it off.

    ``packages=True`` readies it for installing a package with dpkg: ``/usr`` and
    ``/opt`` are overlaid too (in RAM, like ``/etc`` and ``/var``, which hold dpkg's
    database), and systemd also loads units from ``/lib/systemd/system``, where a
    package puts them, over an empty tmpfs: the machine's own units stay out of reach.
    """

    def __init__(
        self, workdir: Path, *, packages: bool = False, sockets: Sequence[Path] = ()
    ) -> None:
        self.workdir = workdir
        self.packages = packages
        self.sockets = tuple(sockets)  # directories of the machine's listening sockets
        self.stage = workdir / "systemdns"
        self.console = self.stage / "console.log"
        self.pid = 0
        self._unshare: subprocess.Popen[bytes] | None = None
        self._cgroup: Path | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> SystemdNS:
        return self.boot()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def boot(self, timeout: float = 60) -> SystemdNS:
        reason = cannot_boot_reason()
        if reason:
            raise SystemdNSError(f"systemd cannot boot in a namespace here: {reason}")
        self._stage()
        parent = _cgroup2()
        assert parent is not None
        _remove_stale_cgroups(parent)
        self._cgroup = parent / f"{CGROUP_PREFIX}{os.getpid()}-{id(self):x}"
        self._cgroup.mkdir()
        launch = (
            LAUNCH.replace("VMT_CONTAINER", CONTAINER)
            .replace("VMT_PATH", PATH)
            .replace("VMT_SYSTEMD", str(SYSTEMD))
            .replace("VMT_TARGET", BOOT_TARGET)
            .replace("VMT_KEEP", " ".join(shlex.quote(str(p)) for p in checkout_paths_under(TMP)))
            .replace("VMT_OVERLAYS", " ".join(self._overlays()))
            .replace("VMT_SOCKETS", " ".join(shlex.quote(str(p)) for p in self.sockets))
            .replace("VMT_EMPTIED", " ".join(PACKAGE_UNIT_DIRS if self.packages else ()))
            .replace("VMT_UNITS", ":".join(self._unit_path()))
        )
        (self.stage / "launch.sh").write_text(launch)
        # The shell moves itself into the new cgroup, then becomes unshare,
        # whose child (PID 1 inside) runs launch.sh and then systemd. Should
        # this process die without close(), unshare gets SIGKILL (pdeathsig)
        # and takes the namespace with it (--kill-child).
        outer = (
            'echo $$ > "$1/cgroup.procs" && exec setpriv --pdeathsig KILL -- unshare --pid'
            " --fork --kill-child=SIGKILL --mount-proc --mount --uts --ipc --cgroup"
            ' --propagation private /bin/sh "$2/launch.sh" "$2"'
        )
        with (self.stage / "unshare.log").open("ab") as log:
            self._unshare = subprocess.Popen(
                ["/bin/sh", "-c", outer, "sh", str(self._cgroup), str(self.stage)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": PATH, "LANG": "C.UTF-8"},
                start_new_session=True,
            )
        _live.add(self)
        try:
            self._wait_booted(timeout)
        except BaseException:
            self.close(graceful=False)
            raise
        return self

    def _overlays(self) -> list[str]:
        """The directories overlaid in RAM, as paths relative to /, parents first."""
        return [*OVERLAID, *(PACKAGE_OVERLAID if self.packages else ()), "usr/bin"]

    def _unit_path(self) -> list[str]:
        return ["/etc/systemd/system", *(PACKAGE_UNIT_DIRS if self.packages else ())]

    def _stage(self) -> None:
        units = self.stage / "units"
        units.mkdir(parents=True, exist_ok=True)
        for name in COPIED_UNITS:
            shutil.copyfile(SYSTEM_UNITS / name, units / name)
        for name, text in OWN_UNITS.items():
            (units / name).write_text(text)
        (units / "default.target").unlink(missing_ok=True)
        (units / "default.target").symlink_to(BOOT_TARGET)
        journald = self.stage / "etc" / "systemd" / "journald.conf.d"
        journald.mkdir(parents=True, exist_ok=True)
        (journald / "vmt-test.conf").write_text(JOURNALD_CONF)
        self.console.touch()

    def _wait_booted(self, timeout: float) -> None:
        assert self._unshare is not None
        deadline = time.monotonic() + timeout
        while not self.pid:
            if self._unshare.poll() is not None or time.monotonic() > deadline:
                raise SystemdNSError(f"the namespace did not start\n{self.diagnostics()}")
            kids = _children(self._unshare.pid)
            if kids and _ns_pid_one(kids[0]) and _comm(kids[0]) == "systemd":
                self.pid = kids[0]
            else:
                time.sleep(0.05)
        state = ""
        while state not in ("running", "degraded"):
            if self._unshare.poll() is not None or time.monotonic() > deadline:
                raise SystemdNSError(f"systemd did not boot ({state!r})\n{self.diagnostics()}")
            time.sleep(0.1)
            state = self.systemctl("is-system-running", check=False).stdout.strip()
        virt = self.run("systemd-detect-virt", "--container", check=False).stdout.strip()
        if virt in ("", "none"):
            # Never power off a systemd that may think it is the machine's init.
            raise SystemdNSError(f"systemd did not see container={CONTAINER} ({virt!r})")

    def poweroff(self, timeout: float = 30) -> None:
        """``systemctl poweroff``: every unit is stopped as on a real host, then PID 1 exits."""
        if self._unshare is None or self._unshare.poll() is not None:
            return
        self.systemctl("--no-block", "--check-inhibitors=no", "poweroff", check=False)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._unshare.wait(timeout)

    def close(self, graceful: bool = True) -> None:
        """Power off (or kill) the namespace and remove its cgroup."""
        if self._unshare is not None:
            if graceful and self.pid:
                with contextlib.suppress(SystemdNSError, subprocess.SubprocessError):
                    self.poweroff()
            if self._unshare.poll() is None:
                self._kill()
            self._unshare.wait(30)
        self._remove_cgroup()
        _live.discard(self)

    def _kill(self) -> None:
        """SIGKILL the namespace's PID 1: the kernel then kills everything in it."""
        assert self._unshare is not None
        for pid in _children(self._unshare.pid):
            if _ns_pid_one(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._unshare.wait(15)
        if self._unshare.poll() is None:
            self._unshare.kill()

    def _remove_cgroup(self) -> None:
        cgroup, self._cgroup = self._cgroup, None
        if cgroup is not None:
            _remove_cgroup_tree(cgroup, timeout=10)

    # ------------------------------------------------------------------ commands

    def run(
        self,
        *argv: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """A command inside the namespace (its PID and mount namespaces)."""
        if not self.pid:
            raise SystemdNSError("the namespace is not running")
        environment = {
            "PATH": PATH,
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "SYSTEMD_COLORS": "0",
            "SYSTEMD_PAGER": "",
            **(env or {}),
        }
        cmd = ["nsenter", "-t", str(self.pid), "-p", "-m", "--", *argv]
        result = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=environment,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise SystemdNSError(
                f"{shlex.join(argv)}: exit status {result.returncode}\n"
                f"{result.stdout}{result.stderr}".rstrip()
            )
        return result

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show`` properties of ``unit`` as strings."""
        out = self.systemctl("show", unit, "--property=" + ",".join(properties)).stdout
        values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        return {p: values.get(p, "") for p in properties}

    def journal(self, *args: str) -> str:
        return self.run("journalctl", "--no-pager", *args).stdout

    def write(self, path: str, text: str, mode: int = 0o644, owner: str = "root:root") -> None:
        """Atomically replace ``path`` inside the namespace."""
        script = (
            'umask 022 && mkdir -p "$(dirname "$1")" && umask 077 && cat > "$1.new"'
            ' && chown "$3" "$1.new"'
            ' && chmod "$2" "$1.new" && mv -f "$1.new" "$1"'
        )
        self.run("/bin/sh", "-c", script, "sh", path, f"{mode:o}", owner, input=text)

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout

    def remove(self, *paths: str) -> None:
        self.run("rm", "-f", *paths)

    def diagnostics(self) -> str:
        """What to show when something went wrong: the launcher's and PID 1's output."""
        parts = []
        for name in ("unshare.log", "console.log"):
            path = self.stage / name
            if path.exists():
                parts.append(f"--- {name} ---\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _depth(path: Path) -> int:
    return len(path.parts)


def _remove_cgroup_tree(cgroup: Path, timeout: float) -> None:
    """rmdir a cgroup and its children, deepest first, once their processes are gone."""
    deadline = time.monotonic() + timeout
    while cgroup.exists():
        dirs = sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=_depth, reverse=True)
        try:
            for d in [*dirs, cgroup]:
                d.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _remove_stale_cgroups(parent: Path) -> None:
    """Cgroups left by a test process that died without close() (its namespace died with it)."""
    for cgroup in parent.glob(f"{CGROUP_PREFIX}*"):
        owner = cgroup.name[len(CGROUP_PREFIX) :].split("-")[0]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            with contextlib.suppress(OSError):
                _remove_cgroup_tree(cgroup, timeout=2)


# ---------------------------------------------------------------------- the service

SERVICE = "vmtelemetryd.service"
CONFIG_PATH = "/etc/vmtelemetryd/vmtelemetryd.env"
TOKEN_PATH = "/etc/vmtelemetryd/influx-token"
STATUS_PATH = "/run/vmtelemetryd/status.json"
DROPIN_DIR = f"/etc/systemd/system/{SERVICE}.d"
PROTECTED_HOMES = (Path("/root"), Path("/home"), Path("/run/user"))
TMP = Path("/tmp")


def checkout_paths_under(top: Path) -> list[Path]:
    """The outermost of this checkout, its venv and its interpreter that lie below ``top``."""
    needed = sorted({Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), REPO})
    below = [p for p in needed if p.is_relative_to(top)]
    return [p for p in below if not any(p != q and p.is_relative_to(q) for q in below)]


@contextlib.contextmanager
def booted_for_test(
    workdir: Path, *, packages: bool = False, sockets: Sequence[Path] = ()
) -> Iterator[SystemdNS]:
    """A booted namespace for one test, skipped with the reason where systemd cannot boot.

    At the end its journal is saved in ``workdir`` and printed: pytest shows it
    for a test that failed.
    """
    reason = cannot_boot_reason()
    if reason:
        pytest.skip(f"systemd cannot boot in a namespace here: {reason}")
    with SystemdNS(workdir, packages=packages, sockets=sockets) as booted:
        try:
            yield booted
        finally:
            with contextlib.suppress(Exception):
                journal = booted.journal("-o", "short-monotonic")
                (workdir / "journal.txt").write_text(journal)
                print("--- journal (last 80 lines) ---")
                print("\n".join(journal.splitlines()[-80:]))


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, every: float = 0.1) -> T:
    """Poll ``probe`` until it gives something true, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def lab_service_config(lab: Any, tag_prefix: str, **overrides: object) -> dict[str, str]:
    """The service's configuration file for the lab, under a HOST_TAG of its own.

    The token is not in it: it comes as the credential.
    """
    config = {
        "LIBVIRT_URI": lab.libvirt_uri,
        "INFLUX_URL": lab.influx_url,
        "INFLUX_DB": lab.influx_db,
        "INFLUX_WRITE_API": lab.write_api,
        "HOST_TAG": f"{tag_prefix}-{uuid.uuid4().hex[:10]}",
        "DOMAINS_INCLUDE": f"{lab.prefix}*",
        "POLL_INTERVAL": "0.5",
        "BATCH_MAX_SEC": "0.5",
    }
    config.update({k: str(v) for k, v in overrides.items()})
    return config


def dotenv(config: Mapping[str, str]) -> str:
    return "".join(f"{name}={value}\n" for name, value in config.items())


def install_vmtelemetryd(
    ns: SystemdNS,
    config: Mapping[str, str],
    *,
    token: str | None,
    dropins: Mapping[str, str] | None = None,
) -> None:
    """Install vmtelemetryd into the namespace as its package would, from this checkout.

    The unit, sysusers.d and tmpfiles.d files from systemd/; /usr/bin/vmtelemetryd
    runs this checkout's venv; ``config`` becomes /etc/vmtelemetryd/vmtelemetryd.env
    and ``token`` /etc/vmtelemetryd/influx-token (the credential). ``dropins``
    maps drop-in file names to their text.
    """
    command = Path(sys.executable).parent / "vmtelemetryd"
    if not command.exists():
        raise SystemdNSError(f"no {command}: run the tests with the venv's python")
    ns.write(f"/etc/systemd/system/{SERVICE}", (UNIT_DIR / SERVICE).read_text())
    ns.write("/etc/sysusers.d/vmtelemetryd.conf", (UNIT_DIR / "vmtelemetryd.sysusers").read_text())
    ns.write("/etc/tmpfiles.d/vmtelemetryd.conf", (UNIT_DIR / "vmtelemetryd.tmpfiles").read_text())
    ns.write(
        "/usr/bin/vmtelemetryd",
        f'#!/bin/sh\nexec {shlex.quote(str(command))} "$@"\n',
        mode=0o755,
    )
    ns.run("systemd-sysusers", "/etc/sysusers.d/vmtelemetryd.conf")
    ns.write(CONFIG_PATH, dotenv(config), mode=0o640)
    if token is not None:
        ns.write(TOKEN_PATH, token + "\n", mode=0o600)
    # What the package's postinst does after sysusers: the config becomes root:vmtelemetry 0640.
    ns.run("systemd-tmpfiles", "--create", "/etc/tmpfiles.d/vmtelemetryd.conf")
    for name, text in {**interpreter_dropin(), **(dropins or {})}.items():
        ns.write(f"{DROPIN_DIR}/{name}", text)
    ns.systemctl("daemon-reload")


def interpreter_dropin() -> dict[str, str]:
    """A drop-in that lets the service reach this checkout's Python where the unit hides it.

    A package runs /usr/bin/python3; a checkout's venv may be built on an
    interpreter under /root or /home (pyenv), which ProtectHome=yes makes
    unreachable, and the checkout itself may lie under /tmp, which
    PrivateTmp=yes replaces. Then only those directories are bound in, read
    only (ProtectHome=tmpfs keeps an empty /root or /home to bind into).
    Every path must also be readable by the service user: checked here, with
    the reason if not.
    """
    needed = [Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), REPO]
    homes = [p for top in PROTECTED_HOMES for p in checkout_paths_under(top)]
    hidden = homes + checkout_paths_under(TMP)
    for path in needed:
        top = next((p for p in hidden if path.is_relative_to(p)), None)
        _check_world_readable(path, below=top)
    if not hidden:
        return {}
    binds = " ".join(str(p) for p in hidden)
    protect_home = "ProtectHome=tmpfs\n" if homes else ""
    return {
        "10-test-interpreter.conf": (
            "# tests/systemdns.py: this checkout's Python lives where the unit hides it.\n"
            f"[Service]\n{protect_home}BindReadOnlyPaths={binds}\n"
        )
    }


def _check_world_readable(path: Path, below: Path | None) -> None:
    """Every directory from / (or from the bind mount ``below``) down to ``path`` is o+rx."""
    chain: Iterable[Path] = [path, *path.parents]
    for step in chain:
        if below is not None and not step.is_relative_to(below):
            break
        mode = step.stat().st_mode
        if mode & 0o005 != 0o005:
            raise SystemdNSError(
                f"{step} (mode {mode & 0o7777:o}) is not readable and searchable by other"
                f" users: the service user vmtelemetry cannot reach {path}"
            )
