"""Lifecycle events: libvirt's default event loop on a thread, callbacks that only enqueue.

libvirt calls every callback on its event loop thread; one that blocked (an
RPC, a lock the poll loop holds) would stall every other event and the
keepalive. So a callback only turns its arguments into a frozen value and
hands it to ``deliver``, which puts it on the daemon's queue; the main loop
dispatches it between cycles, as it does signals, and never waits for it.
The names of events and their details come from libvirt's own constants.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import libvirt

EVENT_NAMES: Mapping[int, str] = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}

# The domain's state after each event, as vm_metrics writes it (virDomainState).
# defined and undefined say nothing of it: the daemon takes the last sampled one.
STATE_AFTER: Mapping[str, int] = {
    "started": libvirt.VIR_DOMAIN_RUNNING,
    "suspended": libvirt.VIR_DOMAIN_PAUSED,
    "resumed": libvirt.VIR_DOMAIN_RUNNING,
    "stopped": libvirt.VIR_DOMAIN_SHUTOFF,
    "shutdown": libvirt.VIR_DOMAIN_SHUTDOWN,
    "pmsuspended": libvirt.VIR_DOMAIN_PMSUSPENDED,
    "crashed": libvirt.VIR_DOMAIN_CRASHED,
}


def _detail_names() -> dict[str, dict[int, str]]:
    """``VIR_DOMAIN_EVENT_STOPPED_DESTROYED`` -> ``{"stopped": {1: "destroyed"}}``, and so on."""
    names: dict[str, dict[int, str]] = {event: {} for event in EVENT_NAMES.values()}
    for constant in dir(libvirt):
        for event in names:
            head = f"VIR_DOMAIN_EVENT_{event.upper()}_"
            if constant.startswith(head):
                names[event][getattr(libvirt, constant)] = constant[len(head) :].lower()
    return names


DETAIL_NAMES = _detail_names()


@dataclass(frozen=True, slots=True)
class DomainEvent:
    """A lifecycle event of one domain, as it arrived; ``uri`` names the connection."""

    uri: str
    host: str
    vm: str
    uuid: str
    event: str
    detail: str
    wall_ns: int

    @property
    def state(self) -> int | None:
        return STATE_AFTER.get(self.event)


@dataclass(frozen=True, slots=True)
class MetadataChanged:
    uri: str
    uuid: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    uri: str
    reason: int


Notice = DomainEvent | MetadataChanged | ConnectionClosed


def describe(event: int, detail: int) -> tuple[str, str]:
    """The schema's ``event`` and ``detail`` tags for libvirt's numbers."""
    name = EVENT_NAMES.get(event, "unknown")
    return name, DETAIL_NAMES.get(name, {}).get(detail, "unknown")


_loop_started = threading.Lock()
_loop_thread: threading.Thread | None = None


def start_event_loop() -> None:
    """libvirt's default event loop, once per process; before any connection opens."""
    global _loop_thread
    with _loop_started:
        if _loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        _loop_thread = threading.Thread(target=_run_loop, name="libvirt-events", daemon=True)
        _loop_thread.start()


def _run_loop() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


class EventSource:
    """Registers the callbacks on each new connection to ``uri`` (its sampler's ``on_connect``).

    Only the newest connection speaks: one the sampler left while a call on it
    hung keeps its callbacks until that call ends, and would deliver every
    event twice, then its close as if the host had gone.
    """

    def __init__(self, uri: str, deliver: Callable[[Notice], None]) -> None:
        self._uri = uri
        self._deliver = deliver
        self._conn: Any = None

    def register(self, conn: Any, host: str) -> Callable[[], None]:
        """Close callback, lifecycle and metadata events; again after a reconnect.
        Returns what deregisters them, for the sampler to call before it closes ``conn``.

        No ``setKeepAlive``: with libvirt 9.0 here, a connection that keepalive
        closed while calls on it were still waiting (a SIGSTOPped libvirtd, then
        SIGCONT) crashed the process in ``getAllDomainStats`` (a segfault,
        reproduced without the rest of the daemon). A hung host is found by the
        sampler's own timeout on every call instead.
        """
        self._conn = conn
        conn.registerCloseCallback(self._closed, host)
        ids = [
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, host
            ),
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, self._metadata, host
            ),
        ]

        def release() -> None:
            for callback_id in ids:
                conn.domainEventDeregisterAny(callback_id)
            conn.unregisterCloseCallback()

        return release

    def _lifecycle(self, conn: Any, dom: Any, event: int, detail: int, host: str) -> None:
        if conn is not self._conn:
            return
        name, detail_name = describe(event, detail)
        # name() and UUIDString() read the handle: no call to libvirtd from its loop.
        self._deliver(
            DomainEvent(
                self._uri, host, dom.name(), dom.UUIDString(), name, detail_name, time.time_ns()
            )
        )

    def _metadata(self, conn: Any, dom: Any, _kind: int, _uri: Any, host: str) -> None:
        if conn is not self._conn:
            return
        self._deliver(MetadataChanged(self._uri, dom.UUIDString()))

    def _closed(self, conn: Any, reason: int, _host: str) -> None:
        if conn is not self._conn:
            return
        self._deliver(ConnectionClosed(self._uri, reason))
