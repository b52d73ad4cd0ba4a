"""Parsers of configuration values: text in, the typed value out, or ``Invalid`` saying
what was expected (config.py ties it to the variable's name)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import SplitResult, urlsplit

from vmtelemetryd.metadata import METADATA_KEYS

WriteApi = Literal["v2", "v3"]
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")


class Invalid(Exception):
    """A value's problem, before it is tied to its variable's name."""


def _expected(what: str, raw: str) -> Invalid:
    return Invalid(f"expected {what}, got {raw!r}")


def seconds(*, zero_ok: bool) -> Callable[[str], float]:
    what = f"a number of seconds {'>= 0' if zero_ok else '> 0'}"

    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise _expected(what, raw) from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise _expected(what, raw)
        return value

    return parse


def whole(unit: str, minimum: int) -> Callable[[str], int]:
    what = f"a whole number of {unit} >= {minimum}"

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise _expected(what, raw) from None
        if value < minimum:
            raise _expected(what, raw)
        return value

    return parse


URI_COMMA = "%2C"  # a comma inside one of several URIs


def libvirt_uris(raw: str) -> tuple[str, ...]:
    """One URI or several, comma-separated; each is unique and none is empty (libvirt
    would guess a hypervisor: never what was meant)."""
    uris = tuple(item.strip().replace(URI_COMMA, ",") for item in raw.split(","))
    if not all(uris):
        raise _expected("libvirt URIs such as qemu:///system, separated by commas", raw)
    if len(set(uris)) < len(uris):
        raise _expected("each URI once", raw)
    return uris


def stats_shards(raw: str) -> int | Literal["auto"]:
    """``auto`` or a number of concurrent requests per host."""
    if raw.lower() == "auto":
        return "auto"
    try:
        value = int(raw)
    except ValueError:
        raise _expected("auto or a whole number from 1 to 64", raw) from None
    if not 1 <= value <= 64:
        raise _expected("auto or a whole number from 1 to 64", raw)
    return value


def influx_url(raw: str) -> str:
    parts = _split_url(raw)
    if parts is not None and (parts.username is not None or parts.password is not None):
        # Not echoed: the value holds a password.
        raise Invalid("must not hold credentials (give the token as INFLUX_TOKEN or a file)")
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise _expected("http://HOST:PORT or https://HOST:PORT", raw)
    if not _port(parts) or parts.query or parts.fragment:
        raise _expected("an explicit port and no query, as in http://127.0.0.1:8181", raw)
    return raw.rstrip("/")


def _split_url(raw: str) -> SplitResult | None:
    try:
        return urlsplit(raw)
    except ValueError:  # e.g. an unbalanced "[" of an IPv6 address
        return None


def _port(parts: SplitResult) -> int | None:
    try:
        return parts.port
    except ValueError:  # not a number, or out of range
        return None


def database(raw: str) -> str:
    if not raw:
        raise _expected("a database name", raw)
    return raw


_WRITE_APIS: Mapping[str, WriteApi] = {"v3": "v3", "v2": "v2"}


def write_api(raw: str) -> WriteApi:
    try:
        return _WRITE_APIS[raw.lower()]
    except KeyError:
        raise _expected("v3 or v2", raw) from None


def spool_dir(raw: str) -> Path:
    path = Path(raw)
    if not path.is_absolute():
        raise _expected("an absolute path", raw)
    return path


def globs(raw: str) -> tuple[str, ...]:
    return tuple(glob for item in raw.split(",") if (glob := item.strip()))


def metadata_tags(raw: str) -> tuple[str, ...]:
    names = globs(raw)
    unknown = [name for name in names if name not in METADATA_KEYS]
    if unknown:
        raise _expected(f"vm_info keys among {', '.join(METADATA_KEYS)}", ",".join(unknown))
    return names


def host_tag(raw: str) -> str | None:
    return raw or None


def token_file(raw: str) -> Path | None:
    """Where the token is read from (config.py reads it); empty: none."""
    return Path(raw) if raw else None


def log_level(raw: str) -> str:
    if raw.lower() not in LOG_LEVELS:
        raise _expected(f"one of {', '.join(LOG_LEVELS)}", raw)
    return raw.lower()
