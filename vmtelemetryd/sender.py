"""The InfluxDB edge: one batch of lines in one synchronous write, the answer classified.

influxdb3-python's own batching mode drops a batch when its retries run out
and loses its buffer on exit, so the writer drives the retry policy itself
and this object only ever makes one attempt.

The body is built and compressed here, not by the client: it serialises a
list one line at a time and gzips at level 9. For 360 lines (60 VMs, one
second) that took 2.1 ms of CPU per write, 1.07 ms of it in gzip; one body
at level 1 takes 0.5 ms and is 22 % larger (11.7 instead of 9.6 KB).
"""

from __future__ import annotations

import enum
import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from influxdb_client_3 import InfluxDBClient3, WriteOptions, WriteType, write_client_options
from influxdb_client_3.exceptions import InfluxDBError, InfluxDBPartialWriteError

WRITE_TIMEOUT_S = 10.0
# DESIGN.md: bodies above 1 KiB go gzip-compressed: a hypervisor's uplink is
# its guests'. At level 1 the daemon's lines shrink 11.7x in 100-line and
# 13.8x in 2000-line batches (level 9: 13.4x, 16.3x; bench/bench_write.py),
# and a hypervisor's CPUs are its guests' too.
GZIP_ABOVE_BYTES = 1024
GZIP_LEVEL = 1


class Outcome(enum.Enum):
    """What the writer must do with a batch after one attempt."""

    RETRY = "retry"  # connection error, timeout, 5xx, 429: same batch later
    SPLIT = "split"  # 413: too large, send halves
    REJECTED = "rejected"  # `rejected` lines go to dead letters; the others were accepted
    REFUSED = "refused"  # 401/403/404/405: keep everything, an operator must act


@dataclass(frozen=True, slots=True)
class RejectedLine:
    line: str
    reason: str


class WriteError(Exception):
    """One failed attempt; never carries the token."""

    def __init__(
        self,
        outcome: Outcome,
        reason: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        rejected: tuple[RejectedLine, ...] = (),
    ) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        self.rejected = rejected


class Sender:
    """Writes line protocol to ``/api/v3/write_lp`` (or ``/api/v2/write``)."""

    def __init__(
        self,
        url: str,
        database: str,
        token: str,
        api: Literal["v2", "v3"],
        timeout_s: float = WRITE_TIMEOUT_S,
    ) -> None:
        # One WriteOptions carries every write setting: the client lets the
        # object passed here override its own keyword arguments.
        options = WriteOptions(
            write_type=WriteType.synchronous,
            max_retries=0,
            use_v2_api=api == "v2",
            accept_partial=True,
            timeout=int(timeout_s * 1000),
        )
        self._client = InfluxDBClient3(
            host=url,
            database=database,
            token=token,
            write_client_options=write_client_options(write_options=options),
            retries=False,
        )

    def send(self, lines: Sequence[str]) -> None:
        """Returns once the database accepted every line; raises ``WriteError`` otherwise."""
        try:
            body = "\n".join(lines).encode()
            compressed = len(body) > GZIP_ABOVE_BYTES
            encoding = {"content_encoding": "gzip"} if compressed else {}
            if compressed:
                body = gzip.compress(body, compresslevel=GZIP_LEVEL)
            # content_encoding: the client's own parameter, sent as Content-Encoding.
            self._client.write(record=body, write_precision="ns", **encoding)
        except InfluxDBError as exc:
            raise _classify_answer(exc, lines) from None
        except Exception as exc:  # urllib3 connection errors, timeouts, TLS failures
            raise WriteError(Outcome.RETRY, f"{type(exc).__name__}: {_first_line(exc)}") from None

    def close(self) -> None:
        self._client.close()


def _classify_answer(exc: InfluxDBError, lines: Sequence[str]) -> WriteError:
    status: int | None = getattr(exc, "status", None)
    if exc.response is not None:
        status = exc.response.status
    reason = f"HTTP {status}: {_first_line(exc.message)}"
    if isinstance(exc, InfluxDBPartialWriteError):
        rejected = tuple(_rejected_lines(exc, lines))
        return WriteError(Outcome.REJECTED, reason, status=status, rejected=rejected)
    if status == 0:  # the client's own word that the endpoint does not exist (405)
        return WriteError(Outcome.REFUSED, _first_line(exc.message), status=405)
    if status is None or status >= 500 or status == 429:
        retry_after = _retry_after_seconds(exc.retry_after)
        return WriteError(Outcome.RETRY, reason, status=status, retry_after=retry_after)
    if status == 413:
        return WriteError(Outcome.SPLIT, reason, status=status)
    if status in (401, 403, 404, 405):
        return WriteError(Outcome.REFUSED, reason, status=status)
    whole_batch = tuple(RejectedLine(line, reason) for line in lines)
    return WriteError(Outcome.REJECTED, reason, status=status, rejected=whole_batch)


def _rejected_lines(exc: InfluxDBPartialWriteError, lines: Sequence[str]) -> list[RejectedLine]:
    """Map the server's 1-based line numbers back to our lines."""
    rejected = []
    for error in exc.line_errors:
        index = error.line_number - 1
        line = lines[index] if 0 <= index < len(lines) else error.original_line
        rejected.append(RejectedLine(line, error.error_message))
    return rejected


def _retry_after_seconds(header: Any) -> float | None:
    """Retry-After in seconds; an HTTP date is rare from InfluxDB and treated as absent."""
    try:
        seconds = float(header)
    except (TypeError, ValueError):
        return None
    return seconds if seconds >= 0 else None


def _first_line(value: object) -> str:
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return text.strip().splitlines()[0][:300] if text.strip() else "no detail"
