"""What the daemon says about itself: the status line systemd shows, and status.json.

Pure: functions of the last answer of each host and the writer's status. With
several hosts the summary adds them up, and status.json carries each host's
figures and last error, so that one stuck host shows without restarting the
daemon for every host.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vmtelemetryd.model import Delivery, WriterStatus


@dataclass(frozen=True, slots=True)
class HostReport:
    """One host's last answer (``host`` is libvirt's name for it, once known)."""

    uri: str
    host: str
    wall: float
    duration_s: float
    vms: int
    error: str | None


@dataclass(frozen=True, slots=True)
class HostState:
    """What the daemon knows of a host besides its last answer."""

    uri: str
    last: HostReport | None
    connected: bool
    reconnects: int
    shards: int
    busy: bool  # asked, and not answered yet


_DELIVERY_WORDS = {
    Delivery.RETRYING: "database unreachable, retrying",
    Delivery.REFUSED: "database REFUSED the writes (token, database or URL)",
    Delivery.SPOOL_UNUSABLE: "spool unusable",
}


def summary(hosts: Sequence[HostState], writer: WriterStatus, reload_error: str | None) -> str:
    """``42 VMs, poll 0.21 s, 0 queued, last write 0.4 s ago`` and what is wrong, if anything."""
    answered = [h.last for h in hosts if h.last is not None]
    vms = sum(r.vms for r in answered)
    parts = [f"{vms} VMs" + (f" on {len(hosts)} hosts" if len(hosts) > 1 else "")]
    if answered:
        parts.append(f"poll {max(r.duration_s for r in answered):.2f} s")
    else:
        parts.append("no poll yet")
    parts.append(f"{writer.queued} queued")
    if writer.spooled:
        parts.append(f"{writer.spooled} spooled")
    if writer.last_write_wall is not None:
        parts.append(f"last write {time.time() - writer.last_write_wall:.1f} s ago")
    if writer.delivery is not Delivery.OK:
        parts.append(_delivery_words(writer))
    if reload_error:
        parts.append(f"error: {reload_error}")
    parts.extend(f"error: {error}" for error in _host_errors(hosts))
    return ", ".join(parts)


def status_document(hosts: Sequence[HostState], writer: WriterStatus) -> dict[str, Any]:
    """The host and delivery part of status.json; the daemon adds its own keys."""
    answered = [h.last for h in hosts if h.last is not None]
    errors = _host_errors(hosts)
    counts = writer.counts
    document: dict[str, Any] = {
        "vms": sum(r.vms for r in answered),
        "last_poll": max((r.wall for r in answered), default=None),
        "last_poll_duration_s": max((r.duration_s for r in answered), default=None),
        "last_sample_error": errors[0] if errors else None,
        "libvirt_connected": all(h.connected for h in hosts),
        "reconnects": sum(h.reconnects for h in hosts),
        "delivery": writer.delivery.value,
        "last_write": writer.last_write_wall,
        "last_write_error": writer.last_error,
        "spool_error": writer.spool_error,
        "queued": writer.queued,
        "spooled": writer.spooled,
        "written": counts.written,
        "dropped": counts.dropped,
        "dead_lettered": counts.dead_lettered,
        "write_errors": counts.write_errors,
    }
    if len(hosts) > 1:
        document["hosts"] = [_host_document(h) for h in hosts]
    return document


def _host_document(state: HostState) -> dict[str, Any]:
    last = state.last
    return {
        "uri": state.uri,
        "host": last.host if last else None,
        "vms": last.vms if last else 0,
        "last_poll": last.wall if last else None,
        "last_poll_duration_s": last.duration_s if last else None,
        "last_sample_error": last.error if last else None,
        "connected": state.connected,
        "reconnects": state.reconnects,
        "shards": state.shards,
        "busy": state.busy,
    }


def _host_errors(hosts: Sequence[HostState]) -> list[str]:
    """Each host's last error, named by its host when there are several."""
    errors = [(h.uri, h.last.error) for h in hosts if h.last is not None and h.last.error]
    if len(hosts) == 1:
        return [error for _, error in errors]
    return [f"{uri}: {error}" for uri, error in errors]


def _delivery_words(status: WriterStatus) -> str:
    """What is wrong with delivery, in the words an operator acts on, with its reason."""
    words = _DELIVERY_WORDS[status.delivery]
    reason = status.spool_error if status.delivery is Delivery.SPOOL_UNUSABLE else status.last_error
    return f"{words}: {reason}" if reason else words
