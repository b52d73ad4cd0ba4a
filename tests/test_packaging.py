"""The .deb and .rpm from packaging/: what they hold, and the .deb installed for real.

The packages are built once per session by packaging/build-deb and packaging/build-rpm
(the .rpm only where rpmbuild is), into a work directory under pytest's tmp, and kept in
/var/tmp/vmtelemetryd-pkgtest/<hash of their inputs>/: a later session with the same
sources, lock files, interpreter and libvirt reuses them instead of spending a minute or
two on each. The build time is printed.

Checked without installing: every file of DESIGN.md's "Files on a host" table (and the
sysusers.d and tmpfiles.d entries) is where it should be, with its mode; the env file is a
conffile / %config(noreplace); nothing names the build host (this checkout, the build
directory, pyenv); the venv runs on the system's /usr/bin/python3.11.

Installed for real, with dpkg, always in private mount namespaces whose overlays keep the
machine untouched: once without a running systemd (a chroot, an image build), and, against
the lab, inside a booted systemd (tests/systemdns.py, ``packages=True``): configure, start,
data in the lab database, upgrade, stop, remove, purge.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import labkit
import pytest
from systemdns import (
    REPO,
    SystemdNS,
    booted_for_test,
    dotenv,
    lab_service_config,
    wait_for,
)

PACKAGING = REPO / "packaging"
CACHE = Path("/var/tmp/vmtelemetryd-pkgtest")
CACHE_KEEP = 3
# What goes into the packages: a change to any of these means a new build.
INPUTS = ("pyproject.toml", "README.md", "vmtelemetryd", "systemd", "etc", "packaging")
PYTHON = "/usr/bin/python3.11"
PREFIX = "/opt/vmtelemetryd"
SITE = f"{PREFIX}/lib/python3.11/site-packages"
SERVICE = "vmtelemetryd.service"
ENV_FILE = "/etc/vmtelemetryd/vmtelemetryd.env"
TOKEN_FILE = "/etc/vmtelemetryd/influx-token"
SYSUSERS = "/usr/lib/sysusers.d/vmtelemetryd.conf"
TMPFILES = "/usr/lib/tmpfiles.d/vmtelemetryd.conf"
DEB_UNIT = "/lib/systemd/system/vmtelemetryd.service"
RPM_UNIT = "/usr/lib/systemd/system/vmtelemetryd.service"
# DESIGN.md, "Files on a host", as shipped: path -> mode and type. /var/lib/vmtelemetryd
# and /run/vmtelemetryd come from StateDirectory= and RuntimeDirectory= at start.
SHIPPED = {
    "/usr/bin/vmtelemetryd": "-rwxr-xr-x",
    ENV_FILE: "-rw-r-----",
    "/etc/vmtelemetryd": "drwxr-x---",
    SYSUSERS: "-rw-r--r--",
    TMPFILES: "-rw-r--r--",
    f"{PREFIX}/bin/python3.11": "lrwxrwxrwx",
    f"{PREFIX}/pyvenv.cfg": "-rw-r--r--",
}
PYVENV_CFG = f"""\
home = /usr/bin
include-system-site-packages = false
version = {{version}}
executable = {PYTHON}
command = {PYTHON} -m venv {PREFIX}
"""

T = TypeVar("T")


# ---------------------------------------------------------------------- building


@dataclass(frozen=True)
class Built:
    deb: Path
    rpm: Path | None
    rpm_skip: str
    # The work directories the builds ran in: no packaged file may name them.
    workdirs: tuple[str, ...]


def _inputs_hash() -> str:
    digest = hashlib.sha256()
    for top in INPUTS:
        path = REPO / top
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for file in files:
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(f"{file.relative_to(REPO)}\0".encode() + file.read_bytes())
    # What the packages are compiled against on this host.
    for argv in ([PYTHON, "-VV"], ["pkg-config", "--modversion", "libvirt"]):
        with contextlib.suppress(OSError):
            digest.update(subprocess.run(argv, capture_output=True).stdout)
    return digest.hexdigest()[:16]


def _build_env() -> dict[str, str]:
    """Nothing of this test's Python (pyenv, .venv) for the build: the scripts use /usr/bin."""
    keep = (
        "HOME",
        "PIP_CERT",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
    )
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update({"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
    if "VMT_PIP_INDEX_URL" in os.environ:
        env["VMT_PIP_INDEX_URL"] = os.environ["VMT_PIP_INDEX_URL"]
    return env


def _run_build(script: str, outdir: Path, workdir: Path) -> tuple[Path, float]:
    started = time.monotonic()
    result = subprocess.run(
        [str(PACKAGING / script), "--outdir", str(outdir), "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        env=_build_env(),
        timeout=1800,
    )
    if result.returncode != 0:
        pytest.fail(f"{script} failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return Path(result.stdout.strip().splitlines()[-1]), time.monotonic() - started


def _rpm_skip_reason() -> str:
    if shutil.which("rpmbuild") is None:
        return "rpmbuild is not installed (Debian: apt-get install rpm)"
    return ""


def _prune_cache(keep: Path) -> None:
    entries = sorted(
        (p for p in CACHE.iterdir() if p.is_dir() and p != keep),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in entries[CACHE_KEEP - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Built:
    """The packages, built from this checkout, or taken from the cache when nothing changed."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed: not a Debian machine")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def say(line: str) -> None:
        """Shown as it happens, whatever the capture mode."""
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(f"\n[packaging] {line}", flush=True)

    rpm_skip = _rpm_skip_reason()
    CACHE.mkdir(parents=True, exist_ok=True)
    entry = CACHE / _inputs_hash()
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entry.mkdir(exist_ok=True)
        os.utime(entry)
        record_path = entry / "build.json"
        record: dict[str, Any] = json.loads(record_path.read_text()) if record_path.exists() else {}
        kinds = [("deb", "build-deb")] + ([] if rpm_skip else [("rpm", "build-rpm")])
        for kind, script in kinds:
            done = record.get(kind)
            if done and (entry / done["file"]).exists():
                say(f"{done['file']}: cached in {entry} (built in {done['seconds']:.0f} s)")
                continue
            workdir = tmp_path_factory.mktemp(f"{kind}-build") / "work"
            say(f"building with packaging/{script} (a minute or two) ...")
            package, seconds = _run_build(script, entry, workdir)
            shutil.rmtree(workdir, ignore_errors=True)
            record[kind] = {"file": package.name, "seconds": seconds, "workdir": str(workdir)}
            record_path.write_text(json.dumps(record, indent=2))
            size = package.stat().st_size / 2**20
            say(f"{package.name}: {size:.1f} MiB, built in {seconds:.0f} s")
        _prune_cache(entry)
    return Built(
        deb=entry / record["deb"]["file"],
        rpm=entry / record["rpm"]["file"] if "rpm" in record and not rpm_skip else None,
        rpm_skip=rpm_skip,
        workdirs=tuple(record[k]["workdir"] for k in ("deb", "rpm") if k in record),
    )


@pytest.fixture(scope="module")
def deb_tree(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The .deb unpacked (dpkg-deb -R: the files and DEBIAN/)."""
    tree = tmp_path_factory.mktemp("deb-tree")
    subprocess.run(["dpkg-deb", "-R", str(built.deb), str(tree)], check=True)
    yield tree
    shutil.rmtree(tree, ignore_errors=True)


@pytest.fixture(scope="module")
def rpm_tree(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The .rpm's payload unpacked."""
    if built.rpm is None:
        pytest.skip(built.rpm_skip)
    tree = tmp_path_factory.mktemp("rpm-tree")
    subprocess.run(
        f"rpm2cpio {built.rpm} | cpio -idm --quiet --no-absolute-filenames",
        shell=True,
        check=True,
        cwd=tree,
    )
    yield tree
    shutil.rmtree(tree, ignore_errors=True)


def rpm_query(built: Built, *args: str) -> str:
    if built.rpm is None:
        pytest.skip(built.rpm_skip)
    return subprocess.run(
        ["rpm", "-qp", *args, str(built.rpm)], capture_output=True, text=True, check=True
    ).stdout


def deb_listing(deb: Path) -> dict[str, tuple[str, str]]:
    """``dpkg-deb -c``: path -> (mode string, owner/group)."""
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True).stdout
    listing = {}
    for line in out.splitlines():
        fields = line.split(None, 5)
        path = fields[5].split(" -> ")[0].removeprefix(".").rstrip("/") or "/"
        listing[path] = (fields[0], fields[1])
    return listing


# ---------------------------------------------------------------------- the .deb, unpacked


def test_deb_control(built: Built) -> None:
    info = subprocess.run(
        ["dpkg-deb", "-f", str(built.deb)], capture_output=True, text=True, check=True
    ).stdout
    fields = dict(re.findall(r"^(\S+): (.*)$", info, re.M))
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert fields["Package"] == "vmtelemetryd" and fields["Architecture"] == "amd64", fields
    assert fields["Version"].startswith(version.replace("rc", "~rc") + "-"), fields
    assert built.deb.name == f"vmtelemetryd_{fields['Version']}_amd64.deb"
    depends = {d.split()[0]: d for d in fields["Depends"].split(", ")}
    # The interpreter the venv's cp311 modules need, by its exact version.
    assert depends["python3.11"] == "python3.11", depends
    # libvirt-python links the distribution's libvirt client library (dpkg-shlibdeps).
    assert re.fullmatch(r"libvirt0 \(>= [\d.]+\)", depends["libvirt0"]), depends
    assert depends["systemd"].startswith("systemd"), depends
    assert "init-system-helpers" in depends, depends
    assert "python3" not in depends, "python3 (>= 3.11) would accept a python3 the venv cannot use"


def test_deb_holds_the_files_of_design_md(built: Built) -> None:
    listing = deb_listing(built.deb)
    for path, mode in {**SHIPPED, DEB_UNIT: "-rw-r--r--"}.items():
        assert path in listing, f"{path} is not in the .deb"
        assert listing[path] == (mode, "root/root"), (path, listing[path])
    # Made by systemd at start (StateDirectory=, RuntimeDirectory=), not shipped.
    assert not [p for p in listing if p.startswith(("/var/", "/run/"))]
    # Nothing outside the package's own places; no pip or activate scripts in the venv.
    owned = (
        "/etc/vmtelemetryd",
        DEB_UNIT,
        PREFIX,
        "/usr/bin/vmtelemetryd",
        SYSUSERS,
        TMPFILES,
        "/usr/share/doc/vmtelemetryd/",
    )
    strays = [p for p, (mode, _) in listing.items() if mode[0] != "d" and not p.startswith(owned)]
    assert not strays, strays
    assert sorted(p for p in listing if p.startswith(f"{PREFIX}/bin/")) == [
        f"{PREFIX}/bin/python",
        f"{PREFIX}/bin/python3",
        f"{PREFIX}/bin/python3.11",
    ]
    assert not [p for p in listing if re.search(r"/site-packages/(pip|setuptools)\b", p)]


def test_deb_ships_this_checkouts_unit_config_and_entries(deb_tree: Path) -> None:
    pairs = {
        DEB_UNIT: "systemd/vmtelemetryd.service",
        SYSUSERS: "systemd/vmtelemetryd.sysusers",
        TMPFILES: "systemd/vmtelemetryd.tmpfiles",
        ENV_FILE: "etc/vmtelemetryd.env",
    }
    for installed, source in pairs.items():
        assert (deb_tree / installed.lstrip("/")).read_bytes() == (REPO / source).read_bytes()
    unit = (deb_tree / DEB_UNIT.lstrip("/")).read_text()
    assert "ExecStart=/usr/bin/vmtelemetryd run" in unit
    assert re.search(r"^StateDirectory=vmtelemetryd$", unit, re.M)
    assert re.search(r"^RuntimeDirectory=vmtelemetryd$", unit, re.M)


def test_deb_env_file_is_a_conffile_and_scripts_are_sound(deb_tree: Path) -> None:
    control = deb_tree / "DEBIAN"
    assert (control / "conffiles").read_text().split() == [ENV_FILE]
    for name in ("postinst", "prerm", "postrm"):
        script = control / name
        assert script.stat().st_mode & 0o777 == 0o755, name
        subprocess.run(["sh", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        result = subprocess.run(
            [
                "shellcheck",
                "-s",
                "sh",
                *(str(control / n) for n in ("postinst", "prerm", "postrm")),
            ],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout
    postinst = (control / "postinst").read_text()
    assert "systemd-sysusers" in postinst and "systemd-tmpfiles" in postinst
    assert "deb-systemd-invoke try-restart" in postinst
    # Every systemctl call waits for a running systemd: a chroot install never fails.
    assert "[ -d /run/systemd/system ]" in postinst
    postrm = (control / "postrm").read_text()
    assert "/var/lib/vmtelemetryd" in postrm and "userdel" not in postrm


def _assert_names_no_build_host(tree: Path, built: Built) -> None:
    """No file names this checkout, a build directory or pyenv; only known shebangs."""
    needles = [REPO.as_posix().encode() + b"/", b"/.pyenv", b"/tmp/pip-"]
    needles += [w.encode() for w in built.workdirs]
    shebangs = {}
    for path in tree.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"{path.relative_to(tree)} names {needle.decode()}"
        if data.startswith(b"#!"):
            shebangs[str(path.relative_to(tree))] = data.split(b"\n", 1)[0].decode()
    shebangs = {p: s for p, s in shebangs.items() if not p.startswith("DEBIAN/")}
    assert shebangs == {"usr/bin/vmtelemetryd": f"#!{PREFIX}/bin/python3 -I"}, shebangs
    version = subprocess.run(
        [PYTHON, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    cfg = (tree / PREFIX.lstrip("/") / "pyvenv.cfg").read_text()
    assert cfg == PYVENV_CFG.format(version=version), cfg
    venv_bin = tree / PREFIX.lstrip("/") / "bin"
    assert os.readlink(venv_bin / "python3.11") == PYTHON
    assert os.readlink(venv_bin / "python3") == "python3.11"


def test_deb_names_no_build_host_path(deb_tree: Path, built: Built) -> None:
    _assert_names_no_build_host(deb_tree, built)


def test_deb_venv_runs_on_the_system_python_and_libvirt(deb_tree: Path) -> None:
    """The unpacked venv imports everything on /usr/bin/python3.11, with the distro's libvirt."""
    python = deb_tree / PREFIX.lstrip("/") / "bin" / "python3"
    probe = (
        "import sys, libvirt, influxdb_client_3, pyarrow, dotenv, sdnotify, structlog;"
        "import vmtelemetryd.cli, vmtelemetryd.sender;"
        "print(sys.base_prefix, sys.version_info[:2], libvirt.getVersion(), libvirt.__file__)"
    )
    result = subprocess.run(
        [str(python), "-I", "-c", probe], capture_output=True, text=True, env={"PATH": "/usr/bin"}
    )
    assert result.returncode == 0, result.stderr
    base, _, rest = result.stdout.partition(" ")
    assert base == "/usr" and rest.startswith("(3, 11) "), result.stdout
    assert f"{deb_tree}{SITE}/libvirt.py" in result.stdout, result.stdout
    module = next((deb_tree / SITE.lstrip("/")).glob("libvirtmod.cpython-311-*.so"))
    ldd = subprocess.run(["ldd", str(module)], capture_output=True, text=True).stdout
    assert re.search(r"libvirt\.so\.0 => /(usr/)?lib/x86_64-linux-gnu/libvirt\.so\.0", ldd), ldd
    # The .pyc files are there (the service cannot write any into /opt), hash-checked.
    pyc = next((deb_tree / SITE.lstrip("/") / "vmtelemetryd" / "__pycache__").glob("cli.*.pyc"))
    assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 0b11  # checked hash


# ---------------------------------------------------------------------- the .rpm


def test_rpm_holds_the_same_files(built: Built) -> None:
    flags = {}
    for line in rpm_query(
        built,
        "--qf",
        "[%{FILEFLAGS:fflags}|%{FILEMODES:perms}|%{FILEUSERNAME}:%{FILEGROUPNAME}|%{FILENAMES}\n]",
    ).splitlines():
        fflags, mode, owner, path = line.split("|")
        flags[path] = (fflags, mode, owner)
    assert set(rpm_query(built, "-l").split()) == set(flags)
    expected = {
        **{p: ("", m, "root:root") for p, m in SHIPPED.items()},
        RPM_UNIT: ("", "-rw-r--r--", "root:root"),
        # The group exists before the files: %pre runs systemd-sysusers.
        "/etc/vmtelemetryd": ("", "drwxr-x---", "root:vmtelemetry"),
        ENV_FILE: ("cn", "-rw-r-----", "root:vmtelemetry"),
        "/var/lib/vmtelemetryd": ("g", "drwx------", "vmtelemetry:vmtelemetry"),
        "/run/vmtelemetryd": ("g", "drwxr-xr-x", "vmtelemetry:vmtelemetry"),
    }
    for path, want in expected.items():
        assert flags.get(path) == want, (path, flags.get(path))
    assert rpm_query(built, "-c").split() == [ENV_FILE]
    assert not [p for p in flags if p.startswith("/lib/")], "units go to /usr/lib/systemd/system"


def test_rpm_scriptlets_and_dependencies(built: Built) -> None:
    scripts = rpm_query(built, "--scripts")
    scriptlet = r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)"
    parts = dict(re.findall(scriptlet, scripts, re.M | re.S))
    assert set(parts) == {"preinstall", "postinstall", "preuninstall", "postuninstall"}, scripts
    assert (
        "systemd-sysusers --replace=/usr/lib/sysusers.d/vmtelemetryd.conf -" in parts["preinstall"]
    )
    assert "u vmtelemetry - " in parts["preinstall"]
    assert "systemd-tmpfiles --create" in parts["postinstall"]
    assert "systemctl --no-reload preset vmtelemetryd.service" in parts["postinstall"]
    assert '"$1" -eq 0' in parts["preuninstall"] and "stop vmtelemetryd" in parts["preuninstall"]
    assert "try-restart vmtelemetryd.service" in parts["postuninstall"]
    # Stopping, restarting and reloading wait for a running systemd (not in a chroot).
    for name in ("postinstall", "preuninstall", "postuninstall"):
        assert "[ -d /run/systemd/system ]" in parts[name], name
    requires = rpm_query(built, "--requires").splitlines()
    assert "/usr/bin/python3.11" in requires, requires
    assert "libvirt.so.0()(64bit)" in requires, requires
    # The venv's own libraries and distributions are not the system's business.
    assert not [r for r in requires if re.match(r"lib(arrow|parquet)|python3\S*dist\(", r)]
    provides = rpm_query(built, "--provides").split("\n")
    assert {p.split()[0] for p in provides if p} == {
        "config(vmtelemetryd)",
        "vmtelemetryd",
        "vmtelemetryd(x86-64)",
    }, provides


def test_rpm_names_no_build_host_path(rpm_tree: Path, built: Built) -> None:
    _assert_names_no_build_host(rpm_tree, built)


# ---------------------------------------------------------------------- installed, no systemd


class MountNS:
    """A private mount namespace with the machine's /etc, /var, /usr and /opt overlaid in
    RAM and an empty /run: what a chroot or an image build looks like to a package (no
    running systemd). Commands run in it through nsenter."""

    SETUP = r"""
set -eu
mount -t tmpfs -o mode=0755 pkgtest-run /run
for dir in etc var usr opt; do
    mkdir -p "/run/ovl/$dir.upper" "/run/ovl/$dir.work"
    mount -t overlay -o "lowerdir=/$dir,upperdir=/run/ovl/$dir.upper,workdir=/run/ovl/$dir.work" \
        "pkgtest-$dir" "/$dir"
done
echo ready
exec sleep infinity
"""

    def __enter__(self) -> MountNS:
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", self.SETUP],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.kill()
            raise RuntimeError("the mount namespace could not be set up")
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["nsenter", "-t", str(self.proc.pid), "-m", "--", *argv],
            capture_output=True,
            text=True,
            timeout=300,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{argv}: {result.returncode}\n{result.stdout}{result.stderr}")
        return result


def _mount_ns_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a mount namespace, overlays)"
    if "\toverlay\n" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlay file system"
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "unshare/nsenter are not installed"
    return None


def test_deb_installs_and_purges_without_a_running_systemd(built: Built) -> None:
    reason = _mount_ns_skip_reason()
    if reason:
        pytest.skip(reason)
    with MountNS() as ns:
        # As on a fresh host: no vmtelemetry user yet (the lab made one on this machine).
        forget = (
            "for f in passwd group shadow gshadow; do"
            ' [ ! -e "/etc/$f" ] || sed -i "/^vmtelemetry:/d" "/etc/$f"; done'
        )
        ns.run("sh", "-c", forget)
        assert ns.run("getent", "passwd", "vmtelemetry", check=False).returncode == 2

        installed = ns.run("dpkg", "-i", str(built.deb))
        assert "not started" in installed.stderr and TOKEN_FILE in installed.stderr, installed
        user = ns.run("getent", "passwd", "vmtelemetry").stdout.strip().split(":")
        assert 0 < int(user[2]) < 1000 and user[6] == "/usr/sbin/nologin", user
        assert ns.run("id", "-nG", "vmtelemetry").stdout.split() == ["vmtelemetry"]
        ls = ns.run("stat", "-c", "%A %U:%G %n", "/etc/vmtelemetryd", ENV_FILE).stdout
        assert ls.splitlines() == [
            "drwxr-x--- root:vmtelemetry /etc/vmtelemetryd",
            f"-rw-r----- root:vmtelemetry {ENV_FILE}",
        ], ls
        # Enabled for the next boot, by deb-systemd-helper, without systemctl.
        wants = f"/etc/systemd/system/multi-user.target.wants/{SERVICE}"
        assert ns.run("readlink", wants).stdout.strip() == DEB_UNIT
        assert ns.run("vmtelemetryd", "check-config").stdout.startswith("configuration OK")

        ns.run("dpkg", "--purge", "vmtelemetryd")
        for gone in ("/etc/vmtelemetryd", wants, PREFIX, "/usr/bin/vmtelemetryd", DEB_UNIT):
            assert ns.run("test", "-e", gone, check=False).returncode == 1, gone
        assert ns.run("getent", "passwd", "vmtelemetry", check=False).returncode == 0


# ---------------------------------------------------------------------- installed, under systemd


@pytest.fixture
def pkg_ns(lab: Any, tmp_path: Path) -> Iterator[SystemdNS]:
    with booted_for_test(tmp_path, packages=True) as booted:
        # A real host has no policy-rc.d. This machine's (Docker's "exit 101") would keep
        # deb-systemd-invoke from starting anything; it goes, in the namespace only.
        booted.remove("/usr/sbin/policy-rc.d")
        yield booted


def lab_config(lab: Any) -> dict[str, str]:
    return lab_service_config(lab, "pkg")


def configure(ns: SystemdNS, lab: Any, config: dict[str, str], group: str = "root") -> None:
    """What the admin (or configuration management) does: the env file and the token.

    The env file must stay readable by the service's group: written before the package is
    installed, as root's, the postinst gives it that group (tmpfiles.d).
    """
    ns.write(ENV_FILE, dotenv(config), mode=0o640, owner=f"root:{group}")
    ns.write(TOKEN_FILE, lab.influx_token + "\n", mode=0o600)


def dpkg(ns: SystemdNS, *args: str) -> subprocess.CompletedProcess[str]:
    return ns.run("dpkg", *args, timeout=300, env={"DEBIAN_FRONTEND": "noninteractive"})


def state(ns: SystemdNS) -> dict[str, str]:
    return ns.show(SERVICE, "ActiveState", "SubState", "MainPID", "UnitFileState")


def exists(ns: SystemdNS, path: str) -> bool:
    return ns.run("test", "-e", path, check=False).returncode == 0


def wait_for_points(lab: Any, host_tag: str, since_ms: float = 0) -> dict[str, list[int]]:
    """Every lab guest's vm_metrics_state timestamps for ``host_tag``, once all have some."""

    def probe() -> dict[str, list[int]] | None:
        rows = labkit.query(f'{{__name__="vm_metrics_state",host="{host_tag}"}}')
        stored = {row["metric"]["vm"]: row["timestamps"] for row in rows}
        fresh = all(max(stored.get(g, [0])) > since_ms for g in lab.guests)
        return stored if fresh else None

    return wait_for(probe, 30, f"points from every lab guest with host={host_tag}")


@pytest.mark.lab
def test_deb_install_start_upgrade_remove_purge(pkg_ns: SystemdNS, lab: Any, built: Built) -> None:
    ns = pkg_ns
    # First install, nothing configured: enabled, not started, and it says what to do.
    installed = dpkg(ns, "-i", str(built.deb))
    assert "not started" in installed.stderr and TOKEN_FILE in installed.stderr, installed
    props = state(ns)
    assert props["ActiveState"] == "inactive" and props["UnitFileState"] == "enabled", props
    assert ns.run("id", "-nG", "vmtelemetry").stdout.split() == ["vmtelemetry"]
    conffiles = ns.run("dpkg-query", "-W", "-f", "${Conffiles}", "vmtelemetryd").stdout
    assert conffiles.split()[0] == ENV_FILE, conffiles

    # The admin configures it; the installed command checks it; systemd starts it.
    config = lab_config(lab)
    configure(ns, lab, config, group="vmtelemetry")
    checked = ns.run(
        "vmtelemetryd", "check-config", env={"CREDENTIALS_DIRECTORY": "/etc/vmtelemetryd"}
    )
    assert checked.stdout.startswith(f"configuration OK ({ENV_FILE})"), checked
    ns.systemctl("start", SERVICE)
    first = state(ns)
    assert first["ActiveState"] == "active" and first["SubState"] == "running", first
    pid = first["MainPID"]
    # The system's interpreter, through the venv and the launcher.
    assert ns.run("readlink", f"/proc/{pid}/exe").stdout.strip() == PYTHON
    argv = ns.read(f"/proc/{pid}/cmdline").split("\0")[:4]
    assert argv == [f"{PREFIX}/bin/python3", "-I", "/usr/bin/vmtelemetryd", "run"], argv
    assert re.search(r"^vms: \d+$", ns.run("vmtelemetryd", "status").stdout, re.M)
    dirs = ns.run("stat", "-c", "%A %U %n", "/var/lib/vmtelemetryd", "/run/vmtelemetryd").stdout
    assert dirs.splitlines() == [
        "drwx------ vmtelemetry /var/lib/vmtelemetryd",
        "drwxr-xr-x vmtelemetry /run/vmtelemetryd",
    ], dirs
    assert exists(ns, "/run/vmtelemetryd/status.json")
    stored = wait_for_points(lab, config["HOST_TAG"])
    assert set(lab.guests) <= set(stored), sorted(stored)

    # Upgrade (the same version again: dpkg runs the upgrade path): restarted on the new
    # files, the admin's configuration kept, the data still flowing.
    before_ms = time.time() * 1000
    dpkg(ns, "-i", str(built.deb))
    upgraded = state(ns)
    assert upgraded["ActiveState"] == "active" and upgraded["MainPID"] != pid, upgraded
    assert ns.read(ENV_FILE) == dotenv(config)
    wait_for_points(lab, config["HOST_TAG"], since_ms=before_ms)

    # An upgrade leaves a service the admin stopped stopped.
    ns.systemctl("stop", SERVICE)
    dpkg(ns, "-i", str(built.deb))
    assert state(ns)["ActiveState"] == "inactive"

    # Removal stops it and keeps configuration, token and spool.
    ns.systemctl("start", SERVICE)
    dpkg(ns, "--remove", "vmtelemetryd")
    assert ns.systemctl("is-active", SERVICE, check=False).stdout.strip() != "active"
    for gone in ("/usr/bin/vmtelemetryd", PREFIX, DEB_UNIT):
        assert not exists(ns, gone), gone
    for kept in (ENV_FILE, TOKEN_FILE, "/var/lib/vmtelemetryd"):
        assert exists(ns, kept), kept

    # Purge: configuration, token and state go; the user stays.
    dpkg(ns, "--purge", "vmtelemetryd")
    wants = f"/etc/systemd/system/multi-user.target.wants/{SERVICE}"
    for gone in ("/etc/vmtelemetryd", "/var/lib/vmtelemetryd", wants, SYSUSERS, TMPFILES):
        assert not exists(ns, gone), gone
    assert ns.run("getent", "passwd", "vmtelemetry", check=False).returncode == 0
    listed = ns.run("dpkg-query", "-W", "vmtelemetryd", check=False)
    assert listed.returncode != 0, listed.stdout


@pytest.mark.lab
def test_deb_configured_beforehand_starts_on_install(
    pkg_ns: SystemdNS, lab: Any, built: Built
) -> None:
    ns = pkg_ns
    config = lab_config(lab)
    # Configuration management put the files first; dpkg keeps them (--force-confold).
    # A policy-rc.d that forbids starting services (an image build) is obeyed.
    ns.write("/usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n", mode=0o755)
    configure(ns, lab, config)
    dpkg(ns, "--force-confold", "-i", str(built.deb))
    assert state(ns)["ActiveState"] == "inactive"
    assert ns.read(ENV_FILE) == dotenv(config)
    dpkg(ns, "--purge", "vmtelemetryd")

    ns.remove("/usr/sbin/policy-rc.d")
    configure(ns, lab, config)
    installed = dpkg(ns, "--force-confold", "-i", str(built.deb))
    assert "not started" not in installed.stderr, installed.stderr
    # Started by the postinst: active (READY=1) by the time dpkg returns.
    assert state(ns)["ActiveState"] == "active"
    assert ns.run("stat", "-c", "%U:%G %a", ENV_FILE).stdout.split() == ["root:vmtelemetry", "640"]
    wait_for_points(lab, config["HOST_TAG"])
    dpkg(ns, "--purge", "vmtelemetryd")
    assert state(ns)["ActiveState"] == "inactive"
