r"""A strict line-protocol parser for tests, following InfluxDB 3's rules.

InfluxDB 3's parser (crate ``influxdb_line_protocol``): ``\\ \, \= \ ``
unescape in keys and tag values (``\\ \, \ `` in the measurement), any other
backslash is literal, a value whose unescaped text ends in a backslash is
rejected, tab and newline cannot appear. Where the real parsers disagree it
refuses what any of them would misread: a raw comma or space in a key, a raw
``=`` in a tag value (Go), CR, an integer without ``i``, unsorted or
duplicate tags. A number without a suffix is a float in each of them
(``field_float_value_no_decimal`` in the crate; ``12`` is 12.0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class ParseError(ValueError):
    pass


@dataclass(frozen=True)
class Line:
    measurement: str
    tags: dict[str, str]
    fields: dict[str, int | float]
    ts: int


KEY_ESCAPES = frozenset("\\,= ")
MEASUREMENT_ESCAPES = frozenset("\\, ")
NEVER_RAW = frozenset("\t\n\r")
INT = re.compile(r"-?\d+i")
FLOAT = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?")
TIMESTAMP = re.compile(r"-?\d+")


def element(
    line: str, pos: int, ends: str, escapes: frozenset[str], refused: str = ""
) -> tuple[str, int]:
    """One measurement, key or tag value from ``pos`` to the first unescaped char of ``ends``."""
    out: list[str] = []
    while pos < len(line):
        char = line[pos]
        if char == "\\":
            if pos + 1 == len(line):
                raise ParseError("backslash at the end of the line")
            after = line[pos + 1]
            if after in NEVER_RAW:
                raise ParseError(f"escaped {after!r}")
            out.append(after if after in escapes else char + after)
            pos += 2
            continue
        if char in ends:
            break
        if char in NEVER_RAW or char in refused:
            raise ParseError(f"raw {char!r} at {pos}")
        out.append(char)
        pos += 1
    value = "".join(out)
    if not value:
        raise ParseError(f"empty element at {pos}")
    if value.endswith("\\"):
        raise ParseError("ends with a backslash")  # InfluxDB 3: EndsWithBackslash
    return value, pos


def expect(line: str, pos: int, char: str) -> None:
    if pos >= len(line) or line[pos] != char:
        raise ParseError(f"expected {char!r} at {pos}")


def number(text: str) -> int | float:
    if INT.fullmatch(text):
        value = int(text[:-1])
        if not -(2**63) <= value < 2**63:
            raise ParseError(f"integer out of range: {text}")
        return value
    if FLOAT.fullmatch(text):
        return float(text)
    raise ParseError(f"not an integer or a float: {text!r}")


def parse(line: str) -> Line:
    measurement, pos = element(line, 0, ", ", MEASUREMENT_ESCAPES)
    tags: list[tuple[str, str]] = []
    while pos < len(line) and line[pos] == ",":
        key, pos = element(line, pos + 1, "=", KEY_ESCAPES, refused=", ")
        expect(line, pos, "=")
        value, pos = element(line, pos + 1, ", ", KEY_ESCAPES, refused="=")
        tags.append((key, value))
    keys = [k for k, _ in tags]
    if keys != sorted(set(keys)):
        raise ParseError(f"tags not sorted or duplicated: {keys}")
    expect(line, pos, " ")
    fields: dict[str, int | float] = {}
    while line[pos] != " " or not fields:
        key, pos = element(line, pos + 1, "=", KEY_ESCAPES, refused=", ")
        expect(line, pos, "=")
        ends = [i for i in (line.find(",", pos), line.find(" ", pos)) if i >= 0]
        if not ends:
            raise ParseError("no timestamp")
        end = min(ends)
        if key in fields:
            raise ParseError(f"duplicate field {key}")
        fields[key] = number(line[pos + 1 : end])
        pos = end
    if not TIMESTAMP.fullmatch(line[pos + 1 :]):
        raise ParseError(f"bad timestamp {line[pos + 1 :]!r}")
    return Line(measurement, dict(tags), fields, int(line[pos + 1 :]))


def parse_lines(text: str) -> list[Line]:
    return [parse(line) for line in text.splitlines() if line]
