"""The main loop: one cycle per tick, signals turned into events it handles between cycles.

Signal handlers only enqueue (as gunicorn's arbiter does): a reload or a
stop never runs in the middle of a cycle, and a handler can never deadlock
on a lock the interrupted code holds.
"""

from __future__ import annotations

import gc
import os
import queue
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import structlog

from vmtelemetryd import featurestate
from vmtelemetryd.config import Config, ConfigError, load_config
from vmtelemetryd.events import ConnectionClosed, DomainEvent, Notice, start_event_loop
from vmtelemetryd.features import Features
from vmtelemetryd.fleet import Fleet, HostResult
from vmtelemetryd.health import Health
from vmtelemetryd.hostpipeline import HostPipeline
from vmtelemetryd.hostsampler import HostSampler
from vmtelemetryd.lineprotocol import encode_line
from vmtelemetryd.logs import configure_logging, set_redacted
from vmtelemetryd.model import Sample, WriterStatus
from vmtelemetryd.report import HostReport, HostState, status_document, summary
from vmtelemetryd.scheduler import Ticker
from vmtelemetryd.stages import open_hosts, open_writer, sampler_settings, writer_settings
from vmtelemetryd.timedcalls import SamplerStuck

log = structlog.get_logger("vmtelemetryd")

STOP_FLUSH_S = 20.0
RELOAD_FLUSH_S = 5.0


@dataclass
class _Host:
    """One hypervisor as the daemon keeps it: its sampler, its pure stages, its last answer."""

    sampler: HostSampler
    pipeline: HostPipeline
    last: HostReport | None = None


class Daemon:
    def __init__(self, config: Config, config_path: Path | None, health: Health) -> None:
        self.config = config
        self._config_path = config_path
        self._health = health
        self._events: queue.SimpleQueue[str | Notice] = queue.SimpleQueue()
        start_event_loop()  # before the first connection opens
        self._hosts: dict[str, _Host] = {}
        self._fleet = self._open_fleet(config)
        featurestate.restore(self._feature_stages(), config.spool_dir)
        self._writer = open_writer(config)
        self._ticker = Ticker(config.poll_interval, time.monotonic())
        self._generation = 1
        self._reload_error: str | None = None
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
        # What start-up made (modules, libvirt, pyarrow: 40k objects) lives as long as the
        # process: kept out of the collector's full passes, which each cycle's new objects
        # set off again and again (own CPU per VM-sample at 56 guests 0.131 -> 0.122 ms).
        gc.collect()
        gc.freeze()
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
        """One tick's work; True when at least one host made progress (for the watchdog)."""
        started = time.monotonic()
        answers = self._fleet.sample(started + self._patience())
        lines: list[str] = []
        for answer in answers:
            lines += self._take(answer)
        self._writer.submit(lines)
        log.debug(
            "poll done",
            hosts=len(answers),
            vms=sum(len(a.sample.vms) for a in answers if a.sample is not None),
            lines=len(lines),
            seconds=round(time.monotonic() - started, 4),
        )
        return any(not isinstance(a.error, SamplerStuck) for a in answers)

    def _patience(self) -> float:
        """How long a cycle waits for its hosts: one host as long as libvirt may take; with
        several, less than an interval, so that a slow host delays no other host's points."""
        if len(self._hosts) == 1:
            return self.config.libvirt_timeout + 1.0
        return max(0.1, 0.9 * self.config.poll_interval)

    def _take(self, answer: HostResult) -> list[str]:
        """One host's answer: its lines, and what the status will say of it."""
        host = self._hosts.get(answer.uri)
        if host is None:  # a host a reload removed, answering late
            return []
        wall = time.time()
        if answer.sample is None:
            self._sample_errors += 1
            error = str(answer.error)
            name = host.last.host if host.last else ""
            host.last = HostReport(answer.uri, name, wall, answer.duration_s, 0, error)
            log.error("sample failed", uri=answer.uri, error=error)
            return []
        sample = answer.sample
        lines = host.pipeline.lines(sample, host.sampler.domain_xml, self.config.metadata_tags)
        vms, share_error = len(sample.vms), host.sampler.share_error
        # When the poll ended, from the sample's own stamp: last_poll - duration is the
        # sample's time, however long the answer waited for the main loop.
        done = sample.wall_ns / 1e9 + answer.duration_s
        host.last = HostReport(answer.uri, sample.host, done, answer.duration_s, vms, share_error)
        own = self._own_metrics(sample, host)
        return lines + ([own] if own is not None else [])

    def _on_notice(self, notice: Notice) -> None:
        """A libvirt event, between cycles: a ``vm_events`` point now, metadata read again."""
        if isinstance(notice, ConnectionClosed):
            if notice.reason != libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT:  # not our own close
                log.warning("libvirt connection closed", uri=notice.uri, reason=notice.reason)
            return
        host = self._hosts.get(notice.uri)
        line = host.pipeline.on_event(notice) if host is not None else None
        if line is not None:
            self._writer.submit([line])
        if isinstance(notice, DomainEvent):
            log.debug("domain event", vm=notice.vm, kind=notice.event, detail=notice.detail)

    @property
    def _reconnects(self) -> int:
        return self._retired_reconnects + sum(h.sampler.reconnects for h in self._hosts.values())

    def _own_metrics(self, sample: Sample, host: _Host) -> str | None:
        """The daemon's own figures, one line per host answer, tagged with that host."""
        status = self._writer.status()
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
            "xml_reads": host.pipeline.xml_reads,
            "shards": host.sampler.shards,
        }
        if host.last is not None:
            fields["poll_duration_s"] = float(host.last.duration_s)
        return encode_line("vmtelemetryd", {"host": sample.host}, fields, sample.wall_ns)

    def _open_fleet(self, config: Config) -> Fleet:
        """A sampler per host; a host that stays keeps its pipeline (rates, windows, metadata)."""
        samplers = open_hosts(config, self._events.put)
        kept = self._hosts
        self._hosts = {s.uri: _Host(s, self._pipeline(config)) for s in samplers}
        for uri, host in self._hosts.items():
            if uri in kept:
                host.pipeline, host.last = kept[uri].pipeline, kept[uri].last
        return Fleet(samplers)

    @staticmethod
    def _pipeline(config: Config) -> HostPipeline:
        return HostPipeline(config.feature_window, config.device_cache_ttl, config.poll_interval)

    def _feature_stages(self) -> dict[str, Features]:
        return {uri: host.pipeline.features for uri, host in self._hosts.items()}

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
            self._fleet.close()
            self._retired_reconnects += sum(h.sampler.reconnects for h in self._hosts.values())
            self._fleet = self._open_fleet(config)
            log.info("libvirt connection rebuilt", uri=",".join(config.libvirt_uris))
        if writer_settings(old) != writer_settings(config):
            self._writer.stop(RELOAD_FLUSH_S)
            self._writer = open_writer(config, self._writer.status().counts)
            log.info("writer rebuilt", url=config.influx_url, database=config.influx_db)
        for host in self._hosts.values():
            host.pipeline.retune(
                config.feature_window, config.device_cache_ttl, config.poll_interval
            )
        if old.poll_interval != config.poll_interval:
            self._ticker.retune(config.poll_interval, time.monotonic())

    def _shutdown(self) -> None:
        log.info("stopping: flushing queued points", timeout_s=STOP_FLUSH_S)
        self._health.stopping(STOP_FLUSH_S + 10)
        self._writer.stop(STOP_FLUSH_S)
        featurestate.save(self._feature_stages(), self.config.spool_dir)
        self._fleet.close()
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
        return summary(self._host_states(), self._writer.status(), self._reload_error)

    def _status_report(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "started": self._started,
            "generation": self._generation,
            "config": str(self._config_path) if self._config_path else None,
            "config_error": self._reload_error,
            "overruns": self._ticker.overruns,
            **status_document(self._host_states(), self._writer.status()),
            "reconnects": self._reconnects,
        }

    def _host_states(self) -> list[HostState]:
        return [
            HostState(
                uri,
                host.last,
                host.sampler.connected,
                host.sampler.reconnects,
                host.sampler.shards,
                uri in self._fleet.busy,
            )
            for uri, host in self._hosts.items()
        ]


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
