"""The InfluxDB schema: measurements, tags, and one fixed type and unit per field.

Why a module of its own: InfluxDB fixes a field's type the first time it is written to a shard;
a later point with ``temperature=21i`` after ``temperature=21.0`` is rejected as a *field type
conflict* and, with it, the rest of that point. The only defence is to decide every field's type
once, here, and coerce every decoder's output through :func:`coerce_field` before it reaches the
spool. The same table gives units (for dashboards and ``docs/schema.md``) and says which fields
are device health, which decoders split into a separate ``device`` point.

Rules (also in ``docs/schema.md``):

* Tags are always exactly ``site``, ``zone``, ``device``, ``kind``: bounded values from config and
  topics. Identifiers of people (card and plate pseudonyms) are fields, never tags.
* A known field has one type forever (``float``, ``int``, ``bool`` or ``str``). Numbers are
  ``float`` unless the table says ``int``.
* An unknown field keeps numbers (as ``float``, whatever the JSON spelling, so ``1`` then ``1.5``
  never conflict) and booleans; strings and anything else are dropped.
* Non-finite floats are rejected: line protocol has no NaN or infinity.

Exception tree (shared with :mod:`edge.decoders`, which re-exports it)::

    ValueError
     └── DecodeError(reason, detail)   bad input; ``reason`` is a bounded counter label

This module is pure: no I/O, no clock, and it imports nothing of ours, so both the decoders
(``edge``) and the line-protocol writer (``ingest``) can use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

FieldValue = float | int | bool | str
FieldType = type[float] | type[int] | type[bool] | type[str]

TAG_KEYS: Final = ("site", "zone", "device", "kind")
"""The tag set of every point, in this order; nothing else is ever a tag."""

MEASUREMENTS: Final = ("environment", "parking", "access", "device", "event")
EVENT_KINDS: Final = ("plate_read", "access")
"""Values of the ``kind`` tag on the ``event`` measurement."""

MAX_FIELD_NAME_LEN: Final = 64
MAX_FIELDS_PER_POINT: Final = 128
"""More fields than this in one message is a misbehaving device, not a schema: rejected."""
MAX_STR_LEN: Final = 2048
"""Longest string field value (a snapshot URL is the longest expected)."""

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One known field.

    Attributes:
        type: the field's only type in InfluxDB.
        unit: unit as shown in dashboards; ``""`` for booleans, strings and counts.
        measurement: where the field lives. ``device`` fields are split into their own point.
        description: one line for ``docs/schema.md``.
    """

    type: FieldType
    unit: str
    measurement: str
    description: str


def _f(unit: str, measurement: str, description: str) -> FieldSpec:
    return FieldSpec(float, unit, measurement, description)


def _i(unit: str, measurement: str, description: str) -> FieldSpec:
    return FieldSpec(int, unit, measurement, description)


def _b(measurement: str, description: str) -> FieldSpec:
    return FieldSpec(bool, "", measurement, description)


def _s(measurement: str, description: str) -> FieldSpec:
    return FieldSpec(str, "", measurement, description)


FIELDS: Final[Mapping[str, FieldSpec]] = {
    # environment
    "temperature": _f("°C", "environment", "air temperature"),
    "dew_point": _f("°C", "environment", "dew point"),
    "humidity": _f("%RH", "environment", "relative humidity"),
    "pressure": _f("hPa", "environment", "air pressure (station level)"),
    "pm1": _f("µg/m³", "environment", "PM1.0 mass concentration"),
    "pm25": _f("µg/m³", "environment", "PM2.5 mass concentration"),
    "pm10": _f("µg/m³", "environment", "PM10 mass concentration"),
    "co2": _f("ppm", "environment", "carbon dioxide"),
    "co": _f("ppm", "environment", "carbon monoxide concentration"),
    "gas_lel": _f("%LEL", "environment", "combustible gas, percent of lower explosive limit"),
    "voc": _f("ppb", "environment", "total volatile organic compounds"),
    "voc_index": _f("", "environment", "VOC index (Sensirion scale 1..500)"),
    "formaldehyde": _f("mg/m³", "environment", "formaldehyde (HCHO)"),
    "noise_dba": _f("dB(A)", "environment", "A-weighted sound level"),
    "illuminance": _f("lx", "environment", "illuminance"),
    "gas_resistance": _f("kΩ", "environment", "metal-oxide gas sensor resistance (BME680)"),
    "smoke": _b("environment", "smoke alarm active"),
    "water_leak": _b("environment", "water leak detected"),
    "gas_alarm": _b("environment", "binary combustible gas alarm active"),
    "co_alarm": _b("environment", "binary carbon monoxide alarm active"),
    # parking
    "occupied": _b("parking", "bay (or room) occupied; Zigbee2MQTT `occupancy`"),
    "spaces_free": _i("", "parking", "free spaces in a lot or zone"),
    "spaces_occupied": _i("", "parking", "occupied spaces in a lot or zone"),
    "spaces_total": _i("", "parking", "capacity of a lot or zone"),
    "distance": _f("cm", "parking", "ultrasonic distance to the nearest object"),
    # access
    "contact_open": _b("access", "door or window open (magnet away from the contact)"),
    "locked": _b("access", "lock engaged"),
    "rex": _b("access", "request-to-exit button pressed"),
    "tamper": _b("access", "enclosure tamper switch triggered"),
    # device health
    "battery": _f("%", "device", "battery level"),
    "battery_low": _b("device", "battery low flag reported by the device"),
    "linkquality": _i("", "device", "Zigbee link quality indicator, 0..255"),
    "rssi": _f("dBm", "device", "received signal strength of the uplink"),
    "snr": _f("dB", "device", "signal-to-noise ratio of the uplink"),
    "fcnt": _i("", "device", "LoRaWAN uplink frame counter"),
    # events
    "plate_pseudonym": _s("event", "keyed HMAC pseudonym of a licence plate"),
    "lane": _s("event", "lane or camera position"),
    "direction": _s("event", "`in` or `out`"),
    "confidence": _f("", "event", "recognition confidence, 0..1"),
    "snapshot_url": _s("event", "evidence image URL, credentials removed"),
    "door": _s("event", "door id as reported by the controller"),
    "card_pseudonym": _s("event", "keyed HMAC pseudonym of a card number"),
    "result": _s("event", "`granted` or `denied`"),
    "reason": _s("event", "controller's reason for the result"),
    "redacted": _b("event", "a field was withheld because it contained the raw identifier"),
}

FIELD_TYPES: Final[Mapping[str, FieldType]] = {n: s.type for n, s in FIELDS.items()}
FIELD_UNITS: Final[Mapping[str, str]] = {n: s.unit for n, s in FIELDS.items()}
DEVICE_FIELDS: Final = frozenset(n for n, s in FIELDS.items() if s.measurement == "device")
"""Health fields: decoders put them in a separate ``device`` point."""

_RESERVED_FIELD_NAMES: Final = frozenset({"time", *TAG_KEYS})


class DecodeError(ValueError):
    """A payload (or a value in it) that cannot become a point.

    ``reason`` is a short, bounded label used as a counter / quarantine reason (``invalid_json``,
    ``not_an_object``, ``too_large``, ``too_deep``, ``non_finite``, ``wrong_type``,
    ``no_fields``, ``bad_timestamp``, ``no_decoded_object``, ``unknown_topic``, ``bad_field``).
    ``detail`` names fields and limits but never contains a value from the payload: values may be
    personal data (plates, card numbers) and errors end up in logs.
    """

    __slots__ = ("detail", "reason")

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[DecodeError], tuple[str, str]]:
        return (DecodeError, (self.reason, self.detail))


def is_valid_field_name(name: str) -> bool:
    """True if ``name`` may be a field key: ASCII identifier, at most 64 characters, not
    starting with ``_`` (reserved by InfluxDB 2+), not ``time`` and not a tag key."""
    return (
        0 < len(name) <= MAX_FIELD_NAME_LEN
        and name.isascii()
        and name.isidentifier()
        and name[0] != "_"
        and name not in _RESERVED_FIELD_NAMES
    )


def _coerce_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise DecodeError("wrong_type", f"{name}: expected a string, got {type(value).__name__}")
    if len(value) > MAX_STR_LEN:
        raise DecodeError("bad_field", f"{name}: string longer than {MAX_STR_LEN} characters")
    # Control characters cannot be written safely in line protocol (an unescaped LF forged a point
    # in InfluxDB 1.6); lone surrogates cannot be encoded as UTF-8. isprintable() rejects both.
    if not value.isprintable():
        raise DecodeError("bad_field", f"{name}: string contains unprintable characters")
    return value


def coerce_field(name: str, value: object) -> FieldValue | None:
    """The value to store for field ``name``, or ``None`` to leave the field out.

    Known fields (in :data:`FIELD_TYPES`) are converted to their one type: numbers to ``float``,
    integers (or integral floats up to 2**53) to ``int`` (within int64), ``bool`` only from
    ``true``/``false`` or the integers ``0``/``1``, ``str`` only from strings (printable, at
    most :data:`MAX_STR_LEN`). ``None`` (JSON ``null``, which devices send for "not measured
    yet") leaves the field out.

    Unknown fields: numbers become ``float``, booleans stay ``bool``, anything else is dropped
    (``None``). The caller checks unknown names with :func:`is_valid_field_name`.

    Raises:
        DecodeError: ``wrong_type`` if a known field has an incompatible type (``"hot"`` or
            ``true`` for ``temperature``), ``non_finite`` for NaN/infinity or a number too large
            for a float, ``bad_field`` for an int out of int64 or a bad string.
    """
    ftype = FIELD_TYPES.get(name)
    if ftype is float or ftype is None:
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            raise DecodeError("non_finite", f"{name}: not a finite number")
        if isinstance(value, bool):
            if ftype is None:
                return value
            raise DecodeError("wrong_type", f"{name}: expected a number, got bool")
        if isinstance(value, int):
            try:
                return float(value)
            except OverflowError:
                raise DecodeError("non_finite", f"{name}: number too large for a float") from None
        if value is None or ftype is None:
            return None
        raise DecodeError("wrong_type", f"{name}: expected a number, got {type(value).__name__}")
    if value is None:
        return None
    if ftype is bool:
        if isinstance(value, bool):
            return value
        # Many hand-written firmwares send 0/1 for alarms; nothing else is a boolean.
        if type(value) is int and (value == 0 or value == 1):
            return value == 1
        raise DecodeError("wrong_type", f"{name}: expected a boolean, got {type(value).__name__}")
    if ftype is int:
        if type(value) is int:  # the common case, first
            if INT64_MIN <= value <= INT64_MAX:
                return value
            raise DecodeError("bad_field", f"{name}: integer out of int64 range")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DecodeError(
                "wrong_type", f"{name}: expected an integer, got {type(value).__name__}"
            )
        if isinstance(value, float):
            if not math.isfinite(value):
                raise DecodeError("non_finite", f"{name}: not a finite number")
            if not value.is_integer():
                raise DecodeError("wrong_type", f"{name}: expected an integer, got a fraction")
            # Beyond 2**53 a double no longer holds every integer: JSON 2**63 + 1 parsed as a
            # float would be stored as a different number.
            if abs(value) > 2.0**53:
                raise DecodeError("bad_field", f"{name}: integer too large to be exact")
            value = int(value)
        if not INT64_MIN <= value <= INT64_MAX:
            raise DecodeError("bad_field", f"{name}: integer out of int64 range")
        return int(value)
    return _coerce_str(name, value)
