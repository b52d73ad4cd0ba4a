"""``vmtelemetryd top``: the terminal edge of a live view of every VM (like virt-top).

It samples through its own read-only connection with the daemon's sampler
and feature stage, on a thread of its own, so that keys answer at once even
while libvirt is slow; the screen is drawn from ``topview``. Without a
terminal on stdout it prints one plain table, after two samples so that
rates exist, and exits: for scripts and ``watch``.
"""

from __future__ import annotations

import contextlib
import curses
import locale
import queue
import sys
import threading
import time
from typing import Any

from vmtelemetryd.config import Config
from vmtelemetryd.features import Features
from vmtelemetryd.fleet import Fleet, HostResult
from vmtelemetryd.stages import open_hosts
from vmtelemetryd.topview import (
    TITLE_LINE,
    Frame,
    Row,
    fits,
    next_sort,
    plain,
    rows_of,
    screen,
)

KEY_WAIT_MS = 100
_SCROLL_KEYS = {
    curses.KEY_UP: -1,
    curses.KEY_DOWN: 1,
    curses.KEY_PPAGE: -20,
    curses.KEY_NPAGE: 20,
    curses.KEY_HOME: -(10**9),
    curses.KEY_END: 10**9,
}


class Poller(threading.Thread):
    """Samples every host every ``interval`` and hands each refresh over as a ``Frame``.

    A host that fails keeps its last rows on screen, under its error; one that
    is slow is shown as it was until it answers, like the daemon's hosts.
    """

    def __init__(self, config: Config, interval: float) -> None:
        super().__init__(name="top-poller", daemon=True)
        hosts = open_hosts(config)
        self._fleet = Fleet(hosts)
        self._features = {h.uri: Features(config.feature_window) for h in hosts}
        self._names: dict[str, str] = {}
        self._rows: dict[str, tuple[Row, ...]] = {}
        self._errors: dict[str, str] = {}
        self._patience = config.libvirt_timeout if len(hosts) == 1 else 0.9 * interval
        self._interval = interval
        self._stopping = threading.Event()
        self.frames: queue.SimpleQueue[Frame] = queue.SimpleQueue()

    def run(self) -> None:
        try:
            self._poll()
        finally:
            self._fleet.close()

    def _poll(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            for answer in self._fleet.sample(started + self._patience):
                self._take(answer)
            rows = tuple(row for uri in self._features for row in self._rows.get(uri, ()))
            hosts = tuple(self._names.get(uri, uri) for uri in self._features)
            error = "; ".join(self._errors.values()) or None
            self.frames.put(Frame(hosts, rows, time.monotonic() - started, time.time(), error))
            self._stopping.wait(max(0.0, started + self._interval - time.monotonic()))

    def _take(self, answer: HostResult) -> None:
        if answer.sample is None:
            self._errors[answer.uri] = str(answer.error)
            return
        self._errors.pop(answer.uri, None)
        self._names[answer.uri] = answer.sample.host
        features = self._features[answer.uri].derive(answer.sample)
        self._rows[answer.uri] = tuple(rows_of(answer.sample, features))

    def stop(self) -> None:
        """Ask the thread to end; a call stuck in libvirt is left behind, not waited for."""
        self._stopping.set()
        self.join(timeout=1.0)


def run_top(config: Config, interval: float, sort: str) -> int:
    locale.setlocale(locale.LC_ALL, "")  # curses draws UTF-8 VM names only under a UTF-8 locale
    poller = Poller(config, interval)
    poller.start()
    try:
        if not sys.stdout.isatty():
            return _print_once(poller, sort)
        return curses.wrapper(lambda window: _View(window, poller, sort).loop())
    except KeyboardInterrupt:  # curses.wrapper has restored the terminal
        return 0
    finally:
        poller.stop()


def _print_once(poller: Poller, sort: str) -> int:
    """The second frame (the first with rates), or the first error."""
    frame = poller.frames.get()
    if frame.error is None:
        frame = poller.frames.get()
    sys.stdout.write("".join(line + "\n" for line in plain(frame, sort)))
    return 0 if frame.error is None else 69


class _View:
    def __init__(self, window: Any, poller: Poller, sort: str) -> None:
        self._window = window
        self._poller = poller
        self._sort = sort
        self._frame: Frame | None = None
        self._offset = 0

    def loop(self) -> int:
        curses.curs_set(0)
        self._window.timeout(KEY_WAIT_MS)
        self._draw()
        while True:
            key = self._window.getch()
            if key in (ord("q"), ord("Q")):
                return 0
            changed = self._take_frames()
            if key in (ord("s"), ord("S")):
                self._sort = next_sort(self._sort)
            elif key in _SCROLL_KEYS:
                self._offset += _SCROLL_KEYS[key]
            elif key != curses.KEY_RESIZE and not changed:
                continue
            self._draw()

    def _take_frames(self) -> bool:
        taken = False
        while True:
            try:
                self._frame = self._poller.frames.get_nowait()
            except queue.Empty:
                return taken
            taken = True

    def _draw(self) -> None:
        height, width = self._window.getmaxyx()
        lines, self._offset = screen(self._frame, self._sort, width, height, self._offset)
        self._window.erase()
        for y, line in enumerate(lines):
            titles = y == TITLE_LINE and fits(width, height)
            with contextlib.suppress(curses.error):  # a wide character past the last column
                self._window.addstr(y, 0, line, curses.A_REVERSE if titles else curses.A_NORMAL)
        self._window.refresh()
