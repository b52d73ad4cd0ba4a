"""The tick grid: steady ticks, overruns skip (never burst), retune on reload."""

import pytest

from vmtelemetryd.scheduler import Ticker


def test_steady_cycles_follow_the_grid_without_drift() -> None:
    ticker = Ticker(1.0, start=100.0)
    ticks = [ticker.advance(100.0 + i + 0.2) for i in range(5)]
    assert ticks == pytest.approx([101.0, 102.0, 103.0, 104.0, 105.0])
    assert ticker.overruns == 0


def test_an_overrun_skips_missed_ticks_and_counts_them() -> None:
    ticker = Ticker(1.0, start=0.0)
    # The cycle started at tick 0 and ended at 3.4 s: ticks 1, 2 and 3 were missed.
    assert ticker.advance(3.4) == pytest.approx(4.0)
    assert ticker.overruns == 3
    assert ticker.advance(4.1) == pytest.approx(5.0)
    assert ticker.overruns == 3


def test_a_cycle_ending_exactly_on_a_tick_does_not_repeat_it() -> None:
    ticker = Ticker(0.5, start=10.0)
    assert ticker.advance(10.5) == pytest.approx(11.0)
    assert ticker.overruns == 1


def test_retune_lays_a_new_grid_from_now() -> None:
    ticker = Ticker(1.0, start=0.0)
    ticker.advance(0.1)
    ticker.retune(2.5, now=0.7)
    assert ticker.due() == pytest.approx(3.2)
    assert ticker.advance(3.3) == pytest.approx(5.7)
