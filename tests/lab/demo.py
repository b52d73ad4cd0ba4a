"""The demo behind ``./dev demo``: the daemon in the foreground on the lab, then what landed.

It writes a real configuration file, checks it with ``vmtelemetryd
check-config``, runs ``vmtelemetryd run`` for a while (its log on the
terminal), stops it with SIGTERM as systemd would, and reads back from the
lab database what the daemon wrote.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import labkit

VMTELEMETRYD = Path(sys.executable).with_name("vmtelemetryd")
FEATURES = ("cpu_pct", "mem_used_pct", "net_rx_bps", "net_tx_bps", "disk_rd_bps", "disk_wr_bps")


def main(seconds: float) -> int:
    lab = labkit.up()
    workdir = Path(tempfile.mkdtemp(prefix="vmtelemetryd-demo-"))
    host = f"demo-{time.strftime('%H%M%S')}"
    config = write_config(lab, workdir, host)
    subprocess.run([VMTELEMETRYD, "--config", config, "check-config"], check=True)
    print(f"\n== vmtelemetryd run, {seconds:.0f} s, writing to {lab.influx_url} ==\n", flush=True)
    runtime = {**os.environ, "RUNTIME_DIRECTORY": str(workdir / "run")}
    daemon = subprocess.Popen([VMTELEMETRYD, "--config", config, "run"], env=runtime)
    try:
        time.sleep(seconds)
        print("\n== vmtelemetryd status ==", flush=True)
        subprocess.run([VMTELEMETRYD, "status"], env=runtime, check=False)
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(60)
    print(f"\n== the daemon stopped with status {code}; what landed in the database ==\n")
    summarize(host)
    return code


def write_config(lab: labkit.LabInfo, workdir: Path, host: str) -> Path:
    (workdir / "run").mkdir()
    settings = {
        **lab.env(),
        "HOST_TAG": host,
        "DOMAINS_INCLUDE": f"{lab.prefix}*",
        "SPOOL_DIR": str(workdir / "spool"),
        "FEATURE_WINDOW": "5",
    }
    path = workdir / "vmtelemetryd.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in settings.items() if not k.startswith("VMT_")))
    print(f"configuration: {path}")
    return path


def summarize(host: str) -> None:
    rows = labkit.query(f'{{host="{host}"}}')
    latest: dict[tuple[str, str], float] = {}
    points = 0
    for row in rows:
        labels = row["metric"]
        points += len(row["values"])
        key = (labels.get("vm", ""), labels["__name__"])
        latest[key] = row["values"][-1]
    vms = sorted({vm for vm, _ in latest if vm})
    print(f"{points} values from {len(rows)} series, {len(vms)} VMs, host tag {host!r}\n")
    print(f"{'vm':<20}" + "".join(f"{name:>14}" for name in FEATURES))
    for vm in vms:
        cells = [latest.get((vm, f"vm_features_{name}")) for name in FEATURES]
        print(f"{vm:<20}" + "".join(f"{_cell(value):>14}" for value in cells))
    own = {name.removeprefix("vmtelemetryd_"): v for (vm, name), v in latest.items() if not vm}
    print(
        f"\nthe daemon itself: last poll {own.get('poll_duration_s', 0) * 1000:.1f} ms, "
        f"{own.get('points_written', 0):.0f} lines written, "
        f"{own.get('write_errors', 0):.0f} write errors, {own.get('overruns', 0):.0f} overruns"
    )


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]) if len(sys.argv) > 1 else 30.0))
