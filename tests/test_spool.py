"""The durable spool, on real files: order, acks, restarts, damage, bounds, failing disks."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmtelemetryd.spool import Spool, SpoolError

BIG = 1 << 30
# max_bytes // 16 is the segment size: 4 KiB segments, so every batch below starts a new one.
ONE_SEGMENT_PER_BATCH = 16 * 4096


def batch(tag: str, count: int, width: int = 0) -> list[str]:
    pad = "x" * width
    return [f'vm_metrics,host=hv01,vm={tag} cpu_time_ns={i}i,pad="{pad}" {i}' for i in range(count)]


def drain(spool: Spool, max_lines: int = 7) -> list[str]:
    """Everything waiting, through peek and ack, in the order the spool gives it."""
    lines: list[str] = []
    for _ in range(10_000):
        got = spool.peek(max_lines)
        if got is None:
            return lines
        assert len(got.lines) <= max_lines
        lines.extend(got.lines)
        spool.ack(got)
    pytest.fail("the spool never ran dry")


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


@contextlib.contextmanager
def reopened(directory: Path, max_bytes: int = BIG) -> Iterator[Spool]:
    spool = Spool(directory, max_bytes)
    try:
        yield spool
    finally:
        spool.close()


def test_peek_gives_oldest_lines_and_removes_nothing_until_ack(tmp_path: Path) -> None:
    first, second = batch("a", 5), batch("b", 5)
    with reopened(tmp_path) as spool:
        spool.append(first)
        spool.append(second)
        got = spool.peek(3)
        assert got is not None and got.lines == tuple(first[:3])
        assert spool.peek(3) == got
        assert spool.lines == 10
        spool.ack(got)
        assert spool.lines == 7
        assert drain(spool) == first[3:] + second
        assert spool.peek(3) is None
        assert spool.lines == 0


def test_order_and_ack_position_survive_reopen(tmp_path: Path) -> None:
    sent = batch("a", 10) + batch("b", 10)
    with reopened(tmp_path) as spool:
        spool.append(sent[:10])
        spool.append(sent[10:])
        got = spool.peek(4)  # ends inside the first record
        assert got is not None
        spool.ack(got)
    with reopened(tmp_path) as spool:
        assert spool.lines == 16
        got = spool.peek(8)  # ends inside the second record
        assert got is not None and got.lines == tuple(sent[4:12])
        spool.ack(got)
    with reopened(tmp_path) as spool:
        assert spool.lines == 8
        assert drain(spool) == sent[12:]


def test_unacked_lines_come_back_after_reopen(tmp_path: Path) -> None:
    sent = batch("a", 6)
    with reopened(tmp_path) as spool:
        spool.append(sent)
        assert spool.peek(100) is not None
    with reopened(tmp_path) as spool:
        assert spool.lines == 6
        assert drain(spool) == sent


def test_appends_and_acks_survive_sigkill(tmp_path: Path) -> None:
    sent = batch("a", 6)

    def work_then_die() -> None:
        spool = Spool(tmp_path, BIG)
        spool.append(sent)
        got = spool.peek(4)
        assert got is not None
        spool.ack(got)
        os.kill(os.getpid(), signal.SIGKILL)

    assert in_child(work_then_die) == -signal.SIGKILL
    with reopened(tmp_path) as spool:
        assert drain(spool) == sent[4:]


def test_a_spool_in_use_cannot_be_opened_twice(tmp_path: Path) -> None:
    with reopened(tmp_path), pytest.raises(SpoolError, match="in use by another process"):
        Spool(tmp_path, BIG)
    with reopened(tmp_path) as spool:  # the lock went with close
        assert spool.lines == 0


def test_long_batches_are_split_and_come_back_whole(tmp_path: Path) -> None:
    sent = batch("a", 6000, width=180)  # ~1.2 MB, many records
    with reopened(tmp_path) as spool:
        spool.append(sent)
    with reopened(tmp_path) as spool:
        assert spool.lines == 6000
        assert drain(spool, max_lines=2000) == sent


def test_nothing_is_written_before_append_and_drained_spool_leaves_empty_dir(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "spool"
    with reopened(directory) as spool:
        assert os.listdir(directory) == []
        assert directory.stat().st_mode & 0o777 == 0o700
        spool.append(batch("a", 20))
        got = spool.peek(7)
        assert got is not None
        spool.ack(got)  # leaves an ack file behind, for now
        assert all(path.stat().st_mode & 0o777 == 0o600 for path in directory.iterdir())
        assert spool.bytes == sum(path.stat().st_size for path in segments(directory))
        drain(spool)
        assert os.listdir(directory) == []
        assert spool.bytes == 0
    assert os.listdir(directory) == []


def test_torn_tail_is_skipped_and_counted_and_appends_go_on(tmp_path: Path) -> None:
    first, second, torn, after = (batch(tag, 5) for tag in "abcd")
    with reopened(tmp_path) as spool:
        for lines in (first, second, torn):
            spool.append(lines)
    [segment] = segments(tmp_path)
    os.truncate(segment, segment.stat().st_size - 20)  # the last append, cut mid-record
    with reopened(tmp_path) as spool:
        assert spool.torn_records == 1
        assert spool.lines == 10
        spool.append(after)
    with reopened(tmp_path) as spool:
        assert drain(spool) == first + second + after


@pytest.mark.parametrize("garbage", [b"\0" * 4096, b"VTS1" + os.urandom(100), b"VT"])
def test_garbage_after_the_last_record_is_skipped_and_counted(
    tmp_path: Path, garbage: bytes
) -> None:
    sent = batch("a", 5)
    with reopened(tmp_path) as spool:
        spool.append(sent)
    [segment] = segments(tmp_path)
    with segment.open("ab") as file:
        file.write(garbage)
    with reopened(tmp_path) as spool:
        assert spool.torn_records == 1
        assert drain(spool) == sent


def test_damage_on_open_ends_its_segment_but_not_the_spool(tmp_path: Path) -> None:
    before, damaged, behind = batch("a", 3), batch("b", 3), batch("c", 3)
    later = batch("d", 3)
    with reopened(tmp_path) as spool:
        for lines in (before, damaged, behind):
            spool.append(lines)
    with reopened(tmp_path) as spool:  # a new process appends to a new segment
        spool.append(later)
    first_segment = segments(tmp_path)[0]
    flip_byte(first_segment, first_segment.read_bytes().index(b"vm=b") + 2)
    with reopened(tmp_path) as spool:
        assert spool.torn_records == 1
        assert drain(spool) == before + later


def test_damage_found_when_reading_back_skips_only_that_record(tmp_path: Path) -> None:
    before, damaged, behind = batch("a", 3), batch("b", 3), batch("c", 3)
    with reopened(tmp_path) as spool:
        for lines in (before, damaged, behind):
            spool.append(lines)
        [segment] = segments(tmp_path)
        flip_byte(segment, segment.read_bytes().index(b"vm=b") + 2)
        assert drain(spool) == before + behind
        assert spool.torn_records == 1
        assert spool.lines == 0


def test_damaged_ack_file_sends_again_rather_than_loses(tmp_path: Path) -> None:
    sent = batch("a", 6)
    with reopened(tmp_path) as spool:
        spool.append(sent)
        got = spool.peek(4)
        assert got is not None
        spool.ack(got)
    flip_byte(tmp_path / "ack", 10)
    with reopened(tmp_path) as spool:
        assert drain(spool) == sent


def test_acked_segment_left_by_a_crash_is_removed_not_sent_again(tmp_path: Path) -> None:
    first, second = batch("a", 20, width=200), batch("b", 20, width=200)
    with reopened(tmp_path, ONE_SEGMENT_PER_BATCH) as spool:
        spool.append(first)
        spool.append(second)
        old = segments(tmp_path)[0]
        kept = old.read_bytes()
        got = spool.peek(20)
        assert got is not None
        spool.ack(got)
        assert not old.exists()
    old.write_bytes(kept)  # the crash came between saving the ack and the unlink
    with reopened(tmp_path, ONE_SEGMENT_PER_BATCH) as spool:
        assert not old.exists()
        assert drain(spool) == second


def test_max_bytes_drops_oldest_first_and_counts_them(tmp_path: Path) -> None:
    sent = [batch(f"vm{n}", 20, width=200) for n in range(30)]  # ~5 KB each
    with reopened(tmp_path, ONE_SEGMENT_PER_BATCH) as spool:
        for lines in sent:
            spool.append(lines)
            assert spool.bytes <= ONE_SEGMENT_PER_BATCH
        assert sum(path.stat().st_size for path in segments(tmp_path)) == spool.bytes
        flat = [line for lines in sent for line in lines]
        assert spool.dropped_lines > 0
        assert spool.dropped_lines + spool.lines == len(flat)
        assert drain(spool) == flat[spool.dropped_lines :]


def test_ack_of_a_batch_dropped_meanwhile_changes_nothing(tmp_path: Path) -> None:
    with reopened(tmp_path, ONE_SEGMENT_PER_BATCH) as spool:
        spool.append(batch("old", 20, width=200))
        got = spool.peek(5)
        assert got is not None
        newer = [batch(f"vm{n}", 20, width=200) for n in range(15)]
        for lines in newer:
            spool.append(lines)
        assert spool.dropped_lines >= 20
        waiting = spool.lines
        spool.ack(got)
        assert spool.lines == waiting
        assert drain(spool) == [line for lines in newer for line in lines][-waiting:]


def test_a_batch_bigger_than_max_bytes_keeps_its_newest_records(tmp_path: Path) -> None:
    sent = batch("a", 4000, width=200)  # ~1 MB of 64 KiB records, four times max_bytes
    with reopened(tmp_path, 256 * 1024) as spool:
        spool.append(sent)
        assert 0 < spool.bytes <= 256 * 1024
        assert spool.dropped_lines + spool.lines == len(sent)
        assert drain(spool, 500) == sent[spool.dropped_lines :]


def test_a_large_append_after_small_ones_leaves_the_spool_within_max_bytes(
    tmp_path: Path,
) -> None:
    small, large = batch("small", 10, width=200), batch("large", 252, width=200)  # 2.5, 63.5 KB
    with reopened(tmp_path, ONE_SEGMENT_PER_BATCH) as spool:
        spool.append(small)
        spool.append(large)
        assert spool.bytes <= ONE_SEGMENT_PER_BATCH
        assert sum(path.stat().st_size for path in segments(tmp_path)) == spool.bytes
        assert spool.dropped_lines == len(small)
        assert drain(spool) == large


def test_a_failed_append_counts_none_of_its_lines_as_dropped(tmp_path: Path) -> None:
    sent = batch("a", 4000, width=200)  # four times max_bytes: its oldest records cannot stay
    with reopened(tmp_path, 256 * 1024) as spool:
        with file_size_limit(1000), pytest.raises(SpoolError, match="File too large"):
            spool.append(sent)
        assert spool.dropped_lines == 0  # the caller still holds every line
        spool.append(sent)
        assert spool.dropped_lines + spool.lines == len(sent)


def test_a_failed_append_at_max_bytes_drops_none_of_the_lines_waiting(tmp_path: Path) -> None:
    sent = [batch(f"vm{n}", 20, width=200) for n in range(12)]  # ~5 KB each, max_bytes 64 KiB
    with reopened(tmp_path, ONE_SEGMENT_PER_BATCH) as spool:
        for lines in sent:
            spool.append(lines)
        waiting, dropped = spool.lines, spool.dropped_lines
        assert spool.bytes + 5000 > ONE_SEGMENT_PER_BATCH  # the next append must make room
        with file_size_limit(1000), pytest.raises(SpoolError, match="File too large"):
            spool.append(batch("late", 20, width=200))
        assert (spool.lines, spool.dropped_lines) == (waiting, dropped)
        flat = [line for lines in sent for line in lines]
        assert drain(spool) == flat[dropped:]


def test_a_line_with_a_newline_is_refused_before_writing(tmp_path: Path) -> None:
    with reopened(tmp_path) as spool:
        with pytest.raises(ValueError):
            spool.append(["a 1", "b\nc 2"])
        assert spool.lines == 0
        assert os.listdir(tmp_path) == []


def test_directory_that_cannot_be_created_is_a_spool_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpoolError, match=rf"{blocker}/spool: Not a directory"):
        Spool(blocker / "spool", BIG)


def test_read_only_directory_is_a_spool_error_and_loses_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    first = batch("a", 20, width=200)
    with reopened(directory, ONE_SEGMENT_PER_BATCH) as spool:
        spool.append(first)
        with read_only(directory):
            with pytest.raises(SpoolError, match=str(directory)):
                spool.append(batch("b", 20, width=200))  # needs a new segment
            assert spool.lines == 20
    with read_only(directory), pytest.raises(SpoolError, match=str(directory)):
        Spool(directory, ONE_SEGMENT_PER_BATCH)
    with reopened(directory, ONE_SEGMENT_PER_BATCH) as spool:
        assert spool.torn_records == 0
        assert drain(spool) == first


def test_no_space_left_keeps_what_was_there(tiny_tmpfs: Path) -> None:
    directory = tiny_tmpfs / "spool"
    kept: list[str] = []
    with reopened(directory) as spool:
        with pytest.raises(SpoolError, match="No space left on device"):
            for n in range(100):
                lines = batch(f"vm{n}", 10, width=150)
                spool.append(lines)
                kept.extend(lines)
        assert spool.lines == len(kept)
        assert len(kept) > 100
    with reopened(directory) as spool:
        assert spool.torn_records == 0
        assert drain(spool, 1000) == kept


def test_a_full_disk_at_max_bytes_drops_the_oldest_and_stores_the_newest(
    tiny_tmpfs: Path,
) -> None:
    """The bound would drop the oldest segment after this append anyway: on a full
    disk it goes first, or nothing could ever be stored again."""
    sent = [batch(f"vm{n}", 10, width=150) for n in range(12)]  # ~2 KB: a segment each
    with reopened(tiny_tmpfs / "spool", 24 * 1024) as spool:
        for lines in sent:
            spool.append(lines)
        assert spool.dropped_lines == 0
        ballast = tiny_tmpfs / "ballast"
        with ballast.open("wb", buffering=0) as filling, contextlib.suppress(OSError):
            while True:  # until the disk is full
                filling.write(b"x" * 512)
        late = batch("late", 10, width=150)
        spool.append(late)
        assert spool.dropped_lines == len(sent[0])
        ballast.unlink()  # room for the ack file that draining writes
        assert drain(spool) == [line for lines in sent[1:] for line in lines] + late


def test_write_failing_midway_is_cut_back_and_the_spool_goes_on(tmp_path: Path) -> None:
    first, refused, after = batch("a", 10), batch("b", 2000, width=100), batch("c", 10)
    with reopened(tmp_path) as spool:
        spool.append(first)
        [segment] = segments(tmp_path)
        limit = file_size_limit(segment.stat().st_size + 1000)
        with limit, pytest.raises(SpoolError, match="File too large"):
            spool.append(refused)
        assert segment.stat().st_size == spool.bytes  # the part that was written is gone
        spool.append(after)
    with reopened(tmp_path) as spool:
        assert spool.torn_records == 0
        assert drain(spool) == first + after


def in_child(work: Callable[[], None]) -> int:
    """Run ``work`` in a forked process; its exit status as subprocess gives it (-N: signal N)."""
    pid = os.fork()
    if pid == 0:
        try:
            work()
        finally:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` fail with EFBIG, after a short write up to it."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Make ``directory`` unwritable: chmod 0500, or as root (who ignores modes) a read-only
    bind mount over it."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
        try:
            yield
        finally:
            directory.chmod(0o700)
        return
    run_or_skip("mount", "--bind", str(directory), str(directory))
    try:
        run_or_skip("mount", "-o", "remount,bind,ro", str(directory))
        yield
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=True)  # busy or not


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB file system, to fill up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    run_or_skip("mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mountpoint))
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)  # busy or not


def run_or_skip(*command: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"{' '.join(command)}: {result.stderr.strip()}")
