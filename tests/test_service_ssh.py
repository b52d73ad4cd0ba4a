"""The hardened unit on a qemu+ssh:// hypervisor, set up as packaging/README.host says.

A real sshd on a free loopback port stands for the remote hypervisor: its own
host key, an unprivileged account (``vmtremote``) whose key may only run
``virt-ssh-helper -r`` (libvirt's read-only socket of the lab's libvirtd, where
auth_unix_ro = "none" lets it in). Under the real systemd of tests/systemdns.py
the key is made as the service user in its home, /var/lib/vmtelemetryd/.ssh/, and
the host key is taken with ssh-keyscan into its known_hosts: the steps an
operator follows. No HOST_TAG: the host tag is the far side's getHostname().
A known_hosts entry that does not match is an error the operator can read, and
never a login (sshd's own log counts the logins).
"""

from __future__ import annotations

import contextlib
import dataclasses
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import labkit
import libvirt
import pytest
from lab_apt import ensure_packages
from lab_state import locked
from systemdns import SERVICE, SystemdNS, wait_for
from test_service import install, lab_config, ns, show, status, wait_status

__all__ = ["ns"]  # the fixture, shared with test_service.py

pytestmark = pytest.mark.lab

REMOTE_USER = "vmtremote"
SSH_DIR = "/var/lib/vmtelemetryd/.ssh"
KEY = f"{SSH_DIR}/id_ed25519"
KNOWN_HOSTS = f"{SSH_DIR}/known_hosts"
SSHD = "/usr/sbin/sshd"
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
# What README.host tells the operator to put before the key in authorized_keys.
KEY_OPTIONS = 'restrict,command="virt-ssh-helper -r qemu:///system"'


@dataclasses.dataclass(frozen=True)
class Remote:
    """The sshd standing for a remote hypervisor, and what it takes to reach it."""

    port: int
    dir: Path
    host_key_pub: str  # "ssh-ed25519 AAAA..." without a comment

    @property
    def uri(self) -> str:
        return f"qemu+ssh://{REMOTE_USER}@127.0.0.1:{self.port}/system?keyfile={KEY}&no_tty=1"

    @property
    def log(self) -> Path:
        return self.dir / "sshd.log"

    def accepted(self) -> int:
        """How many logins sshd has let in so far."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text.count(f"Accepted publickey for {REMOTE_USER} from 127.0.0.1")

    def authorize(self, public_key: str) -> None:
        (self.dir / "authorized_keys").write_text(f"{KEY_OPTIONS} {public_key.strip()}\n")


@contextlib.contextmanager
def no_service_starts() -> Iterator[None]:
    """Keep openssh-server's postinst from starting an sshd on port 22 of every address.

    Docker-like machines already have a policy-rc.d that forbids it; a fresh VM may not.
    """
    if POLICY_RC_D.exists():
        yield
        return
    POLICY_RC_D.write_text(
        "#!/bin/sh\n# tests/test_service_ssh.py, during apt-get install\nexit 101\n"
    )
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        POLICY_RC_D.unlink(missing_ok=True)


@contextlib.contextmanager
def remote_account() -> Iterator[None]:
    """The unprivileged far-side account; removed afterwards only if made here."""
    try:
        pwd.getpwnam(REMOTE_USER)
        made = False
    except KeyError:
        # "*": no password, yet not locked ("!"), which sshd without PAM would refuse.
        subprocess.run(
            ["useradd", "-m", "-s", "/bin/sh", "-p", "*", "-c", "vmtelemetryd test", REMOTE_USER],
            check=True,
        )
        made = True
    try:
        yield
    finally:
        if made:
            subprocess.run(["userdel", "-r", REMOTE_USER], check=False, capture_output=True)


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def remote(lab: Any) -> Iterator[Remote]:
    with locked(), no_service_starts():
        ensure_packages(("openssh-client", "openssh-server"))
    # Under /run, not /tmp: sshd's StrictModes wants every directory above
    # authorized_keys owned by root and not writable by others.
    top = Path(tempfile.mkdtemp(prefix="vmt-sshd-", dir="/run"))
    top.chmod(0o755)
    host_key = top / "host_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host_key], check=True)
    port = free_loopback_port()
    (top / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {top}/sshd.pid\n"
        f"UsePAM no\nAuthorizedKeysFile {top}/authorized_keys\nAllowUsers {REMOTE_USER}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nLogLevel VERBOSE\n"
    )
    (top / "authorized_keys").write_text("")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege separation directory
    with remote_account():
        sshd = subprocess.Popen(
            [SSHD, "-D", "-f", top / "sshd_config", "-E", top / "sshd.log"],
            stdin=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: listening(port) or sshd.poll() is not None, 15, "sshd listening")
            assert sshd.poll() is None, (top / "sshd.log").read_text()
            public = host_key.with_suffix(".pub").read_text().split()
            yield Remote(port, top, f"{public[0]} {public[1]}")
        finally:
            sshd.terminate()
            try:
                sshd.wait(10)
            except subprocess.TimeoutExpired:
                sshd.kill()
                sshd.wait()
            shutil.rmtree(top, ignore_errors=True)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def as_service_user(ns: SystemdNS, *argv: str) -> str:
    return ns.run("runuser", "-u", "vmtelemetry", "--", *argv).stdout


def set_up_client(ns: SystemdNS, remote: Remote) -> None:
    """README.host's steps on the collector, as written there: a key made by the service
    user, the far side's host key taken with ssh-keyscan into its known_hosts."""
    ns.run(
        "install", "-d", "-m", "0700", "-o", "vmtelemetry", "-g", "vmtelemetry",
        "/var/lib/vmtelemetryd", SSH_DIR,
    )  # fmt: skip
    as_service_user(ns, "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", KEY)
    remote.authorize(ns.read(f"{KEY}.pub"))
    scan = f"ssh-keyscan -p {remote.port} -t ed25519 127.0.0.1"
    append = f"runuser -u vmtelemetry -- tee -a {KNOWN_HOSTS} >/dev/null"
    ns.run("/bin/sh", "-c", f"{scan} | {append} && chmod 0600 {KNOWN_HOSTS}")
    scanned = ns.read(KNOWN_HOSTS)
    assert scanned.split() == [f"[127.0.0.1]:{remote.port}", *remote.host_key_pub.split()], scanned


def remote_config(lab: Any, remote: Remote) -> dict[str, str]:
    config = lab_config(lab, LIBVIRT_URI=remote.uri)
    del config["HOST_TAG"]  # the host tag is the far side's name
    return config


def modes(ns: SystemdNS, *paths: str) -> list[str]:
    return ns.run("stat", "-c", "%U:%G %a", *paths).stdout.split("\n")[:-1]


def test_the_service_samples_a_remote_hypervisor_over_ssh(
    ns: SystemdNS, lab: Any, remote: Remote
) -> None:
    """Started as packaged, it reaches the far side's libvirtd through ssh with the
    service user's own key and known_hosts, and tags its points with that host's name."""
    t0_ms = time.time() * 1000
    conn = libvirt.openReadOnly(lab.libvirt_uri)
    try:
        hostname = conn.getHostname()
    finally:
        conn.close()
    install(ns, lab, remote_config(lab, remote))
    set_up_client(ns, remote)
    # README.host's check before the start: the service user's virsh over the same URI.
    assert as_service_user(ns, "virsh", "-r", "-c", remote.uri, "hostname").strip() == hostname
    logins = remote.accepted()
    ns.systemctl("start", SERVICE)

    report = wait_status(ns, lambda s: s["written"] > 0, 30, "points written")
    assert report["last_sample_error"] is None and report["libvirt_connected"], report
    assert report["vms"] >= len(lab.guests), report
    assert show(ns, "ActiveState", "NRestarts") == {"ActiveState": "active", "NRestarts": "0"}
    assert remote.accepted() > logins, remote.log.read_text()
    # What the service's start made of its home leaves ssh's files as they were.
    assert modes(ns, "/var/lib/vmtelemetryd", SSH_DIR, KEY, KNOWN_HOSTS) == [
        "vmtelemetry:vmtelemetry 700",
        "vmtelemetry:vmtelemetry 700",
        "vmtelemetry:vmtelemetry 600",
        "vmtelemetry:vmtelemetry 600",
    ]

    ns.systemctl("stop", SERVICE)
    rows = labkit.query(f'{{__name__="vm_metrics_state",host="{hostname}"}}')
    fresh = {r["metric"]["vm"] for r in rows if max(r["timestamps"]) >= t0_ms}
    assert set(lab.guests) <= fresh, (hostname, sorted(fresh))


def test_a_wrong_known_hosts_entry_is_a_clear_error_not_a_connection(
    ns: SystemdNS, lab: Any, remote: Remote, tmp_path: Path
) -> None:
    """A host key that does not match known_hosts (a new host, or a man in the middle)
    stops the connection at ssh, and the operator sees why in status and journal; once
    the entry is right, the next attempt connects, with no restart."""
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", other], check=True)
    wrong = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    logins = remote.accepted()
    install(ns, lab, remote_config(lab, remote))
    set_up_client(ns, remote)
    right = ns.read(KNOWN_HOSTS)
    ns.write(KNOWN_HOSTS, f"[127.0.0.1]:{remote.port} {wrong}\n", 0o600, "vmtelemetry:vmtelemetry")
    ns.systemctl("start", SERVICE)

    report = wait_status(
        ns,
        lambda s: "Host key verification failed" in (s["last_sample_error"] or ""),
        30,
        "the host key error in status.json",
    )
    assert remote.uri in report["last_sample_error"], report
    assert report["vms"] == 0 and not report["libvirt_connected"], report
    assert "error: cannot connect to libvirt" in show(ns, "StatusText")["StatusText"]
    # --all: ssh's message holds carriage returns, which journalctl otherwise shows as a blob.
    journal = ns.journal("-u", SERVICE, "-p", "err", "-o", "cat", "--all")
    assert "Host key verification failed" in journal, journal
    # Still running, and trying again with backoff, but never let in.
    time.sleep(1)
    assert show(ns, "ActiveState")["ActiveState"] == "active"
    later = status(ns)
    assert later is not None and later["libvirt_connected"] is False, later
    assert remote.accepted() == logins, remote.log.read_text()

    # The right entry is picked up at the next attempt, with no restart.
    ns.write(KNOWN_HOSTS, right, mode=0o600, owner="vmtelemetry:vmtelemetry")
    fixed = wait_status(ns, lambda s: s["libvirt_connected"], 40, "a connection once fixed")
    assert fixed["vms"] >= len(lab.guests) and show(ns, "NRestarts")["NRestarts"] == "0", fixed
    assert remote.accepted() > logins
