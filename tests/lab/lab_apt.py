"""The Debian packages the lab runs on, installed or downloaded with apt.

The lab installs what it needs itself, so a fresh Debian machine needs nothing
but root to run it; the busy guests' kernel and busybox are only downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lab_state import LabError, command_env, log, run

# LAB.md: libvirt + QEMU + dnsmasq-base; libvirt-dev + pkg-config build
# libvirt-python; busybox-static and cpio make the busy guests' initramfs.
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

_apt_updated = False


def apt_update() -> None:
    """``apt-get update``, at most once per process: only when something is
    missing or a download failed (the lists may be stale)."""
    global _apt_updated
    if _apt_updated:
        return
    log("apt-get update")
    env = command_env() | {"DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], env=env, timeout=900)
    _apt_updated = True


def _installed(pkg: str) -> bool:
    cp = run(["dpkg-query", "-W", "-f=${db:Status-Status}", pkg], check=False)
    return cp.returncode == 0 and cp.stdout.strip() == "installed"


def ensure_packages(packages: Sequence[str] = PACKAGES) -> list[str]:
    """Install the Debian packages that are missing. Returns what was installed."""
    missing = [p for p in packages if not _installed(p)]
    if not missing:
        return []
    log(f"installing {' '.join(missing)}")
    apt_update()
    env = command_env() | {"DEBIAN_FRONTEND": "noninteractive"}
    # --force-confnew: libvirt-daemon-system would otherwise ask about an
    # existing /etc/libvirt/qemu.conf (LAB.md)
    run(
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


def apt_download(pkgs: Sequence[str], dest: Path) -> dict[str, Path]:
    """Download (not install) each package's .deb into ``dest``; package -> .deb."""
    dest.mkdir(parents=True, exist_ok=True)
    os.chmod(dest, 0o777)  # apt-get download drops root for _apt
    found: dict[str, Path] = {}
    for attempt in (0, 1):
        missing = [p for p in pkgs if p not in found]
        cp = run(["apt-get", "download", "-q", *missing], cwd=dest, check=False, timeout=900)
        for p in missing:
            debs = sorted(dest.glob(f"{p}_*.deb"))
            if debs:
                found[p] = debs[-1]
        if len(found) == len(pkgs):
            return found
        if attempt == 0:
            log(f"apt-get download failed ({cp.stderr.strip()[-300:]}); updating lists")
            apt_update()
    raise LabError(f"apt-get download {' '.join(pkgs)} failed")
