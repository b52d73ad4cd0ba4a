"""The main loop: one cycle per tick, signals turned into events it handles between cycles.

Signal handlers only enqueue (as gunicorn's arbiter does): a reload or a
stop never runs in the middle of a cycle, and a handler can never deadlock
on a lock the interrupted code holds.
"""

from __future__ import annotations

import os
import queue
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import structlog

from vmtelemetryd import featurestate
from vmtelemetryd.config import Config, ConfigError, load_config
from vmtelemetryd.events import (
    ConnectionClosed,
    EventSource,
    MetadataChanged,
    Notice,
    start_event_loop,
)
from vmtelemetryd.features import Features
from vmtelemetryd.health import Health
from vmtelemetryd.lineprotocol import encode, encode_info, encode_line
from vmtelemetryd.logs import configure_logging, set_redacted
from vmtelemetryd.metadatacache import MetadataCache
from vmtelemetryd.model import Delivery, Sample, WriterStatus
from vmtelemetryd.sampler import SamplerError, SamplerStuck
from vmtelemetryd.scheduler import Ticker
from vmtelemetryd.stages import open_sampler, open_writer, sampler_settings, writer_settings

log = structlog.get_logger("vmtelemetryd")

STOP_FLUSH_S = 20.0
RELOAD_FLUSH_S = 5.0


@dataclass(frozen=True, slots=True)
class CycleReport:
    """What the last cycle did, for the status line, status.json and self-metrics."""

    wall: float
    duration_s: float
    vms: int
    error: str | None


class Daemon:
    def __init__(self, config: Config, config_path: Path | None, health: Health) -> None:
        self.config = config
        self._config_path = config_path
        self._health = health
        self._events: queue.SimpleQueue[str | Notice] = queue.SimpleQueue()
        start_event_loop()  # before the first connection opens
        self._event_source = EventSource(self._events.put)
        self._sampler = open_sampler(config, self._event_source)
        self._last_states: dict[str, int] = {}
        self._features = Features(config.feature_window)
        featurestate.restore(self._features, config.spool_dir)
        self._metadata = MetadataCache(config.device_cache_ttl, config.poll_interval)
        self._xml_reads = 0
        self._writer = open_writer(config)
        self._ticker = Ticker(config.poll_interval, time.monotonic())
        self._generation = 1
        self._reload_error: str | None = None
        self._last: CycleReport | None = None
        self._sample_errors = 0
        self._retired_reconnects = 0  # of samplers a reload replaced: counters only grow
        self._started = time.time()

    def run(self) -> int:
        for signum, name in (
            (signal.SIGTERM, "stop"),
            (signal.SIGINT, "stop"),
            (signal.SIGHUP, "reload"),
        ):
            signal.signal(signum, lambda *_, e=name: self._events.put(e))
        log.info("started", config=str(self.config.source or "environment only"), pid=os.getpid())
        alive = self._tick()
        # status.json before READY=1: once `systemctl start` returns, it shows the first poll.
        self._report(alive)
        self._health.ready(self._summary())
        while True:
            event = self._wait(self._ticker.due(), alive)
            if event == "stop":
                break
            if event == "reload":
                self._reload()  # the tick waited for is still due, as after a notice
            elif event is None:
                alive = self._tick()
            elif not isinstance(event, str):
                self._on_notice(event)
                continue
            self._report(alive)
        self._shutdown()
        return 0

    def _wait(self, until: float, alive: bool) -> str | Notice | None:
        """Sleep until the next tick, waking early for a signal's event.

        While the last cycle made progress, the watchdog is also pinged during the
        wait, so that a POLL_INTERVAL longer than WatchdogSec= is not taken for a hang.
        """
        ping_every = self._health.watchdog_ping_interval() if alive else None
        while (left := until - time.monotonic()) > 0:
            try:
                return self._events.get(timeout=min(left, ping_every or left))
            except queue.Empty:
                if ping_every is not None:
                    self._health.watchdog()
        return None

    def _tick(self) -> bool:
        """A cycle, then the next tick laid on the grid (skipping any it overran)."""
        alive = self._cycle()
        self._ticker.advance(time.monotonic())
        return alive

    def _cycle(self) -> bool:
        """One tick's work; True when the daemon made progress (for the watchdog)."""
        started = time.monotonic()
        try:
            sample = self._sampler.sample()
        except SamplerError as exc:
            self._sample_errors += 1
            self._last = CycleReport(time.time(), time.monotonic() - started, 0, str(exc))
            log.error("sample failed", error=str(exc))
            return not isinstance(exc, SamplerStuck)
        sampled = time.monotonic()
        lines = self._deliver(sample)
        self._last = CycleReport(time.time(), time.monotonic() - started, len(sample.vms), None)
        log.debug(
            "poll done",
            vms=len(sample.vms),
            lines=lines,
            sample_s=round(sampled - started, 4),
            pipeline_s=round(time.monotonic() - sampled, 4),
        )
        return True

    def _deliver(self, sample: Sample) -> int:
        self._last_states = {v.uuid: v.metrics["state"] for v in sample.vms if "state" in v.metrics}
        info = encode_info(sample, self._read_metadata(sample))
        tags = self._metadata.tags(self.config.metadata_tags)
        lines = encode(sample, self._features.derive(sample), tags) + info
        status = self._writer.status()
        own = self._own_metrics(sample, status)
        if own is not None:
            lines.append(own)
        self._writer.submit(lines)
        return len(lines)

    def _on_notice(self, notice: Notice) -> None:
        """A libvirt event, between cycles: a ``vm_events`` point now, metadata read again."""
        if isinstance(notice, ConnectionClosed):
            if notice.reason != libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT:  # not our own close
                log.warning("libvirt connection closed", host=notice.host, reason=notice.reason)
            return
        if isinstance(notice, MetadataChanged) or notice.event == "defined":
            self._metadata.mark_stale(notice.uuid)
        if isinstance(notice, MetadataChanged):
            return
        state = notice.state
        if state is None:  # defined, undefined: as last sampled, or never run
            state = self._last_states.get(notice.uuid, libvirt.VIR_DOMAIN_SHUTOFF)
        tags = {"host": notice.host, "vm": notice.vm, "uuid": notice.uuid}
        tags |= {"event": notice.event, "detail": notice.detail}
        line = encode_line("vm_events", tags, {"state": state}, notice.wall_ns)
        if line is not None:
            self._writer.submit([line])
        log.debug("domain event", vm=notice.vm, kind=notice.event, detail=notice.detail)

    def _read_metadata(self, sample: Sample) -> dict[str, Mapping[str, str]]:
        """The domains whose XML is due this cycle, a few at a time; a failed read waits."""
        try:
            read = self._metadata.refresh(sample, self._sampler.domain_xml)
        except SamplerError as exc:
            log.warning("cannot read domain XML for metadata", error=str(exc))
            return {}
        self._xml_reads += len(read)
        return read

    @property
    def _reconnects(self) -> int:
        return self._retired_reconnects + self._sampler.reconnects

    def _own_metrics(self, sample: Sample, status: WriterStatus) -> str | None:
        last = self._last
        counts = status.counts
        fields: dict[str, int | float] = {
            "vms": len(sample.vms),
            "points_written": counts.written,
            "points_queued": status.queued,
            "points_spooled": status.spooled,
            "points_dropped": counts.dropped,
            "points_dead_lettered": counts.dead_lettered,
            "write_errors": counts.write_errors,
            "sample_errors": self._sample_errors,
            "reconnects": self._reconnects,
            "overruns": self._ticker.overruns,
            "xml_reads": self._xml_reads,
        }
        if last is not None:
            fields["poll_duration_s"] = float(last.duration_s)
        return encode_line("vmtelemetryd", {"host": sample.host}, fields, sample.wall_ns)

    def _reload(self) -> None:
        self._health.reloading()
        try:
            config = load_config(self._config_path, os.environ)
        except ConfigError as exc:
            self._reload_error = str(exc)
            log.error("reload rejected, running configuration kept", error=str(exc))
        else:
            self._apply(config)
            self._reload_error = None
            self._generation += 1
            log.info("configuration reloaded", generation=self._generation)
        self._health.ready(self._summary())

    def _apply(self, config: Config) -> None:
        """Rebuild only the stages whose settings changed; feature state is kept."""
        old, self.config = self.config, config
        configure_logging(config.log_level)
        # The old token may still show up in an error from the writer being replaced.
        set_redacted([old.influx_token.reveal(), config.influx_token.reveal()])
        if sampler_settings(old) != sampler_settings(config):
            self._sampler.close()
            self._retired_reconnects += self._sampler.reconnects
            self._sampler = open_sampler(config, self._event_source)
            log.info("libvirt connection rebuilt", uri=config.libvirt_uri)
        if writer_settings(old) != writer_settings(config):
            self._writer.stop(RELOAD_FLUSH_S)
            self._writer = open_writer(config, self._writer.status().counts)
            log.info("writer rebuilt", url=config.influx_url, database=config.influx_db)
        if old.feature_window != config.feature_window:
            self._features.resize(config.feature_window)
        if old.poll_interval != config.poll_interval:
            self._ticker.retune(config.poll_interval, time.monotonic())
        self._metadata.retune(config.device_cache_ttl, config.poll_interval)

    def _shutdown(self) -> None:
        log.info("stopping: flushing queued points", timeout_s=STOP_FLUSH_S)
        self._health.stopping(STOP_FLUSH_S + 10)
        self._writer.stop(STOP_FLUSH_S)
        featurestate.save(self._features, self.config.spool_dir)
        self._sampler.close()
        self._report(alive=False)
        log.info("stopped", **_counts(self._writer.status()))

    def _report(self, alive: bool) -> None:
        self._health.status(self._summary(), alive=alive)
        try:
            self._health.write_status(self._status_report())
        except OSError as exc:
            log.warning("cannot write status file", error=str(exc))

    def _summary(self) -> str:
        """The one line systemctl status shows."""
        status = self._writer.status()
        last = self._last
        parts = [
            f"{last.vms if last else 0} VMs",
            f"poll {last.duration_s:.2f} s" if last else "no poll yet",
            f"{status.queued} queued",
        ]
        if status.spooled:
            parts.append(f"{status.spooled} spooled")
        if status.last_write_wall is not None:
            parts.append(f"last write {time.time() - status.last_write_wall:.1f} s ago")
        if status.delivery is not Delivery.OK:
            parts.append(_delivery_words(status))
        error = self._reload_error or (last.error if last else None)
        if error:
            parts.append(f"error: {error}")
        return ", ".join(parts)

    def _status_report(self) -> dict[str, Any]:
        status = self._writer.status()
        last = self._last
        return {
            "pid": os.getpid(),
            "started": self._started,
            "generation": self._generation,
            "config": str(self._config_path) if self._config_path else None,
            "config_error": self._reload_error,
            "vms": last.vms if last else 0,
            "last_poll": last.wall if last else None,
            "last_poll_duration_s": last.duration_s if last else None,
            "last_sample_error": last.error if last else None,
            "libvirt_connected": self._sampler.connected,
            "reconnects": self._reconnects,
            "overruns": self._ticker.overruns,
            "delivery": status.delivery.value,
            "last_write": status.last_write_wall,
            "last_write_error": status.last_error,
            "spool_error": status.spool_error,
            **_counts(status),
        }


def _counts(status: WriterStatus) -> dict[str, int]:
    counts = status.counts
    return {
        "queued": status.queued,
        "spooled": status.spooled,
        "written": counts.written,
        "dropped": counts.dropped,
        "dead_lettered": counts.dead_lettered,
        "write_errors": counts.write_errors,
    }


_DELIVERY_WORDS = {
    Delivery.RETRYING: "database unreachable, retrying",
    Delivery.REFUSED: "database REFUSED the writes (token, database or URL)",
    Delivery.SPOOL_UNUSABLE: "spool unusable",
}


def _delivery_words(status: WriterStatus) -> str:
    """What is wrong with delivery, in the words an operator acts on, with its reason."""
    reason = status.spool_error if status.delivery is Delivery.SPOOL_UNUSABLE else status.last_error
    return (
        f"{_DELIVERY_WORDS[status.delivery]}: {reason}"
        if reason
        else _DELIVERY_WORDS[status.delivery]
    )
