"""InfluxDB line-protocol serialiser: one :class:`~edge.model.Reading` or Event to one line.

Escaping here is a security boundary. Tag and field strings come from devices and MQTT
payloads; a string that ends a line early, or swallows a separator, can forge a point or corrupt
its neighbours in the same batch. Every rule below was checked against the real servers this
gateway writes to, InfluxDB 1.6.7 and VictoriaMetrics 1.79.5 (the Debian packages), by writing
the raw bytes to ``/write`` and reading back what was stored.

Output::

    measurement,device=D,kind=K,site=S,zone=Z key=value[,key=value...] <ts_ns>

Tags are sorted by key, which is the order InfluxDB stores them in; timestamps are always
explicit nanoseconds, so a replayed point overwrites its first copy.

Escaping (the only transformations applied):

* measurement: ``,`` and space become ``\\,`` and ``\\ ``; ``=`` is left alone (InfluxDB
  stored ``n1=x`` as the measurement ``n1=x``, and would keep a backslash before it).
* tag values and field keys: ``,``, ``=`` and space become ``\\,``, ``\\=``, ``\\ ``.
* string field values: wrapped in ``"``; ``\\`` becomes ``\\\\`` and ``"`` becomes ``\\"``
  (InfluxDB unescapes exactly these two and keeps any other backslash: ``"a\\nb"`` was
  stored as the four characters ``a\\nb``).
* floats: Python's shortest round-trip ``repr`` (``1e+300``, ``5e-324``, ``-0.0`` were all
  accepted and read back exactly); ints: ``<n>i``; bools: ``true``/``false``.

Rejected with :class:`LineProtocolError` (never emitted), and why:

* LF anywhere. An unescaped LF in a tag value made InfluxDB answer 400 *and* store the
  tail as a forged point (``m,t=a<LF>b f=1i 1000`` created measurement ``b``);
  VictoriaMetrics did the same. ``\\<LF>`` is no escape: InfluxDB kept the backslash in the
  value and VictoriaMetrics still split the line. Inside a quoted string InfluxDB keeps a raw
  LF, but VictoriaMetrics splits lines before it looks at quotes: ``s="x<LF>forged,t=z f=9i
  <ts><LF>"`` stored a forged series ``forged_f{t="z"}``. There is no escape for LF in any
  position, so it is refused everywhere.
* CR anywhere. Both servers stored a raw CR in a tag value verbatim, but there is no escape
  for it either, and it ends a line for common splitters (``bytes.splitlines``, CRLF-aware
  tools, anything that bisects a rejected batch line by line); refusing it keeps "one point =
  one line" true for every reader. The output therefore never contains a CR or LF byte at all.
* a backslash in the measurement, a tag value or a field key. InfluxDB 1.6 cannot store a
  trailing backslash in a tag value or field key (``t=a\\ f=1i`` is 400 "invalid tag format")
  and treats a backslash before ``,``/``=``/space/``"`` differently in each position (in a
  field key ``a\\\\,b`` is 400, in a tag value it is stored as ``a\\,b``, in a measurement as
  ``a,b``); VictoriaMetrics reads ``\\\\`` as one backslash where InfluxDB keeps two. No single
  encoding means the same thing to both servers, and identities never need a backslash.
* a double quote in a field key. InfluxDB stores ``a"b=1i`` fine, but VictoriaMetrics takes
  the quote as the start of a quoted value: ``b=1i,"=2i <ts>`` stored ``"`` as 0 with the
  arrival time instead of ``<ts>``, and ``a"b=3i,c=4i`` lost ``c``, i.e. the rest of the line
  (string contents included) is parsed as something else. Escaping it as ``\\"`` keeps the
  structure but VictoriaMetrics then keeps the backslash in the name. (Quotes in measurements,
  tag values and string values are fine on both.)
* a measurement starting with ``#``: the whole line is a comment. InfluxDB answered 204 and
  stored nothing (so did VictoriaMetrics); ``\\#`` is stored with the backslash.
* a measurement or field key starting with a tab or NUL: InfluxDB skips both as whitespace
  at the start of a line and of the field section (``<TAB>m`` and ``<NUL>m`` were stored as
  measurement ``m``; a first field key ``<NUL><NUL>c`` as ``c``, and ``<NUL>`` alone as the
  empty key, read back as ``val0``). They are rejected in every field key, not just the one
  that happens to come first. Tabs and NULs elsewhere, and in tag values, are stored unchanged.
* a field key ``time``: InfluxDB answered 400 "invalid field name" for a point with only that
  field and, worse, 204 while silently dropping it when other fields were present.
  (VictoriaMetrics stored it.) ``Time`` is an ordinary key.
* empty measurement, tag value or field key, and a point with no fields: InfluxDB answered 400
  ("missing tag value", "missing fields").
* text that is not UTF-8 (lone surrogates): InfluxDB stored invalid UTF-8 as U+FFFD, i.e.
  silently changed the data.
* NaN and +/-Inf: line protocol has no spelling for them.
* ints outside int64: 400 "value out of range". Timestamps outside
  [-9223372036854775806, 9223372036854775806]: 400 "time outside range". ``bool`` timestamps.
* string values over 64 KiB of UTF-8 (InfluxDB 1.6 stored 1 MiB, but 64 KiB is its documented
  limit and a bound on what one point may cost the spool and the batch).
* a series key too long for InfluxDB: it refused ``len(measurement,tags) + 4 + len(field key)
  > 65535`` bytes with "max key length exceeded".

Allowed, and stored unchanged by both servers: NUL, tab and other control characters except
CR/LF (NUL and tab not at the start of a measurement or field key),
quotes (except in field keys), ``#`` after the start, leading and trailing spaces (escaped),
``=`` in measurements, and any other Unicode text. tests/integration/test_lineprotocol_influx.py
checks all of this against both servers with generated strings.

The encoder caches the escaped series prefix (measurement + tags) per 5-tuple and the escaped
field keys, both bounded (cleared when full), so the common case costs a few dict lookups and a
string join.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

from edge.model import Event, FieldValue, Reading

__all__ = ["LineEncoder", "LineProtocolError"]

MAX_STRING_BYTES: Final = 64 * 1024
"""Longest string field value accepted, in UTF-8 bytes."""

MAX_KEY_BYTES: Final = 65535
"""InfluxDB 1.x limit on series key + ``#!~#`` + field key, in bytes."""

MIN_TS_NS: Final = -9223372036854775806
MAX_TS_NS: Final = 9223372036854775806
_MIN_INT: Final = -(2**63)
_MAX_INT: Final = 2**63 - 1
_FIELD_SEPARATOR_BYTES: Final = 4  # InfluxDB joins series key and field key with b"#!~#"
_MAX_SHOWN: Final = 40
_isfinite: Final = math.isfinite
# InfluxDB skips these (and space, which we escape) before the measurement and the fields.
_SKIPPED_AT_START: Final = "\t\x00"

_MEASUREMENT_ESCAPES: Final = str.maketrans({",": "\\,", " ": "\\ "})
_KEY_ESCAPES: Final = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})


class LineProtocolError(ValueError):
    """A point that cannot be written; the message names the offending key."""


def _shown(text: str) -> str:
    """A short, safe ``repr`` of untrusted text for an error message."""
    if len(text) > _MAX_SHOWN:
        return repr(text[:_MAX_SHOWN]) + "..."
    return repr(text)


def _check_name(what: str, text: object) -> str:
    """Validate a measurement, tag value or field key; return it as an exact ``str``.

    Args:
        what: how to name it in an error, e.g. ``"tag 'site'"``.
        text: the value to check.

    Returns:
        ``text`` as a plain ``str``.

    Raises:
        LineProtocolError: if it is not a non-empty, backslash-free, CR/LF-free UTF-8 string.
    """
    if not isinstance(text, str):
        raise LineProtocolError(f"{what} must be a string, not {type(text).__name__}")
    text = str.__str__(text)
    if not text:
        raise LineProtocolError(f"{what} is empty")
    if "\n" in text or "\r" in text:
        raise LineProtocolError(f"{what} {_shown(text)} contains a line break (CR or LF)")
    if "\\" in text:
        raise LineProtocolError(f"{what} {_shown(text)} contains a backslash")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise LineProtocolError(
            f"{what} {_shown(text)} is not valid UTF-8 (lone surrogate)"
        ) from None
    return text


def _escape_string(key: str, value: str) -> str:
    """Quote a string field value.

    Args:
        key: the field key, for error messages.
        value: the value (an exact ``str``).

    Returns:
        The value with ``\\`` and ``"`` escaped, wrapped in double quotes.

    Raises:
        LineProtocolError: on CR/LF, or more than :data:`MAX_STRING_BYTES` of UTF-8.
    """
    if "\n" in value or "\r" in value:
        raise LineProtocolError(f"field {_shown(key)}: string value contains a line break")
    # A code point is at most 4 UTF-8 bytes: only long strings need the exact count.
    if len(value) * 4 > MAX_STRING_BYTES and (
        len(value.encode("utf-8", "surrogatepass")) > MAX_STRING_BYTES
    ):
        raise LineProtocolError(
            f"field {_shown(key)}: string value is longer than {MAX_STRING_BYTES} bytes"
        )
    if "\\" in value:
        value = value.replace("\\", "\\\\")
    if '"' in value:
        value = value.replace('"', '\\"')
    return f'"{value}"'


def _format_value(key: str, value: object) -> str:
    """Format any field value, including subclasses of the four types (the slow path).

    Args:
        key: the field key, for error messages.
        value: the value.

    Returns:
        The line-protocol text of the value.

    Raises:
        LineProtocolError: if the value has no line-protocol form.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        number = int.__index__(value)
        if not _MIN_INT <= number <= _MAX_INT:
            raise LineProtocolError(f"field {_shown(key)}: integer {number} is outside int64")
        return f"{number}i"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise LineProtocolError(f"field {_shown(key)}: {value!r} is not representable")
        return float.__repr__(value)
    if isinstance(value, str):
        return _escape_string(key, str.__str__(value))
    raise LineProtocolError(f"field {_shown(key)}: unsupported value type {type(value).__name__}")


class LineEncoder:
    """Serialises points to InfluxDB line protocol, caching escaped series and field keys.

    Safe to share between threads: the caches only ever map a key to its one correct value.

    Args:
        max_cached_series: how many series prefixes (and, separately, field keys) to keep; the
            cache is cleared when it is full.

    Raises:
        ValueError: if ``max_cached_series`` is less than 1.
    """

    __slots__ = ("_keys", "_max", "_series")

    def __init__(self, max_cached_series: int = 100_000) -> None:
        if max_cached_series < 1:
            raise ValueError("max_cached_series must be at least 1")
        self._max = max_cached_series
        # (measurement, device, kind, site, zone) -> ("escaped prefix ", key bytes left)
        self._series: dict[tuple[str, str, str, str, str], tuple[str, int]] = {}
        # field key -> ("escaped key=", its UTF-8 length)
        self._keys: dict[str, tuple[str, int]] = {}

    def encode(self, point: Reading | Event) -> bytes:
        """Serialise one point.

        Args:
            point: the reading or event.

        Returns:
            One line of UTF-8, without a trailing newline, with the timestamp in ns. It never
            contains a CR or LF byte.

        Raises:
            LineProtocolError: if the point cannot be written faithfully; nothing is emitted.
        """
        series_id = (point.measurement, point.device, point.kind, point.site, point.zone)
        try:
            prefix, room = self._series[series_id]
        except (KeyError, TypeError):
            prefix, room = self._add_series(series_id)
        fields = point.fields
        if not fields:
            raise LineProtocolError("point has no fields")
        keys = self._keys
        parts: list[str] = []
        append = parts.append
        for key, value in fields.items():
            try:
                escaped_key, key_len = keys[key]
            except (KeyError, TypeError):
                escaped_key, key_len = self._add_key(key)
            if key_len > room:
                raise LineProtocolError(
                    f"field {_shown(key)}: series key + field key exceed {MAX_KEY_BYTES} bytes"
                )
            # Exact types first (subclasses such as IntEnum or numpy.float64 may override
            # __repr__/__format__, so they take the slow path that calls the base methods).
            if type(value) is float:
                if not _isfinite(value):
                    raise LineProtocolError(f"field {_shown(key)}: {value!r} is not representable")
                append(escaped_key + repr(value))
            elif type(value) is int:
                if not _MIN_INT <= value <= _MAX_INT:
                    raise LineProtocolError(
                        f"field {_shown(key)}: integer {value} is outside int64"
                    )
                append(f"{escaped_key}{value}i")
            elif type(value) is str:
                append(escaped_key + _escape_string(key, value))
            else:
                append(escaped_key + _format_value(key, value))
        ts = point.ts_ns
        if type(ts) is not int:
            if isinstance(ts, bool) or not isinstance(ts, int):
                raise LineProtocolError(f"timestamp must be an int, not {type(ts).__name__}")
            ts = int.__index__(ts)
        if not MIN_TS_NS <= ts <= MAX_TS_NS:
            raise LineProtocolError(f"timestamp {ts} is outside InfluxDB's range")
        line = f"{prefix}{','.join(parts)} {ts}"
        try:
            return line.encode("utf-8")
        except UnicodeEncodeError:
            raise self._utf8_error(fields) from None

    def _add_series(self, series_id: tuple[object, ...]) -> tuple[str, int]:
        """Validate, escape and cache one series prefix (the slow path of :meth:`encode`).

        Args:
            series_id: (measurement, device, kind, site, zone) as found on the point.

        Returns:
            The escaped prefix with its trailing space, and how many bytes a field key may have.

        Raises:
            LineProtocolError: if the measurement or a tag value cannot be written.
        """
        measurement = _check_name("measurement", series_id[0])
        if measurement[0] == "#":
            raise LineProtocolError(
                f"measurement {_shown(measurement)} starts with '#' (a comment line)"
            )
        if measurement[0] in _SKIPPED_AT_START:
            raise LineProtocolError(f"measurement {_shown(measurement)} starts with a tab or NUL")
        device, kind, site, zone = (
            _check_name(f"tag {name!r}", value)
            for name, value in zip(("device", "kind", "site", "zone"), series_id[1:], strict=True)
        )
        prefix = (
            f"{measurement.translate(_MEASUREMENT_ESCAPES)}"
            f",device={device.translate(_KEY_ESCAPES)}"
            f",kind={kind.translate(_KEY_ESCAPES)}"
            f",site={site.translate(_KEY_ESCAPES)}"
            f",zone={zone.translate(_KEY_ESCAPES)}"
        )
        room = MAX_KEY_BYTES - _FIELD_SEPARATOR_BYTES - len(prefix.encode("utf-8"))
        if room < 1:
            raise LineProtocolError(
                f"series key (measurement {_shown(measurement)} + tags) exceeds"
                f" {MAX_KEY_BYTES} bytes"
            )
        entry = (prefix + " ", room)
        if len(self._series) >= self._max:
            self._series.clear()
        # Keyed by the validated exact strings: the lookup in encode() hits next time.
        self._series[(measurement, device, kind, site, zone)] = entry
        return entry

    def _add_key(self, key: object) -> tuple[str, int]:
        """Validate, escape and cache one field key.

        Args:
            key: the field key as found in the point's fields.

        Returns:
            The escaped key followed by ``=``, and the UTF-8 length of the escaped key.

        Raises:
            LineProtocolError: if the key cannot be written.
        """
        name = _check_name("field key", key)
        if name == "time":
            raise LineProtocolError("field key 'time' is reserved by InfluxDB")
        if name[0] in _SKIPPED_AT_START:
            raise LineProtocolError(f"field key {_shown(name)} starts with a tab or NUL")
        if '"' in name:
            raise LineProtocolError(f"field key {_shown(name)} contains a double quote")
        escaped = name.translate(_KEY_ESCAPES)
        entry = (escaped + "=", len(escaped.encode("utf-8")))
        if len(self._keys) >= self._max:
            self._keys.clear()
        self._keys[name] = entry
        return entry

    @staticmethod
    def _utf8_error(fields: Mapping[str, FieldValue]) -> LineProtocolError:
        """Name the string field that made the line unencodable.

        Args:
            fields: the point's field mapping.

        Returns:
            The error to raise.
        """
        for key, value in fields.items():
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return LineProtocolError(
                        f"field {_shown(str(key))}: string value is not valid UTF-8"
                        " (lone surrogate)"
                    )
        return LineProtocolError("point is not valid UTF-8")
