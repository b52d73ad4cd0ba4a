"""The retry policy, pure: delays for each kind of failure, with the jitter pinned."""

from __future__ import annotations

import pytest

from vmtelemetryd.model import Delivery
from vmtelemetryd.retry import BACKOFF_CAP_S, REFUSED_RETRY_S, RetryPolicy
from vmtelemetryd.sender import Outcome, WriteError


def highest(low: float, high: float) -> float:
    return high


def test_backoff_doubles_then_stops_at_the_cap() -> None:
    policy = RetryPolicy(jitter=highest)
    delays = [policy.failed(WriteError(Outcome.RETRY, "503"), now=0.0) for _ in range(10)]
    assert delays[:3] == [0.5, 1.0, 2.0]
    assert max(delays) == BACKOFF_CAP_S == 10.0
    assert policy.state is Delivery.RETRYING and policy.retry_at == BACKOFF_CAP_S


def test_jitter_stays_in_the_upper_half_of_the_ceiling() -> None:
    policy = RetryPolicy(jitter=lambda low, high: low)
    for _ in range(4):
        policy.failed(WriteError(Outcome.RETRY, "timeout"), now=100.0)
    assert policy.retry_at == 100.0 + 2.0  # ceiling 4 s, at least half of it


def test_retry_after_wins_over_the_backoff() -> None:
    policy = RetryPolicy(jitter=highest)
    assert policy.failed(WriteError(Outcome.RETRY, "429", retry_after=30.0), now=0.0) == 30.0


@pytest.mark.parametrize("status", [401, 403, 404])
def test_refused_waits_a_minute_and_says_refused_until_a_success(status: int) -> None:
    policy = RetryPolicy(jitter=highest)
    refused = WriteError(Outcome.REFUSED, f"HTTP {status}", status=status)
    assert policy.failed(refused, now=5.0) == REFUSED_RETRY_S
    assert policy.state is Delivery.REFUSED
    policy.failed(WriteError(Outcome.RETRY, "connection refused"), now=70.0)
    assert policy.state is Delivery.RETRYING
    policy.succeeded()
    assert policy.state is Delivery.OK and policy.failures == 0 and policy.retry_at == 0.0
