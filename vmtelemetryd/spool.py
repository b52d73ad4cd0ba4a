"""The durable spool: where lines wait on disk while the database is behind or away.

This is the queue; ``spoolfiles.py`` holds the files' format and their checks.
That format was chosen over SQLite in WAL mode by ``bench/bench_spool.py``: a
durable append costs half or less of SQLite's (synchronous=FULL, its only
durable mode), draining is several times faster, and space comes back by
unlinking files, where an SQLite file keeps its peak size. SQLite opens in
constant time; this reads and checks everything: on the bench machine
0.3-0.5 s per GiB from the page cache, 2 s from disk.

One append is one write and one fdatasync, so it is durable when it returns.

Damage: on open every segment is read and checked; its first damaged or torn
record ends it and is counted in ``torn_records``. Appends after an open go to
a new segment: nothing is ever written behind damage. A record that fails its
check later, when read back, is skipped alone and counted the same way.

Bound: a segment is max_bytes/16 (at most 64 MiB). When an append takes the
spool past max_bytes, the oldest segments go whole once it is stored, their
waiting lines counted in ``dropped_lines``: an append that fails drops
nothing, and the disk holds one append more than max_bytes for that moment.
Only a full disk or quota makes room first, as the bound would have after
the append, and tries once more. A batch larger than max_bytes keeps its
newest records.

Acks overwrite the ack file in place without fsync: a crash may lose the last
ack, which only re-sends lines (points carry their timestamps). Fully acked
segments are unlinked; an empty spool leaves an empty directory. Nothing is
written until the first append, so a spool that is never used never touches
the disk (opening only removes files a crash left holding nothing unacked).

One process at a time: the directory is flock()ed while open. One thread (the
writer's) makes every call. The four counters are plain ints, so another
thread may read them for a status report. After a SpoolError the spool stays
consistent and usable: there is no need to reopen it.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmtelemetryd.spoolfiles import (
    ACK_NAME,
    Encoded,
    Position,
    Record,
    SpoolError,
    encode,
    list_segments,
    load_position,
    lock_directory,
    newest_that_fit,
    pack_position,
    read_record,
    scan_segment,
    segment_path,
    spool_error,
    unlink,
    write_all,
)

__all__ = ["Spool", "SpoolBatch", "SpoolError"]

_SEGMENTS_PER_SPOOL = 16  # dropping a whole segment frees ~1/16 of max_bytes
_SEGMENT_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class SpoolBatch:
    """Lines from ``peek``; hand it to ``ack`` once the database has accepted them."""

    lines: tuple[str, ...]
    end: Position = field(repr=False)  # where the read position goes once acked


class Spool:
    """Lines on disk, read oldest first, kept until acknowledged, bounded by ``max_bytes``."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self._dir = directory
        self._max_bytes = max_bytes
        self._segment_bytes = max(1, min(max_bytes // _SEGMENTS_PER_SPOOL, _SEGMENT_MAX_BYTES))
        self._segments: dict[int, int] = {}  # number -> bytes on disk, oldest first
        self._records: deque[Record] = deque()  # not yet acknowledged, oldest first
        self._position = Position(0, 0, 0)
        self._next_segment = 1
        self._writing: tuple[int, int] | None = None  # (segment, fd) appends go to
        self._reading: tuple[int, int] | None = None  # (segment, fd) peeks read from
        self._ack_fd: int | None = None
        self._closed = False
        self._lines = 0
        self._bytes = 0
        self._dropped_lines = 0
        self._torn_records = 0
        self._dir_fd = lock_directory(directory)
        try:
            self._recover()
        except BaseException:
            self.close()
            raise

    @property
    def lines(self) -> int:
        """Lines waiting to be acknowledged."""
        return self._lines

    @property
    def bytes(self) -> int:
        """Bytes of segment files on disk."""
        return self._bytes

    @property
    def dropped_lines(self) -> int:
        """Lines dropped, oldest first, to stay within max_bytes since this spool was opened."""
        return self._dropped_lines

    @property
    def torn_records(self) -> int:
        """Damaged or torn records skipped, on open or when read back."""
        return self._torn_records

    def append(self, lines: Sequence[str]) -> None:
        """Store ``lines`` after everything else; durable on disk when this returns.

        On SpoolError nothing of ``lines`` is kept and what was there is intact;
        the spool stays usable.
        """
        self._require_open()
        if not lines:
            return
        records = newest_that_fit(encode(lines), self._max_bytes)
        if records:
            try:
                self._store(records)
            except SpoolError as error:
                needed = sum(len(record.data) for record in records)
                if not (error.no_space and self._drop_oldest(keep=0, needed=needed)):
                    raise
                self._store(records)
        # Only once stored: after a SpoolError the caller still holds all of ``lines``.
        self._dropped_lines += len(lines) - sum(record.lines for record in records)
        # Stored: raising now would make the caller append them twice. A segment
        # whose unlink failed is read again on the next open (re-sending is harmless).
        with contextlib.suppress(SpoolError):
            self._drop_oldest(keep=1, needed=0)  # never the segment just written to

    def peek(self, max_lines: int) -> SpoolBatch | None:
        """The oldest unacknowledged lines, at most ``max_lines``; None when there are none.

        SpoolError if a segment cannot be opened; nothing is lost, try again later.
        """
        self._require_open()
        if max_lines <= 0:
            raise ValueError(f"max_lines must be positive, not {max_lines}")
        lines: list[str] = []
        end = self._position
        index = 0
        while index < len(self._records) and len(lines) < max_lines:
            record = self._records[index]
            text = read_record(self._reader(record.segment), record)
            if text is None:
                self._forget_damaged(index)
                continue
            skip = self._skip(record)
            taken = text[skip : skip + max_lines - len(lines)]
            lines.extend(taken)
            if skip + len(taken) < record.lines:
                end = Position(record.segment, record.offset, skip + len(taken))
                break
            end = record.end
            index += 1
        if not lines:
            if self._segments:  # all that was left was damaged
                self._settle()
            return None
        return SpoolBatch(tuple(lines), end)

    def ack(self, batch: SpoolBatch) -> None:
        """The batch was delivered: never return its lines again, not even after a restart.

        A batch that was already acknowledged, or dropped meanwhile, changes nothing.
        On SpoolError the lines are still acknowledged in memory; only a restart
        could send them again.
        """
        self._require_open()
        if batch.end <= self._position:
            return
        self._advance(batch.end)
        self._settle()

    def close(self) -> None:
        """Flush the read position and release the files; never raises, as errors here
        can only cause re-sends."""
        if self._closed:
            return
        self._closed = True
        fds = [pair[1] for pair in (self._writing, self._reading) if pair is not None]
        fds.append(self._dir_fd)  # and with it the lock
        if self._ack_fd is not None:
            fds.append(self._ack_fd)
            with contextlib.suppress(OSError):
                os.fsync(self._ack_fd)
        for fd in fds:
            os.close(fd)
        self._ack_fd = self._writing = self._reading = None

    # --- recovery

    def _recover(self) -> None:
        segments = list_segments(self._dir)
        position = load_position(self._dir / ACK_NAME) or Position(0, 0, 0)
        self._position = position
        self._next_segment = max([position.segment, *segments]) + 1
        for number in segments:
            path = segment_path(self._dir, number)
            if number < position.segment:
                unlink(path)
                continue
            records, size, damaged = scan_segment(path, number)
            self._torn_records += damaged
            unacked = [record for record in records if position < record.end]
            if not unacked:
                unlink(path)
                continue
            self._segments[number] = size
            self._bytes += size
            self._records.extend(unacked)
            self._lines += sum(record.lines for record in unacked)
        if self._records:
            self._lines -= self._skip(self._records[0])
        else:
            self._remove_ack_file()

    # --- reading and acknowledging

    def _skip(self, record: Record) -> int:
        """Lines of ``record`` already acknowledged."""
        here = self._position
        if (here.segment, here.offset) == (record.segment, record.offset):
            return min(here.line, record.lines)
        return 0

    def _forget_damaged(self, index: int) -> None:
        record = self._records[index]
        del self._records[index]
        self._lines -= record.lines - self._skip(record)
        self._torn_records += 1

    def _advance(self, position: Position) -> None:
        """Move the read position forward to ``position``, forgetting the lines it passes."""
        while self._records:
            head = self._records[0]
            skip = self._skip(head)
            if position >= head.end:
                self._records.popleft()
                self._lines -= head.lines - skip
                continue
            if (position.segment, position.offset) == (head.segment, head.offset):
                self._lines -= max(0, position.line - skip)
            break
        self._position = max(self._position, position)

    def _settle(self) -> None:
        """Unlink the segments before the oldest unacknowledged record, save the position;
        with nothing left, leave the directory empty."""
        oldest = self._records[0].segment if self._records else self._next_segment
        for number in [n for n in self._segments if n < oldest]:
            self._remove_segment(number)
        if self._segments:
            self._save_position()
        else:
            self._remove_ack_file()

    def _save_position(self) -> None:
        """Overwrite the ack file in place, without fsync: losing it only re-sends lines."""
        path = self._dir / ACK_NAME
        data = pack_position(self._position)
        try:
            if self._ack_fd is None:
                self._ack_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.pwrite(self._ack_fd, data, 0)
        except OSError as error:
            raise spool_error("write", path, error) from error

    def _remove_ack_file(self) -> None:
        if self._ack_fd is not None:
            os.close(self._ack_fd)
            self._ack_fd = None
        unlink(self._dir / ACK_NAME)

    # --- writing and dropping

    def _drop_oldest(self, keep: int, needed: int) -> bool:
        """Drop the oldest segments, all but ``keep``, until ``needed`` more bytes fit;
        whether any went."""
        dropped = False
        while len(self._segments) > keep and self._bytes + needed > self._max_bytes:
            self._drop_oldest_segment()
            dropped = True
        return dropped

    def _store(self, records: list[Encoded]) -> None:
        """Append ``records`` with one write and one fdatasync; on failure cut them back off."""
        data = b"".join(record.data for record in records)
        segment, fd = self._writer(len(data))
        start = self._segments[segment]
        try:
            write_all(fd, data)
            os.fdatasync(fd)
            if start == 0:
                os.fsync(self._dir_fd)  # the new file's name, not only its data
        except OSError as error:
            self._abandon_writer(start)
            raise spool_error("write", segment_path(self._dir, segment), error) from error
        offset = start
        for record in records:
            self._records.append(Record(segment, offset, len(record.data), record.lines))
            offset += len(record.data)
        self._segments[segment] = offset
        self._bytes += len(data)
        self._lines += sum(record.lines for record in records)

    def _drop_oldest_segment(self) -> None:
        number = next(iter(self._segments))
        waiting = self._lines
        self._advance(Position(number + 1, 0, 0))
        self._dropped_lines += waiting - self._lines
        self._remove_segment(number)

    def _writer(self, needed: int) -> tuple[int, int]:
        """The segment to append to: the current one until it is full, then a new one.
        Also a new one when ``needed`` would take the current one past max_bytes, so
        that dropping the older segments brings the spool back within it."""
        if self._writing is not None:
            size = self._segments[self._writing[0]]
            if size < self._segment_bytes and size + needed <= self._max_bytes:
                return self._writing
            os.close(self._writing[1])
            self._writing = None
        number = self._next_segment
        path = segment_path(self._dir, number)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as error:
            raise spool_error("create", path, error) from error
        self._next_segment += 1
        self._segments[number] = 0
        self._writing = (number, fd)
        return self._writing

    def _abandon_writer(self, good_size: int) -> None:
        """After a failed append: cut the segment back to its last record, stop appending to it."""
        assert self._writing is not None
        number, fd = self._writing
        with contextlib.suppress(OSError):  # what is left is then a torn tail, skipped on open
            os.ftruncate(fd, good_size)
        os.close(fd)
        self._writing = None
        if good_size == 0:
            del self._segments[number]
            with contextlib.suppress(SpoolError):  # left behind, it is removed on open
                unlink(segment_path(self._dir, number))

    def _remove_segment(self, number: int) -> None:
        for pair in (self._writing, self._reading):
            if pair is not None and pair[0] == number:
                os.close(pair[1])
        if self._writing is not None and self._writing[0] == number:
            self._writing = None
        if self._reading is not None and self._reading[0] == number:
            self._reading = None
        self._bytes -= self._segments.pop(number)
        unlink(segment_path(self._dir, number))

    def _reader(self, number: int) -> int:
        if self._reading is None or self._reading[0] != number:
            if self._reading is not None:
                os.close(self._reading[1])
                self._reading = None
            path = segment_path(self._dir, number)
            try:
                self._reading = (number, os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as error:
                raise spool_error("read", path, error) from error
        return self._reading[1]

    def _require_open(self) -> None:
        if self._closed:
            raise ValueError("spool is closed")
