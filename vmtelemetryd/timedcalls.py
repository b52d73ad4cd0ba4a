"""libvirt calls made off the caller's thread, each awaited with a deadline.

A hung libvirtd or QEMU monitor can then stall neither the cycle past
``LIBVIRT_TIMEOUT`` nor signal handling, nor the interpreter's exit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


class SamplerError(Exception):
    """Why this cycle has no sample: libvirt unreachable, slow or failing."""


class SamplerStuck(SamplerError):
    """libvirt took a request and has not answered: the daemon is not making progress."""


@dataclass
class _Call:
    """One libvirt call running on its own daemon thread."""

    started: float
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    result: Any = None
    error: BaseException | None = None
    late: Callable[[Any], object] | None = None


class TimedCaller:
    """Runs blocking calls off the caller's thread with a deadline.

    A call that timed out keeps running. One such call is allowed to linger:
    a QEMU monitor that never answers holds its domain's job forever, and the
    next NOWAIT request skips that domain and answers for every other one. A
    second stuck call means libvirtd itself is not answering: from then on
    calls fail fast, so the watchdog can see that no progress is made.
    """

    def __init__(self, max_stuck: int = 1) -> None:
        self._max_stuck = max_stuck
        self._stuck: list[_Call] = []

    def call(
        self,
        fn: Callable[[], T],
        timeout: float,
        what: str,
        late: Callable[[T | None], object] | None = None,
    ) -> T:
        """``fn()`` within ``timeout``; or SamplerStuck, and ``late`` is called on the
        call's own thread with its result (None if it failed) once it ends."""
        self._stuck = [c for c in self._stuck if not c.done.is_set()]
        if len(self._stuck) > self._max_stuck:
            oldest = time.monotonic() - self._stuck[0].started
            raise SamplerStuck(f"libvirt has not answered earlier requests for {oldest:.0f} s")
        call = _Call(started=time.monotonic())

        def run() -> None:
            try:
                call.result = fn()
            except BaseException as exc:  # handed to the waiting thread
                call.error = exc
            finally:
                with call.lock:
                    call.done.set()
                    after = call.late
                if after is not None:  # nobody waits: hand the result on, keep no reference
                    result, call.result = call.result, None
                    after(result)

        threading.Thread(target=run, name=f"libvirt-{what}", daemon=True).start()
        if not call.done.wait(timeout):
            with call.lock:  # the call may end right now: then it is not stuck
                if not call.done.is_set():
                    call.late = late
                    self._stuck.append(call)
                    raise SamplerStuck(f"libvirt {what} timed out after {timeout:g} s")
        if call.error is not None:
            raise call.error
        result: T = call.result
        return result
