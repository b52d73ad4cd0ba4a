"""A strict line-protocol reader for tests, following InfluxDB 3's parser.

In measurements, tag keys and values and field keys, a backslash before a
backslash, comma, equals sign or space stands for that character; any other
backslash is itself. Fields are integers (``i`` suffix) or floats; the
encoder writes no strings or booleans, so this reader refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

ESCAPABLE = "\\, ="


@dataclass(frozen=True)
class Point:
    measurement: str
    tags: dict[str, str]
    fields: dict[str, int | float]
    timestamp: int


def parse_lines(text: str) -> list[Point]:
    return [parse_line(line) for line in text.splitlines() if line]


def parse_line(line: str) -> Point:
    head, fields_text, stamp = _split(line, " ")
    if stamp is None or not stamp.isdigit():
        raise ValueError(f"bad timestamp in {line!r}")
    measurement, *tag_items = _split_all(head, ",")
    tags = dict(_pair(item, line) for item in tag_items)
    fields = {
        k: _number(v, line) for k, v in (_pair(i, line) for i in _split_all(fields_text, ","))
    }
    return Point(_unescape(measurement), tags, fields, int(stamp))


def _pair(item: str, line: str) -> tuple[str, str]:
    parts = _split_all(item, "=")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ValueError(f"bad key=value {item!r} in {line!r}")
    return _unescape(parts[0]), _unescape(parts[1])


def _number(text: str, line: str) -> int | float:
    if text.endswith("i"):
        return int(text[:-1])
    if text in ("t", "f", "true", "false") or text.startswith('"'):
        raise ValueError(f"unexpected non-numeric field {text!r} in {line!r}")
    return float(text)


def _split(line: str, sep: str) -> tuple[str, str, str | None]:
    parts = _split_all(line, sep)
    if len(parts) not in (2, 3):
        raise ValueError(f"expected 2 or 3 sections split by {sep!r}: {line!r}")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _split_all(text: str, sep: str) -> list[str]:
    """Split at unescaped ``sep``, keeping escapes for ``_unescape``."""
    parts, current, i = [], [], 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in ESCAPABLE:
            current.append(text[i : i + 2])
            i += 2
            continue
        if char == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in ESCAPABLE:
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)
