"""Poll ticks on the monotonic clock.

A cycle that overruns skips the ticks it missed instead of bursting to catch
up: a burst would hammer libvirtd exactly when it is already slow. Ticks
stay on the grid laid at start, so the sample rate does not drift.
"""

from __future__ import annotations

import math


class Ticker:
    def __init__(self, interval: float, start: float) -> None:
        self.interval = interval
        self._origin = start
        self._next = start
        self.overruns = 0

    def due(self) -> float:
        """The monotonic time of the next tick."""
        return self._next

    def advance(self, now: float) -> float:
        """Called when a cycle ends at ``now``; returns the next tick, counting skipped ones."""
        ticks_passed = math.floor((now - self._origin) / self.interval) + 1
        upcoming = self._origin + ticks_passed * self.interval
        skipped = ticks_passed - self._ticks_of(self._next) - 1
        if skipped > 0:
            self.overruns += skipped
        self._next = max(upcoming, self._next + self.interval)
        return self._next

    def retune(self, interval: float, now: float) -> None:
        """A reload changed POLL_INTERVAL: a new grid starting one new interval from now."""
        self.interval = interval
        self._origin = now + interval
        self._next = self._origin

    def _ticks_of(self, moment: float) -> int:
        return round((moment - self._origin) / self.interval)
