"""The real test lab: a libvirtd with KVM/TCG guests and a line-protocol database.

Standard library only: ``tests/lab/lab`` runs this before any venv exists.

What ``up()`` gives (see /work/shared/LAB.md for why each piece is the way it is):

* the Debian packages the lab needs, installed when missing;
* ``/etc/libvirt/qemu.conf`` with ``user``/``group`` root (QEMU must open
  /dev/kvm) and ``libvirtd.conf`` with ``auth_unix_ro = "none"`` (no polkit
  here; a non-root collector needs the read-only socket), written before
  libvirtd starts;
* ``virtlogd -d`` and ``libvirtd -d`` when no libvirtd answers, their PIDs
  recorded in the lab dir so that only those are ever stopped;
* N paused guests (transient, created paused, KVM when /dev/kvm exists, else
  TCG) and M busy guests (TCG, a tiny Linux built from Debian packages that
  keeps writing vda, reading vdb, sending ARP on eth0 and holding memory).
  Every guest has one real tap NIC and two qcow2 disks (vda, vdb);
* victoria-metrics on a free 127.0.0.1 port, storage in the lab dir.

Everything lives under ``VMT_LAB_DIR`` (default /var/lib/vmtelemetryd-lab);
every guest name starts with ``VMT_LAB_PREFIX`` (default ``vmtlab-``). The lab
only ever touches domains with that prefix and processes it started itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

DEFAULT_LAB_DIR = "/var/lib/vmtelemetryd-lab"
DEFAULT_PREFIX = "vmtlab-"
LIBVIRT_URI = "qemu:///system"
INFLUX_DB = "lab"
INFLUX_TOKEN = "lab-token"  # victoria-metrics ignores it
WRITE_API = "v2"  # victoria-metrics has no /api/v3/write_lp

DEFAULT_GUESTS = 3
DEFAULT_BUSY = 1
GUEST_MEMORY_MIB = 128
DISK_SIZE = "16M"
TCG_TB_CACHE_MIB = 32
BUSY_READY_TIMEOUT = 180.0  # seconds of host time for a TCG boot on a loaded 2-core box
BUSY_READY_MARK = "busy guest up"

# Debian packages the lab needs (LAB.md); libvirt-dev + pkg-config build libvirt-python.
PACKAGES = (
    "libvirt-daemon-system",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
    "qemu-system-x86",
    "qemu-utils",
    "dnsmasq-base",
    "libvirt-dev",
    "pkg-config",
    "victoria-metrics",
    "busybox-static",
    "cpio",
)

# insmod order matters: virtio needs virtio_ring's symbols, and so on (LAB.md).
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_balloon",
)

# The busy guest's /init. The kernel command line carries this guest's
# address (vmtlab.addr) and the never-answering on-link peer it ARPs for
# (vmtlab.peer); both are link-local, so nothing is routed anywhere: the
# frames end in the host's unbridged tap device.
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
echo "vmtlab: loading virtio modules"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
         virtio_blk failover net_failover virtio_net virtio_balloon; do
    [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko
done
ADDR=169.254.10.2
PEER=169.254.10.1
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmtlab.addr=*) ADDR="${arg#vmtlab.addr=}" ;;
        vmtlab.peer=*) PEER="${arg#vmtlab.peer=}" ;;
    esac
done
n=0
while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ] || [ ! -d /sys/class/net/eth0 ]; do
    n=$((n + 1))
    [ $n -gt 100 ] && { echo "vmtlab: devices missing"; ls /dev /sys/class/net; break; }
    sleep 0.1
done
ip link set lo up
ip link set eth0 up
ip addr add "$ADDR/16" dev eth0
# hold some memory so the balloon's usable/available say something
mount -t tmpfs -o size=48m tmpfs /mnt
dd if=/dev/zero of=/mnt/hold bs=1M count=32 2>/dev/null
echo "vmtlab: eth0 $ADDR, peer $PEER, holding 32 MiB"
echo "busy guest up"
i=0
while :; do
    off=$((i % 2000))
    dd if=/dev/urandom of=/dev/vda bs=4k count=8 seek=$off oflag=direct conv=notrunc 2>/dev/null
    dd if=/dev/vdb of=/dev/null bs=4k count=8 skip=$off iflag=direct 2>/dev/null
    arping -c 1 -w 1 -I eth0 "$PEER" >/dev/null 2>&1
    ping -c 1 -W 1 "$PEER" >/dev/null 2>&1
    i=$((i + 1))
done
"""


SYSUSERS_FILE = Path(__file__).resolve().parents[2] / "systemd" / "vmtelemetryd.sysusers"


class LabError(RuntimeError):
    """The lab could not be brought to the state asked for."""


@dataclasses.dataclass(frozen=True)
class LabInfo:
    """Where the lab's pieces are. ``guests`` is every lab guest made by up()
    (paused ones first, then busy ones); ``busy_guests`` the booted subset."""

    libvirt_uri: str
    influx_url: str
    influx_db: str
    influx_token: str
    write_api: str
    prefix: str
    lab_dir: str
    guests: tuple[str, ...]
    busy_guests: tuple[str, ...]

    @property
    def paused_guests(self) -> tuple[str, ...]:
        return tuple(g for g in self.guests if g not in self.busy_guests)

    def env(self) -> dict[str, str]:
        """The daemon's configuration for this lab, as environment variables."""
        return env_vars(self.influx_url)


# --------------------------------------------------------------------------- basics

_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[lab {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def lab_dir() -> Path:
    return Path(os.environ.get("VMT_LAB_DIR") or DEFAULT_LAB_DIR)


def prefix() -> str:
    return os.environ.get("VMT_LAB_PREFIX") or DEFAULT_PREFIX


def _p(*parts: str) -> Path:
    return lab_dir().joinpath(*parts)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["LC_ALL"] = "C.UTF-8"
    env["LANG"] = "C.UTF-8"
    # root's tools live in sbin, which a CI environment may leave out of PATH
    path = env.get("PATH", "")
    for extra in ("/usr/local/sbin", "/usr/sbin", "/sbin"):
        if extra not in path.split(":"):
            path = f"{path}:{extra}" if path else extra
    env["PATH"] = path
    return env


def _which(cmd: str) -> str | None:
    return shutil.which(cmd, path=_env()["PATH"])


def _run(
    args: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    timeout: float = 120,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    argv = [os.fspath(a) for a in args]
    try:
        cp = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="surrogateescape",
            timeout=timeout,
            cwd=cwd,
            env=env or _env(),
        )
    except FileNotFoundError as e:
        raise LabError(f"{argv[0]}: not found ({e})") from e
    if check and cp.returncode != 0:
        raise LabError(
            f"command failed ({cp.returncode}): {' '.join(argv)}\n{cp.stdout}{cp.stderr}".rstrip()
        )
    return cp


_LOCK = threading.RLock()
_lock_depth = 0
_lock_fd: int | None = None


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise lab changes between processes (flock) and threads (RLock).
    Re-entrant within one process, so up() may call create_guest()."""
    global _lock_depth, _lock_fd
    with _LOCK:
        if _lock_depth == 0:
            d = lab_dir()
            d.mkdir(parents=True, exist_ok=True)
            fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            _lock_fd = fd
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
            if _lock_depth == 0 and _lock_fd is not None:
                os.close(_lock_fd)
                _lock_fd = None


def _write_atomic(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _load_state() -> dict:
    try:
        return json.loads(_p("state.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _save_state(state: dict) -> None:
    _write_atomic(_p("state.json"), json.dumps(state, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- processes


def _proc_start(pid: int) -> str | None:
    """Start time of a live (non-zombie) process, to tell a PID from its reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat[stat.rfind(")") + 2 :].split()
    if rest[0] in ("Z", "X"):
        return None
    return rest[19]  # field 22: starttime


def _proc_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _record(pid: int) -> dict:
    return {"pid": pid, "start": _proc_start(pid), "comm": _proc_comm(pid)}


def _alive(rec: dict | None) -> bool:
    if not rec or not rec.get("pid"):
        return False
    return _proc_start(rec["pid"]) == rec.get("start") and _proc_comm(rec["pid"]) == rec.get("comm")


def _pids_named(comm: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and _proc_comm(int(d)) == comm and _proc_start(int(d)) is not None:
            out.append(int(d))
    return out


_children: dict[int, subprocess.Popen[bytes]] = {}


def _stop_pid(rec: dict, name: str, timeout: float = 30) -> None:
    """SIGTERM a process the lab started (checked by PID + start time), wait
    for it to go (SIGKILL after ``timeout``), and reap it if it is our child."""
    if not _alive(rec):
        return
    pid = rec["pid"]
    log(f"stopping {name} (pid {pid})")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(rec) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(rec):
        log(f"{name} (pid {pid}) ignored SIGTERM for {timeout:.0f}s: SIGKILL")
        os.kill(pid, signal.SIGKILL)
        while _alive(rec):
            time.sleep(0.05)
    child = _children.pop(pid, None)
    if child is not None:
        child.wait(5)


# --------------------------------------------------------------------------- packages

_apt_updated = False


def _apt_update() -> None:
    global _apt_updated
    if _apt_updated:
        return
    log("apt-get update")
    env = _env() | {"DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-q"], env=env, timeout=900)
    _apt_updated = True


def _installed(pkg: str) -> bool:
    cp = _run(["dpkg-query", "-W", "-f=${db:Status-Status}", pkg], check=False)
    return cp.returncode == 0 and cp.stdout.strip() == "installed"


def ensure_packages(packages: Sequence[str] = PACKAGES) -> list[str]:
    """Install the Debian packages that are missing. Returns what was installed."""
    missing = [p for p in packages if not _installed(p)]
    if not missing:
        return []
    log(f"installing {' '.join(missing)}")
    _apt_update()
    env = _env() | {"DEBIAN_FRONTEND": "noninteractive"}
    _run(
        [
            "apt-get",
            "install",
            "-y",
            "-q",
            "-o",
            "Dpkg::Options::=--force-confnew",
            "-o",
            "Dpkg::Options::=--force-confdef",
            *missing,
        ],
        env=env,
        timeout=1800,
    )
    return missing


def can_run() -> tuple[bool, str]:
    """Whether this machine can run the lab at all (root, and QEMU present or
    installable). Anything else that goes wrong in up() is an error, not a skip."""
    if os.geteuid() != 0:
        return False, "the lab needs root (it runs libvirtd and QEMU)"
    if not sys.platform.startswith("linux"):
        return False, "the lab needs Linux"
    if _which("qemu-system-x86_64") is None and (
        _which("apt-get") is None or _which("dpkg-query") is None
    ):
        return False, "no qemu-system-x86_64 and no apt-get to install it"
    return True, ""


# --------------------------------------------------------------------------- tiny Linux


def _kernel_package() -> str:
    """linux-image-<current>-amd64, as named by the linux-image-amd64 metapackage."""
    for attempt in (0, 1):
        cp = _run(["apt-cache", "depends", "linux-image-amd64"], check=False)
        m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)\b", cp.stdout)
        if m:
            return m.group(1)
        if attempt == 0:
            _apt_update()
    raise LabError("apt-cache cannot name the current linux-image-*-amd64 package")


def _apt_download(pkgs: Sequence[str], dest: Path) -> dict[str, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    os.chmod(dest, 0o777)  # apt-get download drops root for _apt
    found: dict[str, Path] = {}
    for attempt in (0, 1):
        missing = [p for p in pkgs if p not in found]
        cp = _run(["apt-get", "download", "-q", *missing], cwd=dest, check=False, timeout=900)
        for p in missing:
            debs = sorted(dest.glob(f"{p}_*.deb"))
            if debs:
                found[p] = debs[-1]
        if len(found) == len(pkgs):
            return found
        if attempt == 0:
            log(f"apt-get download failed ({cp.stderr.strip()[-300:]}); updating lists")
            _apt_update()
    raise LabError(f"apt-get download {' '.join(pkgs)} failed")


def _extract(deb: Path, want: Callable[[str], bool], out: Path) -> list[Path]:
    """Extract the members of a .deb's data that ``want(path)`` selects into
    ``out``, keeping no directory structure (what ``dpkg -x`` does, restricted
    to the few files the initramfs needs: no 400 MB module tree on disk)."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["dpkg-deb", "--fsys-tarfile", os.fspath(deb)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=_env(),
    )
    got: list[Path] = []
    assert proc.stdout is not None
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tf:
        for member in tf:
            if not member.isfile() or not want(member.name):
                continue
            data = tf.extractfile(member)
            assert data is not None
            target = out / os.path.basename(member.name)
            target.write_bytes(data.read())
            os.chmod(target, 0o755 if member.mode & 0o111 else 0o644)
            got.append(target)
    if proc.wait() != 0:
        raise LabError(f"dpkg-deb --fsys-tarfile {deb} failed")
    return got


def _init_hash() -> str:
    h = hashlib.sha256(INIT_SCRIPT.encode())
    h.update("|".join(VIRTIO_MODULES).encode())
    return h.hexdigest()[:16]


def ensure_tiny_linux() -> tuple[Path, Path]:
    """Kernel and initramfs for the busy guests, built once and cached under
    the lab dir (rebuilt only when the /init script changes)."""
    kdir = _p("kernel")
    kernel, initrd = kdir / "vmlinuz", kdir / "initramfs.gz"
    stamp = kdir / "stamp.json"
    try:
        meta = json.loads(stamp.read_text())
    except (FileNotFoundError, ValueError):
        meta = {}
    if kernel.exists() and initrd.exists() and meta.get("init") == _init_hash():
        return kernel, initrd
    t0 = time.monotonic()
    pkg = _kernel_package()
    log(f"building the busy guests' tiny Linux from {pkg} + busybox-static")
    build = kdir / "build"
    shutil.rmtree(build, ignore_errors=True)
    debs = _apt_download([pkg, "busybox-static"], build / "debs")
    mods = {f"{m}.ko" for m in VIRTIO_MODULES} | {f"{m}.ko.xz" for m in VIRTIO_MODULES}

    def want_kernel(name: str) -> bool:
        base = os.path.basename(name)
        if "/boot/vmlinuz-" in name or name.startswith("boot/vmlinuz-"):
            return True
        return "/modules/" in name and base in mods

    got = _extract(debs[pkg], want_kernel, build / "kernel")
    vmlinuz = [g for g in got if g.name.startswith("vmlinuz-")]
    if not vmlinuz:
        raise LabError(f"no boot/vmlinuz-* in {debs[pkg].name}")
    bb = _extract(debs["busybox-static"], lambda n: n.endswith("bin/busybox"), build / "busybox")
    if not bb:
        raise LabError("no bin/busybox in busybox-static")

    root = build / "root"
    for d in ("bin", "dev", "proc", "sys", "tmp", "mnt", "lib/modules", "sbin", "usr/bin"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(bb[0], root / "bin" / "busybox")
    os.chmod(root / "bin" / "busybox", 0o755)
    found = []
    for g in got:
        if g.name.endswith(".ko.xz"):
            (root / "lib/modules" / g.name[:-3]).write_bytes(lzma.decompress(g.read_bytes()))
            found.append(g.name[:-6])
        elif g.name.endswith(".ko"):
            shutil.copy2(g, root / "lib/modules" / g.name)
            found.append(g.name[:-3])
    absent = [m for m in VIRTIO_MODULES if m not in found]
    if absent:
        log(f"note: not modules in this kernel (built in?): {', '.join(absent)}")
    (root / "init").write_text(INIT_SCRIPT)
    os.chmod(root / "init", 0o755)

    # cpio -o -H newc | gzip, as LAB.md does it
    names = sorted(
        os.path.relpath(os.path.join(dp, n), root)
        for dp, dns, fns in os.walk(root)
        for n in dns + fns
    )
    tmp_initrd = kdir / ".initramfs.gz.tmp"
    with open(tmp_initrd, "wb") as out:
        cpio = subprocess.Popen(
            ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_env(),
        )
        gz = subprocess.Popen(["gzip", "-6", "-n"], stdin=cpio.stdout, stdout=out, env=_env())
        assert cpio.stdin is not None and cpio.stdout is not None
        cpio.stdout.close()
        cpio.stdin.write(("\n".join([".", *names]) + "\n").encode())
        cpio.stdin.close()
        if cpio.wait() != 0 or gz.wait() != 0:
            raise LabError("cpio | gzip failed")
    shutil.copy2(vmlinuz[0], kdir / ".vmlinuz.tmp")
    os.replace(kdir / ".vmlinuz.tmp", kernel)
    os.replace(tmp_initrd, initrd)
    _write_atomic(
        stamp,
        json.dumps(
            {
                "init": _init_hash(),
                "kernel_package": pkg,
                "kernel": vmlinuz[0].name,
                "modules": found,
            },
            indent=2,
        )
        + "\n",
    )
    shutil.rmtree(build, ignore_errors=True)
    log(
        f"tiny Linux ready ({initrd.stat().st_size // 1024} KiB initramfs) "
        f"in {time.monotonic() - t0:.1f}s"
    )
    return kernel, initrd


# --------------------------------------------------------------------------- libvirtd


def _set_conf(path: Path, settings: dict[str, str]) -> bool:
    """Make ``key = value`` lines in a libvirt conf file say what we want:
    comment out any other active setting of the key, append ours. True if changed."""
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines()
    changed = False
    for key, value in settings.items():
        pat = re.compile(rf"^\s*{re.escape(key)}\s*=\s*(.*?)\s*(#.*)?$")
        active = [i for i, ln in enumerate(lines) if pat.match(ln)]
        if active and all(pat.match(lines[i]).group(1) == value for i in active):
            continue
        for i in active:
            lines[i] = "#" + lines[i]
        lines += ["# set by the vmtelemetryd test lab (tests/lab/labkit.py)", f"{key} = {value}"]
        changed = True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
        _write_atomic(path, "\n".join(lines) + "\n", mode)
    return changed


def _libvirt_answers(timeout: float = 10) -> bool:
    cp = _run(["virsh", "-c", LIBVIRT_URI, "uri"], check=False, timeout=timeout)
    return cp.returncode == 0


def _read_pidfile(paths: Sequence[str], comm: str, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in paths:
            with contextlib.suppress(OSError, ValueError):
                pid = int(Path(p).read_text().strip())
                if _proc_comm(pid) == comm and _proc_start(pid):
                    return pid
        time.sleep(0.1)
    pids = _pids_named(comm)
    if len(pids) == 1:
        return pids[0]
    raise LabError(f"{comm} -d started but no pidfile in {paths}")


def _start_daemon(comm: str, pidfiles: Sequence[str], extra_env: dict[str, str]) -> dict:
    binary = _which(comm) or f"/usr/sbin/{comm}"
    env = _env() | extra_env
    cp = _run([binary, "-d"], check=False, env=env, timeout=60)
    if cp.returncode != 0:
        raise LabError(f"{comm} -d failed: {cp.stdout}{cp.stderr}")
    pid = _read_pidfile(pidfiles, comm)
    log(f"started {comm} (pid {pid})")
    return _record(pid)


def _start_libvirtd_only(state: dict) -> None:
    env = {}
    logf = _p("libvirtd.log")
    if not re.search(r"\s", os.fspath(logf)):
        env["LIBVIRT_LOG_OUTPUTS"] = f"3:file:{logf}"
    state.setdefault("procs", {})["libvirtd"] = _start_daemon(
        "libvirtd", ["/run/libvirtd.pid", "/var/run/libvirtd.pid"], env
    )
    deadline = time.monotonic() + 60
    while not _libvirt_answers():
        if time.monotonic() > deadline or not _alive(state["procs"]["libvirtd"]):
            tail = logf.read_text(errors="replace")[-2000:] if logf.exists() else ""
            raise LabError(f"libvirtd started but does not answer on {LIBVIRT_URI}\n{tail}")
        time.sleep(0.2)


def ensure_libvirtd(state: dict) -> None:
    """A libvirtd answering on qemu:///system; started (with virtlogd) if none runs."""
    qemu_changed = _set_conf(Path("/etc/libvirt/qemu.conf"), {"user": '"root"', "group": '"root"'})
    conf_changed = _set_conf(Path("/etc/libvirt/libvirtd.conf"), {"auth_unix_ro": '"none"'})
    if qemu_changed or conf_changed:
        log("wrote /etc/libvirt/qemu.conf (user/group root) / libvirtd.conf (auth_unix_ro none)")
    for d in ("/var/log/libvirt", "/var/run/libvirt", "/var/log/libvirt/qemu"):
        os.makedirs(d, exist_ok=True)
    procs = state.setdefault("procs", {})
    if _libvirt_answers():
        if qemu_changed or conf_changed:
            if _alive(procs.get("libvirtd")):
                log("config changed: restarting the lab's libvirtd")
                _stop_pid(procs["libvirtd"], "libvirtd")
                _start_libvirtd_only(state)
            else:
                log(
                    "WARNING: a libvirtd the lab did not start is running with an older "
                    "config; QEMU may not be able to open /dev/kvm until it restarts"
                )
        return
    if _pids_named("libvirtd"):
        # someone is starting one right now: give it a moment before starting ours
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if _libvirt_answers():
                return
            time.sleep(0.5)
    if not _pids_named("virtlogd"):
        procs["virtlogd"] = _start_daemon(
            "virtlogd", ["/run/virtlogd.pid", "/var/run/virtlogd.pid"], {}
        )
    _start_libvirtd_only(state)


def restart_libvirtd() -> int:
    """Stop the libvirtd the lab started (by its recorded PID) and start it again.
    Guests keep running (libvirtd reconnects to them). Returns the new PID."""
    with _locked():
        state = _load_state()
        rec = state.get("procs", {}).get("libvirtd")
        if not _alive(rec):
            raise LabError("the running libvirtd was not started by the lab: not restarting it")
        _stop_pid(rec, "libvirtd")
        if not _pids_named("virtlogd"):
            state["procs"]["virtlogd"] = _start_daemon(
                "virtlogd", ["/run/virtlogd.pid", "/var/run/virtlogd.pid"], {}
            )
        _start_libvirtd_only(state)
        _save_state(state)
        return state["procs"]["libvirtd"]["pid"]


# --------------------------------------------------------------------------- guests


def _virsh(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return _run(["virsh", "-q", "-c", LIBVIRT_URI, *args], check=check, timeout=timeout)


def list_domains() -> dict[str, str]:
    """Every domain libvirt knows (name -> state word). Names with a newline
    are not supported."""
    cp = _virsh("list", "--all", "--name")
    names = [n for n in cp.stdout.split("\n") if n]
    out = {}
    for n in names:
        st = _virsh("domstate", n, check=False)
        out[n] = st.stdout.strip() if st.returncode == 0 else "gone"
    return out


def lab_domains() -> dict[str, str]:
    return {n: s for n, s in list_domains().items() if n.startswith(prefix())}


def _hash(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()


def _safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "guest"
    return f"{s[:40]}-{_hash(name)[:8]}"


def default_nic_dev(name: str) -> str:
    """A tap name for a lab guest: 13 chars (Linux allows 15), stable per name."""
    return "vtl" + _hash(prefix() + "\0" + name)[:10]


def _guest_addr(name: str) -> tuple[str, str]:
    n = int(_hash(name)[:4], 16)
    net = f"169.254.{20 + n % 200}"
    return f"{net}.{2 + (n >> 8) % 250}", f"{net}.1"


def _mac(name: str) -> str:
    h = _hash("mac\0" + name)
    return f"52:54:00:{h[0:2]}:{h[2:4]}:{h[4:6]}"


def _make_qcow2(path: Path) -> None:
    """qcow2 image at ``path``, whatever characters it holds: qemu-img writes it
    under a plain temporary name beside it, then it is renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".vmtlab-{os.getpid()}-{threading.get_ident()}.qcow2"
    _run(["qemu-img", "create", "-q", "-f", "qcow2", tmp, DISK_SIZE])
    os.replace(tmp, path)


def kvm_available() -> bool:
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


def domain_xml(
    name: str,
    *,
    busy: bool,
    nic_dev: str,
    disks: Sequence[Path],
    console: Path | None = None,
    kernel: Path | None = None,
    initrd: Path | None = None,
) -> str:
    """The domain XML, built with ElementTree so that every name and path is
    escaped as XML requires."""
    kind = "kvm" if (kvm_available() and not busy) else "qemu"
    dom = ET.Element("domain", type=kind)
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(GUEST_MEMORY_MIB)
    ET.SubElement(dom, "currentMemory", unit="MiB").text = str(GUEST_MEMORY_MIB)
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    if busy:
        assert kernel and initrd
        addr, peer = _guest_addr(name)
        ET.SubElement(os_el, "kernel").text = os.fspath(kernel)
        ET.SubElement(os_el, "initrd").text = os.fspath(initrd)
        cmdline = f"console=ttyS0 quiet panic=-1 mitigations=off vmtlab.addr={addr}"
        ET.SubElement(os_el, "cmdline").text = f"{cmdline} vmtlab.peer={peer}"
    if kind == "qemu":
        # QEMU 7.2 reserves a 1 GiB TCG translation cache by default and the
        # tiny guest fills a good part of it: 32 MiB is plenty and caps the RSS.
        tcg = ET.SubElement(ET.SubElement(dom, "features"), "tcg")
        ET.SubElement(tcg, "tb-cache", unit="MiB").text = str(TCG_TB_CACHE_MIB)
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devs = ET.SubElement(dom, "devices")
    for target, path in zip(("vda", "vdb", "vdc", "vdd"), disks, strict=False):
        d = ET.SubElement(devs, "disk", type="file", device="disk")
        ET.SubElement(d, "driver", name="qemu", type="qcow2")
        ET.SubElement(d, "source", file=os.fspath(path))
        ET.SubElement(d, "target", dev=target, bus="virtio")
    nic = ET.SubElement(devs, "interface", type="ethernet")
    ET.SubElement(nic, "mac", address=_mac(name))
    ET.SubElement(nic, "target", dev=nic_dev, managed="yes")
    ET.SubElement(nic, "model", type="virtio")
    ET.SubElement(devs, "controller", type="usb", model="none")
    if busy and console is not None:
        s = ET.SubElement(devs, "serial", type="file")
        ET.SubElement(s, "source", path=os.fspath(console), append="off")
        ET.SubElement(s, "target", port="0")
    mb = ET.SubElement(devs, "memballoon", model="virtio")
    ET.SubElement(mb, "stats", period="2")
    return ET.tostring(dom, encoding="unicode") + "\n"


def _registry(name: str) -> Path:
    return _p("guests", _hash(name) + ".json")


def create_guest(
    name: str,
    *,
    busy: bool = False,
    nic_dev: str | None = None,
    disk_paths: Sequence[str | os.PathLike[str]] | None = None,
) -> str:
    """Create one transient lab guest: paused with no OS, or (busy=True) a
    running TCG tiny Linux. ``name`` must start with the lab prefix (so that
    ``down`` finds it) and may hold any other characters libvirt accepts.
    ``disk_paths``: two qcow2 paths (vda, vdb), created when missing and then
    removed again by destroy_guest(). Returns the tap device name."""
    if not name.startswith(prefix()):
        raise ValueError(f"lab guest names must start with {prefix()!r}: {name!r}")
    nic_dev = nic_dev or default_nic_dev(name)
    if not (0 < len(nic_dev.encode()) <= 15):
        raise ValueError(f"tap name {nic_dev!r} must be 1-15 bytes")
    with _locked():
        safe = _safe(name)
        disks = (
            [Path(p) for p in disk_paths]
            if disk_paths is not None
            else [_p("disks", f"{safe}-vda.qcow2"), _p("disks", f"{safe}-vdb.qcow2")]
        )
        if len(disks) < 1:
            raise ValueError("a lab guest needs at least one disk")
        created = []
        for d in disks:
            if not d.exists():
                _make_qcow2(d)
                created.append(os.fspath(d))
        kernel = initrd = console = None
        if busy:
            kernel, initrd = ensure_tiny_linux()
            console = _p("console", f"{safe}.log")
            console.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                console.unlink()
        xml = domain_xml(
            name,
            busy=busy,
            nic_dev=nic_dev,
            disks=disks,
            console=console,
            kernel=kernel,
            initrd=initrd,
        )
        xml_path = _p("xml", f"{safe}.xml")
        _write_atomic(xml_path, xml)
        _write_atomic(
            _registry(name),
            json.dumps(
                {
                    "name": name,
                    "busy": busy,
                    "nic_dev": nic_dev,
                    "disks": [os.fspath(d) for d in disks],
                    "created_disks": created,
                    "console": os.fspath(console) if console else None,
                    "xml": os.fspath(xml_path),
                },
                indent=2,
                ensure_ascii=False,
            )
            + "\n",
        )
        args = ["create", os.fspath(xml_path)]
        if not busy:
            args.append("--paused")
        cp = _virsh(*args, check=False)
        if cp.returncode != 0:
            _cleanup_guest_files(name)
            raise LabError(f"virsh create {name!r} failed: {cp.stderr.strip()}")
        return nic_dev


def _cleanup_guest_files(name: str) -> None:
    reg = _registry(name)
    try:
        meta = json.loads(reg.read_text())
    except (FileNotFoundError, ValueError):
        return
    for f in [*meta.get("created_disks", []), meta.get("console"), meta.get("xml")]:
        if f:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)
    reg.unlink(missing_ok=True)


def _domain_exists(name: str) -> bool:
    return _virsh("domstate", name, check=False).returncode == 0


def destroy_guest(name: str) -> None:
    """Destroy (and undefine, if persistent) one lab guest and remove the
    files the lab made for it. Refuses names without the lab prefix."""
    if not name.startswith(prefix()):
        raise ValueError(f"not a lab guest (prefix {prefix()!r}): {name!r}")
    with _locked():
        if _domain_exists(name):
            _virsh("destroy", name, check=False)
            if _domain_exists(name):
                _virsh("undefine", name, check=False)
            if _domain_exists(name):
                raise LabError(f"could not remove domain {name!r}")
        _cleanup_guest_files(name)


def _console_text(name: str) -> str:
    try:
        meta = json.loads(_registry(name).read_text())
        return Path(meta["console"]).read_text(errors="replace")
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _balloon_ready(name: str) -> bool:
    cp = _virsh("domstats", "--balloon", name, check=False, timeout=30)
    return "balloon.usable=" in cp.stdout and "balloon.available=" in cp.stdout


def wait_busy_ready(names: Sequence[str], timeout: float = BUSY_READY_TIMEOUT) -> None:
    """Until each busy guest's console said it is up and its balloon reports
    usable/available memory."""
    pending = list(names)
    deadline = time.monotonic() + timeout
    while pending:
        for n in list(pending):
            if BUSY_READY_MARK in _console_text(n) and _balloon_ready(n):
                pending.remove(n)
        if not pending:
            return
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {n} console ---\n{_console_text(n)[-1500:]}" for n in pending)
            raise LabError(f"busy guests not up after {timeout:.0f}s: {pending}\n{tails}")
        time.sleep(0.5)


# --------------------------------------------------------------------------- database


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def influx_url(state: dict | None = None) -> str:
    state = _load_state() if state is None else state
    port = state.get("db_port")
    if not port:
        raise LabError("the lab database has never been started: run `tests/lab/lab up`")
    return f"http://127.0.0.1:{port}"


def _http(
    method: str,
    url: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _db_healthy(port: int) -> bool:
    try:
        status, _ = _http("GET", f"http://127.0.0.1:{port}/health", timeout=2)
    except OSError:
        return False
    return status == 200


def start_database() -> str:
    """Start victoria-metrics (if the lab's is not running) on the lab's port
    (the same one every time, picked once) with storage in the lab dir."""
    with _locked():
        state = _load_state()
        procs = state.setdefault("procs", {})
        port = state.get("db_port")
        if port and _alive(procs.get("victoria-metrics")) and _db_healthy(port):
            return f"http://127.0.0.1:{port}"
        if not port:
            port = _free_port()
        elif _port_in_use(port) and not _alive(procs.get("victoria-metrics")):
            raise LabError(f"the lab's database port {port} is taken by another process")
        binary = _which("victoria-metrics")
        if binary is None:
            raise LabError("victoria-metrics is not installed")
        storage = _p("db")
        storage.mkdir(parents=True, exist_ok=True)
        with open(_p("victoria-metrics.log"), "ab") as logf:
            proc = subprocess.Popen(
                [
                    binary,
                    f"-storageDataPath={storage}",
                    f"-httpListenAddr=127.0.0.1:{port}",
                    # not 100y: 1.79's /api/v1/export, asked without start=, then
                    # starts at now - retention, which 100y puts before 1970 (no data)
                    "-retentionPeriod=10y",
                    "-loggerLevel=WARN",
                ],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=_env(),
            )
        _children[proc.pid] = proc
        deadline = time.monotonic() + 60
        while not _db_healthy(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = _p("victoria-metrics.log").read_text(errors="replace")[-2000:]
                raise LabError(f"victoria-metrics did not come up on port {port}\n{tail}")
            time.sleep(0.1)
        procs["victoria-metrics"] = _record(proc.pid)
        state["db_port"] = port
        _save_state(state)
        log(f"started victoria-metrics (pid {proc.pid}) on 127.0.0.1:{port}")
        return f"http://127.0.0.1:{port}"


def stop_database() -> None:
    """Stop the lab's victoria-metrics (SIGTERM, by recorded PID); its data stays."""
    with _locked():
        state = _load_state()
        _stop_pid(state.get("procs", {}).get("victoria-metrics") or {}, "victoria-metrics")


def database_running() -> bool:
    state = _load_state()
    return _alive(state.get("procs", {}).get("victoria-metrics"))


FLUSH_SERIES = "labkit_flush_seen"  # not vm*: the default query leaves it out


def flush(timeout: float = 15) -> None:
    """Make everything written before this call visible to queries.

    victoria-metrics 1.79 keeps new rows in memory for about a second even
    after /internal/force_flush (measured: every point showed up 1.0 s after
    its write, however often force_flush was asked). So a sentinel point is
    written after everything else and this waits, calling force_flush, until
    the sentinel is visible: rows wait their turn, so what came before is too."""
    base = influx_url()
    ts_ms = time.time_ns() // 1_000_000
    line = f"{FLUSH_SERIES.rsplit('_', 1)[0]},pid={os.getpid()} seen=1i {ts_ms}"
    url = f"{base}/api/v2/write?" + urllib.parse.urlencode({"bucket": INFLUX_DB, "precision": "ms"})
    status, body = _http("POST", url, line.encode(), {"Authorization": f"Token {INFLUX_TOKEN}"})
    if status != 204:
        raise LabError(f"writing the flush sentinel: HTTP {status} {body[:200]!r}")
    form = urllib.parse.urlencode(
        {
            "match[]": f'{{__name__="{FLUSH_SERIES}",pid="{os.getpid()}"}}',
            "start": str(ts_ms // 1000),
        }
    ).encode()
    deadline = time.monotonic() + timeout
    while True:
        status, body = _http("GET", base + "/internal/force_flush")
        if status != 200:
            raise LabError(f"force_flush: HTTP {status} {body[:200]!r}")
        status, body = _http("POST", base + "/api/v1/export", form)
        if status == 200:
            for row in body.decode().splitlines():
                if row.strip() and ts_ms in json.loads(row).get("timestamps", []):
                    return
        if time.monotonic() > deadline:
            raise LabError(f"the lab database did not show a point written {timeout:.0f}s ago")
        time.sleep(0.05)


def query(match: str = '{__name__=~"vm.*"}') -> list[dict]:
    """Every series matching ``match`` (a Prometheus series selector), as the
    dicts /api/v1/export gives: {"metric": {...labels}, "values": [...],
    "timestamps": [ms, ...]}."""
    return [json.loads(line) for line in export_raw(match).splitlines() if line.strip()]


def export_raw(match: str) -> str:
    flush()
    data = urllib.parse.urlencode({"match[]": match}).encode()
    status, body = _http(
        "POST",
        influx_url() + "/api/v1/export",
        data,
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    if status != 200:
        raise LabError(f"export: HTTP {status} {body[:500]!r}")
    return body.decode()


def write_lines(lines: str | Sequence[str]) -> int:
    """POST line protocol to the lab database as the daemon does (v2 API)."""
    body = lines if isinstance(lines, str) else "\n".join(lines) + "\n"
    url = (
        influx_url()
        + "/api/v2/write?"
        + urllib.parse.urlencode({"bucket": INFLUX_DB, "precision": "ns"})
    )
    status, _ = _http(
        "POST",
        url,
        body.encode(),
        {"Authorization": f"Token {INFLUX_TOKEN}", "Content-Type": "text/plain; charset=utf-8"},
    )
    return status


# --------------------------------------------------------------------------- verbs


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


def ensure_service_user() -> None:
    """The daemon's system user, made from the package's own sysusers.d file.

    libvirtd names each client after its uid and refuses one it cannot name
    ("Failed to find user record"), so the user must exist on the machine the
    lab's libvirtd runs on, not only inside a test's systemd namespace.
    """
    if subprocess.run(["getent", "passwd", "vmtelemetry"], capture_output=True).returncode:
        _run(["systemd-sysusers", str(SYSUSERS_FILE)])


def up(guests: int = DEFAULT_GUESTS, busy: int = DEFAULT_BUSY) -> LabInfo:
    """Bring the lab up (idempotent: what runs is reused) and say where it is."""
    if guests < 0 or busy < 0:
        raise ValueError("guest counts must be >= 0")
    ok, why = can_run()
    if not ok:
        raise LabError(why)
    t0 = time.monotonic()
    with _locked():
        lab_dir().mkdir(parents=True, exist_ok=True)
        ensure_packages()
        if busy:
            ensure_tiny_linux()
        state = _load_state()
        ensure_libvirtd(state)
        _save_state(state)
        ensure_service_user()
        url = start_database()
        state = _load_state()

        paused_names, busy_names = _guest_names(guests, busy)
        existing = lab_domains()
        made = 0
        for n in paused_names:
            # reuse only what this lab dir knows (a wiped lab dir took the disks along)
            if existing.get(n) in ("paused", "running") and _registry(n).exists():
                continue
            if n in existing:
                destroy_guest(n)
            create_guest(n)
            made += 1
        for n in busy_names:
            st = existing.get(n)
            if st == "running" and _registry(n).exists():
                continue
            if st == "paused" and _registry(n).exists():
                _virsh("resume", n)
                continue
            if st is not None:
                destroy_guest(n)
            create_guest(n, busy=True)
            made += 1
        if busy_names:
            wait_busy_ready(busy_names)
        extra = sorted(set(lab_domains()) - set(paused_names) - set(busy_names))
        if extra:
            log(f"also running with the lab prefix (left alone): {len(extra)} guest(s)")
        state["last_up"] = {"guests": guests, "busy": busy}
        _save_state(state)
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
        )
    log(
        f"lab up: {guests} paused + {busy} busy guest(s) ({made} created), db {url}, "
        f"in {time.monotonic() - t0:.1f}s"
    )
    return info


def info() -> LabInfo:
    """LabInfo for a lab that is already up (no changes made)."""
    state = _load_state()
    last = state.get("last_up", {"guests": DEFAULT_GUESTS, "busy": DEFAULT_BUSY})
    p, b = _guest_names(last["guests"], last["busy"])
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
    )


def down(purge: bool = False) -> None:
    """Remove every guest with the lab prefix, stop what the lab started (by
    recorded PID) and remove the guests' disks. Other domains stay untouched.
    ``purge`` also removes the lab dir (database, kernel cache)."""
    t0 = time.monotonic()
    with _locked():
        state = _load_state()
        have_libvirt = _libvirt_answers(timeout=15) if _which("virsh") else False
        if have_libvirt:
            for n in sorted(lab_domains()):
                log(f"destroying {n}")
                destroy_guest(n)
        for reg in _p("guests").glob("*.json") if _p("guests").exists() else []:
            with contextlib.suppress(ValueError, OSError):
                _cleanup_guest_files(json.loads(reg.read_text())["name"])
        shutil.rmtree(_p("disks"), ignore_errors=True)
        procs = state.get("procs", {})
        _stop_pid(procs.get("victoria-metrics") or {}, "victoria-metrics")
        if _alive(procs.get("libvirtd")) and have_libvirt:
            others = [n for n in list_domains() if not n.startswith(prefix())]
            if others:
                log(f"note: {len(others)} non-lab domain(s) keep running without libvirtd")
        _stop_pid(procs.get("libvirtd") or {}, "libvirtd")
        _stop_pid(procs.get("virtlogd") or {}, "virtlogd")
        state["procs"] = {}
        _save_state(state)
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


def status() -> dict:
    state = _load_state()
    procs = {
        k: {"pid": v.get("pid"), "alive": _alive(v)} for k, v in state.get("procs", {}).items()
    }
    doms = lab_domains() if _libvirt_answers(timeout=5) else {}
    return {
        "lab_dir": os.fspath(lab_dir()),
        "prefix": prefix(),
        "db_port": state.get("db_port"),
        "procs": procs,
        "guests": doms,
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
    sub.add_parser("env", help="print the daemon's configuration for this lab")
    d = sub.add_parser("down", help="remove lab guests, stop what the lab started")
    d.add_argument("--purge", action="store_true", help="also delete the lab dir")
    q = sub.add_parser("query", help="export series from the lab database (JSONL)")
    q.add_argument("match", nargs="?", default='{__name__=~"vm.*"}')
    sub.add_parser("status", help="what runs")
    a = ap.parse_args(argv)
    try:
        if a.verb == "up":
            up(a.guests, a.busy)
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
