"""DOMAINS_INCLUDE / DOMAINS_EXCLUDE against the lab's real guests.

Filtering takes the sampler off the one bulk request onto listing and
domainListGetStats: both what ``once`` prints and what a ``run`` stores are
checked, since they are separate paths to the same promise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemonproc import DaemonProcess, lab_environment, run_verb, stored_vms
from lineparse import parse_lines

pytestmark = pytest.mark.lab


def printed_vms(env: dict[str, str], workdir: Path) -> set[str]:
    result = run_verb(env, "once")
    assert result.returncode == 0, result.stderr
    return {p.tags["vm"] for p in parse_lines(result.stdout)}


def run_vms(env: dict[str, str], workdir: Path) -> set[str]:
    daemon = DaemonProcess(env, workdir).start()
    try:
        daemon.wait_for(lambda s: s["written"] > 0, 30, "a first write")
        time.sleep(1.5)  # a few polls: a guest left out once could still slip in later
    finally:
        assert daemon.stop() == 0, daemon.output()
    return stored_vms(daemon.host)


SEEN: dict[str, Callable[[dict[str, str], Path], set[str]]] = {
    "once": printed_vms,
    "run": run_vms,
}


def filter_case(lab: Any, case: str) -> tuple[dict[str, str], set[str], set[str] | None]:
    """(variables, guests that must be left out, the only guests allowed or None)."""
    busy, paused = lab.busy_guests[0], lab.paused_guests
    if case == "exclude-one":
        return {"DOMAINS_EXCLUDE": f"no-such-*, {paused[0]}"}, {paused[0]}, None
    if case == "include-globs":
        # An exact name and a leading * that only one lab guest ends with.
        kept = {busy, paused[1]}
        include = f"{busy}, *{paused[1].removeprefix(lab.prefix)}"
        return {"DOMAINS_INCLUDE": include}, set(lab.guests) - kept, kept
    assert case == "exclude-wins"
    return {"DOMAINS_INCLUDE": f"{lab.prefix}*", "DOMAINS_EXCLUDE": busy}, {busy}, None


@pytest.mark.parametrize("how", sorted(SEEN))
@pytest.mark.parametrize("case", ["exclude-one", "include-globs", "exclude-wins"])
def test_filters_leave_out_exactly_the_guests_they_name(
    lab: Any, tmp_path: Path, case: str, how: str
) -> None:
    """A guest left out by the globs has no point at all; every other lab guest keeps its own."""
    variables, left_out, only = filter_case(lab, case)
    seen = SEEN[how](lab_environment(lab, tmp_path, **variables), tmp_path)
    assert not seen & left_out, seen
    assert set(lab.guests) - left_out <= seen, seen
    if only is not None:
        assert seen == only
