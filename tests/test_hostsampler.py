"""STATS_SHARDS=auto, the rule alone (tests/test_shards_lab.py runs the shares)."""

from __future__ import annotations

import pytest

from vmtelemetryd.hostsampler import auto_shards


@pytest.mark.parametrize(
    ("domains", "shares"), [(0, 1), (60, 1), (99, 1), (100, 2), (150, 3), (204, 4), (5000, 4)]
)
def test_auto_takes_one_share_per_full_50_domains_at_most_4(domains: int, shares: int) -> None:
    assert auto_shards(domains) == shares
