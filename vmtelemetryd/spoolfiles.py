"""The spool's files: segment records, the ack file, the locked directory.

    <dir>/00000000000000000001.seg   segments, numbered in order, appended to
    <dir>/ack                        read position: segment, offset, line; CRC32

A segment is a run of records, each ``magic "VTS1" | crc32 | payload length |
line count`` (little-endian u32) then the payload: about 64 KiB of lines
joined by ``\\n``, UTF-8. The CRC covers length, count and payload.

Scanning a segment stops at the first record that is short, or whose magic or
CRC is wrong: nothing after it is read, because a damaged length cannot be
trusted to find the next record (and hunting for the magic could stop inside
a payload). A crash can only tear the tail of the segment being appended to,
so this loses nothing that was durable; damage in the middle (bit rot, not a
crash) costs the rest of that segment.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

_MAGIC = b"VTS1"
_HEADER = struct.Struct("<4sIII")  # magic, crc32, payload length, line count
_COUNTS = struct.Struct("<II")  # payload length, line count: the CRC covers them too
_CRC = struct.Struct("<I")
_ACK_MAGIC = b"VTA1"
_ACK = struct.Struct("<4sQQI")  # magic, segment, offset, line; then their crc32
ACK_NAME = "ack"
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")
_RECORD_BYTES = 64 * 1024  # payload per record: bounds what one read needs
_SCAN_BUFFER = 1024 * 1024
_ENCODING = ("utf-8", "surrogatepass")  # stores any str byte-exact; judging it is not our job


class SpoolError(Exception):
    """The spool's directory or files cannot be used; the message names the path and why.

    ``no_space``: the file system or a quota is full (ENOSPC, EDQUOT).
    """

    def __init__(self, message: str, *, no_space: bool = False) -> None:
        super().__init__(message)
        self.no_space = no_space


class Position(NamedTuple):
    """A point in the spool; tuples order the way the spool is read."""

    segment: int
    offset: int  # of a record's header in the segment
    line: int  # lines of that record already acknowledged


class Encoded(NamedTuple):
    """A record ready to be written."""

    data: bytes
    lines: int


@dataclass(frozen=True)
class Record:
    """An intact record on disk: where it lies and how many lines it holds."""

    segment: int
    offset: int
    size: int  # header and payload
    lines: int

    @property
    def end(self) -> Position:
        return Position(self.segment, self.offset + self.size, 0)


def segment_path(directory: Path, number: int) -> Path:
    return directory / f"{number:020d}.seg"


def list_segments(directory: Path) -> list[int]:
    try:
        names = os.listdir(directory)
    except OSError as error:
        raise spool_error("list", directory, error) from error
    return sorted(int(match[1]) for name in names if (match := _SEGMENT_NAME.match(name)))


def encode(lines: Sequence[str]) -> list[Encoded]:
    """Records of about _RECORD_BYTES of payload each, cut between lines, with their line counts."""
    payload = "\n".join(lines).encode(*_ENCODING)
    records: list[Encoded] = []
    start = 0
    while start <= len(payload):
        cut = _cut(payload, start)
        chunk = payload[start:cut]
        count = chunk.count(b"\n") + 1
        counts = _COUNTS.pack(len(chunk), count)
        crc = zlib.crc32(chunk, zlib.crc32(counts))
        records.append(Encoded(_MAGIC + _CRC.pack(crc) + counts + chunk, count))
        start = cut + 1
    if sum(record.lines for record in records) != len(lines):
        raise ValueError("a spooled line must not contain a newline")
    return records


def newest_that_fit(records: list[Encoded], max_bytes: int) -> list[Encoded]:
    """``records`` without their oldest, as many as it takes to fit in max_bytes."""
    needed = sum(len(record.data) for record in records)
    while records and needed > max_bytes:
        needed -= len(records.pop(0).data)
    return records


def _cut(payload: bytes, start: int) -> int:
    """Where the record starting at ``start`` ends: the last newline within _RECORD_BYTES."""
    if len(payload) - start <= _RECORD_BYTES:
        return len(payload)
    cut = payload.rfind(b"\n", start, start + _RECORD_BYTES)
    if cut < 0:  # one line longer than a record: it gets a record of its own
        cut = payload.find(b"\n", start + _RECORD_BYTES)
    return len(payload) if cut < 0 else cut


def read_record(fd: int, record: Record) -> list[str] | None:
    """The record's lines, or None if it is damaged or can no longer be read."""
    try:
        data = os.pread(fd, record.size, record.offset)
    except OSError:
        return None
    header, payload = data[: _HEADER.size], data[_HEADER.size :]
    if len(data) != record.size or not _intact(header, payload):
        return None
    return payload.decode(*_ENCODING).split("\n")


def _intact(header: bytes, payload: bytes) -> bool:
    if len(header) != _HEADER.size:
        return False
    magic, crc, length, _ = _HEADER.unpack(header)
    return bool(
        magic == _MAGIC
        and length == len(payload)
        and crc == zlib.crc32(payload, zlib.crc32(header[-_COUNTS.size :]))
    )


def scan_segment(path: Path, number: int) -> tuple[list[Record], int, bool]:
    """The segment's intact records up to the first damaged one, its size, and if there was one."""
    try:
        file = path.open("rb", buffering=_SCAN_BUFFER)
    except OSError as error:
        raise spool_error("read", path, error) from error
    with file:
        size = os.fstat(file.fileno()).st_size
        records: list[Record] = []
        offset = 0
        while offset < size:
            record = _scan_record(file, number, offset, size - offset)
            if record is None:
                return records, size, True
            records.append(record)
            offset += record.size
        return records, size, False


def _scan_record(file: BinaryIO, number: int, offset: int, room: int) -> Record | None:
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
    return Record(number, offset, _HEADER.size + length, count)


def pack_position(position: Position) -> bytes:
    """The ack file's content for ``position``."""
    body = _ACK.pack(_ACK_MAGIC, *position)
    return body + _CRC.pack(zlib.crc32(body))


def load_position(path: Path) -> Position | None:
    """The saved read position, or None if there is none or it is damaged."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise spool_error("read", path, error) from error
    body, crc = data[: _ACK.size], data[_ACK.size :]
    if len(data) != _ACK.size + _CRC.size or crc != _CRC.pack(zlib.crc32(body)):
        return None
    magic, segment, offset, line = _ACK.unpack(body)
    if magic != _ACK_MAGIC:
        return None
    return Position(segment, offset, line)


def lock_directory(directory: Path) -> int:
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
        raise spool_error("use directory", directory, error) from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        raise SpoolError(f"spool: {directory} is in use by another process") from error
    return fd


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        raise spool_error("remove", path, error) from error


def spool_error(action: str, path: Path, error: OSError) -> SpoolError:
    reason = error.strerror or error
    no_space = error.errno in (errno.ENOSPC, errno.EDQUOT)
    return SpoolError(f"spool: cannot {action} {path}: {reason}", no_space=no_space)
