"""Payload decoders: MQTT and HTTP bytes → readings and events (:mod:`edge.model`).

Why this module exists: every message the gateway accepts passes through exactly one of these
functions, so this is where untrusted bytes become typed points. It therefore owns three promises:

* **Bad input is a clear, counted error, never a crash.** Anything wrong raises
  :class:`DecodeError` with a bounded ``reason`` (the quarantine / counter label); no other
  exception escapes for any input bytes (property-tested).
* **The schema holds.** Every field goes through :func:`ingest.schema.coerce_field`, so a field has
  one type forever and no NaN/infinity reaches line protocol.
* **Personal data stays in.** Plates and card numbers leave as keyed pseudonyms only; error
  details name fields, never values from the payload.

The decoders are pure (no I/O, no clock: ``now_ns`` is passed in) and sized for the hot path: a
typical 3-field JSON message costs a few microseconds (orjson, one pass, no regex on the hot path).

Exception tree::

    ValueError
     ├── DecodeError(reason, detail)   a payload that cannot become a point (from ingest.schema)
     └── (plain ValueError)            a bad Route or decoder configuration: raised at set-up time

Payload formats (see ``docs/schema.md`` for the mapping tables):

* ``json``: any JSON object; ``Route.field_map`` picks and renames (dotted paths), otherwise every
  top-level number and boolean is a field.
* ``zigbee2mqtt``: a device state object; known attributes renamed, ``contact`` inverted into
  ``contact_open``.
* ``chirpstack``: a ChirpStack v4 uplink event; the codec's ``object`` plus ``fCnt``/radio metadata.
* ``tasmota``: a ``tele/<topic>/SENSOR`` message; Tasmota's names lower-cased, °F converted.

Health fields (:data:`ingest.schema.DEVICE_FIELDS`: battery, linkquality, rssi, snr, fcnt, ...) go
into a second reading with measurement ``device``, whichever decoder found them, so a battery
alert has one place to look.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date
from types import MappingProxyType
from typing import Any, Final, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import orjson

from edge.model import Event, FieldValue, Reading
from edge.pseudonym import normalize_plate
from ingest.schema import (
    DEVICE_FIELDS,
    FIELD_TYPES,
    INT64_MAX,
    MAX_FIELDS_PER_POINT,
    MEASUREMENTS,
    DecodeError,
    coerce_field,
    is_valid_field_name,
)

__all__ = [
    "DECODERS",
    "DECODERS_USING_FIELD_MAP",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_DEPTH",
    "DecodeError",
    "Decoder",
    "Pseudonymize",
    "Route",
    "decode_access_event",
    "decode_chirpstack",
    "decode_json",
    "decode_plate_event",
    "decode_tasmota",
    "decode_zigbee2mqtt",
    "loads_strict",
    "make_decoder",
]

DEFAULT_MAX_BYTES: Final = 65536
DEFAULT_MAX_DEPTH: Final = 16
ORJSON_MAX_DEPTH: Final = 1024
"""orjson refuses deeper documents itself; a configured limit above it could not be honoured."""

MIN_TIMESTAMP_NS: Final = 946_684_800 * 10**9
"""2000-01-01T00:00:00Z: anything earlier is a device whose clock was never set."""
MAX_FUTURE_NS: Final = 86_400 * 10**9
"""A device clock more than a day ahead of the gateway is wrong, not early."""

TIMESTAMP_UNITS: Final[Mapping[str, int]] = MappingProxyType(
    {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}
)
MAX_TAG_LEN: Final = 256
MAX_PLATE_LEN: Final = 32
MAX_CARD_LEN: Final = 64

DECODERS_USING_FIELD_MAP: Final = frozenset({"json", "chirpstack"})
"""Decoders that read ``Route.field_map``; zigbee2mqtt and tasmota use their built-in tables,
so a configuration giving them a field map should be rejected by the config loader."""

Pseudonymize = Callable[[str, str], str]
"""``(kind, value) -> pseudonym``, e.g. an :class:`edge.pseudonym.Pseudonymizer`."""


# --------------------------------------------------------------------------------------- routes


def _check_tag(name: str, value: str) -> None:
    # Tag values come from topics (a Zigbee friendly name, a DevEUI): a control character cannot
    # be escaped in line protocol, so such a topic is refused here, once per topic.
    if not isinstance(value, str) or not value:
        raise DecodeError("unknown_topic", f"tag {name} is empty or not a string")
    if len(value) > MAX_TAG_LEN or not value.isprintable():
        raise DecodeError(
            "unknown_topic", f"tag {name} is longer than {MAX_TAG_LEN} or has control characters"
        )


@dataclass(frozen=True, slots=True)
class Route:
    """What a topic (or HTTP path) says about its messages, plus static config; built once per
    topic and reused for every message on it.

    Attributes:
        measurement: measurement of the main reading (``environment``, ``parking``, ``access``,
            ``device``; ``event`` for the HTTP event decoders, which set it themselves).
        site, zone, device, kind: the four tags.
        field_map: source key → schema field name. Keys may be dotted paths into nested objects
            (``sensor.temp``, ``rxInfo.0.rssi``); a key containing a literal dot is tried as
            such first. Empty means "every top-level number and boolean".
        timestamp_field: payload key holding the point time, or ``None`` for the gateway's time.
        timestamp_unit: unit of a numeric timestamp: ``s``, ``ms``, ``us`` or ``ns``. ISO-8601 /
            RFC 3339 strings with a UTC offset are accepted whatever the unit.

    Raises:
        DecodeError: ``unknown_topic`` if a tag is empty, over 256 characters, or has control
            characters (tags usually come from the topic).
        ValueError: bad static configuration (measurement, unit, field map targets).
    """

    measurement: str
    site: str
    zone: str
    device: str
    kind: str
    # Not hashed (a mapping is not hashable) but compared, so a Route can key a dict.
    field_map: Mapping[str, str] = field(default_factory=dict, hash=False)
    timestamp_field: str | None = None
    timestamp_unit: str = "s"
    paths: tuple[tuple[str, tuple[str, ...], str], ...] = field(
        init=False, repr=False, compare=False
    )
    """``(source key, split path, target)`` per field_map entry, prepared once."""

    def __post_init__(self) -> None:
        if self.measurement not in MEASUREMENTS:
            raise ValueError(f"measurement must be one of {', '.join(MEASUREMENTS)}")
        _check_tag("site", self.site)
        _check_tag("zone", self.zone)
        _check_tag("device", self.device)
        _check_tag("kind", self.kind)
        if self.timestamp_unit not in TIMESTAMP_UNITS:
            raise ValueError(f"timestamp_unit must be one of {', '.join(TIMESTAMP_UNITS)}")
        if self.timestamp_field is not None and not self.timestamp_field:
            raise ValueError("timestamp_field must be a key or None")
        paths = []
        for source, target in self.field_map.items():
            if not source or not is_valid_field_name(target):
                raise ValueError(f"field_map: bad entry for target {target!r}")
            paths.append((source, tuple(source.split(".")), target))
        # Frozen: a copy nobody else holds, so the route cannot change under a running decoder.
        object.__setattr__(self, "field_map", MappingProxyType(dict(self.field_map)))
        object.__setattr__(self, "paths", tuple(paths))


# ----------------------------------------------------------------------------------- JSON layer


def _nesting_exceeds(obj: Any, max_depth: int) -> bool:
    # Iterative on purpose: orjson accepts 1,024 levels, Python's recursion limit is 1,000.
    if type(obj) is not dict and type(obj) is not list:
        return False
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return True
        for child in node.values() if type(node) is dict else node:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return False


def loads_strict(payload: bytes, max_bytes: int, max_depth: int) -> Any:
    """Parse JSON with limits; every failure is a :class:`DecodeError`.

    * ``too_large``: more than ``max_bytes`` bytes, refused before parsing.
    * ``too_deep``: objects/arrays nested deeper than ``max_depth`` (top level = 1). Checked
      only when the payload has more brackets than ``max_depth`` (two ``bytes.count`` calls), so a
      typical message pays nothing; orjson itself stops at 1,024 levels.
    * ``non_finite``: ``NaN``/``Infinity`` tokens, or a number that overflows a double such as
      ``1e400`` (orjson refuses it rather than returning ``inf``, unlike ``json``).
    * ``invalid_json``: anything else orjson refuses (including invalid UTF-8 and lone
      surrogates). The detail gives orjson's message and the byte offset, never the content.
    """
    if len(payload) > max_bytes:
        raise DecodeError("too_large", f"payload of {len(payload)} bytes exceeds {max_bytes}")
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise _json_error(payload, exc) from None
    if (
        payload.count(b"[") + payload.count(b"{") > max_depth
        and _nesting_exceeds(obj, max_depth)
    ):
        raise DecodeError("too_deep", f"nesting deeper than {max_depth}")
    return obj


def _json_error(payload: bytes, exc: orjson.JSONDecodeError) -> DecodeError:
    msg = exc.msg
    if msg.startswith("number is infinity"):
        return DecodeError("non_finite", f"number overflows a double at byte {exc.pos}")
    if msg.startswith("depth limit exceeded"):
        return DecodeError("too_deep", f"nesting deeper than {ORJSON_MAX_DEPTH}")
    token = bytes(payload[exc.pos : exc.pos + 3]).lower()
    if token in (b"nan", b"inf"):
        return DecodeError("non_finite", f"NaN or Infinity token at byte {exc.pos}")
    return DecodeError("invalid_json", f"{msg} at byte {exc.pos}")


def _load_object(payload: bytes, max_bytes: int, max_depth: int) -> dict[str, Any]:
    obj = loads_strict(payload, max_bytes, max_depth)
    if type(obj) is not dict:
        raise DecodeError("not_an_object", f"top level is a JSON {_json_type(obj)}")
    return obj


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(value), "number"
    )


# ----------------------------------------------------------------------------------- timestamps

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:[.,]([0-9]{1,9})[0-9]*)?"
    r"(?:([Zz])|([+-])([0-9]{2}):?([0-9]{2}))?",
    re.ASCII,
)
_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()


def parse_rfc3339_ns(text: str) -> int:
    """Nanoseconds since the epoch for an RFC 3339 / ISO-8601 date-time with a UTC offset.

    Keeps all nine fractional digits (ChirpStack sends nanoseconds; ``datetime`` would cut them
    to microseconds) and truncates beyond. A time without ``Z`` or an offset is refused: its
    meaning depends on a time zone the payload does not state.

    Raises:
        DecodeError: ``bad_timestamp``.
    """
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise DecodeError("bad_timestamp", "not an RFC 3339 date-time")
    year, month, day, hour, minute, second, frac, zulu, sign, off_h, off_m = m.groups()
    if zulu is None and sign is None:
        raise DecodeError("bad_timestamp", "date-time has no UTC offset")
    try:
        days = date(int(year), int(month), int(day)).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        raise DecodeError("bad_timestamp", "no such calendar date") from None
    h, mi, s = int(hour), int(minute), int(second)
    if h > 23 or mi > 59 or s > 60:  # 60: a leap second, as RFC 3339 allows
        raise DecodeError("bad_timestamp", "time of day out of range")
    seconds = days * 86_400 + h * 3_600 + mi * 60 + s
    if sign is not None:
        oh, om = int(off_h), int(off_m)
        if oh > 23 or om > 59:
            raise DecodeError("bad_timestamp", "UTC offset out of range")
        offset = oh * 3_600 + om * 60
        seconds = seconds - offset if sign == "+" else seconds + offset
    nanos = int(frac.ljust(9, "0")) if frac else 0
    return seconds * 1_000_000_000 + nanos


def _timestamp_ns(value: object, unit: str, now_ns: int) -> int:
    """Point time from a payload value (number in ``unit`` or RFC 3339 string), bounds-checked."""
    if isinstance(value, bool):
        raise DecodeError("bad_timestamp", "timestamp is a JSON boolean")
    if isinstance(value, int):
        ns = value * TIMESTAMP_UNITS[unit]
    elif isinstance(value, float):
        scale = TIMESTAMP_UNITS[unit]
        if not MIN_TIMESTAMP_NS <= value * scale <= INT64_MAX:  # also catches a non-finite value
            raise DecodeError("bad_timestamp", "timestamp out of range")
        # Whole and fractional parts separately: 1.7e18 as a double is only good to 256 ns.
        whole = int(value)
        ns = whole * scale + round((value - whole) * scale)
    elif isinstance(value, str):
        ns = parse_rfc3339_ns(value)
    else:
        raise DecodeError("bad_timestamp", f"timestamp is a JSON {_json_type(value)}")
    if ns < MIN_TIMESTAMP_NS:
        raise DecodeError("bad_timestamp", "timestamp before 2000-01-01")
    # A gateway clock before 2000 is not synchronised yet (boot without RTC): then only the
    # int64 limit applies, rather than rejecting every correct device clock.
    if ns > INT64_MAX or (now_ns >= MIN_TIMESTAMP_NS and ns > now_ns + MAX_FUTURE_NS):
        raise DecodeError("bad_timestamp", "timestamp more than a day in the future")
    return ns


def _route_timestamp(route: Route, obj: dict[str, Any], now_ns: int) -> int:
    key = route.timestamp_field
    if key is None:
        return now_ns
    value = obj.get(key)
    if value is None:
        return now_ns
    return _timestamp_ns(value, route.timestamp_unit, now_ns)


# ------------------------------------------------------------------------------------ readings

_PLATE_KEYS: Final = ("plate", "plate_number", "license_plate", "plateNumber", "licensePlate")
_CARD_KEYS: Final = ("card", "card_number", "card_no", "cardNumber", "cardNo")
_PERSONAL_KEYS: Final = frozenset(k.lower() for k in (*_PLATE_KEYS, *_CARD_KEYS, "pin"))
"""Keys that name personal identifiers: never stored as plain fields, even as numbers (a numeric
card number would otherwise pass as an unknown float field)."""


def _is_scalar(value: object) -> bool:
    return type(value) is float or type(value) is int or type(value) is bool


def _is_storable_name(key: str) -> bool:
    """An unknown key that may become a field: a valid name that is not a personal identifier."""
    return is_valid_field_name(key) and key.lower() not in _PERSONAL_KEYS


def _put(name: str, value: object, fields: dict[str, FieldValue],
         health: dict[str, FieldValue]) -> None:
    coerced = coerce_field(name, value)
    if coerced is None:
        return
    if name in DEVICE_FIELDS:
        health[name] = coerced
    else:
        fields[name] = coerced


def _readings(route: Route, fields: dict[str, FieldValue], health: dict[str, FieldValue],
              ts_ns: int) -> list[Reading]:
    if route.measurement == "device" and health:
        fields.update(health)
        health = {}
    if len(fields) > MAX_FIELDS_PER_POINT or len(health) > MAX_FIELDS_PER_POINT:
        raise DecodeError("too_large", f"more than {MAX_FIELDS_PER_POINT} fields")
    out: list[Reading] = []
    if fields:
        out.append(Reading(route.measurement, route.site, route.zone, route.device, route.kind,
                           fields, ts_ns))
    if health:
        out.append(Reading("device", route.site, route.zone, route.device, route.kind,
                           health, ts_ns))
    if not out:
        raise DecodeError("no_fields", "payload has no usable fields")
    return out


def _lookup(obj: dict[str, Any], key: str, path: tuple[str, ...]) -> Any:
    value = obj.get(key)
    if value is not None or len(path) == 1:
        return value
    node: Any = obj
    for segment in path:
        if type(node) is dict:
            node = node.get(segment)
        elif type(node) is list and segment.isascii() and segment.isdigit():
            index = int(segment)
            node = node[index] if index < len(node) else None
        else:
            return None
        if node is None:
            return None
    return node


def _extract(route: Route, obj: dict[str, Any], skip: str | None,
             fields: dict[str, FieldValue], health: dict[str, FieldValue]) -> None:
    """Fields of a generic object: the route's field map, or every top-level number/boolean."""
    if route.paths:
        for key, path, target in route.paths:
            value = _lookup(obj, key, path)
            if value is not None and target not in _PERSONAL_KEYS:
                _put(target, value, fields, health)
        return
    # The per-message hot path: _put inlined.
    for key, value in obj.items():
        if key == skip:
            continue
        # Known names always go through coerce_field, so "temperature": "hot" is an error
        # rather than silently missing.
        if key in FIELD_TYPES or (_is_scalar(value) and _is_storable_name(key)):
            coerced = coerce_field(key, value)
            if coerced is not None:
                if key in DEVICE_FIELDS:
                    health[key] = coerced
                else:
                    fields[key] = coerced


def decode_json(route: Route, payload: bytes, now_ns: int, *,
                max_bytes: int = DEFAULT_MAX_BYTES,
                max_depth: int = DEFAULT_MAX_DEPTH) -> list[Reading]:
    """Generic JSON object → readings.

    With ``route.field_map`` only the mapped keys (dotted paths allowed) are read, renamed;
    without it every top-level number and boolean whose key is a valid field name (other keys
    are dropped). Known fields with the wrong type are an error. The point time comes from
    ``route.timestamp_field`` if set and present, else ``now_ns``.

    Raises:
        DecodeError: see :func:`loads_strict`, plus ``not_an_object``, ``wrong_type``,
            ``bad_field``, ``bad_timestamp``, ``no_fields``.
    """
    obj = _load_object(payload, max_bytes, max_depth)
    ts_ns = _route_timestamp(route, obj, now_ns)
    fields: dict[str, FieldValue] = {}
    health: dict[str, FieldValue] = {}
    _extract(route, obj, route.timestamp_field, fields, health)
    return _readings(route, fields, health, ts_ns)


# ---------------------------------------------------------------------------------- Zigbee2MQTT

_Z2M_NAMES: Final[Mapping[str, str]] = {
    "temperature": "temperature",
    "humidity": "humidity",
    "pressure": "pressure",
    "co2": "co2",
    "co": "co",
    "pm1": "pm1",
    "pm25": "pm25",
    "pm10": "pm10",
    "voc": "voc",
    "voc_index": "voc_index",
    "formaldehyd": "formaldehyde",  # sic: Zigbee2MQTT's spelling for Tuya air boxes
    "formaldehyde": "formaldehyde",
    "noise": "noise_dba",
    "illuminance_lux": "illuminance",
    "illuminance": "illuminance",
    "battery": "battery",
    "battery_low": "battery_low",
    "linkquality": "linkquality",
    "occupancy": "occupied",
    "water_leak": "water_leak",
    "smoke": "smoke",
    "gas": "gas_alarm",  # a binary alarm on Zigbee gas detectors
    "carbon_monoxide": "co_alarm",  # likewise binary
    "tamper": "tamper",
}
# Numeric bookkeeping that is not a measurement (last_seen may be epoch ms; elapsed is ms since
# the previous message). Strings and objects (update, action, color...) are dropped anyway.
_Z2M_IGNORED: Final = frozenset({"last_seen", "elapsed", "update_available"})


def decode_zigbee2mqtt(route: Route, payload: bytes, now_ns: int, *,
                       max_bytes: int = DEFAULT_MAX_BYTES,
                       max_depth: int = DEFAULT_MAX_DEPTH) -> list[Reading]:
    """Zigbee2MQTT device state (``zigbee2mqtt/<friendly_name>``) → readings.

    Known attributes are renamed to the schema (``occupancy`` → ``occupied``, ``gas`` →
    ``gas_alarm``, ...). ``contact`` is true when the magnet is *at* the reed switch, i.e. the
    door is closed, so it is stored inverted as ``contact_open``. Other numeric/boolean
    attributes pass through as unknown fields; strings and objects are dropped. Battery and link
    quality go to a separate ``device`` reading. Zigbee2MQTT 1.x sends a raw ``illuminance`` next
    to ``illuminance_lux``; only the lux value is kept then. ``route.field_map`` is not used.

    Raises:
        DecodeError: as :func:`decode_json`.
    """
    obj = _load_object(payload, max_bytes, max_depth)
    ts_field = route.timestamp_field
    ts_ns = _route_timestamp(route, obj, now_ns)
    fields: dict[str, FieldValue] = {}
    health: dict[str, FieldValue] = {}
    for key, value in obj.items():
        name = _Z2M_NAMES.get(key)
        if name is not None:
            if key == "illuminance" and "illuminance_lux" in obj:
                continue
            _put(name, value, fields, health)
        elif key == "contact":
            closed = coerce_field("contact_open", value)
            if closed is not None:
                fields["contact_open"] = not closed
        elif key in _Z2M_IGNORED or key == ts_field:
            continue
        elif _is_scalar(value) and _is_storable_name(key):
            _put(key, value, fields, health)
    return _readings(route, fields, health, ts_ns)


# ----------------------------------------------------------------------------------- ChirpStack


def decode_chirpstack(route: Route, payload: bytes, now_ns: int, *,
                      max_bytes: int = DEFAULT_MAX_BYTES,
                      max_depth: int = DEFAULT_MAX_DEPTH) -> list[Reading]:
    """ChirpStack v4 uplink event (``application/<id>/device/<dev_eui>/event/up``) → readings.

    Fields come from ``object``, the output of the device profile's codec, read like
    :func:`decode_json` reads a payload (``route.field_map`` applies to it). ``fCnt`` becomes the
    integer ``fcnt`` (gap accounting) and the first gateway's ``rssi``/``snr`` join it in the
    ``device`` reading. The device tag is ``route.device`` (from the topic's DevEUI, which the
    broker ACL vouches for), not the payload's ``deviceInfo``. Time: ``time`` (RFC 3339, up to
    nanoseconds), else ``now_ns``.

    Raises:
        DecodeError: ``no_decoded_object`` when the profile has no codec (no ``object``), plus
            the reasons of :func:`decode_json`.
    """
    obj = _load_object(payload, max_bytes, max_depth)
    decoded = obj.get("object")
    if decoded is None:
        raise DecodeError("no_decoded_object", "uplink has no decoded 'object' (no codec set?)")
    if type(decoded) is not dict:
        raise DecodeError("wrong_type", f"object: expected an object, got {_json_type(decoded)}")
    time_value = obj.get("time")
    ts_ns = now_ns if time_value is None else _timestamp_ns(time_value, "s", now_ns)
    fields: dict[str, FieldValue] = {}
    health: dict[str, FieldValue] = {}
    _extract(route, decoded, None, fields, health)
    fcnt = obj.get("fCnt")
    if fcnt is not None:
        _put("fcnt", fcnt, fields, health)
    rx_info = obj.get("rxInfo")
    if type(rx_info) is list and rx_info and type(rx_info[0]) is dict:
        first = rx_info[0]
        _put("rssi", first.get("rssi"), fields, health)
        _put("snr", first.get("snr"), fields, health)
    return _readings(route, fields, health, ts_ns)


# -------------------------------------------------------------------------------------- Tasmota

_TASMOTA_NAMES: Final[Mapping[str, str]] = {
    "Temperature": "temperature",
    "Humidity": "humidity",
    "DewPoint": "dew_point",
    "Pressure": "pressure",
    "PM1": "pm1",
    "PM2.5": "pm25",
    "PM10": "pm10",
    "CarbonDioxide": "co2",
    "TVOC": "voc",
    "Illuminance": "illuminance",
    "Gas": "gas_resistance",  # BME680: resistance in kΩ, not a concentration
    "Distance": "distance",
    "SeaPressure": "sea_pressure",
}
_TASMOTA_META: Final = frozenset({"Time", "TempUnit", "PressureUnit", "SpeedUnit", "Epoch"})
_TEMPERATURE_NAMES: Final = frozenset({"temperature", "dew_point"})
_PRESSURE_NAMES: Final = frozenset({"pressure", "sea_pressure"})
_PRESSURE_TO_HPA: Final[Mapping[str, float]] = {
    "hPa": 1.0,
    "mmHg": 1.333_223_684,
    "inHg": 33.863_886,
}
_NON_NAME_CHARS = re.compile(r"[^a-z0-9_]+")


def _tasmota_name(key: str) -> str:
    name = _TASMOTA_NAMES.get(key)
    if name is not None:
        return name
    # "CF2.5" → "cf2_5", "DS18B20-1" → "ds18b20_1"; an invalid result is dropped by the caller.
    return _NON_NAME_CHARS.sub("_", key.lower())


def _tasmota_wanted(key: str, value: object) -> bool:
    # Tasmota mixes strings into sensor objects ("Id" of a DS18B20, "Switch1": "ON"): dropped.
    # A known measurement with a non-number ("Temperature": "21") is a fault and goes on to
    # coerce_field, which refuses it.
    return _is_scalar(value) or (key in _TASMOTA_NAMES and value is not None)


def decode_tasmota(route: Route, payload: bytes, now_ns: int, *,
                   max_bytes: int = DEFAULT_MAX_BYTES,
                   max_depth: int = DEFAULT_MAX_DEPTH) -> list[Reading]:
    """Tasmota ``tele/<topic>/SENSOR`` → readings.

    Each sensor object's (and the top level's) numbers and booleans become fields, Tasmota names
    mapped (``PM2.5`` → ``pm25``, ``CarbonDioxide`` → ``co2``) or lower-cased. If two sensors
    report the same key (an AM2301 and a DS18B20 both give ``Temperature``), every copy is
    prefixed with its sensor's name (``am2301_temperature``, ``ds18b20_temperature``) rather
    than one silently overwriting the other. ``TempUnit: "F"`` converts temperatures to °C;
    ``PressureUnit`` mmHg/inHg converts to hPa.

    Time is always ``now_ns``: Tasmota's ``Time`` is local time without a UTC offset (its
    ``Timezone`` setting, DST rules and whether NTP ever succeeded are unknown here), while the
    message is published within milliseconds of the reading, so the gateway's clock is the more
    accurate of the two. ``route.field_map`` is not used.

    Raises:
        DecodeError: ``bad_field`` for an unknown ``TempUnit`` or ``PressureUnit``, plus the
            reasons of :func:`decode_json`.
    """
    obj = _load_object(payload, max_bytes, max_depth)
    temp_unit = obj.get("TempUnit", "C")
    if temp_unit != "C" and temp_unit != "F":
        raise DecodeError("bad_field", "TempUnit: expected C or F")
    pressure_unit = obj.get("PressureUnit", "hPa")
    pressure_scale = _PRESSURE_TO_HPA.get(pressure_unit) if type(pressure_unit) is str else None
    if pressure_scale is None:
        raise DecodeError("bad_field", "PressureUnit: expected hPa, mmHg or inHg")

    seen: dict[str, int] = {}
    for key, value in obj.items():
        if type(value) is dict:
            for inner, inner_value in value.items():
                if _tasmota_wanted(inner, inner_value):
                    seen[inner] = seen.get(inner, 0) + 1
        elif key not in _TASMOTA_META and _tasmota_wanted(key, value):
            seen[key] = seen.get(key, 0) + 1

    fields: dict[str, FieldValue] = {}
    health: dict[str, FieldValue] = {}
    for key, value in obj.items():
        if type(value) is dict:
            prefix = _NON_NAME_CHARS.sub("_", key.lower())
            for inner, inner_value in value.items():
                if _tasmota_wanted(inner, inner_value):
                    base = _tasmota_name(inner)
                    name = f"{prefix}_{base}" if seen[inner] > 1 else base
                    _tasmota_put(base, name, inner_value, temp_unit == "F", pressure_scale,
                                 fields, health)
        elif key not in _TASMOTA_META and _tasmota_wanted(key, value):
            base = _tasmota_name(key)
            _tasmota_put(base, base, value, temp_unit == "F", pressure_scale, fields, health)
    return _readings(route, fields, health, now_ns)


def _tasmota_put(base: str, name: str, value: object, fahrenheit: bool, pressure_scale: float,
                 fields: dict[str, FieldValue], health: dict[str, FieldValue]) -> None:
    """Store one Tasmota value as ``name``; ``base`` is its unprefixed schema name, which decides
    the unit conversion."""
    if not (name in FIELD_TYPES or _is_storable_name(name)):
        return
    coerced = coerce_field(name, value)
    if type(coerced) is float:
        if fahrenheit and base in _TEMPERATURE_NAMES:
            coerced = (coerced - 32.0) * 5.0 / 9.0
        elif base in _PRESSURE_NAMES:
            coerced *= pressure_scale
        if not math.isfinite(coerced):
            raise DecodeError("non_finite", f"{name}: not finite after unit conversion")
    if coerced is None:
        return
    if name in DEVICE_FIELDS:
        health[name] = coerced
    else:
        fields[name] = coerced


# ---------------------------------------------------------------------------------- registry

Decoder = Callable[[Route, bytes, int], list[Reading]]
"""``(route, payload, now_ns) -> readings``; raises :class:`DecodeError`."""


class _LimitedDecoder(Protocol):
    def __call__(self, route: Route, payload: bytes, now_ns: int, *,
                 max_bytes: int = ..., max_depth: int = ...) -> list[Reading]: ...


_IMPLS: Final[Mapping[str, _LimitedDecoder]] = MappingProxyType({
    "json": decode_json,
    "zigbee2mqtt": decode_zigbee2mqtt,
    "chirpstack": decode_chirpstack,
    "tasmota": decode_tasmota,
})

DECODERS: Final[Mapping[str, Decoder]] = _IMPLS
"""Decoders with the default limits (64 KiB, depth 16)."""


def make_decoder(name: str, max_bytes: int, max_depth: int) -> Decoder:
    """The decoder called ``name`` with its size and nesting limits bound.

    Raises:
        ValueError: unknown name, ``max_bytes < 1``, or ``max_depth`` outside 1..1024.
    """
    impl = _IMPLS.get(name)
    if impl is None:
        raise ValueError(f"unknown decoder {name!r}; known: {', '.join(DECODERS)}")
    if max_bytes < 1:
        raise ValueError("max_bytes must be at least 1")
    if not 1 <= max_depth <= ORJSON_MAX_DEPTH:
        raise ValueError(f"max_depth must be within 1..{ORJSON_MAX_DEPTH}")

    def decoder(route: Route, payload: bytes, now_ns: int) -> list[Reading]:
        return impl(route, payload, now_ns, max_bytes=max_bytes, max_depth=max_depth)

    decoder.__qualname__ = f"make_decoder({name!r}, {max_bytes}, {max_depth})"
    return decoder


# -------------------------------------------------------------------------------- HTTP events

_DOOR_KEYS: Final = ("door", "door_id", "door_name", "doorId")
_RESULT_KEYS: Final = ("result", "access_result", "granted")
_TIME_KEYS: Final = ("time", "timestamp")
_DIRECTIONS: Final[Mapping[str, str]] = {
    **dict.fromkeys(("in", "entry", "enter", "entrance", "inbound", "入", "进"), "in"),
    **dict.fromkeys(("out", "exit", "leave", "outbound", "出"), "out"),
}
_RESULTS: Final[Mapping[str, str]] = {
    **dict.fromkeys(("granted", "grant", "allow", "allowed", "accept", "accepted", "ok",
                     "success", "pass"), "granted"),
    **dict.fromkeys(("denied", "deny", "reject", "rejected", "refused", "fail", "failed",
                     "invalid"), "denied"),
}


def _event_value(route: Route, obj: dict[str, Any], name: str, aliases: tuple[str, ...]) -> Any:
    """A field of an event payload: the route's field_map (targets are our names) first, then
    the common spellings at top level."""
    for key, path, target in route.paths:
        if target == name:
            value = _lookup(obj, key, path)
            if value is not None:
                return value
    for alias in aliases:
        value = obj.get(alias)
        if value is not None:
            return value
    return None


def _event_timestamp(route: Route, obj: dict[str, Any], now_ns: int) -> int:
    keys = (route.timestamp_field,) if route.timestamp_field else _TIME_KEYS
    for key in keys:
        value = obj.get(key)
        if value is not None:
            return _timestamp_ns(value, route.timestamp_unit, now_ns)
    return now_ns


def _identifier(value: object, name: str, max_len: int) -> str | None:
    """The raw identifier as text; an integer is accepted (JSON card numbers)."""
    if value is None:
        return None
    if type(value) is int:
        return str(value)
    if not isinstance(value, str):
        raise DecodeError("wrong_type", f"{name}: expected a string, got {_json_type(value)}")
    if len(value) > max_len:
        raise DecodeError("bad_field", f"{name}: longer than {max_len} characters")
    return value


def _label(value: object, name: str) -> str | None:
    """A short descriptive string field (lane, door): strings, or integers as text."""
    if value is None:
        return None
    if type(value) is int:
        return str(value)
    return coerce_field(name, value)  # type: ignore[return-value]  # str or DecodeError


def _direction(route: Route, obj: dict[str, Any]) -> str | None:
    value = _event_value(route, obj, "direction", ("direction",))
    if value is None:
        return None
    if not isinstance(value, str):
        raise DecodeError("wrong_type", f"direction: expected a string, got {_json_type(value)}")
    direction = _DIRECTIONS.get(value.strip().lower())
    if direction is None:
        raise DecodeError("bad_field", "direction: expected in/entry or out/exit")
    return direction


def _snapshot_url(value: object) -> str | None:
    if value is None:
        return None
    url: str = coerce_field("snapshot_url", value)  # type: ignore[assignment]
    try:
        parts = urlsplit(url)
    except ValueError:
        raise DecodeError("bad_field", "snapshot_url: not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DecodeError("bad_field", "snapshot_url: expected an http(s) URL")
    if "@" in parts.netloc:
        # Cameras are often addressed as http://admin:password@ip/...: credentials stay here.
        parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
        url = urlunsplit(parts)
    return url


def _card_text(text: str) -> str:
    return "".join(unicodedata.normalize("NFKC", text).split()).upper()


def _redact(fields: dict[str, FieldValue], raw: str, needle: str,
            normalizer: Callable[[str], str]) -> None:
    """Drop every string field that contains the identifier, raw or normalised (a camera may put
    the plate into the snapshot file name, a controller the card number into its reason)."""
    if not needle:
        return
    leaked = []
    for name, value in fields.items():
        if type(value) is str and not name.endswith("_pseudonym") and (
            (raw and raw in value)
            or needle in normalizer(value)
            or needle in normalizer(unquote(value))
        ):
            leaked.append(name)
    for name in leaked:
        del fields[name]
    if leaked:
        fields["redacted"] = True


def _pseudonym(pseudonymize: Pseudonymize, kind: str, value: str) -> str:
    try:
        return pseudonymize(kind, value)
    except ValueError:
        raise DecodeError("bad_field", f"{kind}: empty after normalisation") from None


def decode_plate_event(route: Route, payload: bytes, now_ns: int, pseudonymize: Pseudonymize,
                       *, max_bytes: int = DEFAULT_MAX_BYTES,
                       max_depth: int = DEFAULT_MAX_DEPTH) -> Event:
    """A plate camera's HTTP push → ``event`` with kind ``plate_read``.

    Accepted keys (or ``route.field_map`` entries targeting these names): ``plate`` /
    ``plate_number`` / ``license_plate`` (required), ``lane``, ``direction`` (in/entry,
    out/exit), ``confidence`` (0..1, or 0..100 as a percentage: a value above 1 is read as
    percent), ``snapshot_url`` (http(s); user:password removed), ``time``/``timestamp``. The
    plate leaves only as ``plate_pseudonym``; a string field containing the plate is dropped and
    ``redacted`` set.

    Raises:
        DecodeError: ``bad_field`` (missing/empty plate, confidence out of range, unknown
            direction, bad URL), ``wrong_type``, ``bad_timestamp`` and the JSON reasons. Details
            never contain the plate.
    """
    obj = _load_object(payload, max_bytes, max_depth)
    raw = _identifier(_event_value(route, obj, "plate", _PLATE_KEYS), "plate", MAX_PLATE_LEN)
    if raw is None:
        raise DecodeError("bad_field", "plate: missing")
    ts_ns = _event_timestamp(route, obj, now_ns)
    fields: dict[str, FieldValue] = {"plate_pseudonym": _pseudonym(pseudonymize, "plate", raw)}
    lane = _label(_event_value(route, obj, "lane", ("lane",)), "lane")
    if lane is not None:
        fields["lane"] = lane
    direction = _direction(route, obj)
    if direction is not None:
        fields["direction"] = direction
    confidence = _event_value(route, obj, "confidence", ("confidence",))
    if confidence is not None:
        c: float = coerce_field("confidence", confidence)  # type: ignore[assignment]
        if not 0.0 <= c <= 100.0:
            raise DecodeError("bad_field", "confidence: expected 0..1 or 0..100")
        fields["confidence"] = c if c <= 1.0 else c / 100.0
    url = _snapshot_url(_event_value(route, obj, "snapshot_url", ("snapshot_url",)))
    if url is not None:
        fields["snapshot_url"] = url
    _redact(fields, raw, normalize_plate(raw), normalize_plate)
    return Event("event", route.site, route.zone, route.device, "plate_read", fields, ts_ns)


def decode_access_event(route: Route, payload: bytes, now_ns: int, pseudonymize: Pseudonymize,
                        *, max_bytes: int = DEFAULT_MAX_BYTES,
                        max_depth: int = DEFAULT_MAX_DEPTH) -> Event:
    """An access controller's HTTP push → ``event`` with kind ``access``.

    Accepted keys (or ``route.field_map`` entries targeting these names): ``door`` / ``door_id``
    (required), ``result`` (granted/allow/ok..., denied/reject/fail..., or a boolean; required),
    ``card`` / ``card_number`` / ``card_no`` (optional: an exit button has none; string or
    integer), ``reason``, ``direction``, ``time``/``timestamp``. The card leaves only as
    ``card_pseudonym``; a string field containing the card number is dropped and ``redacted``
    set.

    Raises:
        DecodeError: ``bad_field`` (missing door or result, unknown result), ``wrong_type``,
            ``bad_timestamp`` and the JSON reasons. Details never contain the card number.
    """
    obj = _load_object(payload, max_bytes, max_depth)
    raw = _identifier(_event_value(route, obj, "card", _CARD_KEYS), "card", MAX_CARD_LEN)
    door = _label(_event_value(route, obj, "door", _DOOR_KEYS), "door")
    if door is None:
        raise DecodeError("bad_field", "door: missing")
    result_value = _event_value(route, obj, "result", _RESULT_KEYS)
    if isinstance(result_value, bool):
        result: str | None = "granted" if result_value else "denied"
    elif isinstance(result_value, str):
        result = _RESULTS.get(result_value.strip().lower())
    elif result_value is None:
        raise DecodeError("bad_field", "result: missing")
    else:
        raise DecodeError(
            "wrong_type", f"result: expected a string, got {_json_type(result_value)}"
        )
    if result is None:
        raise DecodeError("bad_field", "result: expected granted/allow/ok or denied/reject/fail")
    ts_ns = _event_timestamp(route, obj, now_ns)
    fields: dict[str, FieldValue] = {"door": door, "result": result}
    card = _card_text(raw) if raw is not None else ""
    if card:
        fields["card_pseudonym"] = _pseudonym(pseudonymize, "card", raw)  # type: ignore[arg-type]
    reason = _label(_event_value(route, obj, "reason", ("reason",)), "reason")
    if reason is not None:
        fields["reason"] = reason
    direction = _direction(route, obj)
    if direction is not None:
        fields["direction"] = direction
    if raw is not None and card:
        _redact(fields, raw.strip(), card.lstrip("0") or card, _card_text)
    return Event("event", route.site, route.zone, route.device, "access", fields, ts_ns)
