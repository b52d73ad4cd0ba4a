"""The service when the database refuses it: what an operator sees, and the fix.

Under the real systemd of tests/systemdns.py, against the FAKE InfluxDB 3
endpoint (it checks the token as InfluxDB 3 does) on this machine's loopback.
The token is a systemd credential, which systemd reads at start only: fixing
it takes a restart, and everything kept meanwhile is delivered.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from fakeinflux import DATABASE, TOKEN, FakeInflux3, serve
from lineparse import parse_lines
from systemdns import SERVICE, TOKEN_PATH, SystemdNS
from test_service import install, lab_config, ns, show, wait_status

__all__ = ["ns"]  # the fixture, shared with test_service.py

pytestmark = pytest.mark.lab


def test_a_refused_token_shows_as_refused_and_a_fixed_one_delivers_what_was_kept(
    ns: SystemdNS, lab: Any, tmp_path: Path
) -> None:
    fake = FakeInflux3()
    with serve(fake) as url:
        config = lab_config(
            lab, INFLUX_URL=url, INFLUX_DB=DATABASE, INFLUX_WRITE_API="v3", DOMAINS_INCLUDE=""
        )
        install(ns, lab, config)  # the lab's token, which the fake refuses
        ns.systemctl("start", SERVICE)
        refused = wait_status(ns, lambda s: s["delivery"] == "refused", 30, "refused")
        text = show(ns, "StatusText")["StatusText"]
        shown = ns.systemctl("status", SERVICE).stdout
        cli = ns.run("vmtelemetryd", "status").stdout
        time.sleep(2)
        kept = wait_status(ns, lambda s: s["spooled"] > refused["spooled"], 15, "more kept")

        ns.write(TOKEN_PATH, TOKEN + "\n", mode=0o600)
        ns.systemctl("restart", SERVICE)
        wait_status(
            ns, lambda s: s["delivery"] == "ok" and s["spooled"] == 0 and s["written"] > 0, 30, "ok"
        )
        ns.systemctl("stop", SERVICE)
    assert "401" in refused["last_write_error"], refused
    assert "REFUSED" in text and "401" in text, text
    assert re.search(r'Status: ".*database REFUSED the writes', shown), shown
    assert re.search(r"^delivery: refused$", cli, re.M), cli
    assert kept["dropped"] == 0, kept
    busy = lab.busy_guests[0]
    times = [
        p.ts
        for p in parse_lines("".join(line + "\n" for line in fake.accepted))
        if p.measurement == "vm_metrics" and p.tags["vm"] == busy
    ]
    assert len(times) == len(set(times)), "a sample delivered twice"
    assert min(times) / 1e9 < refused["last_poll"], "the samples taken while refused are missing"
