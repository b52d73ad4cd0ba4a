"""One write to the database on a thread of its own, halving the batch on 413.

The writer thread goes on parking its queue in the spool while a write hangs
or waits, so the attempt's thread touches nothing but the sender and the
attempt itself, and says it is done under the writer's condition.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from vmtelemetryd.sender import Outcome, RejectedLine, Sender, WriteError
from vmtelemetryd.spool import SpoolBatch


@dataclass
class WriteAttempt:
    """Its thread fills in the outcome; the writer thread reads it once ``finished``."""

    lines: list[str]
    spooled: SpoolBatch | None  # None: the lines were taken from the memory queue
    started: float
    finished: bool = False
    error: WriteError | None = None  # what makes the whole batch wait for a retry
    written: int = 0
    rejections: list[WriteError] = field(default_factory=list)  # for the dead letters

    def start(self, sender: Sender, done: threading.Condition) -> None:
        threading.Thread(
            target=self._run, args=(sender, done), name="writer-send", daemon=True
        ).start()

    def _run(self, sender: Sender, done: threading.Condition) -> None:
        error = self._send(sender, self.lines)
        with done:
            self.error = error
            self.finished = True
            done.notify()

    def _send(self, sender: Sender, lines: list[str]) -> WriteError | None:
        try:
            sender.send(lines)
        except WriteError as error:
            if error.outcome is Outcome.SPLIT and len(lines) > 1:
                half = len(lines) // 2
                return self._send(sender, lines[:half]) or self._send(sender, lines[half:])
            if error.outcome is Outcome.SPLIT:
                error.rejected = (RejectedLine(lines[0], error.reason),)
            elif error.outcome is not Outcome.REJECTED:
                return error
            self.rejections.append(error)
            self.written += len(lines) - len(error.rejected)
            return None
        self.written += len(lines)
        return None
