"""Configuration: DESIGN.md's variables from a dotenv file and the environment.

Every bad variable is reported at once (``ConfigError.problems``), so that an
operator fixes the file in one edit instead of one restart per mistake.

Rules beyond DESIGN.md:

- Values are stripped of surrounding whitespace. A set but empty value is
  validated like any other (``POLL_INTERVAL=`` is an error, not the default),
  except where empty has a meaning: ``DOMAINS_INCLUDE``/``DOMAINS_EXCLUDE``
  (no globs), ``HOST_TAG`` (libvirt's hostname), ``INFLUX_TOKEN_FILE`` (none).
  A bare ``NAME`` line without ``=`` counts as unset.
- ``INFLUX_URL`` is stored without a trailing ``/`` and may carry a path
  prefix (a reverse proxy), but no query, fragment or credentials.
- ``SPOOL_DIR`` must be absolute: a relative one would depend on the
  working directory.
- Unknown variables are never fatal (other software shares the environment):
  every unknown name in the file, and names in the environment that look like
  a typo of ours (``POLL_INTERVALL``), are logged as warnings.
"""

from __future__ import annotations

import difflib
import io
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from dotenv import dotenv_values
from dotenv.parser import parse_stream

from vmtelemetryd import configvalues as parsers
from vmtelemetryd.configvalues import WriteApi

DEFAULT_PATH = Path("/etc/vmtelemetryd/vmtelemetryd.env")
CREDENTIAL_NAME = "influx-token"

# Config is read before logging is configured (LOG_LEVEL is in it): stdlib
# logging's last-resort handler then still writes warnings to stderr, never to
# stdout, where ``once`` prints line protocol.
_log = logging.getLogger(__name__)


class ConfigError(Exception):
    """Why the configuration cannot be used: every problem found, in DESIGN.md's order.

    ``problems`` maps a variable (or, for a file that cannot be read or parsed,
    the file's path) to what is wrong with it. The message is one line,
    ``VARIABLE: reason; VARIABLE: reason``, fit for sd_notify's STATUS= and the
    journal, and never holds the token.
    """

    def __init__(self, problems: Mapping[str, str]) -> None:
        self.problems = dict(problems)
        super().__init__("; ".join(f"{name}: {reason}" for name, reason in self.problems.items()))

    @property
    def variable(self) -> str:
        """The first bad variable."""
        return next(iter(self.problems))


@dataclass(frozen=True, slots=True)
class Secret:
    """The InfluxDB token: ``***`` wherever it is shown (repr, str, f-strings).

    ``reveal()`` is the one way to read it, so every use is easy to find.
    """

    _value: str

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "***"


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The validated configuration; ``load_config`` is the way to build one."""

    libvirt_uris: tuple[str, ...] = ("qemu:///system",)
    influx_url: str
    influx_db: str
    influx_token: Secret
    influx_write_api: WriteApi = "v3"
    influx_token_file: Path | None = None
    poll_interval: float = 1.0
    batch_max_lines: int = 2000
    batch_max_sec: float = 1.0
    device_cache_ttl: float = 300.0
    metadata_tags: tuple[str, ...] = ()
    stats_shards: int | Literal["auto"] = "auto"
    libvirt_timeout: float = 30.0
    spool_dir: Path = Path("/var/lib/vmtelemetryd/spool")
    spool_max_bytes: int = 1073741824
    domains_include: tuple[str, ...] = ()
    domains_exclude: tuple[str, ...] = ()
    feature_window: int = 5
    host_tag: str | None = None
    log_level: str = "info"
    source: Path | None = None

    def wants_domain(self, name: str) -> bool:
        """Whether to monitor domain ``name``: included (or no include list), not excluded."""
        included = not self.domains_include or _matches(name, self.domains_include)
        return included and not _matches(name, self.domains_exclude)


def _matches(name: str, globs: Iterable[str]) -> bool:
    return any(fnmatchcase(name, glob) for glob in globs)


@dataclass(frozen=True)
class _Variable:
    name: str
    attribute: str
    # None for INFLUX_TOKEN, which has three sources: see _token().
    parse: Callable[[str], object] | None
    required: bool = False


# DESIGN.md's order, which is also the order of problems and of describe().
_VARIABLES: tuple[_Variable, ...] = (
    _Variable("LIBVIRT_URI", "libvirt_uris", parsers.libvirt_uris),
    _Variable("INFLUX_URL", "influx_url", parsers.influx_url, required=True),
    _Variable("INFLUX_DB", "influx_db", parsers.database, required=True),
    _Variable("INFLUX_TOKEN", "influx_token", None),
    _Variable("INFLUX_WRITE_API", "influx_write_api", parsers.write_api),
    _Variable("INFLUX_TOKEN_FILE", "influx_token_file", parsers.token_file),
    _Variable("POLL_INTERVAL", "poll_interval", parsers.seconds(zero_ok=False)),
    _Variable("BATCH_MAX_LINES", "batch_max_lines", parsers.whole("lines", 1)),
    _Variable("BATCH_MAX_SEC", "batch_max_sec", parsers.seconds(zero_ok=False)),
    _Variable("DEVICE_CACHE_TTL", "device_cache_ttl", parsers.seconds(zero_ok=True)),
    _Variable("METADATA_TAGS", "metadata_tags", parsers.metadata_tags),
    _Variable("STATS_SHARDS", "stats_shards", parsers.stats_shards),
    _Variable("LIBVIRT_TIMEOUT", "libvirt_timeout", parsers.seconds(zero_ok=False)),
    _Variable("SPOOL_DIR", "spool_dir", parsers.spool_dir),
    _Variable("SPOOL_MAX_BYTES", "spool_max_bytes", parsers.whole("bytes", 1)),
    _Variable("DOMAINS_INCLUDE", "domains_include", parsers.globs),
    _Variable("DOMAINS_EXCLUDE", "domains_exclude", parsers.globs),
    _Variable("FEATURE_WINDOW", "feature_window", parsers.whole("samples", 2)),
    _Variable("HOST_TAG", "host_tag", parsers.host_tag),
    _Variable("LOG_LEVEL", "log_level", parsers.log_level),
)

_KNOWN: frozenset[str] = frozenset(v.name for v in _VARIABLES)
_PREFIXES: tuple[str, ...] = tuple({name.split("_")[0] + "_" for name in _KNOWN})


def load_config(path: Path | None, environ: Mapping[str, str], *, database: bool = True) -> Config:
    """The configuration from the dotenv file at ``path`` and ``environ``, which wins.

    ``path=None`` reads ``DEFAULT_PATH`` if it exists; a given path must exist.
    ``database=False`` is for the verbs that never write (once, vms, top): the
    database's variables need not be set, and are empty when they are not.
    Raises ConfigError listing every problem found.
    """
    file_values, source = _read_file(path)
    _warn_unknown(file_values, str(source), only_typos=False)
    _warn_unknown(environ, "the environment", only_typos=True)
    set_in_file = {name: value for name, value in file_values.items() if value is not None}
    values = _parse({**set_in_file, **environ}, environ, database=database)
    return Config(**values, source=source)


def _read_file(path: Path | None) -> tuple[dict[str, str | None], Path | None]:
    """The file's variables and the file they came from (None if the default is absent)."""
    target = DEFAULT_PATH if path is None else path
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        if path is None:
            return {}, None
        raise ConfigError({str(target): "no such file"}) from None
    except (OSError, UnicodeError) as error:
        raise ConfigError({str(target): f"cannot read: {_why(error)}"}) from None
    # Line numbers only: a broken line may be the token's.
    broken = [str(b.original.line) for b in parse_stream(io.StringIO(text)) if b.error]
    if broken:
        lines = ", ".join(broken)
        raise ConfigError({str(target): f"cannot parse line {lines} (expected NAME=value)"})
    # No interpolation: a token may hold "$", and python-dotenv would expand
    # ${...} from os.environ rather than from ``environ``, a hidden input.
    return dotenv_values(stream=io.StringIO(text), interpolate=False), target


def _why(error: OSError | UnicodeError) -> str:
    if isinstance(error, UnicodeError):
        return "not UTF-8 text"
    return error.strerror or str(error)


def _warn_unknown(names: Iterable[str], where: str, *, only_typos: bool) -> None:
    """Warn about names that are not ours: all of them, or only likely typos of ours."""
    for name in sorted(set(names) - _KNOWN):
        guess = difflib.get_close_matches(name, _KNOWN, n=1, cutoff=0.85)
        if only_typos and not (guess and name.startswith(_PREFIXES)):
            continue
        hint = f"; did you mean {guess[0]}?" if guess else ""
        _log.warning("%s in %s is not a vmtelemetryd variable, ignored%s", name, where, hint)


def _parse(
    settings: Mapping[str, str], environ: Mapping[str, str], *, database: bool
) -> dict[str, Any]:
    """Config's keyword arguments for the variables that are set; unset ones keep the default."""
    values: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for variable in _VARIABLES:
        raw = settings.get(variable.name)
        try:
            if variable.parse is None:
                values[variable.attribute] = _token(settings, environ)
            elif raw is not None:
                values[variable.attribute] = variable.parse(raw.strip())
            elif variable.required and database:
                problems[variable.name] = "required, not set"
        except parsers.Invalid as invalid:
            problems[variable.name] = str(invalid)
        except ConfigError as error:
            if database:
                problems.update(error.problems)
    if not database:
        values = {"influx_url": "", "influx_db": "", "influx_token": Secret(""), **values}
    if values.get("host_tag") and len(values.get("libvirt_uris", ())) > 1:
        problems["HOST_TAG"] = (
            "only with a single LIBVIRT_URI: with several, each host is tagged with its own"
            " libvirt hostname"
        )
    if problems:
        raise ConfigError(problems)
    return values


def _token(settings: Mapping[str, str], environ: Mapping[str, str]) -> Secret:
    """The token from its first source: systemd credential, INFLUX_TOKEN_FILE, INFLUX_TOKEN."""
    credential = _credential(environ)
    if credential is not None:
        return _token_from_file("CREDENTIALS_DIRECTORY", credential)
    token_file = settings.get("INFLUX_TOKEN_FILE", "").strip()
    if token_file:
        return _token_from_file("INFLUX_TOKEN_FILE", Path(token_file))
    token = settings.get("INFLUX_TOKEN", "").strip()
    if not token:
        raise ConfigError(
            {
                "INFLUX_TOKEN": "required: set INFLUX_TOKEN, INFLUX_TOKEN_FILE"
                f" or the systemd credential {CREDENTIAL_NAME}"
            }
        )
    return Secret(token)


def _credential(environ: Mapping[str, str]) -> Path | None:
    """The credential file if systemd passed one named influx-token (LoadCredential=)."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / CREDENTIAL_NAME
    return path if path.exists() else None


def _token_from_file(variable: str, path: Path) -> Secret:
    try:
        # strip(): files usually end in a newline; a token never has whitespace.
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeError) as error:
        raise ConfigError({variable: f"cannot read {path}: {_why(error)}"}) from None
    if not token:
        raise ConfigError({variable: f"{path} is empty"})
    return Secret(token)


def describe(config: Config) -> list[tuple[str, str]]:
    """The effective configuration as (VARIABLE, value) pairs, the token as ``***``.

    Values are written as the variable would be set, so that the output, once
    given the token, loads back into the same configuration.
    """
    return [(v.name, _shown(getattr(config, v.attribute))) for v in _VARIABLES]


def _shown(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ",".join(item.replace(",", parsers.URI_COMMA) for item in value)
    return str(value)  # a Secret shows as ***
