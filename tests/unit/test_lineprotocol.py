"""Unit tests for ingest.lineprotocol: round trips through the reference parser, rejections.

The oracle for "must be rejected" (:func:`expected_rejection`) restates the rules of the module
docstring independently, so a property test checks both directions: everything the rules allow
encodes and parses back unchanged, and everything they forbid raises LineProtocolError.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from enum import IntEnum

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.model import Event, FieldValue, Reading
from ingest.lineprotocol import LineEncoder, LineProtocolError
from tests.lp_reference import parse_line

TS = 1_795_601_990_123_456_789
TAG_KEYS = ("device", "kind", "site", "zone")

# Characters that matter to line protocol or to anything that splits lines.
NASTY = [
    ",", "=", " ", '"', "'", "\\", "#", "\t", "\n", "\r", "\x00", "\x0b", "\x0c", "\x1c",
    "\x85", "\u2028", "\u2029", "\ufeff", "\ud800", "\udfff", "é", "日", "\U0001f600", "i",
]  # fmt: skip
ACCEPTED_NASTY = [c for c in NASTY if c not in "\\\n\r\ud800\udfff"]

any_char = st.one_of(st.sampled_from(NASTY), st.characters())
accepted_char = st.one_of(
    st.sampled_from(ACCEPTED_NASTY),
    st.characters(codec="utf-8", exclude_characters="\\\n\r"),
)
any_text = st.text(any_char, max_size=10)
measurement_text = st.text(accepted_char, min_size=1, max_size=10).filter(
    lambda s: s[0] not in "#\t\x00"
)
name_text = st.text(accepted_char, min_size=1, max_size=10).filter(
    lambda s: s != "time" and s[0] not in "\t\x00" and '"' not in s
)
tag_text = st.text(accepted_char, min_size=1, max_size=10)
string_value = st.text(accepted_char, max_size=30)

finite_floats = st.floats(allow_nan=False, allow_infinity=False)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
accepted_value = st.one_of(finite_floats, int64, st.booleans(), string_value)
any_value = st.one_of(
    st.floats(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.booleans(),
    any_text,
    st.sampled_from(["x" * (64 * 1024), "x" * (64 * 1024 + 1), "é" * (32 * 1024 + 1)]),
)
timestamps = st.integers(min_value=-(2**63) + 2, max_value=2**63 - 2)


def make(
    fields: Mapping[str, FieldValue],
    *,
    measurement: str = "environment",
    device: str = "air-1",
    kind: str = "air",
    site: str = "s1",
    zone: str = "b3",
    ts: int = TS,
) -> Reading:
    """A reading with sensible defaults."""
    return Reading(measurement, site, zone, device, kind, fields, ts)


@st.composite
def points(
    draw: st.DrawFn,
    names: st.SearchStrategy[str],
    measurements: st.SearchStrategy[str],
    tags: st.SearchStrategy[str],
    values: st.SearchStrategy[FieldValue],
    stamps: st.SearchStrategy[int],
) -> Reading | Event:
    cls: type[Reading] | type[Event] = Reading if draw(st.booleans()) else Event
    fields = draw(st.dictionaries(names, values, min_size=1, max_size=4))
    return cls(
        draw(measurements), draw(tags), draw(tags), draw(tags), draw(tags), fields, draw(stamps)
    )


accepted_points = points(name_text, measurement_text, tag_text, accepted_value, timestamps)
any_points = points(
    any_text,
    any_text,
    any_text,
    any_value,
    st.integers(min_value=-(2**64), max_value=2**64),
)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad_name(text: str) -> bool:
    return not text or "\n" in text or "\r" in text or "\\" in text or not _utf8(text)


def expected_rejection(point: Reading | Event) -> str | None:
    """The rule (from the module docstring) that forbids this point, or None if it is fine."""
    if _bad_name(point.measurement) or point.measurement[0] in "#\t\x00":
        return "measurement"
    for key in TAG_KEYS:
        if _bad_name(getattr(point, key)):
            return key
    if not point.fields:
        return "no fields"
    if not -(2**63) + 2 <= point.ts_ns <= 2**63 - 2:
        return "timestamp"
    series_len = len(
        re.sub(r"([, ])", r"\\\1", point.measurement).encode()
        + b"".join(
            b"," + key.encode() + b"=" + re.sub(r"([,= ])", r"\\\1", getattr(point, key)).encode()
            for key in TAG_KEYS
        )
    )
    for key, value in point.fields.items():
        if _bad_name(key) or key == "time" or key[0] in "\t\x00" or '"' in key:
            return key
        if series_len + 4 + len(re.sub(r"([,= ])", r"\\\1", key).encode()) > 65535:
            return key
        if isinstance(value, float) and not math.isfinite(value):
            return key
        if isinstance(value, int) and not -(2**63) <= value <= 2**63 - 1:
            return key
        if isinstance(value, str) and (
            "\n" in value or "\r" in value or not _utf8(value) or len(value.encode()) > 65536
        ):
            return key
    return None


def assert_round_trip(point: Reading | Event, line: bytes) -> None:
    """The line parses back to exactly the point, and is a single line."""
    assert b"\n" not in line
    assert b"\r" not in line
    measurement, tags, fields, ts = parse_line(line)
    assert measurement == point.measurement
    assert tags == {key: getattr(point, key) for key in TAG_KEYS}
    assert list(tags) == sorted(tags), "tags must be sorted by key"
    assert ts == point.ts_ns
    assert fields.keys() == point.fields.keys()
    for key, sent in point.fields.items():
        got = fields[key]
        assert type(got) is type(sent), (key, sent, got)
        assert got == sent, (key, sent, got)
        if isinstance(sent, float):
            assert math.copysign(1.0, got) == math.copysign(1.0, sent)  # type: ignore[arg-type]


# --- properties -----------------------------------------------------------------------------


@settings(max_examples=400)
@given(accepted_points)
def test_accepted_points_round_trip_through_reference_parser(point: Reading | Event) -> None:
    assert_round_trip(point, LineEncoder().encode(point))


@settings(max_examples=400)
@given(any_points)
def test_encode_rejects_exactly_what_the_rules_forbid(point: Reading | Event) -> None:
    reason = expected_rejection(point)
    encoder = LineEncoder()
    if reason is None:
        assert_round_trip(point, encoder.encode(point))
    else:
        with pytest.raises(LineProtocolError):
            encoder.encode(point)
        # A rejected point is not half-cached: it is rejected again, the same way.
        with pytest.raises(LineProtocolError):
            encoder.encode(point)


@given(st.lists(accepted_points, min_size=1, max_size=8))
def test_batch_of_hostile_points_splits_back_into_the_same_points(
    batch: list[Reading | Event],
) -> None:
    encoder = LineEncoder(max_cached_series=3)
    body = b"\n".join(encoder.encode(point) for point in batch)
    lines = body.splitlines()
    assert len(lines) == len(batch)
    for point, line in zip(batch, lines, strict=True):
        assert_round_trip(point, line)


@given(st.lists(accepted_points, min_size=1, max_size=20))
def test_cache_bound_and_clearing_do_not_change_output(batch: list[Reading | Event]) -> None:
    small = LineEncoder(max_cached_series=2)
    for point in batch:
        assert small.encode(point) == LineEncoder().encode(point)
        assert len(small._series) <= 2
        assert len(small._keys) <= 2


# --- exact output ---------------------------------------------------------------------------


def test_typical_reading_exact_bytes() -> None:
    point = make({"temperature": 21.5, "humidity": 48.25, "co2": 612})
    assert LineEncoder().encode(point) == (
        b"environment,device=air-1,kind=air,site=s1,zone=b3 "
        b"temperature=21.5,humidity=48.25,co2=612i 1795601990123456789"
    )


def test_event_encodes_like_a_reading() -> None:
    fields: dict[str, FieldValue] = {"card": "k9f2", "granted": True, "reader": 2}
    event = Event("access", "s1", "gate-a", "door-7", "access", fields, TS)
    assert LineEncoder().encode(event) == (
        b'access,device=door-7,kind=access,site=s1,zone=gate-a card="k9f2",granted=true,'
        b"reader=2i 1795601990123456789"
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, b"true"),
        (False, b"false"),
        (0, b"0i"),
        (-(2**63), b"-9223372036854775808i"),
        (2**63 - 1, b"9223372036854775807i"),
        (1.0, b"1.0"),
        (-0.0, b"-0.0"),
        (0.1, b"0.1"),
        (1e300, b"1e+300"),
        (5e-324, b"5e-324"),
        (1.7976931348623157e308, b"1.7976931348623157e+308"),
        (1e16, b"1e+16"),
        ("", b'""'),
        ('say "hi"', b'"say \\"hi\\""'),
        ("C:\\dir\\", b'"C:\\\\dir\\\\"'),
        ("a\\nb", b'"a\\\\nb"'),
    ],
)
def test_value_formats(value: FieldValue, text: bytes) -> None:
    line = LineEncoder().encode(make({"v": value}))
    prefix = b"environment,device=air-1,kind=air,site=s1,zone=b3 v="
    assert line == prefix + text + b" %d" % TS
    assert_round_trip(make({"v": value}), line)


class Level(IntEnum):
    LOW = 1


class LoudFloat(float):
    def __repr__(self) -> str:
        return "LoudFloat!"


class LoudStr(str):
    def __str__(self) -> str:
        return "not me"

    def __format__(self, spec: str) -> str:
        return "not me"


def test_subclasses_are_written_by_value_not_by_their_repr() -> None:
    point = make({"level": Level.LOW, "f": LoudFloat(2.5), "s": LoudStr("a b")})
    line = LineEncoder().encode(point)
    assert line.endswith(b' level=1i,f=2.5,s="a b" 1795601990123456789')


# --- the injection table ----------------------------------------------------------------------

REJECTED = [
    ("LF in tag value", make({"v": 1.0}, device="a\nforged f=1i 1"), "'device'"),
    ("CR in tag value", make({"v": 1.0}, zone="a\rb"), "'zone'"),
    ("LF in measurement", make({"v": 1.0}, measurement="m\nx"), "measurement"),
    ("LF in field key", make({"v\nforged f": 1.0}), "field key"),
    ("LF in string field", make({"note": 'x\nforged,t=z f=9i 1\n"'}), "'note'"),
    ("CR in string field", make({"note": "x\ry"}), "'note'"),
    ("trailing backslash in tag", make({"v": 1.0}, site="a\\"), "'site'"),
    ("backslash in tag", make({"v": 1.0}, kind="a\\,b"), "'kind'"),
    ("backslash in measurement", make({"v": 1.0}, measurement="m\\"), "measurement"),
    ("backslash in field key", make({"a\\": 1.0}), "field key"),
    ("leading # measurement", make({"v": 1.0}, measurement="#m"), "measurement"),
    ("leading tab measurement", make({"v": 1.0}, measurement="\tm"), "measurement"),
    ("leading tab field key", make({"\tk": 1.0}), "field key"),
    ("leading NUL measurement", make({"v": 1.0}, measurement="\x00m"), "measurement"),
    ("leading NUL field key", make({"\x00\x00c": 1.0}), "field key"),
    ("field key time", make({"time": 1.0, "v": 2.0}), "'time'"),
    ("quote in field key", make({'a"': 1, "s": '",forged=1i 1'}), "field key 'a\"'"),
    ("empty tag value", make({"v": 1.0}, device=""), "'device'"),
    ("empty measurement", make({"v": 1.0}, measurement=""), "measurement"),
    ("empty field key", make({"": 1.0}), "field key"),
    ("no fields", make({}), "no fields"),
    ("lone surrogate in tag", make({"v": 1.0}, site="a\ud800"), "'site'"),
    ("lone surrogate in field key", make({"k\udc00": 1.0}), "field key"),
    ("lone surrogate in string", make({"note": "\udfff"}), "'note'"),
    ("string over 64 KiB", make({"note": "x" * (64 * 1024 + 1)}), "'note'"),
    ("multibyte string over 64 KiB", make({"note": "é" * (32 * 1024 + 1)}), "'note'"),
    ("series key too long", make({"v": 1.0}, device="d" * 65600), "series key"),
    ("series key + field key too long", make({"k" * 50: 1.0}, device="d" * 65460), "'kkkk"),
    ("NaN", make({"v": math.nan}), "'v'"),
    ("+Inf", make({"v": math.inf}), "'v'"),
    ("-Inf", make({"v": -math.inf}), "'v'"),
    ("int over int64", make({"n": 2**63}), "'n'"),
    ("int under int64", make({"n": -(2**63) - 1}), "'n'"),
    ("timestamp too late", make({"v": 1.0}, ts=2**63 - 1), "timestamp"),
    ("timestamp too early", make({"v": 1.0}, ts=-(2**63) + 1), "timestamp"),
    ("bool timestamp", make({"v": 1.0}, ts=True), "timestamp"),
    ("float timestamp", make({"v": 1.0}, ts=1.5), "timestamp"),  # type: ignore[arg-type]
    ("int tag value", make({"v": 1.0}, site=7), "'site'"),  # type: ignore[arg-type]
    ("None value", make({"v": None}), "'v'"),  # type: ignore[dict-item]
    ("bytes value", make({"v": b"x"}), "'v'"),  # type: ignore[dict-item]
]


@pytest.mark.parametrize(
    ("point", "names"), [pytest.param(p, n, id=label) for label, p, n in REJECTED]
)
def test_injection_cases_are_rejected_and_name_the_key(point: Reading, names: str) -> None:
    with pytest.raises(LineProtocolError, match=re.escape(names)):
        LineEncoder().encode(point)


ACCEPTED = [
    ("comma equals space in tags", make({"v": 1}, device="a,b=c d", zone=" lead trail ")),
    ("quotes in tags", make({"v": 1}, site='"quoted"', kind="it's")),
    ("comma equals space in field key", make({"k ,=x": 1})),
    ("comma space in measurement", make({"v": 1}, measurement="my meas,x")),
    ("equals in measurement", make({"v": 1}, measurement="a=b")),
    ("hash after the start", make({"#k": "#v"}, measurement="m#", device="#d")),
    ("NUL everywhere", make({"k\x00": "a\x00b"}, measurement="m\x00", device="\x00")),
    ("tab inside names", make({"k\t": 1}, measurement="m\t", site="\ts\t")),
    ("Time is not time", make({"Time": 1, "times": 2})),
    ("string with backslashes and quotes", make({"s": 'a\\"b\\\\c\\'})),
    ("string that looks like a point", make({"s": 'x",forged=1i 1 #'})),
    ("unicode line separators", make({"s": "a\u2028b\x85c"}, device="\u2029")),
    ("string of exactly 64 KiB", make({"s": "x" * (64 * 1024)})),
    ("extreme timestamps", make({"v": 1}, ts=2**63 - 2)),
    ("earliest timestamp", make({"v": 1}, ts=-(2**63) + 2)),
]


@pytest.mark.parametrize("point", [pytest.param(p, id=label) for label, p in ACCEPTED])
def test_hostile_but_valid_points_round_trip(point: Reading) -> None:
    line = LineEncoder().encode(point)
    assert_round_trip(point, line)


def test_escapes_are_exactly_those_of_the_spec() -> None:
    point = make({"k ,=": "v"}, measurement="m ,=", device="d ,=")
    line = LineEncoder().encode(point)
    assert line.startswith(b"m\\ \\,=,device=d\\ \\,\\=,kind=air,")
    assert b' k\\ \\,\\=="v" ' in line


def test_rejection_names_the_offending_field_among_several() -> None:
    point = make({"ok": 1.0, "bad": math.nan})
    with pytest.raises(LineProtocolError, match="'bad'") as info:
        LineEncoder().encode(point)
    assert "'ok'" not in str(info.value)


def test_cache_reuse_gives_identical_lines_for_other_values() -> None:
    encoder = LineEncoder()
    first = encoder.encode(make({"t": 1.0}))
    second = encoder.encode(make({"t": 2.0}))
    assert first.replace(b"t=1.0", b"t=2.0") == second
    assert len(encoder._series) == 1
    assert len(encoder._keys) == 1


def test_max_cached_series_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_cached_series"):
        LineEncoder(max_cached_series=0)


# --- the reference parser itself --------------------------------------------------------------


def test_reference_parser_resolves_escapes() -> None:
    line = b'my\\ m\\,x,t\\ k=v\\,1\\=2 f\\=k="a \\"q\\" \\\\ \\n",g=-1.5e3,h=3i,b=T 42'
    assert parse_line(line) == (
        "my m,x",
        {"t k": "v,1=2"},
        {"f=k": 'a "q" \\ \\n', "g": -1500.0, "h": 3, "b": True},
        42,
    )


@pytest.mark.parametrize(
    "line",
    [
        b"#m f=1i 1",
        b"m f=1i",
        b"m,t=a\nb f=1i 1",
        b"m,t= f=1i 1",
        b"m 1",
        b'm f="open 1',
        b"m f=1i,f=2i 1",
        b"m f=nan 1",
        b"m f=9223372036854775808i 1",
        b"m f=1i 1\n",
        b"m f=1i 1 2",
        b"m,t=a\xed\xa0\x80 f=1i 1",
    ],
)
def test_reference_parser_rejects_malformed_lines(line: bytes) -> None:
    with pytest.raises(ValueError):
        parse_line(line)
