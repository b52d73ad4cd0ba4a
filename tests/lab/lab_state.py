"""Where the lab lives, how it runs commands, and which processes it started.

The other lab modules build on this: the lab dir and guest-name prefix
(``VMT_LAB_DIR``, ``VMT_LAB_PREFIX``), commands run with root's PATH, one lock
shared by every process that changes the lab, ``state.json``, and records that
tell a process the lab started from a later one that got the same PID.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

DEFAULT_LAB_DIR = "/var/lib/vmtelemetryd-lab"
DEFAULT_PREFIX = "vmtlab-"


class LabError(RuntimeError):
    """The lab could not be brought to the state asked for."""


_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[lab {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def lab_dir() -> Path:
    return Path(os.environ.get("VMT_LAB_DIR") or DEFAULT_LAB_DIR)


def prefix() -> str:
    return os.environ.get("VMT_LAB_PREFIX") or DEFAULT_PREFIX


def lab_path(*parts: str) -> Path:
    return lab_dir().joinpath(*parts)


def command_env() -> dict[str, str]:
    """The environment for the lab's commands: a C locale, and root's tools
    in PATH (a CI environment may leave sbin out)."""
    env = dict(os.environ)
    env["LC_ALL"] = "C.UTF-8"
    env["LANG"] = "C.UTF-8"
    path = env.get("PATH", "")
    for extra in ("/usr/local/sbin", "/usr/sbin", "/sbin"):
        if extra not in path.split(":"):
            path = f"{path}:{extra}" if path else extra
    env["PATH"] = path
    return env


def which(cmd: str) -> str | None:
    return shutil.which(cmd, path=command_env()["PATH"])


def run(
    args: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    timeout: float = 120,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; with ``check``, a failure is a LabError
    carrying its output."""
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
            env=env or command_env(),
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
def locked() -> Iterator[None]:
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


def write_atomic(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def load_state() -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(lab_path("state.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return state


def save_state(state: dict[str, Any]) -> None:
    write_atomic(lab_path("state.json"), json.dumps(state, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- processes


def proc_start(pid: int) -> str | None:
    """Start time of a live (non-zombie) process, to tell a PID from its reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat[stat.rfind(")") + 2 :].split()
    if rest[0] in ("Z", "X"):
        return None
    return rest[19]  # field 22: starttime


def proc_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def record(pid: int) -> dict[str, Any]:
    return {"pid": pid, "start": proc_start(pid), "comm": proc_comm(pid)}


def alive(rec: dict[str, Any] | None) -> bool:
    if not rec or not rec.get("pid"):
        return False
    return proc_start(rec["pid"]) == rec.get("start") and proc_comm(rec["pid"]) == rec.get("comm")


def pids_named(comm: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and proc_comm(int(d)) == comm and proc_start(int(d)) is not None:
            out.append(int(d))
    return out


# Popen objects of the daemons this process started, so that stop_pid() reaps them.
children: dict[int, subprocess.Popen[bytes]] = {}


def stop_pid(rec: dict[str, Any], name: str, timeout: float = 30) -> None:
    """SIGTERM a process the lab started (checked by PID + start time), wait
    for it to go (SIGKILL after ``timeout``), and reap it if it is our child."""
    if not alive(rec):
        return
    pid = rec["pid"]
    log(f"stopping {name} (pid {pid})")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(rec) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(rec):
        log(f"{name} (pid {pid}) ignored SIGTERM for {timeout:.0f}s: SIGKILL")
        os.kill(pid, signal.SIGKILL)
        while alive(rec):
            time.sleep(0.05)
    child = children.pop(pid, None)
    if child is not None:
        child.wait(5)
