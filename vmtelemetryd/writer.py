"""The delivery stage: a background thread between the encoder and the database.

The sampler's thread only appends to a memory queue and never waits on the
network. The writer thread sends that queue in batches while the database
keeps up, and nothing touches the disk. When a write fails, or the queue
grows past its high-water mark, the queue moves to the durable spool and new
lines follow it there until the spool has drained, oldest first; a line
leaves the spool only once the database accepted it.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import structlog

from vmtelemetryd.deadletters import DeadLetters
from vmtelemetryd.sender import Outcome, RejectedLine, Sender, WriteError
from vmtelemetryd.spool import Spool, SpoolError

log = structlog.get_logger("vmtelemetryd.writer")

BACKOFF_FIRST_S = 1.0
BACKOFF_CAP_S = 60.0
RETRY_AFTER_CAP_S = 300.0
SPOOL_RETRY_S = 10.0
HIGH_WATER_BATCHES = 10
MEMORY_CAP_BATCHES = 100


@dataclass(frozen=True, slots=True)
class WriterStatus:
    """A snapshot for status.json and the daemon's own measurement."""

    queued: int
    spooled: int
    written: int
    dropped: int
    dead_lettered: int
    write_errors: int
    last_write_wall: float | None
    last_error: str | None
    spool_error: str | None


@dataclass(frozen=True, slots=True)
class WriterSettings:
    batch_max_lines: int
    batch_max_sec: float
    spool_dir: Path
    spool_max_bytes: int


class Writer:
    """Owns the sender, the spool and the dead letters; only its thread touches them."""

    def __init__(self, sender: Sender, settings: WriterSettings) -> None:
        self._sender = sender
        self._settings = settings
        self._dead_letters = DeadLetters(settings.spool_dir.parent / "dead-letters.jsonl")
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        self._oldest_at = 0.0
        self._stop_by: float | None = None
        self._spool: Spool | None = None
        self._spool_retry_at = 0.0
        self._spooling = False
        self._retry_at = 0.0
        self._failures = 0
        self._written = 0
        self._dropped = 0
        self._write_errors = 0
        self._last_write_wall: float | None = None
        self._last_error: str | None = None
        self._spool_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, lines: Sequence[str]) -> None:
        """Queue lines for delivery; never blocks on the network or the disk."""
        if not lines:
            return
        with self._cond:
            if not self._queue:
                self._oldest_at = time.monotonic()
            self._queue.extend(lines)
            if len(self._queue) >= self._settings.batch_max_lines:
                self._cond.notify()

    def stop(self, timeout: float) -> None:
        """Send what is queued within ``timeout``, spool the rest, and return."""
        with self._cond:
            self._stop_by = time.monotonic() + timeout
            self._cond.notify()
        self._thread.join()

    def status(self) -> WriterStatus:
        with self._cond:
            queued = len(self._queue)
        spool = self._spool
        return WriterStatus(
            queued=queued,
            spooled=spool.lines if spool is not None else 0,
            written=self._written,
            dropped=self._dropped + (spool.dropped_lines if spool is not None else 0),
            dead_lettered=self._dead_letters.count,
            write_errors=self._write_errors,
            last_write_wall=self._last_write_wall,
            last_error=self._last_error,
            spool_error=self._spool_error,
        )

    def _run(self) -> None:
        self._open_spool()
        while self._wait_for_work():
            self._step()
        self._finish()

    def _wait_for_work(self) -> bool:
        """Sleep until a batch is due, a retry is due, or a stop is asked; False on stop."""
        with self._cond:
            while self._stop_by is None:
                wait = self._seconds_until_due()
                if wait <= 0:
                    return True
                self._cond.wait(wait)
            return False

    def _seconds_until_due(self) -> float:
        now = time.monotonic()
        if self._retry_at > now:
            # While waiting to retry, still move the queue to the spool every batch period.
            return min(self._retry_at - now, self._settings.batch_max_sec)
        if self._spooling and (self._has_spooled() or self._queue):
            return 0.0
        if not self._queue:
            return self._settings.batch_max_sec
        if len(self._queue) >= self._settings.batch_max_lines:
            return 0.0
        return self._oldest_at + self._settings.batch_max_sec - now

    def _step(self) -> None:
        if len(self._queue) > HIGH_WATER_BATCHES * self._settings.batch_max_lines:
            self._enter_spooling("memory queue past its high-water mark")
        if self._spooling:
            self._queue_to_spool()
            self._bound_memory()
        if time.monotonic() < self._retry_at:
            return
        if self._has_spooled():
            delivered = self._send_from_spool()
        elif self._queue:
            delivered = self._send_from_queue()
        else:
            return
        if delivered and self._spooling and not self._has_spooled():
            self._spooling = False
            log.info("spool drained, writing directly again")

    def _send_from_queue(self) -> bool:
        with self._cond:
            batch = list(islice(self._queue, self._settings.batch_max_lines))
        if not self._deliver(batch):
            self._enter_spooling(self._last_error or "write failed")
            return False
        with self._cond:
            for _ in batch:
                self._queue.popleft()
            self._oldest_at = time.monotonic()
        return True

    def _send_from_spool(self) -> bool:
        assert self._spool is not None
        try:
            batch = self._spool.peek(self._settings.batch_max_lines)
        except SpoolError as exc:
            self._spool_failed(exc)
            self._retry_at = self._spool_retry_at  # nothing to send until it can be read
            return False
        if batch is None or not self._deliver(list(batch.lines)):
            return False
        try:
            self._spool.ack(batch)
        except SpoolError as exc:  # acknowledged in memory; only a restart could re-send
            self._spool_failed(exc)
        return True

    def _deliver(self, lines: list[str]) -> bool:
        """One attempt, splitting on 413; False means keep the lines and retry later."""
        error = self._send_splitting(lines)
        if error is None:
            self._failures = 0
            self._retry_at = 0.0
            self._last_write_wall = time.time()
            return True
        self._write_errors += 1
        self._last_error = error.reason
        self._failures += 1
        self._retry_at = time.monotonic() + _retry_delay(self._failures, error)
        log.warning(
            "write failed",
            outcome=error.outcome.value,
            reason=error.reason,
            lines=len(lines),
            retry_in_s=round(self._retry_at - time.monotonic(), 1),
        )
        return False

    def _send_splitting(self, lines: list[str]) -> WriteError | None:
        try:
            self._sender.send(lines)
        except WriteError as error:
            if error.outcome is Outcome.SPLIT and len(lines) > 1:
                half = len(lines) // 2
                return self._send_splitting(lines[:half]) or self._send_splitting(lines[half:])
            if error.outcome is Outcome.SPLIT:
                error.rejected = (RejectedLine(lines[0], error.reason),)
            elif error.outcome is not Outcome.REJECTED:
                return error
            self._reject(error)
            self._written += len(lines) - len(error.rejected)
            return None
        self._written += len(lines)
        return None

    def _reject(self, error: WriteError) -> None:
        self._last_error = error.reason
        log.error("database rejected lines", reason=error.reason, lines=len(error.rejected))
        try:
            self._dead_letters.add(error.rejected)
        except OSError as exc:
            path = str(self._dead_letters.path)
            log.error("cannot write dead letters", path=path, error=str(exc))

    def _enter_spooling(self, why: str) -> None:
        if not self._spooling:
            log.warning("spooling to disk until the database catches up", why=why)
        self._spooling = True

    def _queue_to_spool(self) -> None:
        if not self._queue or not self._spool_usable():
            return
        assert self._spool is not None
        with self._cond:
            lines = list(self._queue)
        try:
            self._spool.append(lines)
        except SpoolError as exc:
            self._spool_failed(exc)
            return
        self._spool_error = None
        with self._cond:
            for _ in lines:
                self._queue.popleft()

    def _bound_memory(self) -> None:
        """Without a usable spool, keep the newest lines and count the oldest as dropped."""
        cap = MEMORY_CAP_BATCHES * self._settings.batch_max_lines
        with self._cond:
            excess = len(self._queue) - cap
            for _ in range(max(0, excess)):
                self._queue.popleft()
        if excess > 0:
            self._dropped += excess
            log.error("memory queue full, oldest lines dropped", dropped=excess)

    def _has_spooled(self) -> bool:
        return self._spool is not None and self._spool.lines > 0

    def _spool_usable(self) -> bool:
        """A spool that failed is tried again after a pause, not on every step."""
        if time.monotonic() < self._spool_retry_at:
            return False
        if self._spool is None:
            self._open_spool()
        return self._spool is not None

    def _open_spool(self) -> None:
        settings = self._settings
        try:
            self._spool = Spool(settings.spool_dir, settings.spool_max_bytes)
        except SpoolError as exc:
            self._spool_failed(exc)
            return
        self._spool_error = None
        if self._spool.lines:
            self._spooling = True
            log.info("spool holds lines from before", lines=self._spool.lines)

    def _spool_failed(self, exc: SpoolError) -> None:
        """An append that failed left the spool consistent: keep it, try again later."""
        self._spool_error = str(exc)
        self._spool_retry_at = time.monotonic() + SPOOL_RETRY_S
        log.error("spool unusable, holding lines in memory", error=str(exc))

    def _finish(self) -> None:
        """On stop: a last try to send the memory queue, then spool whatever is left."""
        assert self._stop_by is not None
        while self._queue and not self._spooling and time.monotonic() < self._stop_by:
            self._send_from_queue()
        self._spooling = True
        self._spool_retry_at = 0.0
        self._queue_to_spool()
        if self._queue:
            log.error("lines lost at stop: spool unusable", lines=len(self._queue))
        if self._spool is not None:
            self._spool.close()
        self._sender.close()


def _retry_delay(failures: int, error: WriteError) -> float:
    """Capped exponential backoff with full jitter; the server's Retry-After wins."""
    if error.retry_after is not None:
        return min(error.retry_after, RETRY_AFTER_CAP_S)
    ceiling = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** (failures - 1))
    return random.uniform(ceiling / 2, ceiling)
