"""TimedCaller: blocking calls with a deadline, and what happens to one that ends too late."""

from __future__ import annotations

import threading
import time

import pytest
from systemdns import wait_for

from vmtelemetryd.timedcalls import SamplerStuck, TimedCaller


def test_a_call_that_ends_after_its_timeout_hands_its_result_to_late() -> None:
    gate = threading.Event()
    late: list[str | None] = []

    def slow() -> str:
        gate.wait(5)
        return "answer"

    with pytest.raises(SamplerStuck, match=r"slow timed out after 0\.05 s"):
        TimedCaller().call(slow, 0.05, "slow", late=late.append)
    assert late == []
    gate.set()
    wait_for(lambda: late == ["answer"], 5, "the late result")


def test_a_late_call_that_fails_hands_on_none() -> None:
    gate = threading.Event()
    late: list[None] = []

    def failing() -> None:
        gate.wait(5)
        raise OSError("gone")

    with pytest.raises(SamplerStuck):
        TimedCaller().call(failing, 0.05, "failing", late=late.append)
    gate.set()
    wait_for(lambda: late == [None], 5, "None for the late failure")


def test_a_call_within_its_timeout_returns_and_never_calls_late() -> None:
    late: list[int | None] = []
    assert TimedCaller().call(lambda: 42, 5, "quick", late=late.append) == 42
    with pytest.raises(KeyError):
        TimedCaller().call(lambda: {}["x"], 5, "failing", late=late.append)
    time.sleep(0.1)
    assert late == []


def test_with_two_calls_stuck_the_next_fails_fast_without_being_started() -> None:
    caller, gate, started = TimedCaller(), threading.Event(), threading.Event()
    for _ in range(2):
        with pytest.raises(SamplerStuck, match="timed out"):
            caller.call(lambda: gate.wait(5), 0.02, "hung")
    with pytest.raises(SamplerStuck, match="has not answered earlier requests"):
        caller.call(started.set, 5, "next")
    assert not started.is_set()
    gate.set()

    def answers() -> bool:
        try:
            return caller.call(lambda: 7, 5, "after") == 7
        except SamplerStuck:  # the stuck calls are still ending
            return False

    wait_for(answers, 5, "an answer once the stuck calls ended")
