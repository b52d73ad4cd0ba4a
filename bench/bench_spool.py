"""Spool formats side by side: segment files (vmtelemetryd.spool) against SQLite in WAL mode.

    .venv/bin/python bench/bench_spool.py [--dir DIR] [--recovery-mib 256] [--gib]

Prints figures, tests nothing. The load is the realistic one: 1000 VMs at
1 Hz, about 6000 lines of ~200 bytes appended as one batch a second (here
back to back), drained with peek(2000) + ack. "Open" is the time from
nothing to knowing how many lines wait, on a spool of --recovery-mib,
with its files first dropped from the page cache ("cold"; a VM's host may
still cache them) and again straight after ("warm").

The SQLite contender is the smallest honest one: a row per line, one
transaction per append, DELETE up to the acked id, min/max(id) to count.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vmtelemetryd.spool import Spool

LINES_PER_BATCH = 6000
APPEND_BATCHES = 20
DRAIN_MAX_LINES = 2000
UNBOUNDED = 1 << 50


class Batch(Protocol):
    @property
    def lines(self) -> tuple[str, ...]: ...


class Contender(Protocol):
    @property
    def lines(self) -> int: ...
    def append(self, lines: Sequence[str]) -> None: ...
    def peek(self, max_lines: int) -> Batch | None: ...
    def ack(self, batch: Any) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class SqliteBatch:
    lines: tuple[str, ...]
    last_id: int


class SqliteSpool:
    """The contender: a row per line in a WAL-mode database."""

    def __init__(self, directory: Path, synchronous: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(directory / "spool.db", isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY, line TEXT)")
        # Two subqueries: SQLite looks min() and max() up in the b-tree only when alone.
        bounds = "SELECT (SELECT min(id) FROM spool), (SELECT max(id) FROM spool)"
        low, high = self._db.execute(bounds).fetchone()
        self.lines = 0 if low is None else high - low + 1

    def append(self, lines: Sequence[str]) -> None:
        self._db.execute("BEGIN")
        self._db.executemany("INSERT INTO spool (line) VALUES (?)", ((line,) for line in lines))
        self._db.execute("COMMIT")
        self.lines += len(lines)

    def peek(self, max_lines: int) -> SqliteBatch | None:
        query = "SELECT id, line FROM spool ORDER BY id LIMIT ?"
        rows = self._db.execute(query, (max_lines,)).fetchall()
        return SqliteBatch(tuple(line for _, line in rows), rows[-1][0]) if rows else None

    def ack(self, batch: SqliteBatch) -> None:
        self._db.execute("DELETE FROM spool WHERE id <= ?", (batch.last_id,))
        self.lines -= len(batch.lines)

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class Format:
    name: str
    durable: str  # is an append on disk when it returns?
    open: Callable[[Path], Contender]
    build: Callable[[Path], Contender]  # the fastest way to fill it for the open test


FORMATS = (
    Format(
        "segments + CRC32, fdatasync",
        "yes",
        lambda d: Spool(d, UNBOUNDED),
        lambda d: Spool(d, UNBOUNDED),
    ),
    Format(
        "SQLite WAL, synchronous=FULL",
        "yes",
        lambda d: SqliteSpool(d, "FULL"),
        lambda d: SqliteSpool(d, "OFF"),
    ),
    Format(
        "SQLite WAL, synchronous=NORMAL",
        "no (until checkpoint)",
        lambda d: SqliteSpool(d, "NORMAL"),
        lambda d: SqliteSpool(d, "OFF"),
    ),
)


@dataclass
class Figures:
    append_ms: list[float]
    drain_lines_per_s: float
    disk_after_drain: int
    open_ms: dict[int, tuple[float, float]]  # MiB -> (cold, warm)


def make_batch(second: int) -> list[str]:
    """6000 line-protocol lines of about 200 bytes, like one second of 1000 VMs."""
    stamp = 1_700_000_000_000_000_000 + second * 1_000_000_000
    return [
        f"vm_devices,host=hv01.example.net,vm=vm-{i % 1000:04d},"
        f"uuid=6f1c2c0e-8d3a-4f4e-9b7a-{i % 1000:012d},device=vd{i % 6},kind=disk "
        f"rd_reqs={i * 7}i,rd_bytes={i * 4096}i,wr_reqs={i * 3}i,wr_bytes={i * 8192}i {stamp}"
        for i in range(LINES_PER_BATCH)
    ]


def measure_append_and_drain(fmt: Format, directory: Path) -> tuple[list[float], float, int]:
    spool = fmt.open(directory)
    batches = [make_batch(second) for second in range(APPEND_BATCHES)]
    append_ms = []
    for lines in batches:
        start = time.perf_counter()
        spool.append(lines)
        append_ms.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    drained = 0
    while (batch := spool.peek(DRAIN_MAX_LINES)) is not None:
        spool.ack(batch)
        drained += len(batch.lines)
    elapsed = time.perf_counter() - start
    assert spool.lines == 0 and drained == APPEND_BATCHES * LINES_PER_BATCH
    spool.close()
    return append_ms, drained / elapsed, disk_usage(directory)


def measure_open(fmt: Format, directory: Path, mib: int) -> tuple[float, float]:
    spool = fmt.build(directory)
    lines = make_batch(0)
    while disk_usage(directory) < mib << 20:
        spool.append(lines)
    spool.close()
    os.sync()
    for path in directory.iterdir():
        evict_from_page_cache(path)
    cold = timed_open(fmt, directory)
    warm = timed_open(fmt, directory)
    return cold, warm


def timed_open(fmt: Format, directory: Path) -> float:
    start = time.perf_counter()
    spool = fmt.open(directory)
    assert spool.lines > 0
    elapsed = (time.perf_counter() - start) * 1000
    spool.close()
    return elapsed


def evict_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_usage(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.iterdir())


def run(fmt: Format, scratch: Path, sizes_mib: Sequence[int]) -> Figures:
    append_ms, rate, left = measure_append_and_drain(fmt, scratch / "flow")
    opens = {}
    for mib in sizes_mib:
        opens[mib] = measure_open(fmt, scratch / f"open-{mib}", mib)
        shutil.rmtree(scratch / f"open-{mib}")
    return Figures(append_ms, rate, left, opens)


def print_table(results: dict[str, tuple[Format, Figures]], sizes_mib: Sequence[int]) -> None:
    opens = [f"open {mib} MiB cold/warm ms" for mib in sizes_mib]
    head = [
        "format",
        "durable at return",
        "append ms/batch med (p90)",
        "µs/line",
        "drain lines/s",
        *opens,
        "bytes left after drain",
    ]
    rows = [head]
    for fmt, figures in results.values():
        median = statistics.median(figures.append_ms)
        p90 = statistics.quantiles(figures.append_ms, n=10)[-1]
        rows.append(
            [
                fmt.name,
                fmt.durable,
                f"{median:.1f} ({p90:.1f})",
                f"{median * 1000 / LINES_PER_BATCH:.2f}",
                f"{figures.drain_lines_per_s:,.0f}",
                *(f"{cold:.0f} / {warm:.0f}" for cold, warm in figures.open_ms.values()),
                f"{figures.disk_after_drain:,}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for n, row in enumerate(rows):
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if n == 0:
            print("-+-".join("-" * width for width in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="a disk, not tmpfs")
    parser.add_argument("--recovery-mib", type=int, default=256)
    parser.add_argument("--gib", action="store_true", help="also open spools of 1 GiB")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-spool-", dir=args.dir))
    sizes = [args.recovery_mib, *([1024] if args.gib else [])]
    try:
        results = {fmt.name: (fmt, run(fmt, scratch / fmt.name, sizes)) for fmt in FORMATS}
        print(
            f"{LINES_PER_BATCH} lines (~200 B) per append, {APPEND_BATCHES} appends back to back; "
            f"drain with peek({DRAIN_MAX_LINES}) + ack; scratch {args.dir}"
        )
        print_table(results, sizes)
    finally:
        shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
