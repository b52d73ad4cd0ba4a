"""The lab's line-protocol database: victoria-metrics on 127.0.0.1.

InfluxDB 3 is not packaged here (LAB.md); victoria-metrics takes the same line
protocol on the v2 write API and reads it back on /api/v1/export. The lab
starts it on a port picked once and kept, with its storage in the lab dir.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from lab_state import (
    LabError,
    alive,
    children,
    command_env,
    lab_path,
    load_state,
    locked,
    log,
    record,
    save_state,
    stop_pid,
    which,
)

INFLUX_DB = "lab"
INFLUX_TOKEN = "lab-token"  # victoria-metrics ignores it
WRITE_API = "v2"  # victoria-metrics has no /api/v3/write_lp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def influx_url(state: dict[str, Any] | None = None) -> str:
    state = load_state() if state is None else state
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
    with locked():
        state = load_state()
        procs = state.setdefault("procs", {})
        port = state.get("db_port")
        if port and alive(procs.get("victoria-metrics")) and _db_healthy(port):
            return f"http://127.0.0.1:{port}"
        if not port:
            port = _free_port()
        elif _port_in_use(port) and not alive(procs.get("victoria-metrics")):
            raise LabError(f"the lab's database port {port} is taken by another process")
        binary = which("victoria-metrics")
        if binary is None:
            raise LabError("victoria-metrics is not installed")
        storage = lab_path("db")
        storage.mkdir(parents=True, exist_ok=True)
        with open(lab_path("victoria-metrics.log"), "ab") as logf:
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
                env=command_env(),
            )
        children[proc.pid] = proc
        deadline = time.monotonic() + 60
        while not _db_healthy(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = lab_path("victoria-metrics.log").read_text(errors="replace")[-2000:]
                raise LabError(f"victoria-metrics did not come up on port {port}\n{tail}")
            time.sleep(0.1)
        procs["victoria-metrics"] = record(proc.pid)
        state["db_port"] = port
        save_state(state)
        log(f"started victoria-metrics (pid {proc.pid}) on 127.0.0.1:{port}")
        return f"http://127.0.0.1:{port}"


def stop_database() -> None:
    """Stop the lab's victoria-metrics (SIGTERM, by recorded PID); its data stays."""
    with locked():
        state = load_state()
        stop_pid(state.get("procs", {}).get("victoria-metrics") or {}, "victoria-metrics")


def database_running() -> bool:
    state = load_state()
    return alive(state.get("procs", {}).get("victoria-metrics"))


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


def query(match: str = '{__name__=~"vm.*"}') -> list[dict[str, Any]]:
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
