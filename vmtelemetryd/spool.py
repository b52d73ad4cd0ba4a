"""The durable spool: where lines wait on disk while the database is behind or away.

Format, chosen over SQLite in WAL mode by ``bench/bench_spool.py``: a durable
append costs half or less of SQLite's (synchronous=FULL, its only durable
mode), draining is several times faster, and space comes back by unlinking
files, where an SQLite file keeps its peak size. SQLite opens in constant
time; this reads and checks everything: on the bench machine 0.3-0.5 s per
GiB from the page cache, 2 s from disk.

    <dir>/00000000000000000001.seg   segments, numbered in order, appended to
    <dir>/ack                        read position: segment, offset, line; CRC32

A segment is a run of records, each ``magic "VTS1" | crc32 | payload length |
line count`` (little-endian u32) then the payload: about 64 KiB of lines
joined by ``\\n``, UTF-8. The CRC covers length, count and payload. One append
is one write and one fdatasync, so it is durable when it returns.

Damage: on open every segment is read and checked. The first record that is
short, or whose magic or CRC is wrong, ends its segment; it is counted in
``torn_records`` and nothing after it is read, because a damaged length cannot
be trusted to find the next record (and hunting for the magic could stop
inside a payload). A crash can only tear the tail of the segment being
appended to, so this loses nothing that was durable; damage in the middle
(bit rot, not a crash) costs the rest of that segment. Appends after an open
go to a new segment: nothing is ever written behind damage. A record that
fails its check later, when read back, is skipped alone and counted the same
way.

Bound: a segment is max_bytes/16 (at most 64 MiB). When an append would pass
max_bytes, the oldest segments go whole, their waiting lines counted in
``dropped_lines``; a batch larger than max_bytes keeps its newest records.

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
import errno
import fcntl
import os
import re
import struct
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

_MAGIC = b"VTS1"
_HEADER = struct.Struct("<4sIII")  # magic, crc32, payload length, line count
_COUNTS = struct.Struct("<II")  # payload length, line count: the CRC covers them too
_CRC = struct.Struct("<I")
_ACK_MAGIC = b"VTA1"
_ACK = struct.Struct("<4sQQI")  # magic, segment, offset, line; then their crc32
_ACK_NAME = "ack"
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")
_RECORD_BYTES = 64 * 1024  # payload per record: bounds what one read needs
_SEGMENTS_PER_SPOOL = 16  # dropping a whole segment frees ~1/16 of max_bytes
_SEGMENT_MAX_BYTES = 64 * 1024 * 1024
_SCAN_BUFFER = 1024 * 1024
_ENCODING = ("utf-8", "surrogatepass")  # stores any str byte-exact; judging it is not our job


class SpoolError(Exception):
    """The spool's directory or files cannot be used; the message names the path and why."""


class _Position(NamedTuple):
    """A point in the spool; tuples order the way the spool is read."""

    segment: int
    offset: int  # of a record's header in the segment
    line: int  # lines of that record already acknowledged


@dataclass(frozen=True)
class SpoolBatch:
    """Lines from ``peek``; hand it to ``ack`` once the database has accepted them."""

    lines: tuple[str, ...]
    end: _Position = field(repr=False)  # where the read position goes once acked


class _Encoded(NamedTuple):
    """A record ready to be written."""

    data: bytes
    lines: int


@dataclass(frozen=True)
class _Record:
    segment: int
    offset: int
    size: int  # header and payload
    lines: int

    @property
    def end(self) -> _Position:
        return _Position(self.segment, self.offset + self.size, 0)


class Spool:
    """Lines on disk, read oldest first, kept until acknowledged, bounded by ``max_bytes``."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self._dir = directory
        self._max_bytes = max_bytes
        self._segment_bytes = max(1, min(max_bytes // _SEGMENTS_PER_SPOOL, _SEGMENT_MAX_BYTES))
        self._segments: dict[int, int] = {}  # number -> bytes on disk, oldest first
        self._records: deque[_Record] = deque()  # not yet acknowledged, oldest first
        self._position = _Position(0, 0, 0)
        self._next_segment = 1
        self._writing: tuple[int, int] | None = None  # (segment, fd) appends go to
        self._reading: tuple[int, int] | None = None  # (segment, fd) peeks read from
        self._ack_fd: int | None = None
        self._closed = False
        self._lines = 0
        self._bytes = 0
        self._dropped_lines = 0
        self._torn_records = 0
        self._dir_fd = _lock_directory(directory)
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
        records = self._make_room(_encode(lines))
        if not records:
            return
        data = b"".join(record.data for record in records)
        segment, fd = self._writer()
        start = self._segments[segment]
        try:
            _write_all(fd, data)
            os.fdatasync(fd)
            if start == 0:
                os.fsync(self._dir_fd)  # the new file's name, not only its data
        except OSError as error:
            self._abandon_writer(start)
            raise _spool_error("write", self._segment_path(segment), error) from error
        offset = start
        for record in records:
            self._records.append(_Record(segment, offset, len(record.data), record.lines))
            offset += len(record.data)
        self._segments[segment] = offset
        self._bytes += len(data)
        self._lines += sum(record.lines for record in records)

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
            text = self._read(record)
            if text is None:
                self._forget_damaged(index)
                continue
            skip = self._skip(record)
            taken = text[skip : skip + max_lines - len(lines)]
            lines.extend(taken)
            if skip + len(taken) < record.lines:
                end = _Position(record.segment, record.offset, skip + len(taken))
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
        segments = _list_segments(self._dir)
        position = _load_position(self._dir / _ACK_NAME) or _Position(0, 0, 0)
        self._position = position
        self._next_segment = max([position.segment, *segments]) + 1
        for number in segments:
            path = self._segment_path(number)
            if number < position.segment:
                _unlink(path)
                continue
            records, size, damaged = _scan_segment(path, number)
            self._torn_records += damaged
            unacked = [record for record in records if position < record.end]
            if not unacked:
                _unlink(path)
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

    def _skip(self, record: _Record) -> int:
        """Lines of ``record`` already acknowledged."""
        here = self._position
        if (here.segment, here.offset) == (record.segment, record.offset):
            return min(here.line, record.lines)
        return 0

    def _read(self, record: _Record) -> list[str] | None:
        """The record's lines, or None if it is damaged or can no longer be read."""
        fd = self._reader(record.segment)
        try:
            data = os.pread(fd, record.size, record.offset)
        except OSError:
            return None
        header, payload = data[: _HEADER.size], data[_HEADER.size :]
        if len(data) != record.size or not _intact(header, payload):
            return None
        return payload.decode(*_ENCODING).split("\n")

    def _forget_damaged(self, index: int) -> None:
        record = self._records[index]
        del self._records[index]
        self._lines -= record.lines - self._skip(record)
        self._torn_records += 1

    def _advance(self, position: _Position) -> None:
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
        path = self._dir / _ACK_NAME
        body = _ACK.pack(_ACK_MAGIC, *self._position)
        try:
            if self._ack_fd is None:
                self._ack_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.pwrite(self._ack_fd, body + _CRC.pack(zlib.crc32(body)), 0)
        except OSError as error:
            raise _spool_error("write", path, error) from error

    def _remove_ack_file(self) -> None:
        if self._ack_fd is not None:
            os.close(self._ack_fd)
            self._ack_fd = None
        _unlink(self._dir / _ACK_NAME)

    # --- writing and dropping

    def _make_room(self, records: list[_Encoded]) -> list[_Encoded]:
        """Drop the oldest segments, then the batch's own oldest records, until it fits."""
        needed = sum(len(record.data) for record in records)
        while self._segments and self._bytes + needed > self._max_bytes:
            self._drop_oldest_segment()
        while records and needed > self._max_bytes:
            record = records.pop(0)
            needed -= len(record.data)
            self._dropped_lines += record.lines
        return records

    def _drop_oldest_segment(self) -> None:
        number = next(iter(self._segments))
        waiting = self._lines
        self._advance(_Position(number + 1, 0, 0))
        self._dropped_lines += waiting - self._lines
        self._remove_segment(number)

    def _writer(self) -> tuple[int, int]:
        """The segment to append to: the current one until it is full, then a new one."""
        if self._writing is not None:
            if self._segments[self._writing[0]] < self._segment_bytes:
                return self._writing
            os.close(self._writing[1])
            self._writing = None
        number = self._next_segment
        path = self._segment_path(number)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as error:
            raise _spool_error("create", path, error) from error
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
                _unlink(self._segment_path(number))

    def _remove_segment(self, number: int) -> None:
        for pair in (self._writing, self._reading):
            if pair is not None and pair[0] == number:
                os.close(pair[1])
        if self._writing is not None and self._writing[0] == number:
            self._writing = None
        if self._reading is not None and self._reading[0] == number:
            self._reading = None
        self._bytes -= self._segments.pop(number)
        _unlink(self._segment_path(number))

    def _reader(self, number: int) -> int:
        if self._reading is None or self._reading[0] != number:
            if self._reading is not None:
                os.close(self._reading[1])
                self._reading = None
            path = self._segment_path(number)
            try:
                self._reading = (number, os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as error:
                raise _spool_error("read", path, error) from error
        return self._reading[1]

    def _segment_path(self, number: int) -> Path:
        return self._dir / f"{number:020d}.seg"

    def _require_open(self) -> None:
        if self._closed:
            raise ValueError("spool is closed")


def _encode(lines: Sequence[str]) -> list[_Encoded]:
    """Records of about _RECORD_BYTES of payload each, cut between lines, with their line counts."""
    payload = "\n".join(lines).encode(*_ENCODING)
    records: list[_Encoded] = []
    start = 0
    while start <= len(payload):
        cut = _cut(payload, start)
        chunk = payload[start:cut]
        count = chunk.count(b"\n") + 1
        counts = _COUNTS.pack(len(chunk), count)
        crc = zlib.crc32(chunk, zlib.crc32(counts))
        records.append(_Encoded(_MAGIC + _CRC.pack(crc) + counts + chunk, count))
        start = cut + 1
    if sum(record.lines for record in records) != len(lines):
        raise ValueError("a spooled line must not contain a newline")
    return records


def _cut(payload: bytes, start: int) -> int:
    """Where the record starting at ``start`` ends: the last newline within _RECORD_BYTES."""
    if len(payload) - start <= _RECORD_BYTES:
        return len(payload)
    cut = payload.rfind(b"\n", start, start + _RECORD_BYTES)
    if cut < 0:  # one line longer than a record: it gets a record of its own
        cut = payload.find(b"\n", start + _RECORD_BYTES)
    return len(payload) if cut < 0 else cut


def _intact(header: bytes, payload: bytes) -> bool:
    if len(header) != _HEADER.size:
        return False
    magic, crc, length, _ = _HEADER.unpack(header)
    return bool(
        magic == _MAGIC
        and length == len(payload)
        and crc == zlib.crc32(payload, zlib.crc32(header[-_COUNTS.size :]))
    )


def _scan_segment(path: Path, number: int) -> tuple[list[_Record], int, bool]:
    """The segment's intact records up to the first damaged one, its size, and if there was one."""
    try:
        file = path.open("rb", buffering=_SCAN_BUFFER)
    except OSError as error:
        raise _spool_error("read", path, error) from error
    with file:
        size = os.fstat(file.fileno()).st_size
        records: list[_Record] = []
        offset = 0
        while offset < size:
            record = _scan_record(file, number, offset, size - offset)
            if record is None:
                return records, size, True
            records.append(record)
            offset += record.size
        return records, size, False


def _scan_record(file: BinaryIO, number: int, offset: int, room: int) -> _Record | None:
    """The record at ``offset``, or None if it is torn, damaged or unreadable."""
    try:
        header = file.read(_HEADER.size)
        if len(header) != _HEADER.size:
            return None
        magic, _, length, count = _HEADER.unpack(header)
        if magic != _MAGIC or _HEADER.size + length > room:
            return None
        payload = file.read(length)
    except OSError:
        return None
    if not _intact(header, payload):
        return None
    return _Record(number, offset, _HEADER.size + length, count)


def _load_position(path: Path) -> _Position | None:
    """The saved read position, or None if there is none or it is damaged."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise _spool_error("read", path, error) from error
    body, crc = data[: _ACK.size], data[_ACK.size :]
    if len(data) != _ACK.size + _CRC.size or crc != _CRC.pack(zlib.crc32(body)):
        return None
    magic, segment, offset, line = _ACK.unpack(body)
    if magic != _ACK_MAGIC:
        return None
    return _Position(segment, offset, line)


def _list_segments(directory: Path) -> list[int]:
    try:
        names = os.listdir(directory)
    except OSError as error:
        raise _spool_error("list", directory, error) from error
    return sorted(int(match[1]) for name in names if (match := _SEGMENT_NAME.match(name)))


def _lock_directory(directory: Path) -> int:
    """Create the directory (0700), check it is writable without writing to it, and lock it.

    Returns the locked directory's descriptor, also used to fsync new names into it.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            read_only = os.statvfs(directory).f_flag & os.ST_RDONLY
            code = errno.EROFS if read_only else errno.EACCES
            raise OSError(code, os.strerror(code))
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise _spool_error("use directory", directory, error) from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        raise SpoolError(f"spool: {directory} is in use by another process") from error
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        raise _spool_error("remove", path, error) from error


def _spool_error(action: str, path: Path, error: OSError) -> SpoolError:
    return SpoolError(f"spool: cannot {action} {path}: {error.strerror or error}")
