"""The HTTP push source end to end: a device POSTs, the gateway process spools, InfluxDB stores.

The gateway runs as a real process (``python -m edge.cli run``) on a port chosen here, with its
bearer token and pseudonym key as credential files in the test's temp dir. What is proved:

* a plate read and an access event with the right token are answered 200 ``{"status":
  "stored"}`` only once committed, and stored as ``event`` points whose plate / card is the keyed
  pseudonym of the site key;
* the raw plate and card number appear nowhere: not in the spool's files (database and WAL, read
  as bytes), not in the gateway's log, not in InfluxDB, not in an error answer;
* bad requests get their status (401, 404, 400 with the reason, 413), the 400s are counted per
  reason, nothing else is stored, and the gateway keeps serving good events.
"""

from __future__ import annotations

import http.client
import json
import secrets
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge.pseudonym import Pseudonymizer
from edge.sim.publisher import Publisher, community, messages
from ingest.spool import open_readonly
from tests.gateway import GatewayProcess, accounting_holds, count_points, wait_for
from tests.lp_reference import FieldValue, parse_line
from tests.servers import Server, free_ports, influx_query

TOKEN_CREDENTIAL = "http-token"
PLATE_PATH = "/plate/gate-1"
ACCESS_PATH = "/access/door-1"
EVENT_MS = 1_760_000_000_123  # a fixed device time: the stored timestamp is known exactly
START_MS = 1_760_000_000_000

Point = tuple[str, dict[str, str], dict[str, FieldValue], int]


@dataclass
class Site:
    """The secrets of one test's gateway and a plate and a card that only this test uses."""

    token: str
    key: bytes
    plate: str  # as the camera sends it: lower case, with a dash
    plate_normalized: str  # as it would be after normalisation
    card: str  # as the controller sends it: zero-padded
    card_digits: str  # without the padding

    def pseudonym(self, kind: str, value: str) -> str:
        return Pseudonymizer(self.key)(kind, value)

    def raw_identifiers(self) -> list[str]:
        return [self.plate, self.plate_normalized, self.card, self.card_digits]


def make_site(tmp: Path) -> Site:
    """Write the bearer token and pseudonym key credentials; pick a unique plate and card."""
    creds = tmp / "credentials"
    creds.mkdir(exist_ok=True)
    token = secrets.token_urlsafe(24)
    key = secrets.token_hex(32).encode()  # text: the trailing-newline rule cannot touch it
    (creds / TOKEN_CREDENTIAL).write_text(token + "\n")
    (creds / "pseudonym-key").write_bytes(key)
    letters = uuid.uuid4().hex[:6].upper()
    plate = f"q{letters[:2].lower()}-{letters[2:]}7"
    card_digits = str(secrets.randbelow(9 * 10**9) + 10**9)  # 10 digits, no leading zero
    return Site(token=token, key=key, plate=plate,
                plate_normalized=plate.upper().replace("-", ""),
                card="00" + card_digits, card_digits=card_digits)


def http_config(tmp: Path, port: int, *, http: dict[str, Any] | None = None,
                influx: dict[str, Any] | None = None,
                mqtt: tuple[int, str] | None = None) -> dict[str, Any]:
    """A gateway config with ``[sources.http]`` (a plate and an access endpoint), optionally
    forwarding to InfluxDB and reading ``<prefix>/{site}/{zone}/{device}`` from MQTT."""
    sections: dict[str, Any] = {
        "gateway": {"site": "test", "data_dir": str(tmp / "data"),
                    "credentials_dir": str(tmp / "credentials")},
        "spool": {"commit_interval_ms": 20},
    }
    if influx is not None:
        sections["influxdb"] = {"flush_interval_ms": 100, "backoff_initial_secs": 0.1,
                                "backoff_max_secs": 1.0, **influx}
    if mqtt is not None:
        mqtt_port, prefix = mqtt
        sections["sources.mqtt"] = {"host": "127.0.0.1", "port": mqtt_port,
                                    "client_id": f"edgegw-{prefix}"}
        sections["sources.mqtt.topics"] = [{
            "template": prefix + "/{site}/{zone}/{device}", "decoder": "json",
            "measurement": "environment", "kind": "air",
        }]
    sections["sources.http"] = {"host": "127.0.0.1", "port": port,
                                "token_credential": TOKEN_CREDENTIAL, **(http or {})}
    sections["sources.http.endpoints"] = [
        {"path": PLATE_PATH, "decoder": "plate", "zone": "car-park-b1", "device": "gate-1"},
        {"path": ACCESS_PATH, "decoder": "access", "zone": "block-7", "device": "door-1"},
    ]
    return sections


def start_gateway(tmp: Path, **kwargs: Any) -> tuple[GatewayProcess, int]:
    port = free_ports(1)[0]
    gw = GatewayProcess(tmp, http_config(tmp, port, **kwargs))
    gw.start()
    return gw, port


def post(port: int, path: str, body: bytes, token: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """POST ``body``; ``token`` goes into ``Authorization: Bearer``. Returns (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        sent = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        conn.request("POST", path, body=body, headers=sent)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def plate_body(site: Site, **extra: Any) -> bytes:
    """A plate camera's push, with the plate also in the snapshot URL (as cameras do)."""
    return json.dumps({
        "plate": site.plate, "lane": 2, "direction": "entry", "confidence": 93,
        "snapshot_url": f"http://admin:camera-pw@10.0.0.9/snap/{site.plate}.jpg",
        "time": EVENT_MS, **extra,
    }).encode()


def access_body(site: Site, **extra: Any) -> bytes:
    """A door controller's push, with the card number also in the reason text."""
    return json.dumps({
        "card_no": site.card, "door": "east", "result": "allow",
        "reason": f"card {site.card_digits} valid", "time": EVENT_MS, **extra,
    }).encode()


def stored_events(gw: GatewayProcess, n: int = 1000) -> list[Point]:
    spool = open_readonly(gw.spool_path)
    try:
        lines = spool.tail(n)
    finally:
        spool.close()
    return [p for p in map(parse_line, lines) if p[0] == "event"]


def files_under(*roots: Path) -> dict[Path, bytes]:
    """Every regular file under the roots (the spool database, its WAL and shm), as bytes."""
    out: dict[Path, bytes] = {}
    for root in roots:
        paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in paths:
            out[path] = path.read_bytes()
    return out


def assert_nowhere(raw_values: list[str], places: dict[str, bytes]) -> None:
    for name, data in places.items():
        lowered = data.lower()
        for raw in raw_values:
            assert raw.encode().lower() not in lowered, f"{raw!r} found in {name}"


def spool_and_log(gw: GatewayProcess) -> dict[str, bytes]:
    places = {str(p): b for p, b in files_under(gw.spool_path.parent).items()}
    places["gateway log"] = (gw.tmp / "gateway.log").read_bytes()
    return places


def check_plate_point(site: Site, point: Point) -> None:
    measurement, tags, fields, ts = point
    assert measurement == "event"
    assert tags == {"site": "test", "zone": "car-park-b1", "device": "gate-1",
                    "kind": "plate_read"}
    assert fields == {
        "plate_pseudonym": site.pseudonym("plate", site.plate),
        "lane": "2", "direction": "in", "confidence": pytest.approx(0.93),
        "redacted": True,  # the snapshot URL named the plate, so it was dropped
    }
    assert ts == EVENT_MS * 1_000_000


def check_access_point(site: Site, point: Point) -> None:
    measurement, tags, fields, ts = point
    assert measurement == "event"
    assert tags == {"site": "test", "zone": "block-7", "device": "door-1", "kind": "access"}
    assert fields == {
        "card_pseudonym": site.pseudonym("card", site.card),
        "door": "east", "result": "granted",
        "redacted": True,  # the reason named the card, so it was dropped
    }
    assert ts == EVENT_MS * 1_000_000


STORED = {"status": "stored"}


def test_events_are_stored_as_pseudonyms_and_the_raw_values_are_nowhere_on_disk(
    tmp_path: Path,
) -> None:
    site = make_site(tmp_path)
    gw, port = start_gateway(tmp_path)
    try:
        status, body = post(port, PLATE_PATH, plate_body(site), site.token)
        assert (status, json.loads(body)) == (200, STORED)
        status, body = post(port, ACCESS_PATH, access_body(site), site.token)
        assert (status, json.loads(body)) == (200, STORED)
        # 200 means committed: the points are in the spool now, without waiting.
        points = stored_events(gw)
        assert len(points) == 2, points
        check_plate_point(site, points[0])
        check_access_point(site, points[1])
        # The same plate spelt differently by another camera is the same pseudonym.
        respelt = site.plate_normalized[:3] + " " + site.plate_normalized[3:]
        status, _ = post(port, PLATE_PATH, json.dumps({"plate_number": respelt}).encode(),
                         site.token)
        assert status == 200
        assert stored_events(gw)[-1][2]["plate_pseudonym"] == site.pseudonym("plate", site.plate)

        places = spool_and_log(gw)
        # Positive control: the bytes searched are where the points are (database or WAL).
        assert any(site.pseudonym("card", site.card).encode() in data
                   for data in places.values())
        assert_nowhere([*site.raw_identifiers(), respelt], places)
        st = gw.status()
        assert st.counters["messages_accepted"] == 3
        assert st.points_queued == 3
    finally:
        assert gw.terminate() == 0
    # After shutdown the WAL is checkpointed into the database: still nowhere.
    assert_nowhere(site.raw_identifiers(), spool_and_log(gw))
    ok, why = accounting_holds(gw.status())
    assert ok, why


@dataclass(frozen=True)
class BadRequest:
    name: str
    path: str
    body: bytes
    auth: str  # "good", "none", "wrong", "basic", "x-auth-wrong", "prefix"
    status: int
    reason: str | None = None  # the 400 reason, counted as messages_rejected:<reason>


def bad_requests(site: Site) -> list[BadRequest]:
    plate = plate_body(site)
    return [
        BadRequest("no token", PLATE_PATH, plate, "none", 401),
        BadRequest("wrong token", PLATE_PATH, plate, "wrong", 401),
        BadRequest("token as Basic auth", PLATE_PATH, plate, "basic", 401),
        BadRequest("wrong X-Auth-Token", ACCESS_PATH, access_body(site), "x-auth-wrong", 401),
        BadRequest("prefix of the token", PLATE_PATH, plate, "prefix", 401),
        BadRequest("unknown path", "/plate/gate-2", plate, "good", 404),
        BadRequest("endpoint path with a suffix", PLATE_PATH + "/x", plate, "good", 404),
        BadRequest("truncated JSON", PLATE_PATH, plate[:-5], "good", 400, "invalid_json"),
        BadRequest("not UTF-8", PLATE_PATH, b'{"plate": "\xff\xfe"}', "good", 400,
                   "invalid_json"),
        BadRequest("empty body", PLATE_PATH, b"", "good", 400, "invalid_json"),
        BadRequest("JSON array", ACCESS_PATH, b"[1, 2]", "good", 400, "not_an_object"),
        BadRequest("no plate", PLATE_PATH, b'{"lane": 1}', "good", 400, "bad_field"),
        BadRequest("plate is a number", PLATE_PATH, b'{"plate": 1.5}', "good", 400,
                   "wrong_type"),
        BadRequest("unknown direction, with the plate", PLATE_PATH,
                   plate_body(site, direction="sideways"), "good", 400, "bad_field"),
        BadRequest("no door, with the card", ACCESS_PATH,
                   json.dumps({"card": site.card, "result": "ok"}).encode(), "good", 400,
                   "bad_field"),
        BadRequest("bad time, with the card", ACCESS_PATH,
                   access_body(site, time="yesterday"), "good", 400, "bad_timestamp"),
        BadRequest("too deep", PLATE_PATH, b'{"a":' * 40 + b"1" + b"}" * 40, "good", 400,
                   "too_deep"),
        BadRequest("oversized body", PLATE_PATH,
                   plate_body(site, image="A" * 200_000), "good", 413),
    ]


def headers_for(site: Site, auth: str) -> tuple[str | None, dict[str, str]]:
    if auth == "good":
        return site.token, {}
    if auth == "wrong":
        return secrets.token_urlsafe(24), {}
    if auth == "prefix":
        return site.token[:-1], {}
    if auth == "basic":
        return None, {"Authorization": f"Basic {site.token}"}
    if auth == "x-auth-wrong":
        return None, {"X-Auth-Token": site.token + "x"}
    return None, {}


def test_bad_requests_are_refused_counted_and_good_events_keep_flowing(
    tmp_path: Path,
) -> None:
    site = make_site(tmp_path)
    # 128 KiB: more than the decoders' 64 KiB default, so the configured limit is the one used.
    gw, port = start_gateway(tmp_path, http={"max_body_bytes": 131_072})
    expected_rejects: dict[str, int] = {}
    good = 0
    try:
        for bad in bad_requests(site):
            token, headers = headers_for(site, bad.auth)
            status, body = post(port, bad.path, bad.body, token, headers)
            assert status == bad.status, (bad.name, status, body)
            if bad.reason is not None:
                answer = json.loads(body)
                assert answer["error"] == bad.reason, (bad.name, answer)
                assert bad.reason in answer["detail"]
                expected_rejects[bad.reason] = expected_rejects.get(bad.reason, 0) + 1
            elif status != 413:
                assert json.loads(body)["error"] in ("unauthorized", "unknown path")
            assert_nowhere(site.raw_identifiers(), {f"answer to {bad.name}": body})
            assert gw.running(), bad.name
            # A good event right after every bad request is stored.
            status, body = post(port, PLATE_PATH, plate_body(site), site.token)
            assert (status, json.loads(body)) == (200, STORED), bad.name
            good += 1

        # The X-Auth-Token header is the documented alternative to Authorization.
        status, _ = post(port, ACCESS_PATH, access_body(site), None,
                         {"X-Auth-Token": site.token})
        assert status == 200
        # A body above the decoders' 64 KiB default but within max_body_bytes is accepted
        # (cameras push base64 snapshots), and the picture is not stored.
        status, body = post(port, PLATE_PATH, plate_body(site, image="A" * 100_000), site.token)
        assert (status, json.loads(body)) == (200, STORED)
        good += 1

        # Concurrent devices: every one answered only after its own commit.
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(
                lambda _: post(port, PLATE_PATH, plate_body(site), site.token)[0], range(40)))
        assert results == [200] * 40
        good += 40

        points = stored_events(gw)
        plates = [p for p in points if p[1]["kind"] == "plate_read"]
        access = [p for p in points if p[1]["kind"] == "access"]
        assert len(plates) == good and len(access) == 1
        for point in plates:
            check_plate_point(site, point)
        check_access_point(site, access[0])

        st = gw.status()
        rejected = {k.split(":", 1)[1]: v for k, v in st.counters.items()
                    if k.startswith("messages_rejected:")}
        assert rejected == expected_rejects
        # 401, 404 and 413 never reached the spool: not received, not stored.
        assert st.counters["messages_received"] == good + 1 + sum(expected_rejects.values())
        assert st.points_queued == good + 1
        ok, why = accounting_holds(st)
        assert ok, why
        places = spool_and_log(gw)
        assert b"bad or missing token" in places["gateway log"]
        assert b"rejected (bad_field)" in places["gateway log"]
        assert_nowhere(site.raw_identifiers(), places)
    finally:
        assert gw.terminate() == 0


def test_a_busy_port_fails_the_start_instead_of_reporting_ready(tmp_path: Path) -> None:
    make_site(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        gw = GatewayProcess(tmp_path, http_config(tmp_path, port))
        with pytest.raises(AssertionError, match="no READY=1"):
            gw.start(timeout=20)
        assert gw.proc is not None
        assert gw.proc.wait(10) != 0
        gw.kill9()  # already gone: only closes the log and the notify socket
    assert "address already in use" in gw.log_tail()




def test_events_reach_influxdb_as_pseudonyms_next_to_mqtt_readings(
    mosquitto: Server, influxdb1: Server, tmp_path: Path
) -> None:
    site = make_site(tmp_path)
    db = "t" + uuid.uuid4().hex[:12]
    influx_query(influxdb1, "", f'CREATE DATABASE "{db}"')
    prefix = "http" + uuid.uuid4().hex[:8]
    gw, port = start_gateway(
        tmp_path, influx={"url": influxdb1.url, "api": "v1", "database": db},
        mqtt=(mosquitto.port, prefix))
    n_mqtt = 200
    try:
        with Publisher("127.0.0.1", mosquitto.port, client_id=f"pub-{prefix}") as pub:
            for topic, data in messages(community(10, sites=2, prefix=prefix), n_mqtt, START_MS):
                pub.publish(topic, data)
            assert post(port, PLATE_PATH, plate_body(site), site.token)[0] == 200
            assert post(port, ACCESS_PATH, access_body(site), site.token)[0] == 200
            status, body = post(port, PLATE_PATH, plate_body(site, direction="up"), site.token)
            assert (status, json.loads(body)["error"]) == (400, "bad_field")
            pub.flush()
        wait_for(lambda: count_points(influxdb1, db, "environment", "temperature") == n_mqtt, 30,
                 f"{n_mqtt} MQTT readings in InfluxDB")
        wait_for(lambda: count_points(influxdb1, db, "event", "redacted") == 2, 30,
                 "both events in InfluxDB")
        rows = influx_query(influxdb1, db, "SELECT * FROM event", epoch="ns")
        by_kind = {r["kind"]: r for r in rows}
        assert set(by_kind) == {"plate_read", "access"}
        plate, access = by_kind["plate_read"], by_kind["access"]
        assert plate["plate_pseudonym"] == site.pseudonym("plate", site.plate)
        assert (plate["device"], plate["zone"], plate["site"]) == ("gate-1", "car-park-b1", "test")
        assert plate["time"] == EVENT_MS * 1_000_000
        assert plate.get("snapshot_url") is None and plate["redacted"] is True
        assert access["card_pseudonym"] == site.pseudonym("card", site.card)
        assert access.get("reason") is None and access["result"] == "granted"

        # Everything InfluxDB has for this database: points, series, keys, tag values.
        dumps = {
            q: json.dumps(influx_query(influxdb1, db, q)).encode()
            for q in ("SELECT * FROM /.*/", "SHOW SERIES", "SHOW FIELD KEYS",
                      "SHOW TAG VALUES WITH KEY =~ /.*/")
        }
        assert site.pseudonym("card", site.card).encode() in dumps["SELECT * FROM /.*/"]
        places = {f"InfluxDB {q}": data for q, data in dumps.items()} | spool_and_log(gw)
        assert_nowhere(site.raw_identifiers(), places)

        wait_for(lambda: gw.status().points_queued == 0, 10, "an empty spool")
        st = gw.status()
        ok, why = accounting_holds(st)
        assert ok, why
        assert st.counters["points_delivered"] == n_mqtt + 2
        assert st.counters["messages_rejected:bad_field"] == 1
    finally:
        assert gw.terminate() == 0
