"""One hypervisor's pure stages: features, metadata and the encoding of its samples and events.

Each host of ``LIBVIRT_URI`` has a pipeline of its own, so that a VM's rates
and trend windows are kept by host and uuid: a VM that migrates between two
monitored hosts starts afresh on the one it moved to instead of mixing the
two hosts' counters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import libvirt
import structlog

from vmtelemetryd.events import DomainEvent, MetadataChanged
from vmtelemetryd.features import Features
from vmtelemetryd.lineprotocol import SeriesCache, encode, encode_info, encode_line
from vmtelemetryd.metadatacache import MetadataCache
from vmtelemetryd.model import Sample
from vmtelemetryd.timedcalls import SamplerError

log = structlog.get_logger("vmtelemetryd")

ReadXml = Callable[[Sequence[str]], Mapping[str, str]]


class HostPipeline:
    def __init__(self, feature_window: int, cache_ttl: float, poll_interval: float) -> None:
        self.features = Features(feature_window)
        self._metadata = MetadataCache(cache_ttl, poll_interval)
        self._series = SeriesCache()
        self._states: dict[str, int] = {}
        self.xml_reads = 0

    def retune(self, feature_window: int, cache_ttl: float, poll_interval: float) -> None:
        """A reload: trend windows and metadata are kept, resized to the new settings."""
        self.features.resize(feature_window)
        self._metadata.retune(cache_ttl, poll_interval)

    def lines(self, sample: Sample, read_xml: ReadXml, metadata_tags: Sequence[str]) -> list[str]:
        """Every line of one sample: the VMs' measurements, then ``vm_info`` of those read."""
        self._states = {v.uuid: v.metrics["state"] for v in sample.vms if "state" in v.metrics}
        # Read before encoding: a VM's first points already carry its METADATA_TAGS.
        info = encode_info(sample, self._read_metadata(sample, read_xml))
        tags = self._metadata.tags(metadata_tags)
        return encode(sample, self.features.derive(sample), tags, self._series) + info

    def on_event(self, notice: DomainEvent | MetadataChanged) -> str | None:
        """The ``vm_events`` line of a lifecycle event; a define or metadata change also
        has the domain's XML read again in the next cycle."""
        if isinstance(notice, MetadataChanged) or notice.event == "defined":
            self._metadata.mark_stale(notice.uuid)
        if isinstance(notice, MetadataChanged):
            return None
        state = notice.state
        if state is None:  # defined, undefined: as last sampled, or never run
            state = self._states.get(notice.uuid, libvirt.VIR_DOMAIN_SHUTOFF)
        tags = {"host": notice.host, "vm": notice.vm, "uuid": notice.uuid}
        tags |= {"event": notice.event, "detail": notice.detail}
        return encode_line("vm_events", tags, {"state": state}, notice.wall_ns)

    def _read_metadata(self, sample: Sample, read_xml: ReadXml) -> dict[str, Mapping[str, str]]:
        """The domains whose XML is due this cycle, a few at a time; a failed read waits."""
        try:
            read = self._metadata.refresh(sample, read_xml)
        except SamplerError as exc:
            log.warning("cannot read domain XML for metadata", host=sample.host, error=str(exc))
            return {}
        self.xml_reads += len(read)
        return read
