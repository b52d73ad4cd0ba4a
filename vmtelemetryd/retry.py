"""When to ask the database again after a failed write, and what to call its state meanwhile.

A database that is away (connection refused, a timeout, 5xx, 429) comes
back on its own: try again soon, with capped exponential backoff and full
jitter, so that points flow again within ``BACKOFF_CAP_S`` of its return.
A database that refuses us (401/403/404/405) will not change its mind until
an operator fixes the token, the database name or the URL: keep everything,
ask again every ``REFUSED_RETRY_S``, and say "refused", not "retrying".

Pure: the clock and the random source are the caller's.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from vmtelemetryd.model import Delivery
from vmtelemetryd.sender import Outcome, WriteError

BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 10.0
RETRY_AFTER_CAP_S = 300.0
REFUSED_RETRY_S = 60.0


class RetryPolicy:
    """Counts consecutive failures and says when the next attempt is due."""

    def __init__(self, jitter: Callable[[float, float], float] = random.uniform) -> None:
        self._jitter = jitter
        self.failures = 0
        self.retry_at = 0.0
        self.refused = False

    def succeeded(self) -> None:
        self.failures = 0
        self.retry_at = 0.0
        self.refused = False

    def failed(self, error: WriteError, now: float) -> float:
        """Record a failed attempt at ``now``; returns the delay before the next one."""
        self.failures += 1
        self.refused = error.outcome is Outcome.REFUSED
        delay = self._delay(error)
        self.retry_at = now + delay
        return delay

    @property
    def state(self) -> Delivery:
        if self.refused:
            return Delivery.REFUSED
        return Delivery.RETRYING if self.failures else Delivery.OK

    def _delay(self, error: WriteError) -> float:
        if self.refused:
            return REFUSED_RETRY_S
        if error.retry_after is not None:  # the server's word wins, within reason
            return min(error.retry_after, RETRY_AFTER_CAP_S)
        ceiling = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** (self.failures - 1))
        return self._jitter(ceiling / 2, ceiling)
