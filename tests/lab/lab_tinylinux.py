"""The busy guests' operating system: a tiny Linux made from Debian packages.

A Debian kernel and busybox-static, downloaded (not installed), and an
initramfs whose /init loads the virtio drivers and then keeps the disks, the
NIC and the balloon busy at steady rates, or (vmtlab.spin=1) its vCPU. Built
once and cached under the lab dir; a change to INIT_SCRIPT rebuilds it (LAB.md:
TCG boots it, KVM hangs).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from lab_apt import apt_download, apt_update
from lab_state import LabError, command_env, lab_path, log, run, write_atomic

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

BUSY_READY_MARK = "busy guest up"  # printed by INIT_SCRIPT once the workload starts

# The busy guest's /init. The kernel command line carries this guest's
# address (vmtlab.addr), the host side of its tap (vmtlab.peer, which libvirt
# gives the tap, so it answers) and an address nobody has (vmtlab.nobody). All
# are link-local and the tap is on no bridge: every frame ends in the host.
#
# The workload runs in long-lived processes, so that its rates are steady
# within one poll interval (a loop of short commands makes a rate jump by a
# whole command's worth per poll, and costs a fork each time under TCG):
# * disks: dd as fast as the domain's <iotune> lets it, writing vda 3x as
#   many bytes per second as it reads vdb (24k vs 8k, 4 requests a second each);
# * network: 4 pings a second to the peer (200-byte frames, answered) and 4 to
#   nobody (400-byte frames to a MAC no one has, so never answered): the guest
#   sends 3x what it receives, and the host never forwards a frame;
# * memory: 32 MiB held in a tmpfs, so the balloon's usable/available differ.
# With vmtlab.spin=1 the guest runs none of that workload but a shell busy loop
# instead: a guest that wants its whole vCPU, to show steal time (LAB.md).
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
NOBODY=169.254.10.254
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmtlab.addr=*) ADDR="${arg#vmtlab.addr=}" ;;
        vmtlab.peer=*) PEER="${arg#vmtlab.peer=}" ;;
        vmtlab.nobody=*) NOBODY="${arg#vmtlab.nobody=}" ;;
        vmtlab.spin=1) SPIN=1 ;;
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
arp -s "$NOBODY" 02:00:00:00:00:01
mount -t tmpfs -o size=48m tmpfs /mnt
dd if=/dev/zero of=/mnt/hold bs=1M count=32 2>/dev/null
echo "vmtlab: eth0 $ADDR, peer $PEER, nobody $NOBODY, holding 32 MiB"
echo "busy guest up"
[ -n "$SPIN" ] && while :; do :; done
ping -q -i 0.25 -s 158 "$PEER" >/dev/null 2>&1 &
ping -q -i 0.25 -s 358 "$NOBODY" >/dev/null 2>&1 &
while :; do dd if=/dev/zero of=/dev/vda bs=24k oflag=direct 2>/dev/null; done &
while :; do dd if=/dev/vdb of=/dev/null bs=8k iflag=direct 2>/dev/null; done &
wait
"""


def _kernel_package() -> str:
    """linux-image-<current>-amd64, as named by the linux-image-amd64 metapackage."""
    for attempt in (0, 1):
        cp = run(["apt-cache", "depends", "linux-image-amd64"], check=False)
        m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*-amd64)\b", cp.stdout)
        if m:
            return m.group(1)
        if attempt == 0:
            apt_update()
    raise LabError("apt-cache cannot name the current linux-image-*-amd64 package")


def _extract(deb: Path, want: Callable[[str], bool], out: Path) -> list[Path]:
    """Extract the members of a .deb's data that ``want(path)`` selects into
    ``out``, keeping no directory structure (what ``dpkg -x`` does, restricted
    to the few files the initramfs needs: no 400 MB module tree on disk)."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["dpkg-deb", "--fsys-tarfile", os.fspath(deb)],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=command_env(),
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


def init_hash() -> str:
    """What a busy guest's /init is made of: a guest booted from another one is stale."""
    h = hashlib.sha256(INIT_SCRIPT.encode())
    h.update("|".join(VIRTIO_MODULES).encode())
    return h.hexdigest()[:16]


def ensure_tiny_linux() -> tuple[Path, Path]:
    """Kernel and initramfs for the busy guests, built once and cached under
    the lab dir (rebuilt only when the /init script changes)."""
    kdir = lab_path("kernel")
    kernel, initrd = kdir / "vmlinuz", kdir / "initramfs.gz"
    stamp = kdir / "stamp.json"
    try:
        meta = json.loads(stamp.read_text())
    except (FileNotFoundError, ValueError):
        meta = {}
    if kernel.exists() and initrd.exists() and meta.get("init") == init_hash():
        return kernel, initrd
    t0 = time.monotonic()
    pkg = _kernel_package()
    log(f"building the busy guests' tiny Linux from {pkg} + busybox-static")
    build = kdir / "build"
    shutil.rmtree(build, ignore_errors=True)
    debs = apt_download([pkg, "busybox-static"], build / "debs")
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
            env=command_env(),
        )
        gz = subprocess.Popen(
            ["gzip", "-6", "-n"], stdin=cpio.stdout, stdout=out, env=command_env()
        )
        assert cpio.stdin is not None and cpio.stdout is not None
        cpio.stdout.close()
        cpio.stdin.write(("\n".join([".", *names]) + "\n").encode())
        cpio.stdin.close()
        if cpio.wait() != 0 or gz.wait() != 0:
            raise LabError("cpio | gzip failed")
    shutil.copy2(vmlinuz[0], kdir / ".vmlinuz.tmp")
    os.replace(kdir / ".vmlinuz.tmp", kernel)
    os.replace(tmp_initrd, initrd)
    write_atomic(
        stamp,
        json.dumps(
            {
                "init": init_hash(),
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
