"""A domain that NOWAIT found busy, asked once more for its monitor groups, and how late.

Another client's stats call (a second collector, a cloud's own monitoring) holds
a domain's job while QEMU answers it: 3.8 ms (median) here. NOWAIT then returns
that domain without its memory figures and disk counters; beside a reader
polling every 0.1 s, 5 of 200 samples here. Asked again ``BUSY_RETRY_AFTER_S``
later, none of 22 such domains still lacked them (at once, 5 of 6 did).

Only the monitor groups of the second answer are kept: the domain's CPU and NIC
counters are those of the first, read with everyone else's. Its monitor groups
were read ``late_s`` after the rest, which its disk rates are timed with
(features): up to a whole request later (about 0.25 s at 60 guests), too much
to pass off as read with the rest at 1 s intervals.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

BUSY_RETRY_AFTER_S = 0.02
MONITOR_KEYS = ("balloon.", "block.")  # the prefixes of the groups that need the job

Pairs = list[tuple[Any, dict[str, Any]]]
"""(domain handle, libvirt's stats dict) of each domain, as a bulk request returns them."""


def monitor_skipped(stats: Mapping[str, Any]) -> bool:
    """Whether NOWAIT left out this running domain's monitor groups. libvirt reads
    ``balloon.rss`` only once it holds the domain's job, for every running domain,
    with or without a balloon device or disks (seen here, libvirt 9.0)."""
    return "balloon.rss" not in stats


def ask_again_if_busy(
    running: Pairs,
    asked: tuple[float, float],
    ask: Callable[[list[Any]], Pairs],
    deadline: float,
) -> tuple[Pairs, dict[str, float]]:
    """``running`` with the monitor groups of each busy domain from a second ``ask``,
    and how late (seconds) each one's were read, by uuid.

    ``asked``: when the request that returned ``running`` started and ended
    (monotonic). No second ask past ``deadline``: it must not take the request
    past its timeout. A domain busy again, or gone, keeps its first answer.
    """
    busy = [index for index, (_, stats) in enumerate(running) if monitor_skipped(stats)]
    if not busy or time.monotonic() + BUSY_RETRY_AFTER_S > deadline:
        return running, {}
    time.sleep(BUSY_RETRY_AFTER_S)
    started = time.monotonic()
    again = ask([running[index][0] for index in busy])
    answered = (started, time.monotonic())
    whole = {
        dom.UUIDString(): (place, stats)
        for place, (dom, stats) in enumerate(again)
        if not monitor_skipped(stats)
    }
    merged = list(running)
    late: dict[str, float] = {}
    for index in busy:
        dom, first = running[index]
        uuid = dom.UUIDString()
        if uuid in whole:
            place, second = whole[uuid]
            merged[index] = (dom, with_monitor_groups(first, second))
            late[uuid] = read_at(answered, place, len(again)) - read_at(asked, index, len(running))
    return merged, late


def with_monitor_groups(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any]:
    """``first`` with its monitor groups taken from ``second``."""
    merged = {key: value for key, value in first.items() if not key.startswith(MONITOR_KEYS)}
    merged.update((key, value) for key, value in second.items() if key.startswith(MONITOR_KEYS))
    return merged


def read_at(span: tuple[float, float], place: int, count: int) -> float:
    """When the ``place``-th of ``count`` domains was read in a request over ``span``:
    libvirtd asks their monitors one after another, in the order it returns them."""
    start, end = span
    return start + (place + 0.5) / count * (end - start)
