"""Line protocol against the real servers: what the encoder writes is stored unchanged, once.

Hostile-but-accepted strings (separators, quotes, ``#``, NUL, tabs, any Unicode) in tag values,
field keys and string values are written to a real InfluxDB 1.6 and must come back from
``/query`` as exactly one point in exactly one new measurement. VictoriaMetrics (which splits
lines before looking at quotes) is checked the same way for names and labels.

The server fixtures here are private to this module, small and self-contained (to be replaced by
the shared ones in tests/conftest.py later): each starts its server on random free loopback
ports with temporary directories and stops it at teardown.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.model import FieldValue, Reading
from ingest.lineprotocol import LineEncoder

pytestmark = pytest.mark.servers

DB = "lp"
TAG_KEYS = ("device", "kind", "site", "zone")
START_TIMEOUT_SECS = 30.0
HTTP_TIMEOUT_SECS = 10.0
VM_VISIBLE_SECS = 10.0
_RUN = uuid.uuid4().hex[:8]
_counter = itertools.count()

ACCEPTED_NASTY = [
    ",", "=", " ", '"', "'", "#", "\t", "\x00", "\x0b", "\x1c", "\x85", "\u2028",
    "\ufeff", "é", "日", "\U0001f600", "i", "t", "f",
]  # fmt: skip
accepted_char = st.one_of(
    st.sampled_from(ACCEPTED_NASTY),
    st.characters(codec="utf-8", exclude_characters="\\\n\r"),
)
tag_text = st.text(accepted_char, min_size=1, max_size=12)
field_key = st.text(accepted_char, min_size=1, max_size=12).filter(
    lambda s: s not in ("time", *TAG_KEYS) and s[0] not in "\t\x00" and '"' not in s
)
string_value = st.text(accepted_char, max_size=40)
field_value: st.SearchStrategy[FieldValue] = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    string_value,
)


def _unique_measurement(prefix: str) -> str:
    return f"{prefix}_{_RUN}_{next(_counter)}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else "")
    if not path:
        if os.environ.get("EDGE_TEST_REQUIRE_SERVERS") == "1":
            pytest.fail(f"{name} is not installed, and EDGE_TEST_REQUIRE_SERVERS=1", pytrace=False)
        pytest.skip(f"{name} is not installed")
    return path


def _http(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECS) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read(), dict(error.headers)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, want: int, log: Path) -> dict[str, str]:
    deadline = time.monotonic() + START_TIMEOUT_SECS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            status, _, headers = _http("GET", url)
        except OSError:
            time.sleep(0.1)
            continue
        if status == want:
            return headers
        time.sleep(0.1)
    pytest.fail(f"server did not answer {url} in {START_TIMEOUT_SECS}s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


@pytest.fixture(scope="module")
def influx_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private InfluxDB 1.6 with database ``lp``; yields its base URL."""
    binary = _binary("influxd")
    root = tmp_path_factory.mktemp("influxd")
    http_port, rpc_port = _free_port(), _free_port()
    config = root / "influxdb.conf"
    config.write_text(
        "reporting-disabled = true\n"
        f'bind-address = "127.0.0.1:{rpc_port}"\n'
        f'[meta]\n  dir = "{root / "meta"}"\n'
        f'[data]\n  dir = "{root / "data"}"\n  wal-dir = "{root / "wal"}"\n'
        "  query-log-enabled = false\n"
        f'[http]\n  bind-address = "127.0.0.1:{http_port}"\n  log-enabled = false\n'
    )
    log = root / "influxd.log"
    url = f"http://127.0.0.1:{http_port}"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [binary, "-config", str(config)], stdout=log_file, stderr=subprocess.STDOUT
        )
    try:
        headers = _wait_ready(proc, f"{url}/ping", 204, log)
        # Make sure we talk to the server we started, not something else on that port.
        assert headers.get("X-Influxdb-Version", "").startswith("1.")
        assert proc.poll() is None
        query = urllib.parse.urlencode({"q": f"CREATE DATABASE {DB}"})
        status, body, _ = _http("POST", f"{url}/query?{query}")
        assert status == 200, body
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def vm_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private VictoriaMetrics; yields its base URL."""
    binary = _binary("victoria-metrics")
    root = tmp_path_factory.mktemp("victoria-metrics")
    port = _free_port()
    log = root / "vm.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [
                binary,
                f"-httpListenAddr=127.0.0.1:{port}",
                f"-storageDataPath={root / 'data'}",
                "-loggerLevel=ERROR",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(proc, f"{url}/health", 200, log)
        assert proc.poll() is None
        yield url
    finally:
        _stop(proc)


def _influx_query(url: str, q: str) -> dict[str, Any]:
    params = urllib.parse.urlencode({"db": DB, "q": q, "epoch": "ns"})
    status, body, _ = _http("GET", f"{url}/query?{params}")
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)["results"][0]
    assert "error" not in result, result
    return result


def _measurements(url: str) -> set[str]:
    series = _influx_query(url, "SHOW MEASUREMENTS").get("series", [])
    return {row[0] for s in series for row in s["values"]}


def _influx_write(url: str, line: bytes) -> None:
    params = urllib.parse.urlencode({"db": DB, "precision": "ns"})
    status, body, _ = _http("POST", f"{url}/write?{params}", line)
    assert status == 204, (status, body, line)


def _assert_stored_once(url: str, point: Reading) -> None:
    """The point is the only one in its measurement, with tags and fields unchanged."""
    result = _influx_query(url, f'SELECT * FROM "{point.measurement}"')
    series = result["series"]
    assert len(series) == 1
    assert series[0]["name"] == point.measurement
    assert len(series[0]["values"]) == 1, series
    row = dict(zip(series[0]["columns"], series[0]["values"][0], strict=True))
    assert row.pop("time") == point.ts_ns
    for key, sent in point.fields.items():
        got = row[key]
        # bool must stay bool and str stay str; Go's JSON writes a float such as 4.6e16 as
        # the integer literal 46670937022919350, which reads back as the same float.
        assert isinstance(got, bool) == isinstance(sent, bool), key
        assert isinstance(got, str) == isinstance(sent, str), key
        if isinstance(sent, float) and type(got) is int:
            row[key] = float(got)
    expected: dict[str, object] = {key: getattr(point, key) for key in TAG_KEYS}
    expected.update(point.fields)
    assert row == expected
    keys = _influx_query(url, f'SHOW SERIES FROM "{point.measurement}"')["series"][0]["values"]
    assert len(keys) == 1


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,  # the autouse thread-leak check; harmless here
    ],
)
@given(
    tags=st.tuples(tag_text, tag_text, tag_text, tag_text),
    fields=st.dictionaries(field_key, field_value, min_size=1, max_size=4),
    offset=st.integers(min_value=0, max_value=10**15),
)
def test_hostile_strings_come_back_unchanged_as_one_point(
    influx_url: str,
    tags: tuple[str, str, str, str],
    fields: dict[str, FieldValue],
    offset: int,
) -> None:
    device, kind, site, zone = tags
    ts = 1_700_000_000_000_000_000 + offset
    point = Reading(_unique_measurement("lp"), site, zone, device, kind, fields, ts)
    before = _measurements(influx_url)
    _influx_write(influx_url, LineEncoder().encode(point))
    assert _measurements(influx_url) - before == {point.measurement}
    _assert_stored_once(influx_url, point)


TABLE: list[tuple[str, dict[str, str], dict[str, FieldValue], int]] = [
    ("separators", {"device": "a,b=c d", "zone": " lead "}, {"k ,=": "v ,= "}, 1),
    ("quotes", {"site": '"q"', "kind": "it's"}, {"k'": 'say "hi"'}, 2),
    ("hash", {"device": "#d"}, {"#k": "#v\\"}, 3),
    ("NUL", {"device": "a\x00b"}, {"k\x00": "a\x00b"}, 4),
    ("tabs inside", {"site": "\ts\t"}, {"k\t": "\t"}, 5),
    ("backslashes in strings", {}, {"s": "C:\\dir\\", "t": '\\"', "u": "a\\nb"}, 6),
    ("string that looks like a point", {}, {"s": 'x",forged=1i 1 #'}, 7),
    ("Time is an ordinary key", {}, {"Time": 1, "times": 2.5}, 8),
    ("extremes", {}, {"f": 1.7976931348623157e308, "g": 5e-324, "n": -(2**63)}, -(2**63) + 2),
    ("latest timestamp", {}, {"b": True, "c": False}, 2**63 - 2),
    ("64 KiB string", {}, {"s": "é" * (32 * 1024)}, 9),
]


def _table_point(tags: dict[str, str], fields: dict[str, FieldValue], ts: int) -> Reading:
    values = {"device": "d", "kind": "k", "site": "s", "zone": "z", **tags}
    return Reading(
        _unique_measurement("lpt"),
        values["site"],
        values["zone"],
        values["device"],
        values["kind"],
        fields,
        ts,
    )


@pytest.mark.parametrize(
    ("tags", "fields", "ts"), [pytest.param(t, f, s, id=label) for label, t, f, s in TABLE]
)
def test_injection_table_is_stored_unchanged(
    influx_url: str, tags: dict[str, str], fields: dict[str, FieldValue], ts: int
) -> None:
    point = _table_point(tags, fields, ts)
    before = _measurements(influx_url)
    _influx_write(influx_url, LineEncoder().encode(point))
    assert _measurements(influx_url) - before == {point.measurement}
    _assert_stored_once(influx_url, point)


def test_injection_table_as_one_batch_does_not_corrupt_neighbours(influx_url: str) -> None:
    points = [_table_point(tags, fields, ts) for _, tags, fields, ts in TABLE]
    before = _measurements(influx_url)
    encoder = LineEncoder()
    _influx_write(influx_url, b"\n".join(encoder.encode(point) for point in points))
    assert _measurements(influx_url) - before == {point.measurement for point in points}
    for point in points:
        _assert_stored_once(influx_url, point)


@pytest.mark.parametrize(
    "measurement", ["lpm a,b", "lpm=x", "lpm#", "lpm\x00", "lpm\t", 'lpm"', "lpm é\U0001f600"]
)
def test_measurement_names_are_stored_unchanged(influx_url: str, measurement: str) -> None:
    name = f"{measurement}_{_RUN}"
    point = Reading(name, "s", "z", "d", "k", {"v": 1}, 10)
    before = _measurements(influx_url)
    _influx_write(influx_url, LineEncoder().encode(point))
    assert _measurements(influx_url) - before == {name}


def _vm_names(url: str) -> set[str]:
    status, body, _ = _http("GET", f"{url}/api/v1/label/__name__/values")
    assert status == 200, body
    names: list[str] = json.loads(body)["data"]
    return set(names)


def _vm_export(url: str, measurement: str) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"match[]": f'{{__name__=~"{measurement}_.*"}}'})
    status, body, _ = _http("GET", f"{url}/api/v1/export?{params}")
    assert status == 200, body
    # A string field that reads as a number ("INF", "1e5") becomes a sample of that value in
    # VictoriaMetrics 1.79, and it exports infinities as bare +Inf/-Inf, which JSON lacks.
    return [json.loads(_VM_INF.sub(_json_infinity, line))
            for line in body.splitlines() if line.strip()]


def _json_infinity(match: re.Match[bytes]) -> bytes:
    return b"-Infinity" if match[1] == b"-" else b"Infinity"


_VM_INF = re.compile(rb"(?<=[\[,])([-+]?)Inf(?=[\],])")


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,  # the autouse thread-leak check; harmless here
    ],
)
@given(
    tags=st.tuples(tag_text, tag_text, tag_text, tag_text),
    keys=st.lists(field_key, min_size=1, max_size=3, unique=True),
    note=string_value,
)
def test_victoria_metrics_stores_names_and_labels_unchanged(
    vm_url: str, tags: tuple[str, str, str, str], keys: list[str], note: str
) -> None:
    device, kind, site, zone = tags
    measurement = _unique_measurement("lpvm")
    fields: dict[str, FieldValue] = {key: index for index, key in enumerate(keys)}
    note_key = "note" if "note" not in keys else "note2"
    fields[note_key] = note  # a string field: VictoriaMetrics splits lines before quotes
    point = Reading(measurement, site, zone, device, kind, fields, time.time_ns())
    before = _vm_names(vm_url)
    status, body, _ = _http("POST", f"{vm_url}/write", LineEncoder().encode(point))
    assert status == 204, body
    expected_names = {f"{measurement}_{key}" for key in keys}
    # Fresh samples become searchable within about a second of a flush: poll, bounded.
    deadline = time.monotonic() + VM_VISIBLE_SECS
    while True:
        assert _http("GET", f"{vm_url}/internal/force_flush")[0] == 200
        by_name = {row["metric"]["__name__"]: row for row in _vm_export(vm_url, measurement)}
        if expected_names <= set(by_name) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # VictoriaMetrics 1.79 keeps a string field as a zero-valued series of its own.
    assert set(by_name) - {f"{measurement}_{note_key}"} == expected_names
    for index, key in enumerate(keys):
        row = by_name[f"{measurement}_{key}"]
        labels = {k: v for k, v in row["metric"].items() if k != "__name__"}
        assert labels == {"device": device, "kind": kind, "site": site, "zone": zone}
        assert row["values"] == [index]
    new_names = _vm_names(vm_url) - before
    assert all(name.startswith(f"{measurement}_") for name in new_names), new_names
