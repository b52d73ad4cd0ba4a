"""``vmtelemetryd [--config PATH] VERB``: the daemon and the operator's tools around it."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from vmtelemetryd.config import Config, ConfigError, describe, load_config
from vmtelemetryd.daemon import Daemon
from vmtelemetryd.features import Features
from vmtelemetryd.health import Health, default_status_path, read_status
from vmtelemetryd.hostsampler import HostSampler
from vmtelemetryd.lineprotocol import encode
from vmtelemetryd.logs import configure_logging, is_journal, set_redacted
from vmtelemetryd.metadata import parse_metadata
from vmtelemetryd.model import Sample, state_name
from vmtelemetryd.stages import open_hosts
from vmtelemetryd.timedcalls import SamplerError
from vmtelemetryd.top import run_top
from vmtelemetryd.topview import SORTS

EX_OK = 0
EX_FAILURE = 1
EX_UNAVAILABLE = 69
EX_CONFIG = 78
RUN_STATUS_PATH = Path("/run/vmtelemetryd/status.json")
T = TypeVar("T")
LOCAL_VERBS = ("once", "vms", "top")  # they never write to the database, and need none configured


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verb == "status":
        return _status(args.json)
    path = Path(args.config) if args.config else None
    configure_logging("info")  # warnings about unknown variables, while loading
    try:
        config = load_config(path, os.environ, database=args.verb not in LOCAL_VERBS)
    except ConfigError as exc:
        # <3>: journald files each line at priority err (sd-daemon(3)), as the logger does.
        prefix = "<3>" if is_journal(sys.stderr) else ""
        for variable, reason in exc.problems.items():
            message = f"vmtelemetryd: configuration error: {variable}: {reason}"
            print(prefix + message, file=sys.stderr)
        return EX_CONFIG
    configure_logging(config.log_level)
    set_redacted([config.influx_token.reveal()])
    verbs = {
        "run": lambda: Daemon(config, path, Health(default_status_path())).run(),
        "once": lambda: _once(config),
        "check-config": lambda: _check_config(config),
        "show-config": lambda: _show_config(config),
        "vms": lambda: _vms(config),
        "top": lambda: run_top(config, args.interval or config.poll_interval, args.sort),
    }
    try:
        return verbs[args.verb]()
    except BrokenPipeError:  # `vms | head`: the reader left, which is not our error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EX_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmtelemetryd", description="VM telemetry from libvirt to InfluxDB 3."
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="dotenv configuration file (default /etc/vmtelemetryd/vmtelemetryd.env)",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.add_parser("run", help="the daemon, in the foreground (the default)")
    verbs.add_parser("once", help="sample twice and print the second sample's line protocol")
    verbs.add_parser("check-config", help="validate the configuration: exit 0 or 78")
    verbs.add_parser("show-config", help="the effective configuration, secrets masked")
    verbs.add_parser("vms", help="the VMs being monitored, with their devices")
    top = verbs.add_parser("top", help="a live view of every VM, like virt-top")
    top.add_argument(
        "--interval", type=_positive_seconds, metavar="S", help="refresh (default POLL_INTERVAL)"
    )
    top.add_argument("--sort", choices=SORTS, default="cpu", help="initial sort (s cycles)")
    status = verbs.add_parser("status", help="what the running daemon reports")
    status.add_argument("--json", action="store_true", help="the raw status document")
    parser.set_defaults(verb="run", json=False)
    return parser


def _positive_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {raw!r}")
    return value


def _once(config: Config) -> int:
    """Two samples of every host an interval apart, so rates exist; nothing goes to the
    database."""
    rounds = _take_samples(config, 2)
    if rounds is None:
        return EX_UNAVAILABLE
    lines: list[str] = []
    for before, after in zip(*rounds, strict=True):
        features = Features(config.feature_window)
        features.derive(before)
        lines += encode(after, features.derive(after))
    sys.stdout.write("".join(line + "\n" for line in lines))
    return EX_OK


def _take_samples(config: Config, count: int) -> list[list[Sample]] | None:
    """``count`` rounds, POLL_INTERVAL apart, of one sample per host; None (and the reason
    on stderr) if libvirt fails."""

    def take(hosts: list[HostSampler]) -> list[list[Sample]]:
        rounds: list[list[Sample]] = []
        while len(rounds) < count:
            if rounds:
                time.sleep(config.poll_interval)
            rounds.append([host.sample() for host in hosts])
        return rounds

    return _with_hosts(config, take)


def _with_hosts(config: Config, use: Callable[[list[HostSampler]], T]) -> T | None:
    """``use`` connections of its own to every host; None (and the reason on stderr) if
    libvirt fails."""
    hosts = open_hosts(config)
    try:
        return use(hosts)
    except SamplerError as exc:
        print(f"vmtelemetryd: {exc}", file=sys.stderr)
        return None
    finally:
        for host in hosts:
            host.close()


def _check_config(config: Config) -> int:
    source = config.source or "environment only"
    print(f"configuration OK ({source})")
    return EX_OK


def _show_config(config: Config) -> int:
    for name, value in describe(config):
        print(f"{name}={value}")
    return EX_OK


def _vms(config: Config) -> int:
    def look(hosts: list[HostSampler]) -> list[tuple[Sample, dict[str, str]]]:
        seen = []
        for host in hosts:
            sample = host.sample()
            seen.append((sample, host.domain_xml([vm.uuid for vm in sample.vms])))
        return seen

    seen = _with_hosts(config, look)
    if seen is None:
        return EX_UNAVAILABLE
    for sample, xml in seen:
        for vm in sorted(sample.vms, key=lambda v: v.name):
            print(f"{vm.name}  {vm.uuid}  {state_name(vm.metrics.get('state'))}")
            for device in vm.devices:
                print(f"    {device.kind:<4} {device.name}")
            for key, value in parse_metadata(vm.name, xml.get(vm.uuid, "")).items():
                print(f"    {key}={value!r}")
        print(f"{len(sample.vms)} VMs on {sample.host}")
    return EX_OK


def _status(as_json: bool) -> int:
    path = default_status_path() or RUN_STATUS_PATH
    try:
        report = read_status(path)
    except (OSError, ValueError) as exc:
        print(f"vmtelemetryd: no status at {path}: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    if not _alive(report.get("pid")):
        # Run by hand, a daemon leaves its last status behind; systemd removes it.
        print(
            f"vmtelemetryd: not running: {path} is from pid {report.get('pid')}, which has exited",
            file=sys.stderr,
        )
        return EX_UNAVAILABLE
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return EX_OK
    hosts = report.pop("hosts", [])
    for key in sorted(report):
        print(f"{key}: {_human(key, report[key])}")
    for host in hosts:  # with several hosts: each one's figures, indented under its URI
        print(f"host {host.get('uri')}:")
        for key in sorted(set(host) - {"uri"}):
            print(f"    {key}: {_human(key, host[key])}")
    return EX_OK


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _human(key: str, value: object) -> str:
    if isinstance(value, float) and key in ("last_poll", "last_write", "started"):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
        return f"{stamp} ({time.time() - value:.1f} s ago)"
    return "-" if value is None else str(value)
