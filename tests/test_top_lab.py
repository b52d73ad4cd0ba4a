"""``vmtelemetryd top`` in a real terminal (tmux) and through a pipe, against the lab's guests.

tmux runs on a socket of this test's own (``tmux -L``), so the server it
starts is ours to kill and sees only the environment given here.
"""

from __future__ import annotations

import shlex
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import labkit
import pytest
from daemonproc import COMMAND, lab_environment, run_verb

from vmtelemetryd.model import STATE_NAMES

pytestmark = pytest.mark.lab

STATES = set(STATE_NAMES.values())


@dataclass
class Terminal:
    socket: str
    workdir: Path

    def tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True
        )
        return done.stdout

    def screen(self) -> list[str]:
        return self.tmux("capture-pane", "-p", "-t", "top").splitlines()

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "top", *keys)

    def exit_status(self, timeout: float) -> int:
        path = self.workdir / "exit"
        deadline = time.monotonic() + timeout
        while not path.exists() or not path.read_text().strip():
            assert time.monotonic() < deadline, "top still running:\n" + "\n".join(self.screen())
            time.sleep(0.1)
        return int(path.read_text())

    def stderr(self) -> str:
        return (self.workdir / "stderr").read_text()

    def wait_for(self, check: Callable[[list[str]], bool], timeout: float, what: str) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.screen()
            if check(lines):
                return lines
            assert time.monotonic() < deadline, f"no {what} on screen:\n" + "\n".join(lines)
            time.sleep(0.1)


@contextmanager
def terminal(
    env: dict[str, str], workdir: Path, size: tuple[int, int], *args: str
) -> Iterator[Terminal]:
    term = Terminal(f"vmt-top-{uuid.uuid4().hex[:8]}", workdir)
    command = shlex.join([*COMMAND, "top", *args])
    # The shell stays after top exits, so that its last screen can still be read; it
    # survives a Ctrl-C with a handler (not an ignore, which top would inherit).
    script = (
        f"trap true INT; {command} 2>{workdir / 'stderr'}; echo $? >{workdir / 'exit'}; sleep 60"
    )
    width, height = size
    session = ["new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height)]
    subprocess.run(
        ["tmux", "-L", term.socket, *session, "sh", "-c", script],
        env={**env, "TERM": "screen"},
        check=True,
    )
    try:
        yield term
    finally:
        subprocess.run(["tmux", "-L", term.socket, "kill-server"], check=False)


def rows(lines: list[str]) -> dict[str, list[str]]:
    """The VM rows under the column titles, by name (lab names have no spaces)."""
    titles = next((i for i, line in enumerate(lines) if line.startswith("NAME ")), None)
    if titles is None:
        return {}
    return {line.split()[0]: line.split() for line in lines[titles + 1 :] if line.strip()}


def order(lines: list[str]) -> list[str]:
    return list(rows(lines))


def has_numbers(lines: list[str], guests: tuple[str, ...]) -> bool:
    shown = rows(lines)
    return all(g in shown and shown[g][1] in STATES and _number(shown[g][2]) for g in guests)


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.fixture
def extra_guest(lab: Any) -> Iterator[str]:
    """A paused guest whose name sorts first: sorting by name and by CPU then differ."""
    name = lab.prefix + "aaa-top"
    labkit.create_guest(name)
    yield name
    labkit.destroy_guest(name)


def test_top_in_a_120x40_terminal(lab: Any, tmp_path: Path, extra_guest: str) -> None:
    env = lab_environment(lab, tmp_path)
    guests = (*lab.guests, extra_guest)
    with terminal(env, tmp_path, (120, 40), "--interval", "1") as term:
        started = time.monotonic()
        lines = term.wait_for(lambda ls: has_numbers(ls, guests), 4, "every guest with CPU %")
        shown_after = time.monotonic() - started
        assert order(lines)[0] == lab.busy_guests[0], lines
        assert rows(lines)[lab.paused_guests[0]][1] == "paused", lines
        assert rows(lines)[lab.busy_guests[0]][1] == "running", lines
        assert "sort: cpu" in lines[1], lines

        term.keys("s")
        lines = term.wait_for(lambda ls: "sort: steal" in ls[1], 3, "the steal sort")
        for _ in range(4):  # steal -> mem -> net -> disk -> name
            term.keys("s")
        lines = term.wait_for(lambda ls: "sort: name" in ls[1], 3, "the name sort")
        assert order(lines)[0] == extra_guest, lines
        assert order(lines) == sorted(order(lines)), lines

        term.tmux("resize-window", "-t", "top", "-x", "100", "-y", "12")
        lines = term.wait_for(lambda ls: len(ls) == 12 and "NAME" in ls[2], 3, "the redraw")
        assert max(len(line) for line in lines) <= 100
        term.keys("Down")  # 9 rows fit, 5 guests: scrolling stops at the end, nothing breaks
        term.keys("q")
        assert term.exit_status(5) == 0
        assert "Traceback" not in term.stderr(), term.stderr()
    assert shown_after <= 4


def test_top_in_a_30x5_terminal_says_so_and_quits(lab: Any, tmp_path: Path) -> None:
    with terminal(lab_environment(lab, tmp_path), tmp_path, (30, 5)) as term:
        lines = term.wait_for(lambda ls: "too small" in " ".join(ls), 5, "the size message")
        time.sleep(1.5)  # a refresh or two at this size
        term.keys("q")
        assert term.exit_status(5) == 0
        assert "Traceback" not in term.stderr() + "\n".join(term.screen()), lines


def test_ctrl_c_leaves_top_cleanly(lab: Any, tmp_path: Path) -> None:
    with terminal(lab_environment(lab, tmp_path), tmp_path, (120, 40)) as term:
        term.wait_for(lambda ls: any(line.startswith("NAME ") for line in ls), 5, "the table")
        term.keys("C-c")
        assert term.exit_status(5) == 0
        assert term.stderr() == ""
        # The terminal is back to normal: the alternate screen is gone.
        assert not any(line.startswith("NAME ") for line in term.screen()), term.screen()


def test_top_through_a_pipe_prints_one_table(lab: Any, tmp_path: Path) -> None:
    env = lab_environment(lab, tmp_path, POLL_INTERVAL="0.5")
    started = time.monotonic()
    result = run_verb(env, "top", timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("vmtelemetryd top - ") and lines[1].startswith("NAME "), lines
    shown = rows(lines)
    assert set(shown) >= set(lab.guests), lines
    assert all(_number(shown[g][2]) for g in lab.guests), lines  # two samples: CPU % exists
    assert time.monotonic() - started < 10


def test_a_libvirt_failure_shows_in_the_header_and_top_keeps_trying(
    lab: Any, tmp_path: Path
) -> None:
    env = lab_environment(lab, tmp_path, LIBVIRT_URI="qemu+unix:///system?socket=/nonexistent")
    piped = run_verb(env, "top", timeout=30)
    assert piped.returncode == 69 and "libvirt: cannot connect" in piped.stdout, piped
    with terminal(env, tmp_path, (120, 40), "--interval", "0.5") as term:
        term.wait_for(lambda ls: "libvirt, retrying: cannot connect" in ls[1], 5, "the error")
        term.keys("q")
        assert term.exit_status(5) == 0
        assert "Traceback" not in term.stderr()
