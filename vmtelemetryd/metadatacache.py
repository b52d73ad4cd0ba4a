"""Each domain's metadata, kept for ``DEVICE_CACHE_TTL``, and which domains to read next.

Pure: the XML comes from a function the caller passes (the libvirt edge),
the clock from the sample. A
domain's XML is read when it is first seen, again once its keys are older
than the TTL, and at once after an event says it changed (defined,
metadata changed). The reads are spread over the cycles: each cycle reads
at most a budget, unseen domains first, then the stalest, so that a host
with hundreds of VMs never makes hundreds of ``XMLDesc`` calls in one cycle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from vmtelemetryd.metadata import parse_metadata
from vmtelemetryd.model import Sample

MIN_READS_PER_CYCLE = 8


@dataclass(slots=True)
class _Entry:
    keys: Mapping[str, str]
    read_at: float  # -inf: marked stale by an event


class MetadataCache:
    def __init__(self, ttl: float, poll_interval: float) -> None:
        self._entries: dict[str, _Entry] = {}
        self.retune(ttl, poll_interval)

    def retune(self, ttl: float, poll_interval: float) -> None:
        """A reload changed DEVICE_CACHE_TTL or POLL_INTERVAL; what is known stays."""
        self._ttl = ttl
        self._poll_interval = poll_interval

    def refresh(
        self, sample: Sample, read_xml: Callable[[Sequence[str]], Mapping[str, str]]
    ) -> dict[str, Mapping[str, str]]:
        """Read the domains due this cycle; their keys by uuid, for ``vm_info`` lines.

        ``read_xml`` gives the XML of the uuids asked for; one it leaves out (a
        domain gone meanwhile) is asked for again next cycle.
        """
        uuids = [vm.uuid for vm in sample.vms]
        self.keep_only(uuids)
        due = self.due(uuids, sample.monotonic)
        if not due:
            return {}
        names = {vm.uuid: vm.name for vm in sample.vms}
        read: dict[str, Mapping[str, str]] = {
            uuid: parse_metadata(names[uuid], xml) for uuid, xml in read_xml(due).items()
        }
        for uuid, keys in read.items():
            self.put(uuid, keys, sample.monotonic)
        return read

    def due(self, uuids: Sequence[str], now: float) -> list[str]:
        """The domains to read this cycle, most needed first, within the budget."""
        unseen = [u for u in uuids if u not in self._entries]
        expired = sorted(
            (u for u in uuids if u in self._entries and self._expired(u, now)),
            key=lambda u: self._entries[u].read_at,
        )
        return (unseen + expired)[: self._budget(len(uuids))]

    def put(self, uuid: str, keys: Mapping[str, str], now: float) -> None:
        self._entries[uuid] = _Entry(dict(keys), now)

    def mark_stale(self, uuid: str) -> None:
        """An event said this domain changed: read it in the next cycle."""
        entry = self._entries.get(uuid)
        if entry is not None:
            entry.read_at = -math.inf

    def keep_only(self, uuids: Collection[str]) -> None:
        """Forget the domains that are gone (a set: the check runs for every entry)."""
        present = set(uuids)
        self._entries = {u: e for u, e in self._entries.items() if u in present}

    def keys(self, uuid: str) -> Mapping[str, str] | None:
        entry = self._entries.get(uuid)
        return entry.keys if entry is not None else None

    def tags(self, names: Sequence[str]) -> dict[str, dict[str, str]]:
        """By uuid, the keys among ``names`` that each domain has (METADATA_TAGS)."""
        if not names:
            return {}
        return {
            uuid: {name: entry.keys[name] for name in names if name in entry.keys}
            for uuid, entry in self._entries.items()
        }

    def _expired(self, uuid: str, now: float) -> bool:
        return now - self._entries[uuid].read_at >= self._ttl

    def _budget(self, domains: int) -> int:
        """Enough to read every domain once per TTL, and never fewer than the minimum."""
        if self._ttl <= 0:
            return domains
        return max(MIN_READS_PER_CYCLE, math.ceil(domains * self._poll_interval / self._ttl))
