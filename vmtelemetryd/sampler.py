"""The libvirt edge: one bulk stats request per cycle, turned into a ``Sample``.

Every libvirt call runs on a thread of its own, awaited with a timeout
(``timedcalls``). A request that timed out takes its connection along: the
next one goes on a new connection, never queued behind the hung one. Within
the request, the domains NOWAIT found busy are asked once more (``monitorgroups``).
"""

from __future__ import annotations

import contextlib
import functools
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import libvirt

from vmtelemetryd.model import DeviceKind, DeviceSample, Sample, VmSample
from vmtelemetryd.monitorgroups import Pairs, ask_again_if_busy
from vmtelemetryd.timedcalls import SamplerError, SamplerStuck, TimedCaller

T = TypeVar("T")

Release = Callable[[], None]
"""Deregisters what an ``on_connect`` hook registered on a connection."""

STATS_GROUPS = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    | libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_VCPU
    | libvirt.VIR_DOMAIN_STATS_INTERFACE
    | libvirt.VIR_DOMAIN_STATS_BLOCK
)
# NOWAIT: a domain whose job is held (migration, stuck monitor) comes back
# without its monitor groups instead of stalling every other domain.
STATS_FLAGS = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
MONITOR_GROUPS = libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_BLOCK
ACTIVE_ONLY = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
INACTIVE_ONLY = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_INACTIVE
LIST_ACTIVE = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
LIST_INACTIVE = libvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE
STATE_ONLY = libvirt.VIR_DOMAIN_STATS_STATE

VM_KEYS: Mapping[str, str] = {
    "state.state": "state",
    "cpu.time": "cpu_time_ns",
    "cpu.user": "cpu_user_ns",
    "cpu.system": "cpu_system_ns",
    "vcpu.current": "vcpus",
    "balloon.maximum": "mem_max_kib",
    "balloon.current": "mem_current_kib",
    "balloon.rss": "mem_rss_kib",
    "balloon.usable": "mem_usable_kib",
    "balloon.available": "mem_available_kib",
    "balloon.unused": "mem_unused_kib",
    "balloon.disk_caches": "mem_disk_caches_kib",
    "balloon.swap_in": "swap_in_kib",
    "balloon.swap_out": "swap_out_kib",
    "balloon.major_fault": "major_faults",
    "balloon.minor_fault": "minor_faults",
}

DEVICE_KEYS: Mapping[DeviceKind, Mapping[str, str]] = {
    "nic": {
        "rx.bytes": "rx_bytes",
        "rx.pkts": "rx_packets",
        "rx.errs": "rx_errors",
        "rx.drop": "rx_drops",
        "tx.bytes": "tx_bytes",
        "tx.pkts": "tx_packets",
        "tx.errs": "tx_errors",
        "tx.drop": "tx_drops",
    },
    "disk": {
        "rd.reqs": "rd_reqs",
        "rd.bytes": "rd_bytes",
        "wr.reqs": "wr_reqs",
        "wr.bytes": "wr_bytes",
        "fl.reqs": "fl_reqs",
        "rd.times": "rd_time_ns",
        "wr.times": "wr_time_ns",
        "capacity": "capacity_bytes",
        "allocation": "allocation_bytes",
    },
}
GROUP_PREFIX: Mapping[DeviceKind, str] = {"nic": "net", "disk": "block"}

BACKOFF_FIRST_S = 1.0
BACKOFF_CAP_S = 60.0


def parse_vm(
    name: str, uuid: str, instance: int, stats: Mapping[str, Any], monitor_late_s: float = 0.0
) -> VmSample:
    """Turn one domain's libvirt stats dict into schema names; keep only what was reported."""
    metrics = {field: int(stats[key]) for key, field in VM_KEYS.items() if key in stats}
    delay = _vcpu_delay_ns(stats)
    if delay is not None:
        metrics["cpu_delay_ns"] = delay
    devices: list[DeviceSample] = []
    counts: dict[DeviceKind, int] = {}
    for kind, prefix in GROUP_PREFIX.items():
        count = stats.get(f"{prefix}.count")
        if count is None:
            continue
        counts[kind] = int(count)
        devices.extend(_parse_devices(kind, prefix, int(count), stats))
    return VmSample(
        name=name,
        uuid=uuid,
        instance=instance,
        metrics=metrics,
        devices=tuple(devices),
        device_counts=counts,
        monitor_late_s=monitor_late_s,
    )


def _vcpu_delay_ns(stats: Mapping[str, Any]) -> int | None:
    """Sum of ``vcpu.N.delay``: ns a vCPU was runnable but waited for a host CPU.

    None unless every vCPU that reports its run time also reports its delay:
    a sum over fewer vCPUs than last time would look like a drop.
    """
    maximum = int(stats.get("vcpu.maximum", 0))
    timed = [delay_key for run_key, delay_key in _vcpu_keys(maximum) if run_key in stats]
    if not timed or any(key not in stats for key in timed):
        return None
    return sum(int(stats[key]) for key in timed)


@functools.lru_cache(maxsize=64)
def _vcpu_keys(maximum: int) -> tuple[tuple[str, str], ...]:
    """``(vcpu.N.time, vcpu.N.delay)`` for N below ``maximum``: the strings are made once,
    not for every vCPU of every domain each cycle; one entry per vCPU count seen."""
    return tuple((f"vcpu.{n}.time", f"vcpu.{n}.delay") for n in range(maximum))


def _parse_devices(
    kind: DeviceKind, prefix: str, count: int, stats: Mapping[str, Any]
) -> list[DeviceSample]:
    devices = []
    for index in range(count):
        name_key, keys = _device_keys(prefix, index, kind)
        name = stats.get(name_key)
        if not name:
            continue
        counters = {f: int(stats[k]) for k, f in keys if k in stats}
        devices.append(DeviceSample(kind=kind, name=str(name), counters=counters))
    return devices


@functools.lru_cache(maxsize=1024)
def _device_keys(
    prefix: str, index: int, kind: DeviceKind
) -> tuple[str, tuple[tuple[str, str], ...]]:
    """libvirt's key of a device's name, and (key, field) of each of its counters: made
    once per device index seen, not for every counter of every device each cycle."""
    head = f"{prefix}.{index}."
    return head + "name", tuple((head + k, f) for k, f in DEVICE_KEYS[kind].items())


class Sampler:
    """A read-only libvirt connection that yields one ``Sample`` per call.

    Reconnects with capped exponential backoff when libvirt refuses or is gone;
    between attempts ``sample()`` fails fast instead of waiting on a dead daemon.
    Name, uuid and id come with the handle each bulk request returns, at no
    extra RPC. Defined domains that do not run come from a second, state-only
    request: they have no monitor to ask, and show as stopped rather than as gone.
    ``on_connect`` is called with each new connection and its host (event
    registration); what it returns is called before that connection closes.
    """

    def __init__(
        self,
        uri: str,
        *,
        timeout: float,
        wants_domain: Callable[[str], bool],
        filtered: bool,
        host_tag: str | None,
        on_connect: Callable[[Any, str], Release] | None = None,
        share: tuple[int, int] = (0, 1),
    ) -> None:
        self._uri = uri
        self._on_connect = on_connect
        self.share = share
        self._handles: dict[str, Any] = {}
        self._timeout = timeout
        self._wants_domain = wants_domain
        self._filtered = filtered
        self._host_tag = host_tag
        self._caller = TimedCaller()
        self._conn: Any = None
        self._release: Release | None = None
        self._host = host_tag or ""
        self._next_attempt = 0.0
        self._backoff = BACKOFF_FIRST_S
        self._ever_connected = False
        self.reconnects = 0
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def sample(self) -> Sample:
        conn = self._connection()
        wall_ns = time.time_ns()
        monotonic = time.monotonic()
        try:
            pairs, late = self._call_on_connection(lambda: self._request(conn), "stats request")
        except libvirt.libvirtError as exc:
            self.close()
            raise SamplerError(f"libvirt stats request failed: {exc.get_error_message()}") from exc
        named = [(dom.UUIDString(), dom, stats) for dom, stats in pairs]
        self._handles = {uuid: dom for uuid, dom, _ in named}
        vms = tuple(
            parse_vm(dom.name(), uuid, dom.ID(), stats, late.get(uuid, 0.0))
            for uuid, dom, stats in named
        )
        return Sample(host=self._host, wall_ns=wall_ns, monotonic=monotonic, vms=vms)

    def domain_xml(self, uuids: Sequence[str]) -> dict[str, str]:
        """The XML of these domains of the last sample, by uuid, in one timed call;
        a domain gone meanwhile is left out."""
        handles = [self._handles[uuid] for uuid in uuids if uuid in self._handles]
        if not handles:
            return {}

        def read() -> dict[str, str]:
            xml = {}
            for dom in handles:
                with contextlib.suppress(libvirt.libvirtError):
                    xml[dom.UUIDString()] = dom.XMLDesc(0)
            return xml

        return self._call_on_connection(read, "domain XML")

    def close(self) -> None:
        """Close the connection; the next ``sample()`` opens a new one.

        No call runs on it: one that timed out took its connection along
        (``_call_on_connection``).
        """
        conn, release = self._forget()
        if conn is not None:
            with contextlib.suppress(SamplerError):
                self._caller.call(lambda: _shut(conn, release), self._timeout, "close")

    def _call_on_connection(self, fn: Callable[[], T], what: str) -> T:
        """A call on the open connection; one that times out takes the connection along.

        The next request on it may queue behind the hung one and hang too (libvirt 9.0,
        a SIGSTOPped QEMU: 2 in 20 with shares, 1 in 20 listing with one share), leaving
        every domain unsampled; on a new connection NOWAIT skipped the hung domain 30 in
        30 (and each request asks it once more, 20 ms later: ``monitorgroups``). If
        libvirtd itself hangs, the new connect times out and says so.
        The hung call closes its connection once it ends: closing it under the call
        would free it beneath that call (a segfault in libvirt-python, seen here when a
        SIGSTOPped libvirtd resumed).
        """
        conn, release = self._conn, self._release
        try:
            return self._caller.call(fn, self._timeout, what, late=lambda _: _shut(conn, release))
        except SamplerStuck:
            self._forget()
            raise

    def _forget(self) -> tuple[Any, Release | None]:
        """Drop the connection, what releases its callbacks, and its domain handles (each
        holds the connection open too); closing it is the caller's, or the hung call's."""
        conn, release = self._conn, self._release
        self._conn, self._release, self._handles = None, None, {}
        return conn, release

    def _request(self, conn: Any) -> tuple[Pairs, dict[str, float]]:
        """Running (and paused) domains with every group, then the others' state alone;
        and, by uuid, how late the monitor groups of those asked again were read."""
        asked = time.monotonic()
        if not self._filtered and self.share[1] == 1:
            running: Pairs = conn.getAllDomainStats(STATS_GROUPS, ACTIVE_ONLY | STATS_FLAGS)
            answered = time.monotonic()
            stopped: Pairs = conn.getAllDomainStats(STATE_ONLY, INACTIVE_ONLY)
        else:
            running = self._listed_stats(conn, LIST_ACTIVE, STATS_GROUPS)
            answered = time.monotonic()
            stopped = self._listed_stats(conn, LIST_INACTIVE, STATE_ONLY)
        pairs, late = ask_again_if_busy(
            running,
            (asked, answered),
            lambda busy: _monitor_groups(conn, busy),
            asked + self._timeout / 2,
        )
        return pairs + stopped, late

    def _listed_stats(self, conn: Any, listing: int, groups: int) -> Pairs:
        domains = [d for d in conn.listAllDomains(listing) if self._mine(d)]
        if not domains:
            return []
        # A domain gone since the listing is skipped by libvirt, not an error.
        pairs: Pairs = conn.domainListGetStats(domains, groups, STATS_FLAGS)
        return pairs

    def _mine(self, dom: Any) -> bool:
        """Wanted by the filters, and in this connection's share of the host's domains.

        Shares are cut by a hash of the uuid, so that every shard's own listing
        puts each domain in exactly one share, whatever order libvirt lists them in.
        """
        index, count = self.share
        share = zlib.crc32(dom.UUIDString().encode()) % count
        return share == index and self._wants_domain(dom.name())

    def _connection(self) -> Any:
        if self._conn is not None:
            return self._conn
        now = time.monotonic()
        if now < self._next_attempt:
            wait = self._next_attempt - now
            raise SamplerError(f"libvirt at {self._uri} unavailable; next attempt in {wait:.0f} s")
        try:
            # One that answers late has no callbacks: libvirt-python closes it when dropped.
            conn = self._caller.call(
                lambda: libvirt.openReadOnly(self._uri), self._timeout, "connect"
            )
            host = self._host_tag or self._caller.call(
                conn.getHostname, self._timeout, "hostname", late=lambda _: _shut(conn, None)
            )
            release = None
            if self._on_connect is not None:
                hook, hostname = self._on_connect, str(host)
                release = self._caller.call(
                    lambda: hook(conn, hostname),
                    self._timeout,
                    "event registration",
                    late=lambda registered: _shut(conn, registered),
                )
        except SamplerStuck as exc:
            # No backoff: the calls still waiting bound the attempts (TimedCaller), and
            # once libvirtd answers them the next cycle connects at once.
            raise SamplerStuck(f"cannot connect to libvirt at {self._uri}: {exc}") from exc
        except (SamplerError, libvirt.libvirtError) as exc:
            self._next_attempt = now + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_CAP_S)
            reason = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) else str(exc)
            raise SamplerError(f"cannot connect to libvirt at {self._uri}: {reason}") from exc
        self._conn, self._release, self._host = conn, release, str(host)
        self._backoff = BACKOFF_FIRST_S
        self.reconnects += self._ever_connected
        self._ever_connected = True
        return conn


def _monitor_groups(conn: Any, domains: list[Any]) -> Pairs:
    """The groups a busy domain lacked; none if the ask fails: the first answer stands."""
    try:
        pairs: Pairs = conn.domainListGetStats(domains, MONITOR_GROUPS, STATS_FLAGS)
    except libvirt.libvirtError:
        return []
    return pairs


def _shut(conn: Any, release: Release | None) -> None:
    """Deregister the connection's callbacks, then close it. Each callback holds the
    connection: libvirt kept one with events registered open after ``close()`` (which
    returned 1, and the socket stayed)."""
    if release is not None:
        with contextlib.suppress(libvirt.libvirtError):
            release()
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; the daemon logs its own."""
