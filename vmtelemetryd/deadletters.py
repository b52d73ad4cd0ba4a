"""Lines the database refused for good, kept with its reason for an operator to read.

Retrying them would block everything behind them forever; dropping them
silently would hide a bug. One JSON object per line, rotated once at a size
bound so a flood of bad lines cannot fill the disk.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

from vmtelemetryd.sender import RejectedLine

MAX_BYTES = 64 * 1024 * 1024


class DeadLetters:
    def __init__(self, path: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self._max_bytes = max_bytes

    def add(self, rejected: Iterable[RejectedLine]) -> None:
        """Append; an ``OSError`` here is the caller's to report, the lines are lost anyway."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        records = [
            json.dumps({"time": stamp, "reason": r.reason, "line": r.line}, ensure_ascii=False)
            for r in rejected
        ]
        if not records:
            return
        self._rotate_if_full()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            out.write("\n".join(records) + "\n")

    def _rotate_if_full(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size >= self._max_bytes:
            os.replace(self.path, self.path.with_suffix(self.path.suffix + ".1"))
