"""Shared fixtures.

``lab``: the real test lab (tests/lab/labkit.py): a libvirtd with 3 paused and
1 busy guest, and a line-protocol database. Brought up once per session
(reusing whatever already runs) and left running afterwards, unless
VMT_LAB_DOWN=1. Tests marked ``lab`` are skipped only where the lab truly
cannot run (not root, or no QEMU and no apt to install it); anywhere else a
lab that fails to come up is an error.

``lab2``: the same lab with a second hypervisor beside it (``up(hosts=2)``:
hv2, a libvirtd with its own hostname and paused guests; see lab_hosts.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "lab"))

import labkit  # the lab's own module: stdlib only, importable before anything else


def _lab_skip_reason() -> str | None:
    ok, why = labkit.can_run()
    return None if ok else f"the real test lab cannot run on this machine: {why}"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("lab") is not None:
        reason = _lab_skip_reason()
        if reason:
            pytest.skip(reason)


def _lab_session(hosts: int) -> Iterator[labkit.LabInfo]:
    reason = _lab_skip_reason()
    if reason:
        pytest.skip(reason)
    yield labkit.up(labkit.DEFAULT_GUESTS, labkit.DEFAULT_BUSY, hosts=hosts)
    if os.environ.get("VMT_LAB_DOWN") == "1":
        labkit.down()


@pytest.fixture(scope="session")
def lab() -> Iterator[labkit.LabInfo]:
    yield from _lab_session(hosts=1)


@pytest.fixture(scope="session")
def lab2() -> Iterator[labkit.LabInfo]:
    yield from _lab_session(hosts=2)
