"""The lab's guests: transient domains, each with a real tap NIC and two qcow2 disks.

A paused guest has no OS and costs no CPU, yet reports every stats group; a
busy guest boots the tiny Linux under TCG and keeps its counters growing at
steady rates (lab_tinylinux.INIT_SCRIPT), or spins to want all of its vCPU.
Every name starts with the lab prefix, and the lab only ever removes domains
with that prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from lab_libvirtd import LIBVIRT_URI, list_domains, virsh
from lab_state import LabError, lab_path, locked, prefix, run, write_atomic
from lab_tinylinux import BUSY_READY_MARK, ensure_tiny_linux, init_hash

GUEST_MEMORY_MIB = 128
DISK_SIZE = "16M"
TCG_TB_CACHE_MIB = 32
BUSY_READY_TIMEOUT = 180.0  # seconds of host time for a TCG boot on a loaded 2-core box
# A busy guest's disks are throttled by QEMU (<iotune>) to these rates, which
# its dd loops keep up with: writes to vda are 3x the reads from vdb.
BUSY_WRITE_BYTES_SEC = 96 * 1024
BUSY_READ_BYTES_SEC = 32 * 1024


def is_lab_guest(name: str) -> bool:
    """The lab's own: named with its prefix, or created by it under another name."""
    return name.startswith(prefix()) or registry(name).exists()


def lab_domains(uri: str = LIBVIRT_URI) -> dict[str, str]:
    """The lab's domains on ``uri`` (the default host, or another of lab_hosts)."""
    return {n: s for n, s in list_domains(uri).items() if is_lab_guest(n)}


def _hash(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()


def _safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "guest"
    return f"{s[:40]}-{_hash(name)[:8]}"


def default_nic_dev(name: str) -> str:
    """A tap name for a lab guest: 13 chars (Linux allows 15), stable per name."""
    return "vtl" + _hash(prefix() + "\0" + name)[:10]


def _guest_addrs(name: str) -> tuple[str, str, str]:
    """A busy guest's link-local address, its tap's host side, and an address
    no one has, in a /24 of its own (names permitting)."""
    n = int(_hash(name)[:4], 16)
    net = f"169.254.{20 + n % 200}"
    return f"{net}.{2 + (n >> 8) % 250}", f"{net}.1", f"{net}.254"


def _mac(name: str) -> str:
    h = _hash("mac\0" + name)
    return f"52:54:00:{h[0:2]}:{h[2:4]}:{h[4:6]}"


def _make_qcow2(path: Path) -> None:
    """qcow2 image at ``path``, whatever characters it holds: qemu-img writes it
    under a plain temporary name beside it, then it is renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".vmtlab-{os.getpid()}-{threading.get_ident()}.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", tmp, DISK_SIZE])
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
    title: str | None = None,
    metadata: str | None = None,
    spin: bool = False,
) -> str:
    """The domain XML, built with ElementTree so that every name and path is
    escaped as XML requires. ``metadata``: the XML of ``<metadata>``'s children
    (namespaced blocks, as OpenNebula and Nova write them). ``spin``: a busy
    guest whose /init spins instead of doing I/O (vmtlab.spin=1)."""
    if spin and not busy:
        raise ValueError("only a busy guest boots an /init that can spin")
    kind = "kvm" if (kvm_available() and not busy) else "qemu"
    dom = ET.Element("domain", type=kind)
    ET.SubElement(dom, "name").text = name
    if title is not None:
        ET.SubElement(dom, "title").text = title
    if metadata is not None:
        dom.append(ET.fromstring(f"<metadata>{metadata}</metadata>"))
    ET.SubElement(dom, "memory", unit="MiB").text = str(GUEST_MEMORY_MIB)
    ET.SubElement(dom, "currentMemory", unit="MiB").text = str(GUEST_MEMORY_MIB)
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    addr, peer, nobody = _guest_addrs(name)
    if busy:
        assert kernel and initrd
        ET.SubElement(os_el, "kernel").text = os.fspath(kernel)
        ET.SubElement(os_el, "initrd").text = os.fspath(initrd)
        ET.SubElement(os_el, "cmdline").text = (
            "console=ttyS0 quiet panic=-1 mitigations=off "
            f"vmtlab.addr={addr} vmtlab.peer={peer} vmtlab.nobody={nobody} "
            f"{'vmtlab.spin=1 ' if spin else ''}"
            # unused by /init: it makes the XML say which /init it boots (is_current)
            f"vmtlab.init={init_hash()}"
        )
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
        if busy and target in ("vda", "vdb"):
            tune = ET.SubElement(d, "iotune")
            if target == "vda":
                ET.SubElement(tune, "write_bytes_sec").text = str(BUSY_WRITE_BYTES_SEC)
            else:
                ET.SubElement(tune, "read_bytes_sec").text = str(BUSY_READ_BYTES_SEC)
    nic = ET.SubElement(devs, "interface", type="ethernet")
    ET.SubElement(nic, "mac", address=_mac(name))
    ET.SubElement(nic, "target", dev=nic_dev, managed="yes")
    ET.SubElement(nic, "model", type="virtio")
    if busy:
        # libvirt gives the host side of the tap the peer's address, with a
        # route to this guest alone (peer=): the host answers the guest, and
        # nothing else on the machine is routed through the tap. libvirt 9.0 adds
        # the address again on `virsh resume` and fails ("Failed to add IP
        # address"): never suspend the busy guest; event tests use a guest of their own.
        src = ET.SubElement(nic, "source")
        ET.SubElement(src, "ip", address=peer, prefix="32", peer=addr)
    ET.SubElement(devs, "controller", type="usb", model="none")
    if busy and console is not None:
        s = ET.SubElement(devs, "serial", type="file")
        ET.SubElement(s, "source", path=os.fspath(console), append="off")
        ET.SubElement(s, "target", port="0")
    mb = ET.SubElement(devs, "memballoon", model="virtio")
    ET.SubElement(mb, "stats", period="2")
    return ET.tostring(dom, encoding="unicode") + "\n"


def registry(name: str) -> Path:
    return lab_path("guests", _hash(name) + ".json")


def _guest_xml(
    name: str,
    busy: bool,
    nic_dev: str,
    disks: Sequence[Path],
    console: Path | None,
    spin: bool = False,
    **identity: str | None,
) -> str:
    kernel, initrd = ensure_tiny_linux() if busy else (None, None)
    return domain_xml(
        name,
        busy=busy,
        nic_dev=nic_dev,
        disks=disks,
        console=console,
        kernel=kernel,
        initrd=initrd,
        spin=spin,
        **identity,
    )


def create_guest(
    name: str,
    *,
    busy: bool = False,
    spin: bool = False,
    nic_dev: str | None = None,
    disk_paths: Sequence[str | os.PathLike[str]] | None = None,
    title: str | None = None,
    metadata: str | None = None,
    start: bool = True,
    named_freely: bool = False,
    uri: str = LIBVIRT_URI,
) -> str:
    """Create one transient lab guest: paused with no OS, or (busy=True) a
    running TCG tiny Linux (``spin=True``: one that spins, to want all of its vCPU,
    instead of doing I/O). ``name`` must start with the lab prefix (so that
    ``down`` finds it) and may hold any other characters libvirt accepts.
    ``disk_paths``: two qcow2 paths (vda, vdb), created when missing and then
    removed again by destroy_guest(). ``title`` and ``metadata``: see
    domain_xml(). ``start=False`` defines a persistent guest that is not
    running (shut off). ``named_freely``: a name without the prefix (OpenNebula's
    ``one-<ID>``), allowed only if no domain has it yet; the lab's registry then
    marks it as the lab's, for destroy_guest() and ``down``. ``uri``: the
    read-write URI of the host to create it on (lab_hosts). Returns the tap
    device name."""
    if not name.startswith(prefix()) and not named_freely:
        raise ValueError(f"lab guest names must start with {prefix()!r}: {name!r}")
    if named_freely and not is_lab_guest(name) and _domain_exists(name, uri):
        raise LabError(f"a domain named {name!r} exists and is not the lab's")
    nic_dev = nic_dev or default_nic_dev(name)
    if not (0 < len(nic_dev.encode()) <= 15):
        raise ValueError(f"tap name {nic_dev!r} must be 1-15 bytes")
    with locked():
        safe = _safe(name)
        disks = (
            [Path(p) for p in disk_paths]
            if disk_paths is not None
            else [lab_path("disks", f"{safe}-vda.qcow2"), lab_path("disks", f"{safe}-vdb.qcow2")]
        )
        if len(disks) < 1:
            raise ValueError("a lab guest needs at least one disk")
        created = []
        for d in disks:
            if not d.exists():
                _make_qcow2(d)
                created.append(os.fspath(d))
        console = None
        if busy:
            console = lab_path("console", f"{safe}.log")
            console.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                console.unlink()
        xml = _guest_xml(name, busy, nic_dev, disks, console, spin, title=title, metadata=metadata)
        xml_path = lab_path("xml", f"{safe}.xml")
        write_atomic(xml_path, xml)
        write_atomic(
            registry(name),
            json.dumps(
                {
                    "name": name,
                    "busy": busy,
                    "spin": spin,
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
        args = ["create" if start else "define", os.fspath(xml_path)]
        if start and not busy:
            args.append("--paused")
        cp = virsh(*args, check=False, uri=uri)
        if cp.returncode != 0:
            cleanup_guest_files(name)
            raise LabError(f"virsh {args[0]} {name!r} failed: {cp.stderr.strip()}")
        return nic_dev


def is_current(name: str) -> bool:
    """Whether this lab dir made the guest and would make it the same way now
    (same domain XML, hence same /init): up() replaces a guest that is not."""
    try:
        meta = json.loads(registry(name).read_text())
        made = Path(meta["xml"]).read_text()
    except (OSError, ValueError, KeyError, TypeError):
        return False
    console = Path(meta["console"]) if meta.get("console") else None
    disks = [Path(d) for d in meta["disks"]]
    spin = bool(meta.get("spin"))
    return made == _guest_xml(name, bool(meta["busy"]), meta["nic_dev"], disks, console, spin)


def cleanup_guest_files(name: str) -> None:
    reg = registry(name)
    try:
        meta = json.loads(reg.read_text())
    except (FileNotFoundError, ValueError):
        return
    for f in [*meta.get("created_disks", []), meta.get("console"), meta.get("xml")]:
        if f:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)
    reg.unlink(missing_ok=True)


def _domain_exists(name: str, uri: str = LIBVIRT_URI) -> bool:
    return virsh("domstate", name, check=False, uri=uri).returncode == 0


def destroy_guest(name: str, uri: str = LIBVIRT_URI) -> None:
    """Destroy (and undefine, if persistent) one lab guest on ``uri`` and remove
    the files the lab made for it. Refuses names without the lab prefix."""
    if not is_lab_guest(name):
        raise ValueError(f"not a lab guest (prefix {prefix()!r}, or made by the lab): {name!r}")
    with locked():
        if _domain_exists(name, uri):
            virsh("destroy", name, check=False, uri=uri)
            if _domain_exists(name, uri):
                virsh("undefine", name, check=False, uri=uri)
            if _domain_exists(name, uri):
                raise LabError(f"could not remove domain {name!r}")
        cleanup_guest_files(name)


def _console_text(name: str) -> str:
    try:
        meta = json.loads(registry(name).read_text())
        return Path(meta["console"]).read_text(errors="replace")
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _balloon_ready(name: str) -> bool:
    cp = virsh("domstats", "--balloon", name, check=False, timeout=30)
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
