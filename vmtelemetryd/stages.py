"""The stages with side effects, built from a ``Config``; and which of them a reload rebuilds.

The daemon, ``once``, ``vms`` and ``top`` open their hosts here, so that
they all sample the same way.
"""

from __future__ import annotations

from collections.abc import Callable

from vmtelemetryd.config import Config
from vmtelemetryd.events import EventSource, Notice
from vmtelemetryd.hostsampler import HostSampler
from vmtelemetryd.model import DeliveryCounts, WriterSettings
from vmtelemetryd.sender import Sender
from vmtelemetryd.writer import Writer


def open_hosts(
    config: Config, deliver: Callable[[Notice], None] | None = None
) -> list[HostSampler]:
    """A sampler per host of LIBVIRT_URI; with ``deliver``, each listens to its host's events."""
    return [
        open_host(config, uri, EventSource(uri, deliver) if deliver is not None else None)
        for uri in config.libvirt_uris
    ]


def open_host(config: Config, uri: str, events: EventSource | None = None) -> HostSampler:
    return HostSampler(
        uri,
        shards=None if config.stats_shards == "auto" else config.stats_shards,
        timeout=config.libvirt_timeout,
        wants_domain=config.wants_domain,
        filtered=bool(config.domains_include or config.domains_exclude),
        host_tag=config.host_tag,
        on_connect=events.register if events is not None else None,
    )


def open_writer(config: Config, counts: DeliveryCounts | None = None) -> Writer:
    sender = Sender(
        config.influx_url,
        config.influx_db,
        config.influx_token.reveal(),
        config.influx_write_api,
    )
    settings = WriterSettings(
        batch_max_lines=config.batch_max_lines,
        batch_max_sec=config.batch_max_sec,
        spool_dir=config.spool_dir,
        spool_max_bytes=config.spool_max_bytes,
    )
    writer = Writer(sender, settings, counts)
    writer.start()
    return writer


def sampler_settings(config: Config) -> tuple[object, ...]:
    """What a reload must change to rebuild the sampler (and its connection)."""
    return (
        config.libvirt_uris,
        config.stats_shards,
        config.libvirt_timeout,
        config.domains_include,
        config.domains_exclude,
        config.host_tag,
    )


def writer_settings(config: Config) -> tuple[object, ...]:
    """What a reload must change to rebuild the writer (its queue and spool move along)."""
    return (
        config.influx_url,
        config.influx_db,
        config.influx_token.reveal(),
        config.influx_write_api,
        config.batch_max_lines,
        config.batch_max_sec,
        config.spool_dir,
        config.spool_max_bytes,
    )
