"""The writer's error policy, each InfluxDB 3 answer driven by the FAKE endpoint.

Whether data really lands in a database is checked against the lab's real
one in test_delivery_lab.py; here only the answers the lab cannot give.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fakeinflux import DATABASE, TOKEN, Answer, FakeInflux3, serve

from vmtelemetryd.model import Delivery, WriterSettings
from vmtelemetryd.sender import Sender
from vmtelemetryd.writer import Writer


def lines(n: int, tag: str = "a") -> list[str]:
    return [f"m,t={tag} v={i}i {1_700_000_000_000_000_000 + i}" for i in range(n)]


def make_writer(
    url: str,
    tmp_path: Path,
    batch: int = 100,
    timeout_s: float = 5.0,
    token: str = TOKEN,
    database: str = DATABASE,
) -> Writer:
    settings = WriterSettings(
        batch_max_lines=batch,
        batch_max_sec=0.1,
        spool_dir=tmp_path / "spool",
        spool_max_bytes=10_000_000,
    )
    writer = Writer(Sender(url, database, token, "v3", timeout_s=timeout_s), settings)
    writer.start()
    return writer


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_5xx_is_retried_and_the_batch_lands_once(tmp_path: Path) -> None:
    fake = FakeInflux3(script=[Answer(500, {"error": "internal"}), Answer(503)])
    with serve(fake) as url:
        writer = make_writer(url, tmp_path)
        sent = lines(50)
        writer.submit(sent)
        wait_until(lambda: len(fake.accepted) >= 50, 15, "delivery after two 5xx")
        status = writer.status()
        writer.stop(5)
    assert sorted(fake.accepted) == sorted(sent)
    assert status.counts.write_errors == 2 and status.counts.written == 50
    assert status.delivery is Delivery.OK
    assert fake.paths[0].startswith("/api/v3/write_lp")


def test_429_waits_as_long_as_retry_after_says(tmp_path: Path) -> None:
    fake = FakeInflux3(script=[Answer(429, {"error": "slow down"}, {"Retry-After": "2"})])
    with serve(fake) as url:
        writer = make_writer(url, tmp_path)
        started = time.monotonic()
        writer.submit(lines(10))
        wait_until(lambda: len(fake.accepted) == 10, 15, "delivery after 429")
        waited = time.monotonic() - started
        writer.stop(5)
    assert waited >= 2.0
    assert len(fake.requests) == 2


def test_413_splits_the_batch_until_it_fits(tmp_path: Path) -> None:
    fake = FakeInflux3(max_lines=30)
    with serve(fake) as url:
        writer = make_writer(url, tmp_path, batch=100)
        sent = lines(100)
        writer.submit(sent)
        wait_until(lambda: len(fake.accepted) == 100, 15, "delivery in halves")
        writer.stop(5)
    assert sorted(fake.accepted) == sorted(sent)
    # Halving: 100 and 50 are refused (413), every 25 lands, each line once.
    assert [len(r) for r in fake.requests] == [100, 50, 25, 25, 50, 25, 25]
    assert writer.status().counts.write_errors == 0


def test_partial_write_keeps_accepted_lines_and_dead_letters_the_rest(tmp_path: Path) -> None:
    def reject_bad(line: str) -> str | None:
        return "invalid column type for column 'v'" if "t=bad" in line else None

    fake = FakeInflux3(reject=reject_bad)
    with serve(fake) as url:
        writer = make_writer(url, tmp_path)
        good, bad = lines(20, "good"), lines(3, "bad")
        writer.submit(good[:10] + bad + good[10:])
        wait_until(lambda: writer.status().counts.dead_lettered == 3, 15, "dead letters")
        time.sleep(0.5)
        writer.stop(5)
    assert sorted(fake.accepted) == sorted(good)
    assert len(fake.requests) == 1, "rejected lines must not be retried"
    # In SPOOL_DIR, the one directory the service may write.
    records = [
        json.loads(row)
        for row in (tmp_path / "spool" / "dead-letters.jsonl").read_text().splitlines()
    ]
    assert [r["line"] for r in records] == bad
    assert all("invalid column type" in r["reason"] for r in records)
    assert writer.status().counts.written == 20


def test_401_keeps_everything_and_reports_it(tmp_path: Path) -> None:
    refused = Answer(401, {"error": "authorization failed"})
    fake = FakeInflux3(script=[refused] * 3)
    with serve(fake) as url:
        writer = make_writer(url, tmp_path)
        sent = lines(40)
        writer.submit(sent)
        wait_until(lambda: writer.status().counts.write_errors >= 1, 10, "the refusal")
        status = writer.status()
        assert status.delivery is Delivery.REFUSED
        assert status.last_error is not None and "401" in status.last_error
        assert TOKEN not in status.last_error
        assert status.queued + status.spooled == 40, "nothing may be dropped on 401"
        # Refused is not retried at the pace of an outage: an operator must act first.
        time.sleep(3)
        assert len(fake.requests) == 1
        writer.stop(1)
    assert fake.accepted == []


@pytest.mark.parametrize("status", [401, 500])
def test_lines_still_failing_at_stop_are_spooled_and_sent_by_the_next_writer(
    tmp_path: Path, status: int
) -> None:
    fake = FakeInflux3(script=[Answer(status)] * 1000)
    with serve(fake) as url:
        writer = make_writer(url, tmp_path)
        sent = lines(25)
        writer.submit(sent)
        wait_until(lambda: writer.status().counts.write_errors >= 1, 10, "a failure")
        writer.stop(1)
        assert fake.accepted == []
    healthy = FakeInflux3()
    with serve(healthy) as url:
        writer = make_writer(url, tmp_path)
        wait_until(lambda: len(healthy.accepted) == 25, 15, "the spool drained")
        writer.stop(5)
    assert sorted(healthy.accepted) == sorted(sent)


def test_a_hung_database_times_out_and_nothing_is_lost(tmp_path: Path) -> None:
    """A FAKE peer that accepts connections and never answers."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    url = f"http://127.0.0.1:{hung.getsockname()[1]}"
    writer = make_writer(url, tmp_path, timeout_s=2.0)
    writer.submit(lines(30))
    time.sleep(0.2)  # the first write is in flight, and hangs
    started = time.perf_counter()
    for _ in range(20):
        writer.submit(lines(30, "more"))
    assert time.perf_counter() - started < 0.1, "submit waited on the network"
    # While the write hangs, the queue still reaches the spool: only that write's
    # lines live in memory alone.
    wait_until(lambda: writer.status().spooled == 20 * 30, 1.5, "the queue in the spool")
    assert writer.status().queued == 30 and writer.status().counts.write_errors == 0
    wait_until(lambda: writer.status().counts.write_errors >= 1, 10, "the timeout")
    status = writer.status()
    assert status.last_error is not None and "timed out" in status.last_error.lower()
    assert status.delivery is Delivery.RETRYING
    writer.stop(1)
    hung.close()
    healthy = FakeInflux3()
    with serve(healthy) as url:
        writer = make_writer(url, tmp_path)
        wait_until(lambda: len(healthy.accepted) == 30 + 20 * 30, 15, "the spool drained")
        writer.stop(5)


def make_writer_at(url: str, spool_dir: Path, spool_max_bytes: int = 10_000_000) -> Writer:
    settings = WriterSettings(
        batch_max_lines=100, batch_max_sec=0.1, spool_dir=spool_dir, spool_max_bytes=spool_max_bytes
    )
    writer = Writer(Sender(url, DATABASE, TOKEN, "v3", timeout_s=2.0), settings)
    writer.start()
    return writer


def test_an_unwritable_spool_holds_lines_in_memory_and_reports_it(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    fake = FakeInflux3(script=[Answer(500)] * 3)
    with serve(fake) as url:
        writer = make_writer_at(url, blocker / "spool")
        sent = lines(60)
        writer.submit(sent)
        wait_until(lambda: writer.status().counts.write_errors >= 1, 10, "a failed write")
        status = writer.status()
        assert status.spool_error is not None and "not-a-directory" in status.spool_error
        assert status.delivery is Delivery.SPOOL_UNUSABLE
        assert status.queued == 60 and status.spooled == 0
        wait_until(lambda: len(fake.accepted) == 60, 30, "delivery from memory")
        writer.stop(5)
    assert sorted(fake.accepted) == sorted(sent)


def test_a_full_disk_under_the_spool_loses_nothing_once_the_database_returns(
    tmp_path: Path,
) -> None:
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)])
    if made.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        (mount / "filler").write_bytes(b"\0" * 60 * 1024)
        fake = FakeInflux3(script=[Answer(503)] * 4)
        with serve(fake) as url:
            writer = make_writer_at(url, mount / "spool")
            sent = [f'm,t=x pad="{"y" * 200}" {i}' for i in range(400)]
            writer.submit(sent)
            wait_until(lambda: writer.status().spool_error is not None, 15, "the spool filling")
            wait_until(lambda: len(fake.accepted) >= 400, 60, "delivery")
            writer.stop(5)
        assert sorted(fake.accepted) == sorted(sent), "a line lost or delivered twice"
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_slow_database_sends_the_queue_past_its_high_water_mark_to_the_spool(
    tmp_path: Path,
) -> None:
    fake = FakeInflux3(delay_s=0.5)
    with serve(fake) as url:
        writer = make_writer(url, tmp_path, batch=10)
        sent = []
        for i in range(6):
            chunk = lines(50, f"chunk{i}")
            sent.extend(chunk)
            writer.submit(chunk)
            time.sleep(0.1)
        wait_until(lambda: writer.status().spooled > 0, 10, "lines in the spool")
        wait_until(lambda: len(fake.accepted) == len(sent), 60, "everything delivered")
        writer.stop(5)
    assert sorted(fake.accepted) == sorted(sent)
    assert writer.status().counts.write_errors == 0
