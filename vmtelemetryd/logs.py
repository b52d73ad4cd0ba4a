"""Logging: structlog events, one line each, on stderr.

stderr, because ``vmtelemetryd once`` prints line protocol on stdout. Under
systemd (stderr is the journal) a line is ``<N>`` + logfmt key=value pairs:
the ``<N>`` prefix of sd-daemon(3) gives journald the priority, and journald
adds the timestamp. Elsewhere a line is for a human: timestamp, level, event.

Usage elsewhere: ``log = structlog.get_logger()`` then
``log.info("poll done", vms=42)``. Register the token with ``set_redacted``
so that it never reaches the output, whatever holds it.

Masking must never damage the text: a token shorter than
``SHORT_SECRET_CHARS`` (a lab's ``t``) is masked only where it stands as a
word of its own, not inside ``started``; a longer one, as every real
InfluxDB token is, wherever it appears.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# structlog method names -> stdlib levels; "exception" logs at error.
_METHOD_LEVELS = _LEVELS | {
    "warn": logging.WARNING,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}

_MASK = "***"
SHORT_SECRET_CHARS = 8

# Read on every event, not captured by configure_logging(): loggers bound before a
# reload (log = structlog.get_logger().bind(...)) follow the new level and
# token too.
_threshold = logging.INFO
_secrets: re.Pattern[str] | None = None


def configure_logging(level: str, *, journal: bool | None = None) -> None:
    """Send structlog events and stdlib warnings to stderr, at ``level`` and above.

    ``journal=None`` detects whether stderr is the journal. Call again on
    reload to change the level.
    """
    global _threshold
    _threshold = _LEVELS[level.lower()]
    stream = sys.stderr
    in_journal = is_journal(stream) if journal is None else journal
    structlog.configure(
        processors=_journal_chain() if in_journal else _console_chain(stream),
        wrapper_class=structlog.make_filtering_bound_logger(logging.NOTSET),
        logger_factory=structlog.WriteLoggerFactory(stream),
        # Not cached: module-level get_logger() proxies pick up a reconfiguration.
        cache_logger_on_first_use=False,
    )
    # Libraries (influxdb client, urllib3) log through stdlib logging: only
    # their warnings and errors are ours to show.
    logging.basicConfig(
        handlers=[_ToStructlog()], level=max(logging.WARNING, _threshold), force=True
    )
    logging.captureWarnings(True)


def set_redacted(secrets: Iterable[str]) -> None:
    """Mask these strings wherever they appear in a log line; replaces the previous set."""
    global _secrets
    # Longest first: a token that contains another is masked whole.
    patterns = [_secret_pattern(s) for s in sorted(set(secrets) - {""}, key=len, reverse=True)]
    _secrets = re.compile("|".join(patterns)) if patterns else None


def _secret_pattern(secret: str) -> str:
    escaped = re.escape(secret)
    return escaped if len(secret) >= SHORT_SECRET_CHARS else rf"(?<!\w){escaped}(?!\w)"


def is_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is systemd's journal: $JOURNAL_STREAM names its device and inode."""
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no file descriptor (io.UnsupportedOperation), or closed
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{status.st_dev}:{status.st_ino}"


def _journal_chain() -> list[Processor]:
    return [
        _drop_below_threshold,
        _mask_token_keys,
        # Plain traceback (never locals) as a value: logfmt escapes its newlines.
        structlog.processors.format_exc_info,
        _Finish(structlog.processors.LogfmtRenderer(key_order=["event"]), syslog_prefix=True),
    ]


def _console_chain(stream: TextIO) -> list[Processor]:
    colors = stream.isatty() and "NO_COLOR" not in os.environ
    renderer = structlog.dev.ConsoleRenderer(
        colors=colors,
        # Explicit: with rich or better-exceptions installed, structlog's default
        # would print every frame's locals, the token among them.
        exception_formatter=structlog.dev.plain_traceback,
    )
    return [
        _drop_below_threshold,
        _mask_token_keys,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _Finish(renderer, syslog_prefix=False),
    ]


def _drop_below_threshold(_: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    if _METHOD_LEVELS.get(method_name, logging.INFO) < _threshold:
        raise structlog.DropEvent
    return event_dict


def _mask_token_keys(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Mask values of keys named like a token, whether or not it is the registered one."""
    for key in event_dict:
        if key.lower() == "token" or key.lower().endswith("_token"):
            event_dict[key] = _MASK
    return event_dict


@dataclass(frozen=True)
class _Finish:
    """Render, then mask the secrets in the finished line.

    Masking the line, not the event's values, also catches a token inside an
    exception message, a traceback or the repr of an object.
    """

    render: Processor
    syslog_prefix: bool

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
        line = str(self.render(logger, method_name, event_dict))
        if _secrets is not None:
            line = _secrets.sub(_MASK, line)
        if self.syslog_prefix:
            # logfmt escapes newlines, not CR: journald would file the line as binary.
            line = line.replace("\r", "\\r")
            return f"<{_priority(method_name)}>{line}"
        return line


# sd-daemon(3)'s SD_CRIT, SD_ERR, SD_WARNING, SD_INFO, SD_DEBUG.
_SYSLOG_PRIORITIES = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


def _priority(method_name: str) -> int:
    return _SYSLOG_PRIORITIES[_method(_METHOD_LEVELS.get(method_name, logging.INFO))]


class _ToStructlog(logging.Handler):
    """Hands stdlib records to structlog: one format, one stream, one lock."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # bad %-arguments in a library's call
            self.handleError(record)
            return
        log = structlog.get_logger()
        extra = {"exc_info": record.exc_info} if record.exc_info else {}
        getattr(log, _method(record.levelno))(message, logger=record.name, **extra)


def _method(levelno: int) -> str:
    """The structlog method for a stdlib level; custom levels round down."""
    if levelno >= logging.CRITICAL:
        return "critical"
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    return "info" if levelno >= logging.INFO else "debug"
