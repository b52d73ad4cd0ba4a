"""What lives only in memory while the database is away or refuses us (FAKE endpoint).

DESIGN.md: at most one batch lives only in memory at any moment; a refused
write keeps everything until an operator fixes the token; bodies above
1 KiB are gzip-compressed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fakeinflux import DATABASE, TOKEN, Answer, FakeInflux3, serve
from test_delivery_policy import lines, make_writer, wait_until

from vmtelemetryd.model import Delivery


@pytest.mark.parametrize(
    ("token", "database", "status"), [("wrong-token", DATABASE, "401"), (TOKEN, "nodb", "404")]
)
def test_a_refused_writer_keeps_everything_for_a_writer_with_the_right_settings(
    tmp_path: Path, token: str, database: str, status: str
) -> None:
    fake = FakeInflux3()  # refuses on its own check of the token and the database
    sent = lines(70)
    with serve(fake) as url:
        writer = make_writer(url, tmp_path, token=token, database=database)
        writer.submit(sent)
        wait_until(lambda: writer.status().delivery is Delivery.REFUSED, 10, "the refusal")
        refused = writer.status()
        writer.stop(1)
        assert fake.accepted == []
        assert refused.last_error is not None and status in refused.last_error
        assert refused.queued + refused.spooled == 70
        # What a reload with the fixed setting does: a new writer on the same spool.
        fixed = make_writer(url, tmp_path)
        wait_until(lambda: len(fake.accepted) >= 70, 15, "delivery with the right settings")
        fixed.stop(5)
    assert sorted(fake.accepted) == sorted(sent)
    assert fixed.status().delivery is Delivery.OK


def test_lines_reach_the_spool_every_batch_period_while_a_retry_waits(tmp_path: Path) -> None:
    """Backoff grows past 2 s here; the queue must not wait for the retry to reach the disk."""
    fake = FakeInflux3(script=[Answer(503)] * 1000)
    per_tick = 10
    with serve(fake) as url:
        writer = make_writer(url, tmp_path)  # batch period 0.1 s
        most_in_memory = 0
        deadline = time.monotonic() + 5
        submitted = 0
        while time.monotonic() < deadline:
            writer.submit(lines(per_tick, f"t{submitted}"))
            submitted += per_tick
            time.sleep(0.02)
            most_in_memory = max(most_in_memory, writer.status().queued)
        status = writer.status()
        writer.stop(1)
    # 0.1 s of lines is about 50 here; a write in flight holds at most one batch (100).
    assert most_in_memory <= 100 + 2 * 50, (most_in_memory, submitted)
    assert status.spooled >= submitted - most_in_memory
    assert status.counts.write_errors >= 3 and status.delivery is Delivery.RETRYING


def test_status_never_counts_a_line_twice_while_the_queue_moves_to_the_spool(
    tmp_path: Path,
) -> None:
    fake = FakeInflux3(script=[Answer(500)] * 1000)
    with serve(fake) as url:
        writer = make_writer(url, tmp_path)
        submitted = 0
        readings = []
        for i in range(300):
            writer.submit(lines(20, f"r{i}"))
            submitted += 20
            status = writer.status()
            readings.append((status.queued + status.spooled, submitted))
            time.sleep(0.005)
        writer.stop(1)
    wrong = [(seen, true) for seen, true in readings if seen != true]
    assert wrong == [], wrong[:5]


def test_bodies_above_one_kib_go_gzip_compressed(tmp_path: Path) -> None:
    fake = FakeInflux3()
    small, large = lines(3, "small"), lines(200, "large")
    assert len("\n".join(small).encode()) < 1024 < len("\n".join(large).encode())
    with serve(fake) as url:
        writer = make_writer(url, tmp_path)
        writer.submit(small)
        wait_until(lambda: len(fake.accepted) == 3, 10, "the small batch")
        writer.submit(large)
        wait_until(lambda: len(fake.accepted) == 203, 10, "the large batch")
        writer.stop(5)
    assert fake.encodings[0] == "" and fake.wire_bytes[0] == len("\n".join(small).encode())
    assert set(fake.encodings[1:]) == {"gzip"}
    assert sum(fake.wire_bytes[1:]) < len("\n".join(large).encode()) / 3
    assert sorted(fake.accepted) == sorted(small + large)
