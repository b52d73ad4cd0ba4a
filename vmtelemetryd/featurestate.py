"""The feature state kept across a daemon restart (DESIGN.md "Features: rate and angle").

On stop, what ``Features`` would build each VM's next sample on goes to
``SPOOL_DIR/features.state``; the next start takes it back, so that its first
sample already has rates and the trend windows go on. Monotonic stamps only
compare within one boot, hence the boot id in the file; a VM that restarted
meanwhile has another domain id, and derive() then starts it afresh.

The file is read once: it is removed as it is read, so that a start after a
crash (SIGKILL, power loss) never takes back a state older than the run that
crashed. Whatever is wrong with it (truncated, corrupt, another boot, another
format) costs one sample's rates, never the start: it is ignored with one
warning. No file is the first start, or the one after a crash: silent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import structlog

from vmtelemetryd.features import Features, Point, VmHistory
from vmtelemetryd.model import DeviceKind, DeviceSample, VmSample

FILE_NAME = "features.state"
FORMAT = 2  # 2: by host URI, then uuid
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")

log = structlog.get_logger("vmtelemetryd.featurestate")

_KINDS: Mapping[str, DeviceKind] = {"nic": "nic", "disk": "disk"}
T = TypeVar("T")
_LATEST_S = 3600.0  # far beyond any request: LIBVIRT_TIMEOUT bounds a second ask


class _Unusable(ValueError):
    """Why a saved state cannot be taken back."""


def save(features: Mapping[str, Features], spool_dir: Path) -> None:
    """Save each host's state (by URI) for the next start; a failure is one warning,
    never a failed stop."""
    path = spool_dir / FILE_NAME
    hosts = {uri: stage.snapshot() for uri, stage in features.items()}
    encoded = {
        uri: {uuid: _encoded(history) for uuid, history in histories.items()}
        for uri, histories in hosts.items()
    }
    vms = sum(len(histories) for histories in hosts.values())
    try:
        document = {"format": FORMAT, "boot_id": _boot_id(), "hosts": encoded}
        _write_atomically(path, json.dumps(document, separators=(",", ":")).encode())
    except OSError as error:
        log.warning(
            "cannot save the feature state, rates start afresh after the restart",
            path=str(path),
            error=str(error),
        )
        return
    log.info("feature state saved", path=str(path), vms=vms)


def restore(features: Mapping[str, Features], spool_dir: Path) -> None:
    """Give each host's ``features`` the state the previous run of this boot saved for
    that URI, and remove the file; hosts no longer monitored are left out."""
    path = spool_dir / FILE_NAME
    try:
        data = path.read_bytes()
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as error:
        # Unremovable, it would be taken back again at every start: not even once.
        log.warning("feature state ignored", path=str(path), reason=str(error))
        return
    try:
        hosts = _decoded(json.loads(data), _boot_id())
    except (OSError, ValueError) as error:  # json's errors are ValueErrors, as is _Unusable
        log.warning("feature state ignored", path=str(path), reason=str(error))
        return
    taken = 0
    for uri, stage in features.items():
        histories = hosts.get(uri, {})
        stage.restore(histories)
        taken += len(histories)
    log.info("feature state taken back", path=str(path), vms=taken)


def _boot_id() -> str:
    """The kernel's id of this boot: CLOCK_MONOTONIC readings compare only within one."""
    return BOOT_ID_PATH.read_text(encoding="ascii").strip()


def _write_atomically(path: Path, data: bytes) -> None:
    """Temp file, fsync, rename, fsync of the directory: a reader sees a whole file or none."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _encoded(history: VmHistory) -> dict[str, object]:
    last = history.last
    return {
        "instance": history.instance,
        "monotonic": history.monotonic,
        "last": {
            "name": last.name,
            "uuid": last.uuid,
            "instance": last.instance,
            "metrics": dict(last.metrics),
            "devices": [[d.kind, d.name, dict(d.counters)] for d in last.devices],
            "device_counts": dict(last.device_counts),
            "monitor_late_s": last.monitor_late_s,
        },
        "windows": dict(history.windows),  # tuples of (time, value) come out as JSON arrays
    }


def _decoded(document: object, boot: str) -> dict[str, dict[str, VmHistory]]:
    """The histories of a parsed file, every value checked: a bad one must not reach derive()."""
    top = _typed(document, dict)
    if top.get("format") != FORMAT:
        raise _Unusable(f"format {top.get('format')!r}, this version reads {FORMAT}")
    if top.get("boot_id") != boot:
        raise _Unusable("saved during another boot")
    return {
        _typed(uri, str): {uuid: _history(vm) for uuid, vm in _typed(vms, dict).items()}
        for uri, vms in _typed(top.get("hosts"), dict).items()
    }


def _history(value: object) -> VmHistory:
    fields = _typed(value, dict)
    last = _typed(fields.get("last"), dict)
    sample = VmSample(
        name=_typed(last.get("name"), str),
        uuid=_typed(last.get("uuid"), str),
        instance=_typed(last.get("instance"), int),
        metrics=_counters(last.get("metrics")),
        devices=tuple(_device(d) for d in _typed(last.get("devices"), list)),
        device_counts={
            _kind(kind): _typed(n, int)
            for kind, n in _typed(last.get("device_counts"), dict).items()
        },
        monitor_late_s=_late(last.get("monitor_late_s", 0.0)),
    )
    windows = {
        name: tuple(_point(p) for p in _typed(points, list))
        for name, points in _typed(fields.get("windows"), dict).items()
    }
    return VmHistory(
        _typed(fields.get("instance"), int), _typed(fields.get("monotonic"), float), sample, windows
    )


def _device(value: object) -> DeviceSample:
    kind, name, counters = _typed(value, list)
    return DeviceSample(_kind(kind), _typed(name, str), _counters(counters))


def _kind(value: object) -> DeviceKind:
    kind = _KINDS.get(_typed(value, str))
    if kind is None:
        raise _Unusable(f"unknown device kind {value!r}")
    return kind


def _counters(value: object) -> dict[str, int]:
    return {name: _typed(n, int) for name, n in _typed(value, dict).items()}


def _late(value: object) -> float:
    """How late a VM's disks were read: within one request, never negative. Anything
    else was not written by this daemon, and would skew the next disk rates."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= _LATEST_S:
        raise _Unusable(f"monitor_late_s {value!r} is not between 0 and {_LATEST_S:g} s")
    return float(value)


def _point(value: object) -> Point:
    when, what = _typed(value, list)
    return _typed(when, float), _typed(what, float)


def _typed(value: object, kind: type[T]) -> T:
    if not isinstance(value, kind):
        raise _Unusable(f"expected {kind.__name__}, found {type(value).__name__}")
    return value
