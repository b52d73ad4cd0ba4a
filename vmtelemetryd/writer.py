"""The delivery stage: a background thread between the encoder and the database.

The sampler's thread only appends to a memory queue and never waits on the
network or the disk. While the database keeps up, the writer sends that
queue in batches and nothing touches the disk. Once a write fails, or takes
longer than ``BATCH_MAX_SEC``, or the queue grows past its high-water mark,
the writer is *spooling*: every ``BATCH_MAX_SEC`` the queue moves to the
durable spool, and the spool drains oldest first; a line leaves the spool
only once the database accepted it.

Each write runs on a thread of its own, one at a time, so that a database
that hangs or a retry that waits never keeps the queue from the spool: what
lives only in memory is the batch being written and, while spooling, at most
one batch period of new lines.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Sequence

import structlog

from vmtelemetryd.deadletters import DeadLetters
from vmtelemetryd.model import Delivery, DeliveryCounts, WriterSettings, WriterStatus
from vmtelemetryd.retry import RetryPolicy
from vmtelemetryd.sender import Outcome, Sender, WriteError
from vmtelemetryd.spool import Spool, SpoolBatch, SpoolError
from vmtelemetryd.writeattempt import WriteAttempt

log = structlog.get_logger("vmtelemetryd.writer")

SPOOL_RETRY_S = 10.0
HIGH_WATER_BATCHES = 10
MEMORY_CAP_BATCHES = 100
DEAD_LETTERS_FILE = "dead-letters.jsonl"
REFUSED_HINT = "fix INFLUX_DB or INFLUX_URL and reload; a new token credential needs a restart"


class Writer:
    """Owns the sender, the spool and the dead letters; only its thread touches them."""

    def __init__(
        self, sender: Sender, settings: WriterSettings, counts: DeliveryCounts | None = None
    ) -> None:
        self._sender = sender
        self._settings = settings
        self._dead_letters = DeadLetters(settings.spool_dir / DEAD_LETTERS_FILE)
        self._retry = RetryPolicy()
        self._cond = threading.Condition()
        # Shared with submit() and status(): read and written under _cond.
        self._queue: deque[str] = deque()
        self._oldest_at = 0.0
        self._stop_by: float | None = None
        self._in_flight = 0
        self._spooled = 0
        self._counts = counts or DeliveryCounts()
        self._last_write_wall: float | None = None
        self._last_error: str | None = None
        self._spool_error: str | None = None
        # The writer thread's own.
        self._spool: Spool | None = None
        self._spool_retry_at = 0.0
        self._spooling = False
        self._attempt: WriteAttempt | None = None
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, lines: Sequence[str]) -> None:
        """Queue lines for delivery; never blocks on the network or the disk."""
        if not lines:
            return
        with self._cond:
            was_empty = not self._queue
            if was_empty:
                self._oldest_at = time.monotonic()
            self._queue.extend(lines)
            if was_empty or len(self._queue) >= self._settings.batch_max_lines:
                self._cond.notify()

    def stop(self, timeout: float) -> None:
        """Send what is queued within ``timeout``, spool the rest, and return."""
        with self._cond:
            self._stop_by = time.monotonic() + timeout
            self._cond.notify()
        self._thread.join()

    def status(self) -> WriterStatus:
        with self._cond:
            return WriterStatus(
                queued=len(self._queue) + self._in_flight,
                spooled=self._spooled,
                counts=self._counts,
                delivery=self._delivery(),
                last_write_wall=self._last_write_wall,
                last_error=self._last_error,
                spool_error=self._spool_error,
            )

    def _delivery(self) -> Delivery:
        state = self._retry.state
        if state is Delivery.REFUSED or self._spool_error is None:
            return state
        return Delivery.SPOOL_UNUSABLE

    # --- the writer thread

    def _run(self) -> None:
        self._open_spool()
        while self._wait_for_work():
            self._step(time.monotonic())
        self._finish()

    def _wait_for_work(self) -> bool:
        """Sleep until a step has something to do or a stop is asked; False on stop."""
        with self._cond:
            while self._stop_by is None:
                wait = self._next_due() - time.monotonic()
                if wait <= 0:
                    return True
                self._cond.wait(None if math.isinf(wait) else wait)
            return False

    def _next_due(self) -> float:
        attempt = self._attempt
        if attempt is None:
            return min(self._park_due(), self._send_due())
        if attempt.finished:
            return 0.0
        slow_at = math.inf if self._spooling else attempt.started + self._settings.batch_max_sec
        return min(slow_at, self._park_due())

    def _step(self, now: float) -> None:
        attempt = self._attempt
        if attempt is not None and attempt.finished:
            self._settle(attempt)
        elif attempt is not None and now - attempt.started >= self._settings.batch_max_sec:
            self._enter_spooling("a write is taking longer than BATCH_MAX_SEC")
        if len(self._queue) > HIGH_WATER_BATCHES * self._settings.batch_max_lines:
            self._enter_spooling("memory queue past its high-water mark")
        if self._park_due() <= now:
            self._queue_to_spool()
        self._bound_memory()
        if self._attempt is None and self._send_due() <= now:
            self._start_attempt()

    def _batch_due(self) -> float:
        """When the lines in the queue make a batch: full, or the oldest has waited enough."""
        if len(self._queue) >= self._settings.batch_max_lines:
            return 0.0
        return self._oldest_at + self._settings.batch_max_sec

    def _park_due(self) -> float:
        """While spooling, the queue moves to the spool once per batch."""
        if not (self._spooling and self._queue):
            return math.inf
        return max(self._batch_due(), self._spool_retry_at)

    def _send_due(self) -> float:
        if self._has_spooled():
            return max(self._retry.retry_at, self._spool_retry_at)
        if self._queue and (not self._spooling or self._spool_error is not None):
            return max(self._batch_due(), self._retry.retry_at)
        return math.inf

    def _start_attempt(self) -> None:
        batch_max = self._settings.batch_max_lines
        spooled: SpoolBatch | None = None
        if self._has_spooled():
            assert self._spool is not None
            try:
                spooled = self._spool.peek(batch_max)
            except SpoolError as exc:
                self._spool_failed(exc)
                return
            if spooled is None:
                return
            lines = list(spooled.lines)
        else:
            with self._cond:
                lines = [self._queue.popleft() for _ in range(min(batch_max, len(self._queue)))]
                self._in_flight = len(lines)
                self._oldest_at = time.monotonic()
        self._attempt = WriteAttempt(lines, spooled, time.monotonic())
        self._attempt.start(self._sender, self._cond)

    def _settle(self, attempt: WriteAttempt) -> None:
        self._attempt = None
        seconds = round(time.monotonic() - attempt.started, 3)
        source = "memory" if attempt.spooled is None else "spool"
        if attempt.error is not None:
            self._failed(attempt, attempt.error)
            return
        for rejection in attempt.rejections:
            self._reject(rejection)
        if attempt.spooled is not None:
            self._ack(attempt.spooled)
        with self._cond:
            self._retry.succeeded()
            self._in_flight = 0
            self._counts += DeliveryCounts(written=attempt.written)
            self._last_write_wall = time.time()
        log.debug("batch written", lines=len(attempt.lines), source=source, seconds=seconds)
        if self._spooling and not self._has_spooled():
            self._spooling = False
            log.info("spool drained, writing directly again")

    def _failed(self, attempt: WriteAttempt, error: WriteError) -> None:
        """Keep every line of the attempt; a retry redoes it whole, rejections included."""
        with self._cond:
            delay = self._retry.failed(error, time.monotonic())
            if attempt.spooled is None:
                self._queue.extendleft(reversed(attempt.lines))
                self._in_flight = 0
                self._oldest_at = attempt.started
            self._counts += DeliveryCounts(write_errors=1)
            self._last_error = error.reason
        self._enter_spooling(error.reason)
        details = {"reason": error.reason, "lines": len(attempt.lines), "retry_in_s": delay}
        if error.outcome is Outcome.REFUSED:
            # Not transient: at error priority, so that `journalctl -p err` shows it.
            log.error("database refused the write, lines kept", hint=REFUSED_HINT, **details)
        else:
            log.warning("write failed", outcome=error.outcome.value, **details)

    def _ack(self, batch: SpoolBatch) -> None:
        assert self._spool is not None
        try:
            self._spool.ack(batch)
        except SpoolError as exc:  # acknowledged in memory; only a restart could re-send
            self._spool_failed(exc)
        with self._cond:
            self._spooled = self._spool.lines

    def _reject(self, error: WriteError) -> None:
        with self._cond:
            self._last_error = error.reason
            self._counts += DeliveryCounts(dead_lettered=len(error.rejected))
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
        if not self._spool_usable():
            return
        assert self._spool is not None
        with self._cond:
            lines = list(self._queue)
        if not lines:
            return
        dropped_before = self._spool.dropped_lines
        try:
            self._spool.append(lines)
        except SpoolError as exc:
            self._spool_failed(exc)
            lines = []  # still in the queue, and the spool as it was
        with self._cond:
            for _ in lines:
                self._queue.popleft()
            self._spooled = self._spool.lines
            self._counts += DeliveryCounts(dropped=self._spool.dropped_lines - dropped_before)
            if lines:
                self._spool_error = None
        if lines:
            log.debug("lines spooled", lines=len(lines), spooled=self._spool.lines)

    def _bound_memory(self) -> None:
        """Without a usable spool, keep the newest lines and count the oldest as dropped."""
        cap = MEMORY_CAP_BATCHES * self._settings.batch_max_lines
        with self._cond:
            excess = len(self._queue) - cap
            for _ in range(max(0, excess)):
                self._queue.popleft()
            if excess > 0:
                self._counts += DeliveryCounts(dropped=excess)
        if excess > 0:
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
        with self._cond:
            self._spool_error = None
            self._spooled = self._spool.lines
        if self._spool.lines:
            self._spooling = True
            log.info("spool holds lines from before", lines=self._spool.lines)

    def _spool_failed(self, exc: SpoolError) -> None:
        """An append that failed left the spool consistent: keep it, try again later."""
        with self._cond:
            self._spool_error = str(exc)
        self._spool_retry_at = time.monotonic() + SPOOL_RETRY_S
        log.error("spool unusable, holding lines in memory", error=str(exc))

    def _finish(self) -> None:
        """On stop: the write in flight and a last try of the queue, then spool the rest."""
        assert self._stop_by is not None
        while time.monotonic() < self._stop_by and (self._attempt or self._direct_work()):
            with self._cond:
                if self._attempt is not None and not self._attempt.finished:
                    self._cond.wait(max(0.0, self._stop_by - time.monotonic()))
            if self._attempt is not None and self._attempt.finished:
                self._settle(self._attempt)
            if self._attempt is None and self._direct_work():
                self._start_attempt()
        self._abandon_attempt()
        self._spooling = True
        self._spool_retry_at = 0.0
        self._queue_to_spool()
        if self._queue:
            log.error("lines lost at stop: spool unusable", lines=len(self._queue))
        if self._spool is not None:
            self._spool.close()
        self._sender.close()

    def _direct_work(self) -> bool:
        """Lines a last write at stop may still send from memory."""
        return bool(self._queue) and not self._spooling and self._retry.state is Delivery.OK

    def _abandon_attempt(self) -> None:
        """A write still running at the stop deadline: its memory lines go back to the queue,
        to be spooled; if it lands after all, the re-send is harmless."""
        attempt, self._attempt = self._attempt, None
        if attempt is None or attempt.spooled is not None:
            return
        with self._cond:
            self._queue.extendleft(reversed(attempt.lines))
            self._in_flight = 0
