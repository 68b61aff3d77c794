"""A plain reference parser for one InfluxDB line-protocol line, written from the spec.

It is deliberately independent of :mod:`ingest.lineprotocol` (no shared code or tables) and
deliberately strict, so property tests can use it as an oracle: whatever the encoder emits must
parse here to exactly the point that went in.

Grammar (InfluxDB 1.x)::

    line        = measurement *("," tag_key "=" tag_value) " " field *("," field) " " timestamp
    field       = field_key "=" field_value
    field_value = float | integer "i" | boolean | '"' string '"'

Escapes: in a measurement a backslash before ``,`` or space, and in tag keys, tag values and
field keys a backslash before ``,``, ``=`` or space, stands for that character; any other
backslash is literal. In a string field value ``\\"`` is ``"`` and ``\\\\`` is ``\\``; any
other backslash is literal. A line starting with ``#`` is a comment (an error here: it is no
point). A timestamp is required (the encoder always writes one).
"""

from __future__ import annotations

import re

FieldValue = float | int | bool | str

_MEASUREMENT_SPECIAL = frozenset(", ")
_KEY_SPECIAL = frozenset(",= ")
_TRUE = frozenset({"t", "T", "true", "True", "TRUE"})
_FALSE = frozenset({"f", "F", "false", "False", "FALSE"})
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]+")
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


class _Cursor:
    """Position in the decoded line."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def at_end(self) -> bool:
        return self.pos >= len(self.text)


def _read_name(cur: _Cursor, special: frozenset[str], stops: str, what: str) -> str:
    """Read an escaped name up to (not including) the first unescaped character in ``stops``."""
    out: list[str] = []
    text = cur.text
    while cur.pos < len(text):
        char = text[cur.pos]
        if char == "\\" and cur.pos + 1 < len(text) and text[cur.pos + 1] in special:
            out.append(text[cur.pos + 1])
            cur.pos += 2
            continue
        if char in stops:
            break
        if char in "\n\r":
            raise ValueError(f"line break in {what}")
        out.append(char)
        cur.pos += 1
    name = "".join(out)
    if not name:
        raise ValueError(f"empty {what} at offset {cur.pos}")
    return name


def _expect(cur: _Cursor, char: str) -> None:
    if cur.peek() != char:
        raise ValueError(f"expected {char!r} at offset {cur.pos}, got {cur.peek()!r}")
    cur.pos += 1


def _read_string(cur: _Cursor) -> str:
    """Read a double-quoted string value; the cursor is on the opening quote."""
    _expect(cur, '"')
    out: list[str] = []
    text = cur.text
    while True:
        if cur.pos >= len(text):
            raise ValueError("unterminated string field value")
        char = text[cur.pos]
        if char == "\\" and cur.pos + 1 < len(text) and text[cur.pos + 1] in '"\\':
            out.append(text[cur.pos + 1])
            cur.pos += 2
            continue
        if char == '"':
            cur.pos += 1
            return "".join(out)
        out.append(char)
        cur.pos += 1


def _read_bare(cur: _Cursor) -> str:
    """Read an unquoted field value up to ``,`` or space."""
    start = cur.pos
    while cur.pos < len(cur.text) and cur.text[cur.pos] not in ", ":
        cur.pos += 1
    return cur.text[start : cur.pos]


def _parse_value(token: str) -> FieldValue:
    if token in _TRUE:
        return True
    if token in _FALSE:
        return False
    if token.endswith("i"):
        digits = token[:-1]
        if not _INTEGER.fullmatch(digits):
            raise ValueError(f"bad integer {token!r}")
        number = int(digits)
        if not _INT64_MIN <= number <= _INT64_MAX:
            raise ValueError(f"integer out of range {token!r}")
        return number
    if not _FLOAT.fullmatch(token):
        raise ValueError(f"bad field value {token!r}")
    value = float(token)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"float out of range {token!r}")
    return value


def parse_line(line: bytes) -> tuple[str, dict[str, str], dict[str, FieldValue], int]:
    """Parse one line of line protocol.

    Args:
        line: the line, without its trailing newline.

    Returns:
        ``(measurement, tags, fields, timestamp_ns)`` with every escape resolved.

    Raises:
        ValueError: if the line is not exactly one valid point (including comments, invalid
            UTF-8, line breaks outside string values, duplicate keys, missing timestamp).
    """
    text = line.decode("utf-8")  # strict: invalid UTF-8 raises UnicodeDecodeError (ValueError)
    if text.startswith("#"):
        raise ValueError("comment line")
    cur = _Cursor(text)
    measurement = _read_name(cur, _MEASUREMENT_SPECIAL, ", ", "measurement")
    tags: dict[str, str] = {}
    while cur.peek() == ",":
        cur.pos += 1
        key = _read_name(cur, _KEY_SPECIAL, ",= ", "tag key")
        _expect(cur, "=")
        tag_value = _read_name(cur, _KEY_SPECIAL, ",= ", "tag value")
        if key in tags:
            raise ValueError(f"duplicate tag {key!r}")
        tags[key] = tag_value
    _expect(cur, " ")
    fields: dict[str, FieldValue] = {}
    while True:
        key = _read_name(cur, _KEY_SPECIAL, ",= ", "field key")
        _expect(cur, "=")
        if cur.peek() == '"':
            value: FieldValue = _read_string(cur)
        else:
            value = _parse_value(_read_bare(cur))
        if key in fields:
            raise ValueError(f"duplicate field {key!r}")
        fields[key] = value
        if cur.peek() != ",":
            break
        cur.pos += 1
    _expect(cur, " ")
    stamp = cur.text[cur.pos :]
    if not _INTEGER.fullmatch(stamp):
        raise ValueError(f"bad timestamp {stamp!r}")
    return measurement, tags, fields, int(stamp)
