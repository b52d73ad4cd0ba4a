"""Write throughput into the lab database, in lines per second, three ways in one run.

* sender: ``Sender.send`` of 2000-line batches, back to back (the HTTP edge alone);
* writer, memory path: lines submitted to a ``Writer`` until all are written;
* writer, spool drain: a spool filled beforehand, drained by a new ``Writer``.

Then the bytes on the wire: the same batches sent to the FAKE InfluxDB 3
endpoint of the tests, which counts each request body as received, beside
the size of the uncompressed body (gzip above 1 KiB, DESIGN.md "Delivery").

Lines are the daemon's own: encoded samples of synthetic VMs, each run with
its own host tag. Needs the lab (``tests/lab/lab up``).
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "lab"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import labkit
from fakeinflux import DATABASE, TOKEN, FakeInflux3, serve

from vmtelemetryd.features import Features
from vmtelemetryd.lineprotocol import encode
from vmtelemetryd.logs import configure_logging
from vmtelemetryd.model import DeviceSample, Sample, VmSample, WriterSettings
from vmtelemetryd.sender import Sender
from vmtelemetryd.spool import Spool
from vmtelemetryd.writer import Writer

BATCH = 2000
LINES = 120_000


def daemon_lines(host: str, count: int) -> list[str]:
    """Encoded samples of 100 synthetic VMs, one second apart, until ``count`` lines."""
    features = Features(5)
    lines: list[str] = []
    second = 0
    while len(lines) < count:
        vms = tuple(_vm(i, second) for i in range(100))
        sample = Sample(host, (1_700_000_000 + second) * 10**9, float(second), vms)
        lines.extend(encode(sample, features.derive(sample)))
        second += 1
    return lines[:count]


def _vm(i: int, second: int) -> VmSample:
    grow = 1000 * second + i
    nic = DeviceSample("nic", "vnet0", {"rx_bytes": grow, "tx_bytes": grow, "rx_packets": grow})
    disk = DeviceSample("disk", "vda", {"rd_bytes": grow, "wr_bytes": grow, "wr_reqs": grow})
    metrics = {"state": 1, "cpu_time_ns": grow * 10**6, "vcpus": 2}
    return VmSample(f"vm-{i}", f"uuid-{i}", 1, metrics, (nic, disk), {"nic": 1, "disk": 1})


def sender_rate(lab: labkit.LabInfo) -> float:
    lines = daemon_lines(f"bench-{uuid.uuid4().hex[:8]}", LINES)
    sender = Sender(lab.influx_url, lab.influx_db, lab.influx_token, "v2")
    started = time.perf_counter()
    for i in range(0, len(lines), BATCH):
        sender.send(lines[i : i + BATCH])
    elapsed = time.perf_counter() - started
    sender.close()
    return len(lines) / elapsed


def writer_rate(lab: labkit.LabInfo, spool_dir: Path, prefill: bool) -> float:
    lines = daemon_lines(f"bench-{uuid.uuid4().hex[:8]}", LINES)
    if prefill:
        spool = Spool(spool_dir, 1 << 30)
        spool.append(lines)
        spool.close()
    settings = WriterSettings(
        batch_max_lines=BATCH, batch_max_sec=1.0, spool_dir=spool_dir, spool_max_bytes=1 << 30
    )
    writer = Writer(Sender(lab.influx_url, lab.influx_db, lab.influx_token, "v2"), settings)
    started = time.perf_counter()
    writer.start()
    if not prefill:
        for i in range(0, len(lines), 6000):
            writer.submit(lines[i : i + 6000])
    while writer.status().counts.written < len(lines):
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    writer.stop(10)
    return len(lines) / elapsed


def wire_bytes(batch: int) -> tuple[int, int]:
    """(uncompressed body bytes, bytes received) for ``LINES`` lines in ``batch``-line requests."""
    lines = daemon_lines(f"bench-{uuid.uuid4().hex[:8]}", LINES)
    fake = FakeInflux3()
    with serve(fake) as url:
        sender = Sender(url, DATABASE, TOKEN, "v3")
        for i in range(0, len(lines), batch):
            sender.send(lines[i : i + batch])
        sender.close()
    assert len(fake.accepted) == len(lines)
    raw = sum(len("\n".join(lines[i : i + batch]).encode()) for i in range(0, len(lines), batch))
    return raw, sum(fake.wire_bytes)


def main() -> None:
    configure_logging("warning")
    lab = labkit.info()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        rows = [
            ("sender, 2000-line batches", sender_rate(lab)),
            ("writer, memory path", writer_rate(lab, Path(scratch) / "a", prefill=False)),
            ("writer, draining a spool", writer_rate(lab, Path(scratch) / "b", prefill=True)),
        ]
    print(f"write throughput into the lab database ({LINES} lines of the daemon's own, v2 API)")
    for name, rate in rows:
        print(f"{name:<28}{rate:>12,.0f} lines/s")
    print("at 1 Hz x 1000 VMs the daemon produces about 6,000 lines/s")
    print(f"bytes on the wire for the same {LINES} lines (FAKE endpoint counts what it receives)")
    for batch in (BATCH, 100, 10):
        raw, wire = wire_bytes(batch)
        print(f"{batch:>5}-line batches: body {raw:>12,} B, wire {wire:>12,} B, {raw / wire:5.1f}x")


if __name__ == "__main__":
    main()
