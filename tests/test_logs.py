"""Logging, observed from outside: each case runs in a child process.

A child, because the journal is detected from the process's own stderr and
because configuring logging is global state that must not leak into other tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOKEN = "apiv3_s3cr3t-T0KEN_value"
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")

# argv: JOURNAL_STREAM source ("1", "2": fake it to match that fd; "none": unset),
# level, journal argument ("auto", "yes", "no"), code to run with ``log`` bound.
CHILD = textwrap.dedent(
    """
    import logging, os, sys
    import structlog
    from vmtelemetryd.logs import configure_logging, set_redacted

    fd, level, journal, code = sys.argv[1:]
    if fd != "none":
        status = os.fstat(int(fd))
        os.environ["JOURNAL_STREAM"] = f"{status.st_dev}:{status.st_ino}"
    configure_logging(level, journal={"auto": None, "yes": True, "no": False}[journal])
    log = structlog.get_logger()
    exec(code)
    """
)


def run(code: str, *, fd: str = "none", level: str = "info", journal: str = "auto") -> list[str]:
    """The child's stderr lines; it must have written nothing to stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NO_COLOR")}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, fd, level, journal, textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout == ""
    return child.stderr.splitlines()


LEVELS = """
    log.debug("dbg")
    log.info("poll done", vms=42)
    log.warning("slow poll", seconds=1.5)
    log.error("write failed", vm="web 1")
"""


def test_journal_lines_carry_priority_and_no_timestamp() -> None:
    lines = run(LEVELS, fd="2")
    assert lines == [
        '<6>event="poll done" vms=42',
        '<4>event="slow poll" seconds=1.5',
        '<3>event="write failed" vm="web 1"',
    ]


def test_journal_debug_priority() -> None:
    assert run(LEVELS, fd="2", level="debug")[0] == "<7>event=dbg"


def test_console_lines_have_timestamps_and_no_priority() -> None:
    lines = run(LEVELS)
    assert len(lines) == 3
    for line, level in zip(lines, ("info", "warning", "error"), strict=True):
        assert TIMESTAMP.match(line), line
        assert f"[{level}" in line
        assert not line.startswith("<")
        assert "\x1b[" not in line  # no colors: stderr is a pipe


@pytest.mark.parametrize(
    ("fd", "journal", "expect_journal"),
    [
        ("1", "auto", False),  # stdout is the journal, but logs go to stderr
        ("2", "no", False),
        ("none", "yes", True),
    ],
)
def test_journal_detection_and_override(fd: str, journal: str, expect_journal: bool) -> None:
    (line,) = run('log.error("boom")', fd=fd, journal=journal)
    assert line.startswith("<3>") is expect_journal
    assert bool(TIMESTAMP.search(line)) is not expect_journal


def test_value_with_newline_stays_one_journal_line() -> None:
    lines = run('log.info("vm seen", vm="evil\\n<3>forged")', fd="2")
    assert len(lines) == 1
    assert lines[0].startswith("<6>")


REDACTION = f"""
    set_redacted(["{TOKEN}"])
    log.info("equal", value="{TOKEN}")
    log.info("inside", url="http://influx:8181/?t={TOKEN}")
    log.info("keys", token="another-secret", influx_token="and-another")
    log.error("object", error=RuntimeError("401 for {TOKEN}"))
    try:
        raise PermissionError("rejected token {TOKEN}")
    except PermissionError:
        log.exception("traceback")
    logging.getLogger("influxdb_client").warning("retry with %s", "{TOKEN}")
"""


@pytest.mark.parametrize("fd", ["2", "none"])
def test_secrets_are_masked(fd: str) -> None:
    output = "\n".join(run(REDACTION, fd=fd))
    assert TOKEN not in output
    assert "another-secret" not in output
    assert "and-another" not in output
    for event in ("equal", "inside", "keys", "object", "traceback", "retry with"):
        assert event in output
    assert output.count("***") >= 7


def test_redaction_follows_the_current_secrets() -> None:
    lines = run(
        """
        set_redacted(["old-token"])
        set_redacted(["new-token", ""])
        log.info("rotated", a="old-token", b="new-token")
        """,
        fd="2",
    )
    assert lines == ["<6>event=rotated a=old-token b=***"]


TRACEBACK = """
    def fail():
        hidden = "".join(reversed("EULAV_LACOL"))
        raise ValueError("kaput " + str(len(hidden)))

    try:
        fail()
    except ValueError:
        log.exception("poll failed")
"""


@pytest.mark.parametrize("fd", ["2", "none"])
def test_traceback_without_locals(fd: str) -> None:
    lines = run(TRACEBACK, fd=fd)
    output = "\n".join(lines)
    assert "Traceback (most recent call last)" in output
    assert "ValueError: kaput 11" in output
    assert "in fail" in output
    assert "LOCAL_VALUE" not in output
    if fd == "2":
        assert len(lines) == 1  # one journal entry, at error priority
        assert lines[0].startswith("<3>")


def test_stdlib_logging_at_warning_and_above_only() -> None:
    lines = run(
        """
        lib = logging.getLogger("influxdb_client.client.write_api")
        lib.debug("lib debug")
        lib.info("lib info")
        lib.warning("lib warning %d", 1)
        lib.error("lib error")
        """,
        fd="2",
        level="debug",
    )
    assert lines == [
        '<4>event="lib warning 1" logger=influxdb_client.client.write_api',
        '<3>event="lib error" logger=influxdb_client.client.write_api',
    ]


def test_stdlib_below_log_level_is_dropped() -> None:
    lines = run('logging.getLogger("urllib3").warning("retrying")', fd="2", level="error")
    assert lines == []


def test_level_changes_at_runtime_even_for_bound_loggers() -> None:
    lines = run(
        """
        bound = log.bind(component="writer")
        bound.info("before")
        configure_logging("debug", journal=True)
        bound.debug("after")
        log.debug("proxy after")
        configure_logging("error", journal=True)
        bound.warning("muted")
        """,
        fd="2",
        level="warning",
    )
    assert lines == ["<7>event=after component=writer", '<7>event="proxy after"']


def test_reconfiguring_reaches_loggers_already_used() -> None:
    lines = run(
        """
        log.info("before")
        configure_logging("info", journal=True)
        log.info("after")
        """,
        journal="no",
    )
    assert TIMESTAMP.match(lines[0])
    assert lines[1:] == ["<6>event=after"]


def test_a_short_token_is_masked_as_a_word_and_never_inside_one() -> None:
    """A lab's ``INFLUX_TOKEN=t`` once turned ``started`` into ``s***ar***ed``."""
    lines = run(
        """
        set_redacted(["t"])
        log.info("started", config="/tmp/test.env", auth="Token t", bare="t")
        """,
        fd="2",
    )
    assert lines == ['<6>event=started config=/tmp/test.env auth="Token ***" bare=***']


def test_a_long_token_is_masked_even_inside_a_word() -> None:
    lines = run(f'set_redacted(["{TOKEN}"])\nlog.info("glued", v="x{TOKEN}y")', fd="2")
    assert lines == ["<6>event=glued v=x***y"]


def test_a_carriage_return_is_escaped_in_the_journal() -> None:
    """ssh's error text holds CR LF; journald would show the whole line as a blob."""
    (line,) = run(
        'log.error("sample failed", error="@@@@\\r\\nHost key verification failed.")', fd="2"
    )
    assert "\r" not in line and "\\r" in line and line.startswith("<3>")
