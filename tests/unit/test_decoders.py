"""Payload decoders and the schema: realistic payloads, malformed input, privacy, fuzzing.

The invariants every decoder must keep, whatever the bytes: it returns readings whose fields have
their schema type, or raises DecodeError with a known reason, and nothing else. Plates and card
numbers never appear in an event or an error.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge.decoders import (
    DECODERS,
    DEFAULT_MAX_DEPTH,
    DecodeError,
    Route,
    decode_access_event,
    decode_chirpstack,
    decode_json,
    decode_plate_event,
    decode_tasmota,
    decode_zigbee2mqtt,
    loads_strict,
    make_decoder,
    parse_rfc3339_ns,
)
from edge.model import Event, Reading
from edge.pseudonym import Pseudonymizer
from ingest.schema import (
    DEVICE_FIELDS,
    FIELD_TYPES,
    FIELD_UNITS,
    FIELDS,
    MAX_STR_LEN,
    TAG_KEYS,
    coerce_field,
    is_valid_field_name,
)

REASONS = {
    "invalid_json", "not_an_object", "too_large", "too_deep", "non_finite", "wrong_type",
    "no_fields", "bad_timestamp", "no_decoded_object", "unknown_topic", "bad_field",
}
NOW_NS = 1_714_557_600_000_000_000 + 5 * 10**9  # 2024-05-01T10:00:05Z
SEC = 10**9

ENV = Route("environment", "site-1", "building-3", "air-17", "air")
ENV_TS_MS = Route("environment", "site-1", "building-3", "air-17", "air",
                  timestamp_field="ts", timestamp_unit="ms")
PARKING = Route("parking", "site-1", "car-park-b1", "0102030405060708", "bay")
DOOR = Route("access", "site-1", "building-3", "front-door", "door")
CAMERA = Route("event", "site-1", "gate-north", "cam-1", "camera")
READER = Route("event", "site-1", "building-3", "reader-2", "reader")
PSEUDO = Pseudonymizer(b"k" * 32)


def check_readings(readings: list[Reading], route: Route) -> None:
    """The schema contract of any decoder output."""
    assert isinstance(readings, list) and readings
    for r in readings:
        assert isinstance(r, Reading)
        assert r.measurement in (route.measurement, "device")
        assert (r.site, r.zone, r.device, r.kind) == (route.site, route.zone, route.device,
                                                      route.kind)
        assert isinstance(r.ts_ns, int) and r.ts_ns > 0
        assert r.fields
        for name, value in r.fields.items():
            assert name in FIELD_TYPES or is_valid_field_name(name), name
            assert name not in TAG_KEYS and name != "time"
            expected = FIELD_TYPES.get(name)
            if expected is None:
                assert type(value) in (float, bool), (name, value)
            else:
                assert type(value) is expected, (name, value)
            if type(value) is float:
                assert math.isfinite(value)
            if r.measurement != "device" and route.measurement != "device":
                assert name not in DEVICE_FIELDS


# ------------------------------------------------------------------------------- generic JSON


def test_json_workload_message() -> None:
    ts_ms = NOW_NS // 10**6 - 1_000
    payload = b'{"ts": %d, "temperature": 21.5, "humidity": 40, "pm25": 12}' % ts_ms
    [reading] = decode_json(ENV_TS_MS, payload, NOW_NS)
    assert reading == Reading("environment", "site-1", "building-3", "air-17", "air",
                              {"temperature": 21.5, "humidity": 40.0, "pm25": 12.0},
                              ts_ms * 10**6)
    assert type(reading.fields["humidity"]) is float  # int in JSON, float in the schema


def test_json_field_map_dotted_paths_and_rename() -> None:
    route = Route("environment", "s", "z", "d", "air", field_map={
        "sensor.temp": "temperature", "rh": "humidity", "PM2.5": "pm25",
        "probes.1.t": "dew_point", "missing.path": "co2",
    })
    payload = orjson.dumps({"sensor": {"temp": 19.0}, "rh": 55, "PM2.5": 8, "other": 1,
                            "probes": [{"t": 1.0}, {"t": 2.5}]})
    [reading] = decode_json(route, payload, NOW_NS)
    assert dict(reading.fields) == {"temperature": 19.0, "humidity": 55.0, "pm25": 8.0,
                                    "dew_point": 2.5}
    assert reading.ts_ns == NOW_NS


def test_json_without_map_keeps_numbers_and_bools_only() -> None:
    payload = orjson.dumps({
        "temperature": 20, "smoke": False, "label": "kitchen", "nested": {"x": 1},
        "list": [1], "Odd Key": 3, "time": 5, "_private": 1, "site": 2, "ratio": 0.5,
        "count": 7, "nothing": None, "card": 123456, "plate_number": 5,
    })
    [reading] = decode_json(ENV, payload, NOW_NS)
    assert dict(reading.fields) == {"temperature": 20.0, "smoke": False, "ratio": 0.5,
                                    "count": 7.0}


def test_json_health_fields_split_into_device_reading() -> None:
    env, dev = decode_json(ENV, b'{"co2": 812, "battery": 64, "rssi": -71}', NOW_NS)
    assert env.measurement == "environment" and dict(env.fields) == {"co2": 812.0}
    assert dev.measurement == "device" and dict(dev.fields) == {"battery": 64.0, "rssi": -71.0}
    assert env.ts_ns == dev.ts_ns
    # A route that is itself about device health keeps one point.
    route = Route("device", "s", "z", "d", "gw")
    [only] = decode_json(route, b'{"battery": 64, "uptime": 5}', NOW_NS)
    assert dict(only.fields) == {"battery": 64.0, "uptime": 5.0}


def test_json_known_field_with_null_is_left_out() -> None:
    [reading] = decode_json(ENV, b'{"temperature": null, "humidity": 40}', NOW_NS)
    assert dict(reading.fields) == {"humidity": 40.0}


@pytest.mark.parametrize(("value", "unit", "expected"), [
    (1_714_557_600, "s", 1_714_557_600 * SEC),
    (1_714_557_600_123, "ms", 1_714_557_600_123 * 10**6),
    (1_714_557_600_123_456, "us", 1_714_557_600_123_456 * 1000),
    (1_714_557_600_123_456_789, "ns", 1_714_557_600_123_456_789),
    (1_714_557_600.5, "s", 1_714_557_600_500_000_000),
    ("2024-05-01T10:00:00Z", "s", 1_714_557_600 * SEC),
    ("2024-05-01T18:00:00+08:00", "ms", 1_714_557_600 * SEC),
    ("2024-05-01 18:00:00.25+0800", "s", 1_714_557_600 * SEC + 250_000_000),
    ("2024-05-01T05:30:00.000000001-04:30", "s", 1_714_557_600 * SEC + 1),
])
def test_timestamps(value: object, unit: str, expected: int) -> None:
    route = Route("environment", "s", "z", "d", "air", timestamp_field="t", timestamp_unit=unit)
    [reading] = decode_json(route, orjson.dumps({"t": value, "co2": 400}), NOW_NS)
    assert reading.ts_ns == expected
    assert "t" not in reading.fields


@pytest.mark.parametrize("value", [
    "2024-05-01T10:00:00",  # no offset: local time of an unknown zone
    "2024-02-30T10:00:00Z",  # no such date
    "2024-05-01T24:00:00Z",
    "2024-05-01T10:00:00+24:00",
    "yesterday",
    "١٩٩٩-05-01T10:00:00Z",  # non-ASCII digits
    946_684_799,  # 1999-12-31T23:59:59Z
    0,
    -5,
    NOW_NS // SEC + 86_400 + 1,  # more than a day ahead
    1e300,
    True,
    [1],
])
def test_bad_timestamps(value: object) -> None:
    route = Route("environment", "s", "z", "d", "air", timestamp_field="t")
    with pytest.raises(DecodeError) as info:
        decode_json(route, orjson.dumps({"t": value, "co2": 400}), NOW_NS)
    assert info.value.reason == "bad_timestamp"


def test_timestamp_up_to_a_day_ahead_is_accepted() -> None:
    route = Route("environment", "s", "z", "d", "air", timestamp_field="t")
    ahead = NOW_NS // SEC + 86_400
    [reading] = decode_json(route, orjson.dumps({"t": ahead, "co2": 1}), NOW_NS)
    assert reading.ts_ns == ahead * SEC


def test_unsynchronised_gateway_clock_trusts_device_time() -> None:
    # Booted without RTC, before NTP: the gateway thinks it is 1970.
    route = Route("environment", "s", "z", "d", "air", timestamp_field="t")
    [reading] = decode_json(route, b'{"t": 1714557600, "co2": 1}', 12 * SEC)
    assert reading.ts_ns == 1_714_557_600 * SEC


def test_rfc3339_keeps_nanoseconds_and_truncates_beyond() -> None:
    assert parse_rfc3339_ns("2024-05-01T10:00:00.123456789Z") == 1_714_557_600_123_456_789
    assert parse_rfc3339_ns("2024-05-01T10:00:00.1234567891234Z") == 1_714_557_600_123_456_789
    assert parse_rfc3339_ns("2016-12-31T23:59:60Z") == parse_rfc3339_ns("2017-01-01T00:00:00Z")


# -------------------------------------------------------------------------------- Zigbee2MQTT

Z2M_STATE = (b'{"temperature": 22.4, "humidity": 41, "battery": 87, "linkquality": 120,'
             b' "contact": false, "occupancy": true, "water_leak": false, "smoke": false}')


def test_zigbee2mqtt_state_from_domain_doc() -> None:
    main, health = decode_zigbee2mqtt(ENV, Z2M_STATE, NOW_NS)
    assert main.measurement == "environment"
    assert dict(main.fields) == {"temperature": 22.4, "humidity": 41.0, "contact_open": True,
                                 "occupied": True, "water_leak": False, "smoke": False}
    assert health.measurement == "device"
    assert dict(health.fields) == {"battery": 87.0, "linkquality": 120}
    assert type(health.fields["linkquality"]) is int
    assert main.ts_ns == health.ts_ns == NOW_NS


@pytest.mark.parametrize(("contact", "is_open"), [(True, False), (False, True)])
def test_zigbee2mqtt_contact_true_means_closed(contact: bool, is_open: bool) -> None:
    [reading] = decode_zigbee2mqtt(DOOR, orjson.dumps({"contact": contact, "tamper": False}),
                                   NOW_NS)
    assert reading.fields == {"contact_open": is_open, "tamper": False}


def test_zigbee2mqtt_ignores_bookkeeping_and_strings() -> None:
    payload = orjson.dumps({
        "co2": 650, "voc": 120, "formaldehyd": 0.02, "gas": True, "carbon_monoxide": False,
        "last_seen": 1_714_557_600_000, "elapsed": 30_000, "update_available": False,
        "update": {"state": "idle", "installed_version": 1}, "action": "single",
        "state": "ON", "voltage": 2995, "device_temperature": 31, "battery": None,
        "illuminance": 18_000, "illuminance_lux": 63,
    })
    [reading] = decode_zigbee2mqtt(ENV, payload, NOW_NS)
    assert dict(reading.fields) == {
        "co2": 650.0, "voc": 120.0, "formaldehyde": 0.02, "gas_alarm": True,
        "co_alarm": False, "voltage": 2995.0, "device_temperature": 31.0, "illuminance": 63.0,
    }


def test_zigbee2mqtt_device_time_from_last_seen_when_configured() -> None:
    route = Route("environment", "s", "z", "d", "air", timestamp_field="last_seen",
                  timestamp_unit="ms")
    [reading] = decode_zigbee2mqtt(route, b'{"co2": 1, "last_seen": 1714557601000}', NOW_NS)
    assert reading.ts_ns == 1_714_557_601 * SEC and reading.fields == {"co2": 1.0}


def test_zigbee2mqtt_availability_is_not_a_reading() -> None:
    with pytest.raises(DecodeError) as info:
        decode_zigbee2mqtt(ENV, b'{"state": "online"}', NOW_NS)
    assert info.value.reason == "no_fields"


# --------------------------------------------------------------------------------- ChirpStack

CHIRPSTACK_UP: dict[str, Any] = {
    "deduplicationId": "3ac7e3c4-4401-4b8d-9386-a5c902f9202d",
    "time": "2024-05-01T10:00:00.123456789Z",
    "deviceInfo": {
        "tenantId": "52f14cd4-c6f1-4fbd-8f87-4025e1d49242",
        "tenantName": "ChirpStack",
        "applicationId": "17c82e96-be03-4f38-aef3-f83d48582d97",
        "applicationName": "parking",
        "deviceProfileId": "14855bf7-d10d-4aee-b618-ebfcb64dc7ad",
        "deviceProfileName": "geomagnetic bay sensor",
        "deviceName": "bay-17",
        "devEui": "0102030405060708",
        "tags": {"lot": "b1"},
    },
    "devAddr": "00189440",
    "adr": True,
    "dr": 5,
    "fCnt": 412,
    "fPort": 2,
    "confirmed": False,
    "data": "AV0=",
    "object": {"occupied": True, "battery": 93, "temperature": 18.5, "model": "GM-2"},
    "rxInfo": [
        {"gatewayId": "0016c001ff10a235", "uplinkId": 4217, "rssi": -87, "snr": 7.5,
         "channel": 2, "location": {}, "context": "EFwMtA==",
         "metadata": {"region_config_id": "cn470_10", "region_common_name": "CN470"}},
        {"gatewayId": "0016c001ff10a236", "uplinkId": 99, "rssi": -112, "snr": -3.0},
    ],
    "txInfo": {"frequency": 486300000, "modulation": {
        "lora": {"bandwidth": 125000, "spreadingFactor": 7, "codeRate": "CR_4_5"}}},
}


def test_chirpstack_uplink() -> None:
    main, health = decode_chirpstack(PARKING, orjson.dumps(CHIRPSTACK_UP), NOW_NS)
    assert main.measurement == "parking"
    assert dict(main.fields) == {"occupied": True, "temperature": 18.5}
    assert health.measurement == "device"
    assert dict(health.fields) == {"battery": 93.0, "fcnt": 412, "rssi": -87.0, "snr": 7.5}
    assert type(health.fields["fcnt"]) is int
    assert main.device == health.device == "0102030405060708"
    assert main.ts_ns == 1_714_557_600_123_456_789


def test_chirpstack_field_map_applies_to_object_and_time_defaults_to_now() -> None:
    route = Route("parking", "s", "z", "dev", "bay", field_map={"status.busy": "occupied"})
    up = {"fCnt": 3, "object": {"status": {"busy": 1}, "battery": 50}}
    main, health = decode_chirpstack(route, orjson.dumps(up), NOW_NS)
    assert main.fields == {"occupied": True} and health.fields == {"fcnt": 3}
    assert main.ts_ns == NOW_NS


def test_chirpstack_without_codec() -> None:
    up = {k: v for k, v in CHIRPSTACK_UP.items() if k != "object"}
    with pytest.raises(DecodeError) as info:
        decode_chirpstack(PARKING, orjson.dumps(up), NOW_NS)
    assert info.value.reason == "no_decoded_object"


def test_chirpstack_empty_object_still_reports_link_health() -> None:
    up = {**CHIRPSTACK_UP, "object": {}}
    [health] = decode_chirpstack(PARKING, orjson.dumps(up), NOW_NS)
    assert health.measurement == "device" and health.fields["fcnt"] == 412


# ------------------------------------------------------------------------------------ Tasmota


def test_tasmota_single_sensor() -> None:
    payload = (b'{"Time":"2024-05-01T18:00:00","AM2301":{"Temperature":21.3,"Humidity":40.1,'
               b'"DewPoint":7.2},"TempUnit":"C"}')
    [reading] = decode_tasmota(ENV, payload, NOW_NS)
    assert dict(reading.fields) == {"temperature": 21.3, "humidity": 40.1, "dew_point": 7.2}
    assert reading.ts_ns == NOW_NS  # Time has no offset: the gateway's clock is used


def test_tasmota_shared_keys_are_prefixed_with_the_sensor() -> None:
    payload = orjson.dumps({
        "Time": "2024-05-01T18:00:00",
        "AM2301": {"Temperature": 70.0, "Humidity": 40},
        "DS18B20-1": {"Id": "01131B7E5AAA", "Temperature": 50.0},
        "PMS5003": {"CF1": 3, "CF2.5": 5, "PM1": 3, "PM2.5": 5, "PM10": 6},
        "SCD30": {"CarbonDioxide": 612, "eCO2": 580},
        "BMP280": {"Pressure": 760.0},
        "TempUnit": "F", "PressureUnit": "mmHg",
    })
    [reading] = decode_tasmota(ENV, payload, NOW_NS)
    fields = dict(reading.fields)
    assert fields.pop("am2301_temperature") == pytest.approx(21.111, abs=1e-3)
    assert fields.pop("ds18b20_1_temperature") == pytest.approx(10.0)
    assert fields.pop("pressure") == pytest.approx(1013.25, abs=0.01)
    assert fields == {"humidity": 40.0, "cf1": 3.0, "cf2_5": 5.0, "pm1": 3.0, "pm25": 5.0,
                      "pm10": 6.0, "co2": 612.0, "eco2": 580.0}


@pytest.mark.parametrize("payload", [
    b'{"AM2301": {"Temperature": 21}, "TempUnit": "K"}',
    b'{"AM2301": {"Temperature": 21}, "TempUnit": ["C"]}',
    b'{"BMP280": {"Pressure": 1000}, "PressureUnit": {"x": 1}}',
])
def test_tasmota_unknown_units(payload: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode_tasmota(ENV, payload, NOW_NS)
    assert info.value.reason == "bad_field"


def test_tasmota_null_reading_of_failed_sensor_is_left_out() -> None:
    [reading] = decode_tasmota(ENV, b'{"AM2301":{"Temperature":null,"Humidity":40}}', NOW_NS)
    assert reading.fields == {"humidity": 40.0}


# --------------------------------------------------------------------------- malformed table

DEEP = b"[" * 10_000 + b"]" * 10_000
ALL_READING_DECODERS = sorted(DECODERS)

MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "invalid_json"),
    ("whitespace", b"  \n", "invalid_json"),
    ("truncated", b'{"temperature": 21', "invalid_json"),
    ("garbage", b"\x00\x01\xfe", "invalid_json"),
    ("invalid utf-8", b'{"temperature": 21, "x": "\xff"}', "invalid_json"),
    ("lone surrogate", b'{"x": "\\ud800"}', "invalid_json"),
    ("single quotes", b"{'temperature': 21}", "invalid_json"),
    ("array", b"[1, 2]", "not_an_object"),
    ("string", b'"hello"', "not_an_object"),
    ("number", b"21.5", "not_an_object"),
    ("null", b"null", "not_an_object"),
    ("NaN", b'{"temperature": NaN}', "non_finite"),
    ("Infinity", b'{"temperature": Infinity}', "non_finite"),
    ("-Infinity", b'{"temperature": -Infinity}', "non_finite"),
    ("1e400", b'{"temperature": 1e400}', "non_finite"),
    ("-1e400 nested", b'{"x": {"y": [-1e400]}}', "non_finite"),
    ("1 MB", b'{"temperature": 1, "pad": "' + b"x" * 1_000_000 + b'"}', "too_large"),
    ("10,000-deep", DEEP, "too_deep"),
    ("17-deep", b'{"a":' * 17 + b"1" + b"}" * 17, "too_deep"),
]


@pytest.mark.parametrize("decoder_name", ALL_READING_DECODERS)
@pytest.mark.parametrize(("case", "payload", "reason"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_payloads(decoder_name: str, case: str, payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        DECODERS[decoder_name](ENV, payload, NOW_NS)
    assert info.value.reason == reason, info.value


@pytest.mark.parametrize(("decoder_name", "payload", "reason"), [
    ("json", b"{}", "no_fields"),
    ("zigbee2mqtt", b"{}", "no_fields"),
    ("tasmota", b"{}", "no_fields"),
    ("chirpstack", b"{}", "no_decoded_object"),
    ("json", b'{"temperature": "hot"}', "wrong_type"),
    ("json", b'{"temperature": true}', "wrong_type"),
    ("json", b'{"smoke": "yes"}', "wrong_type"),
    ("json", b'{"smoke": 2}', "wrong_type"),
    ("json", b'{"fcnt": 1.5}', "wrong_type"),
    ("json", b'{"temperature": [21]}', "wrong_type"),
    ("json", b'{"fcnt": 18446744073709551615}', "bad_field"),
    ("json", b'{"fcnt": 1e30}', "bad_field"),
    ("json", b'{"spaces_free": -9223372036854775809}', "bad_field"),
    ("zigbee2mqtt", b'{"temperature": "22.4"}', "wrong_type"),
    ("zigbee2mqtt", b'{"contact": "open"}', "wrong_type"),
    ("zigbee2mqtt", b'{"battery": {"level": 3}}', "wrong_type"),
    ("chirpstack", b'{"object": [1]}', "wrong_type"),
    ("chirpstack", b'{"object": {"x": 1}, "fCnt": "7"}', "wrong_type"),
    ("chirpstack", b'{"object": {"x": 1}, "fCnt": 18446744073709551615}', "bad_field"),
    ("chirpstack", b'{"object": {"x": 1}, "time": "2024-05-01T10:00:00"}', "bad_timestamp"),
    ("chirpstack", b'{"object": {"x": 1}, "rxInfo": [{"rssi": "-80"}]}', "wrong_type"),
    ("tasmota", b'{"AM2301": {"Temperature": "21"}}', "wrong_type"),
    ("tasmota", b'{"X": {"Pressure": 1.7e308}, "PressureUnit": "inHg"}', "non_finite"),
    ("json", b'{"lane": "a\\nb"}', "bad_field"),
])
def test_wrong_content(decoder_name: str, payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        DECODERS[decoder_name](ENV, payload, NOW_NS)
    assert info.value.reason == reason, info.value


def test_huge_but_finite_numbers_are_floats() -> None:
    payload = b'{"temperature": 123456789012345678901234567890, "co2": 1.7e308, "x": -1e-320}'
    [reading] = decode_json(ENV, payload, NOW_NS)
    assert reading.fields == {"temperature": 1.2345678901234568e29, "co2": 1.7e308,
                              "x": -1e-320}


def test_loads_strict_limits() -> None:
    assert loads_strict(b'{"a":' * 16 + b"1" + b"}" * 16, 1000, 16) is not None
    # Brackets inside strings are not nesting.
    assert loads_strict(orjson.dumps({"s": "[[[[{{{{" * 10}), 1000, 2) == {"s": "[[[[{{{{" * 10}
    with pytest.raises(DecodeError, match="too_deep"):
        loads_strict(b"[[[1]]]", 1000, 2)
    assert loads_strict(b"[[1]]", 5, 2) == [[1]]
    with pytest.raises(DecodeError, match="too_large"):
        loads_strict(b"[[1]] ", 5, 2)


def test_decode_error_is_a_value_error_and_pickles() -> None:
    err = DecodeError("wrong_type", "temperature: expected a number, got str")
    assert isinstance(err, ValueError)
    assert str(err) == "wrong_type: temperature: expected a number, got str"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.reason, copy.detail) == (err.reason, err.detail)


# ------------------------------------------------------------------------- routes and factory


def test_make_decoder_binds_limits() -> None:
    small = make_decoder("json", max_bytes=64, max_depth=2)
    assert small(ENV, b'{"co2": 400}', NOW_NS)[0].fields == {"co2": 400.0}
    with pytest.raises(DecodeError, match="too_large"):
        small(ENV, b'{"co2": 400, "pad": "' + b"x" * 64 + b'"}', NOW_NS)
    with pytest.raises(DecodeError, match="too_deep"):
        small(ENV, b'{"a": {"b": {"c": 1}}, "co2": 1}', NOW_NS)
    for name in DECODERS:
        assert callable(make_decoder(name, 1024, DEFAULT_MAX_DEPTH))


@pytest.mark.parametrize(("name", "max_bytes", "max_depth"), [
    ("protobuf", 100, 10), ("json", 0, 10), ("json", 100, 0), ("json", 100, 1025),
])
def test_make_decoder_rejects_bad_config(name: str, max_bytes: int, max_depth: int) -> None:
    with pytest.raises(ValueError):
        make_decoder(name, max_bytes, max_depth)


@pytest.mark.parametrize("kwargs", [
    {"measurement": "weather"},
    {"timestamp_unit": "minutes"},
    {"timestamp_field": ""},
    {"field_map": {"a": "time"}},
    {"field_map": {"a": "bad name"}},
    {"field_map": {"": "temperature"}},
])
def test_route_rejects_bad_config(kwargs: dict[str, Any]) -> None:
    base: dict[str, Any] = {"measurement": "environment", "site": "s", "zone": "z",
                            "device": "d", "kind": "air"}
    with pytest.raises(ValueError):
        Route(**{**base, **kwargs})


@pytest.mark.parametrize("device", ["", "door\nweather,site=x t=1", "a\rb", "x" * 257, "\x00"])
def test_route_rejects_unusable_tags_from_topics(device: str) -> None:
    with pytest.raises(DecodeError) as info:
        Route("environment", "s", "z", device, "air")
    assert info.value.reason == "unknown_topic"
    assert device not in str(info.value) or not device


def test_route_field_map_is_a_private_copy() -> None:
    mapping = {"a": "temperature"}
    route = Route("environment", "s", "z", "d", "air", field_map=mapping)
    mapping["b"] = "humidity"
    assert dict(route.field_map) == {"a": "temperature"}
    assert {route: 1}[Route("environment", "s", "z", "d", "air", field_map={"a": "temperature"})]
    assert route != Route("environment", "s", "z", "d", "air", field_map={"b": "temperature"})


# ----------------------------------------------------------------------------- event decoders


def test_plate_event() -> None:
    payload = orjson.dumps({
        "plate_number": "京A·12345", "lane": 2, "direction": "Entry", "confidence": 96,
        "snapshot_url": "http://admin:secret@10.0.0.8/snap/20240501-100000.jpg",
        "time": "2024-05-01T18:00:00+08:00",
    })
    event = decode_plate_event(CAMERA, payload, NOW_NS, PSEUDO)
    assert event == Event("event", "site-1", "gate-north", "cam-1", "plate_read", {
        "plate_pseudonym": PSEUDO("plate", "京A12345"),
        "lane": "2", "direction": "in", "confidence": 0.96,
        "snapshot_url": "http://10.0.0.8/snap/20240501-100000.jpg",
    }, 1_714_557_600 * SEC)
    assert event.priority.name == "EVENT"


@pytest.mark.parametrize("key", ["plate", "plate_number", "license_plate"])
def test_plate_aliases_and_normalisation(key: str) -> None:
    event = decode_plate_event(CAMERA, orjson.dumps({key: "jing a-123 45"}), NOW_NS, PSEUDO)
    assert event.fields == {"plate_pseudonym": PSEUDO("plate", "JINGA12345")}
    assert event.ts_ns == NOW_NS


def test_plate_field_map_for_nested_camera_payloads() -> None:
    route = Route("event", "s", "z", "cam", "camera", field_map={
        "AlarmInfoPlate.result.PlateResult.license": "plate",
        "AlarmInfoPlate.result.PlateResult.confidence": "confidence",
    })
    payload = orjson.dumps({"AlarmInfoPlate": {"result": {"PlateResult": {
        "license": "沪B88888", "confidence": 0.9}}}})
    event = decode_plate_event(route, payload, NOW_NS, PSEUDO)
    assert event.fields == {"plate_pseudonym": PSEUDO("plate", "沪B88888"), "confidence": 0.9}


@pytest.mark.parametrize(("payload", "reason"), [
    ({"lane": 1}, "bad_field"),
    ({"plate": ""}, "bad_field"),
    ({"plate": " - "}, "bad_field"),
    ({"plate": ["ABC123"]}, "wrong_type"),
    ({"plate": "ABC123", "confidence": 101}, "bad_field"),
    ({"plate": "ABC123", "confidence": -0.1}, "bad_field"),
    ({"plate": "ABC123", "confidence": "high"}, "wrong_type"),
    ({"plate": "ABC123", "direction": "sideways"}, "bad_field"),
    ({"plate": "ABC123", "snapshot_url": "file:///etc/passwd"}, "bad_field"),
    ({"plate": "ABC123", "snapshot_url": "http://[::1/x"}, "bad_field"),
    ({"plate": "ABC123", "time": "2024-05-01 18:00:00"}, "bad_timestamp"),
    ({"plate": "ABC123", "lane": "x" * (MAX_STR_LEN + 1)}, "bad_field"),
    ({"plate": "A" * 33}, "bad_field"),
])
def test_plate_event_errors(payload: dict[str, Any], reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_plate_event(CAMERA, orjson.dumps(payload), NOW_NS, PSEUDO)
    assert info.value.reason == reason
    assert "ABC123" not in str(info.value)


def test_access_event() -> None:
    payload = orjson.dumps({"door": "B3-east", "card_number": "0004521987", "result": "GRANTED",
                            "reason": "schedule ok", "timestamp": 1_714_557_600})
    event = decode_access_event(READER, payload, NOW_NS, PSEUDO)
    assert event == Event("event", "site-1", "building-3", "reader-2", "access", {
        "door": "B3-east", "result": "granted", "card_pseudonym": PSEUDO("card", "4521987"),
        "reason": "schedule ok"}, 1_714_557_600 * SEC)


def test_access_event_card_spellings_share_a_pseudonym() -> None:
    a = decode_access_event(READER, b'{"door": 1, "card": 4521987, "result": true}', NOW_NS,
                            PSEUDO)
    b = decode_access_event(READER, b'{"door": 1, "card_no": "00 4521987", "result": "allow"}',
                            NOW_NS, PSEUDO)
    assert a.fields == b.fields == {"door": "1", "result": "granted",
                                    "card_pseudonym": PSEUDO("card", "4521987")}


def test_access_event_without_card() -> None:
    event = decode_access_event(READER, b'{"door": "D1", "result": "denied", "card": "  "}',
                                NOW_NS, PSEUDO)
    assert event.fields == {"door": "D1", "result": "denied"}


@pytest.mark.parametrize(("payload", "reason"), [
    ({"card": "12345678", "result": "granted"}, "bad_field"),
    ({"door": "D1", "card": "12345678"}, "bad_field"),
    ({"door": "D1", "card": "12345678", "result": "maybe"}, "bad_field"),
    ({"door": "D1", "card": "12345678", "result": 1}, "wrong_type"),
    ({"door": "D1", "card": 12345678.0, "result": "ok"}, "wrong_type"),
    ({"door": True, "card": "12345678", "result": "ok"}, "wrong_type"),
    ({"door": "D1", "card": "1" * 65, "result": "ok"}, "bad_field"),
])
def test_access_event_errors(payload: dict[str, Any], reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_access_event(READER, orjson.dumps(payload), NOW_NS, PSEUDO)
    assert info.value.reason == reason
    assert "12345678" not in str(info.value)


def test_identifier_inside_other_fields_is_redacted() -> None:
    plate = decode_plate_event(CAMERA, orjson.dumps({
        "plate": "粤B-12345", "lane": "in-2",
        "snapshot_url": "http://cam/snap/%E7%B2%A4B12345_1.jpg"}), NOW_NS, PSEUDO)
    assert plate.fields == {"plate_pseudonym": PSEUDO("plate", "粤B12345"), "lane": "in-2",
                            "redacted": True}
    card = decode_access_event(READER, orjson.dumps({
        "door": "D1", "card": "0098765432", "result": "denied",
        "reason": "card 98765432 not enrolled"}), NOW_NS, PSEUDO)
    assert card.fields == {"door": "D1", "result": "denied",
                           "card_pseudonym": PSEUDO("card", "98765432"), "redacted": True}


PLATE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789京沪粤"
plates = st.text(PLATE_ALPHABET, min_size=5, max_size=10).filter(
    lambda p: any(c in "GHJKLMNPQRSTUVWXYZ京沪粤" for c in p))
cards = st.text("0123456789ABCDEF", min_size=8, max_size=16).filter(lambda c: c[0] != "0")
int64s = st.integers(-(2**63), 2**63 - 1)
junk = st.one_of(st.none(), st.booleans(), int64s, st.floats(allow_nan=False, allow_infinity=False),
                 st.text(max_size=20), st.just("sideways"), st.just("http://cam/x.jpg"),
                 st.lists(int64s, max_size=2))


def _embed(identifier: str, template: str) -> str:
    return template.replace("{}", identifier)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(plate=plates, lane=junk, direction=junk, confidence=junk, url=junk, time=junk,
       sep=st.sampled_from(["", " ", "-", "·"]),
       where=st.sampled_from(["lane", "snapshot_url", "direction", None]),
       template=st.sampled_from(["{}", "http://cam/{}.jpg", "lane {} 2", "http://cam/?p={}"]))
def test_plate_never_leaks(plate: str, lane: object, direction: object, confidence: object,
                           url: object, time: object, sep: str, where: str | None,
                           template: str) -> None:
    raw = plate[:2] + sep + plate[2:]
    payload: dict[str, Any] = {"plate": raw, "lane": lane, "direction": direction,
                               "confidence": confidence, "snapshot_url": url, "time": time}
    if where is not None:
        payload[where] = _embed(raw, template)
    try:
        text = repr(decode_plate_event(CAMERA, orjson.dumps(payload), NOW_NS, PSEUDO))
    except DecodeError as exc:
        assert exc.reason in REASONS
        text = str(exc) + repr(exc.args)
    assert plate not in text and raw not in text


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(card=cards, zeros=st.integers(0, 3), door=junk, result=junk, reason=junk,
       as_int=st.booleans(), where=st.sampled_from(["reason", "door", None]),
       template=st.sampled_from(["{}", "card {} unknown", "door-{}"]))
def test_card_never_leaks(card: str, zeros: int, door: object, result: object, reason: object,
                          as_int: bool, where: str | None, template: str) -> None:
    assume(card not in str(NOW_NS))
    raw: object = int(card) if as_int and card.isdigit() else "0" * zeros + card
    payload: dict[str, Any] = {"card_number": raw, "door": door, "result": result,
                               "reason": reason}
    if where is not None:
        payload[where] = _embed(str(raw), template)
    try:
        text = repr(decode_access_event(READER, orjson.dumps(payload), NOW_NS, PSEUDO))
    except DecodeError as exc:
        assert exc.reason in REASONS
        text = str(exc) + repr(exc.args)
    assert card not in text and str(raw) not in text


# -------------------------------------------------------------------------------- fuzzing

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
    st.sampled_from(["2024-05-01T10:00:00Z", "C", "F", "hPa", "inHg", "granted", "in"]),
)
known_keys = st.sampled_from([
    *FIELD_TYPES, "contact", "occupancy", "gas", "carbon_monoxide", "last_seen", "ts", "time",
    "Temperature", "Humidity", "PM2.5", "TempUnit", "PressureUnit", "Pressure", "object",
    "fCnt", "rxInfo", "rssi", "plate", "card", "door", "result", "illuminance_lux",
])
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(known_keys, st.text(max_size=8)), children, max_size=6),
    ),
    max_leaves=25,
)
json_objects = st.dictionaries(st.one_of(known_keys, st.text(max_size=8)), json_values,
                               max_size=8)
FUZZ_ROUTES = [
    ENV, ENV_TS_MS, PARKING, DOOR, Route("device", "s", "z", "d", "gw"),
    Route("environment", "s", "z", "d", "air", field_map={"object.x": "temperature",
                                                         "a.0.b": "fcnt", "t": "smoke"},
          timestamp_field="time"),
]


def _run(decoder_name: str, route: Route, payload: bytes) -> None:
    try:
        readings = DECODERS[decoder_name](route, payload, NOW_NS)
    except DecodeError as exc:
        assert exc.reason in REASONS
        return
    check_readings(readings, route)


@settings(max_examples=400)
@given(payload=st.binary(max_size=200), route=st.sampled_from(FUZZ_ROUTES),
       decoder_name=st.sampled_from(ALL_READING_DECODERS))
def test_fuzz_arbitrary_bytes(payload: bytes, route: Route, decoder_name: str) -> None:
    _run(decoder_name, route, payload)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(obj=json_objects, route=st.sampled_from(FUZZ_ROUTES),
       decoder_name=st.sampled_from(ALL_READING_DECODERS))
def test_fuzz_json_objects_keep_the_schema(obj: dict[str, Any], route: Route,
                                           decoder_name: str) -> None:
    _run(decoder_name, route, orjson.dumps(obj))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(decoded=json_objects, fcnt=json_scalars, rx=json_values, time=json_scalars)
def test_fuzz_chirpstack_uplinks(decoded: dict[str, Any], fcnt: object, rx: object,
                                 time: object) -> None:
    up = {**CHIRPSTACK_UP, "object": decoded, "fCnt": fcnt, "rxInfo": [rx], "time": time}
    _run("chirpstack", PARKING, orjson.dumps(up))


@settings(max_examples=300)
@given(payload=st.one_of(st.binary(max_size=200), json_objects.map(orjson.dumps)))
def test_fuzz_event_decoders(payload: bytes) -> None:
    for decode in (decode_plate_event, decode_access_event):
        try:
            event = decode(CAMERA, payload, NOW_NS, PSEUDO)
        except DecodeError as exc:
            assert exc.reason in REASONS
            continue
        assert event.measurement == "event" and event.kind in ("plate_read", "access")
        for name, value in event.fields.items():
            assert type(value) is FIELD_TYPES[name]


# ------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize(("name", "value", "expected"), [
    ("temperature", 21, 21.0),
    ("temperature", -0.5, -0.5),
    ("temperature", None, None),
    ("fcnt", 7, 7),
    ("fcnt", 7.0, 7),
    ("smoke", 1, True),
    ("smoke", 0, False),
    ("lane", "A", "A"),
    ("unknown_thing", 3, 3.0),
    ("unknown_thing", True, True),
    ("unknown_thing", "text", None),
    ("unknown_thing", [1], None),
    ("unknown_thing", None, None),
])
def test_coerce_field(name: str, value: object, expected: object) -> None:
    result = coerce_field(name, value)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize(("name", "value", "reason"), [
    ("temperature", "hot", "wrong_type"),
    ("temperature", True, "wrong_type"),
    ("temperature", math.nan, "non_finite"),
    ("temperature", math.inf, "non_finite"),
    ("unknown_thing", -math.inf, "non_finite"),
    ("temperature", 10**400, "non_finite"),
    ("fcnt", True, "wrong_type"),
    ("fcnt", 2**63, "bad_field"),
    ("fcnt", math.nan, "non_finite"),
    ("smoke", 1.0, "wrong_type"),
    ("lane", 3, "wrong_type"),
    ("lane", "a\x00b", "bad_field"),
    ("lane", "\ud800", "bad_field"),
])
def test_coerce_field_errors(name: str, value: object, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        coerce_field(name, value)
    assert info.value.reason == reason


def test_schema_tables_are_consistent() -> None:
    assert set(FIELD_TYPES) == set(FIELD_UNITS) == set(FIELDS)
    for name, ftype in FIELD_TYPES.items():
        assert is_valid_field_name(name), name
        assert ftype in (float, int, bool, str)
        if ftype in (bool, str):
            assert FIELD_UNITS[name] == ""
    assert {"battery", "linkquality", "rssi", "snr", "fcnt"} <= DEVICE_FIELDS
    assert FIELD_TYPES["fcnt"] is int and FIELD_TYPES["temperature"] is float
    assert FIELD_TYPES["plate_pseudonym"] is str and FIELD_TYPES["card_pseudonym"] is str


def test_schema_doc_lists_every_field_with_its_type_and_unit() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "schema.md").read_text("utf-8")
    rows = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(
        r"^\| `(\w+)` \| (float|int|bool|str) \| ([^|]*?) \|", doc, re.MULTILINE)}
    assert set(rows) == set(FIELDS)
    for name, (type_name, unit) in rows.items():
        assert type_name == FIELD_TYPES[name].__name__, name
        assert unit.strip("`") == (FIELD_UNITS[name] or "\u2013"), name  # en dash: no unit


@pytest.mark.parametrize("name", ["time", "site", "kind", "_value", "1abc", "a b", "é", "x" * 65,
                                  ""])
def test_invalid_field_names(name: str) -> None:
    assert not is_valid_field_name(name)
