"""The forwarder and writer against real servers: what InfluxDB answers decides what is kept.

Every test builds the production objects (a real :class:`SpoolService` on SQLite in
``tmp_path``, an :class:`InfluxWriter` from :func:`parse_config`, the :class:`Forwarder`) and
talks to a real InfluxDB 1.6 or VictoriaMetrics started by ``tests/servers.py``; the only
stand-in is a TCP socket that accepts and never answers, which is the fault under test.

Each forwarder run is bounded with ``asyncio.timeout``: runs that must keep retrying (wrong
API, unknown database, wrong password, no answer) end by that timeout, and then the spool is
checked: every line still queued, the error recorded for ``edgegw status``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import secrets
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import ingest.writer
from edge.config import InfluxConfig, parse_config
from edge.model import Priority
from ingest.forwarder import Forwarder
from ingest.spool import Batch, Segment, Spool, SpoolService, SpoolStatus
from ingest.writer import InfluxWriter, Outcome
from tests.servers import (
    HOST,
    Server,
    ServerError,
    _check_listener_owner,
    _http,
    _launch,
    _poll,
    find_binary,
    influx_query,
    influx_write,
    vm_export,
)

pytestmark = pytest.mark.servers

BOUND_SECS = 20.0  # a forwarder run that should finish
RETRYING_SECS = 1.5  # how long a run that keeps retrying is watched before it is stopped
T0 = 1_700_000_000_000_000_000
LAST_ERROR = "forwarder_last_error"
_RUN = uuid.uuid4().hex[:8]
_counter = itertools.count()


def unique(prefix: str) -> str:
    """A name no other test (or earlier run against a shared server) uses."""
    return f"{prefix}_{_RUN}_{next(_counter)}"


# --- building the production objects --------------------------------------------------------


def influx_config(
    tmp_path: Path, influxdb: dict[str, Any], credentials: dict[str, str] | None = None
) -> InfluxConfig:
    """``[influxdb]`` loaded the way the daemon loads it; secrets via $CREDENTIALS_DIRECTORY."""
    cred_dir = tmp_path / "credentials"
    cred_dir.mkdir(exist_ok=True)
    for name, value in (credentials or {}).items():
        path = cred_dir / name
        path.write_text(value + "\n")
        path.chmod(0o600)
    data = {
        "gateway": {
            "data_dir": str(tmp_path / "data"),
            "credentials_dir": str(tmp_path / "no-credentials-here"),
        },
        "sources": {"mqtt": {"topics": [{"template": "a/{device}", "decoder": "json"}]}},
        "influxdb": {
            "backoff_initial_secs": 0.05,
            "backoff_max_secs": 0.2,
            "flush_interval_ms": 1,
            **influxdb,
        },
    }
    config = parse_config(data, env={"CREDENTIALS_DIRECTORY": str(cred_dir)})
    assert config.influxdb is not None
    return config.influxdb


@contextlib.asynccontextmanager
async def spool_service(tmp_path: Path) -> AsyncIterator[SpoolService]:
    service = SpoolService(Spool(tmp_path / "spool.db", max_bytes=64 << 20))
    await service.open()
    try:
        yield service
    finally:
        await service.shutdown()


async def spool_segments(service: SpoolService, *segments: Sequence[bytes]) -> None:
    for lines in segments:
        batch = Batch(lines={Priority.TELEMETRY: list(lines)})
        await service.call(service.spool.append, batch, time.time_ns())


async def queued(service: SpoolService) -> list[Segment]:
    segments: list[Segment] = await service.call(service.spool.peek, 1 << 30, 1 << 40)
    return segments


async def status(service: SpoolService) -> SpoolStatus:
    result: SpoolStatus = await service.call(service.spool.status)
    return result


async def forward_everything(forwarder: Forwarder, service: SpoolService) -> None:
    async with asyncio.timeout(BOUND_SECS):
        while segments := await queued(service):
            await forwarder.forward(segments)


async def run_while_failing(forwarder: Forwarder) -> None:
    """Run the forwarder (probe included) until stopped; it must still be retrying then."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(RETRYING_SECS):
            await forwarder.run()


def server_message(detail: str) -> str:
    """InfluxDB's own message inside a quarantine detail (the raw body may be its JSON)."""
    with contextlib.suppress(ValueError, TypeError, KeyError):
        return str(json.loads(detail)["error"])
    return detail


def create_database(server: Server) -> str:
    db = unique("fwd")
    influx_query(server, "", f'CREATE DATABASE "{db}"')
    return db


def counts_by_series(server: Server, db: str, measurement: str) -> dict[str, int]:
    rows = influx_query(server, db, f'SELECT count(f) FROM "{measurement}" GROUP BY t')
    return {row["t"]: row["count"] for row in rows}


# --- 400 partial writes: quarantine exactly the bad lines -----------------------------------


async def test_bad_lines_are_quarantined_with_influxdbs_reason_and_good_lines_stored(
    influxdb1: Server, tmp_path: Path
) -> None:
    db = create_database(influxdb1)
    m = unique("conflict")
    influx_write(influxdb1, db, f"{m},t=a f=1i {T0}")  # f is an integer field from now on
    good = [f"{m},t=g{i} f={i}i {T0 + i}".encode() for i in range(1, 9)]
    floats = [f"{m},t=x{i} f={i}.5 {T0 + 100 + i}".encode() for i in range(2)]
    garbage = b"this is not line protocol"
    segments = [
        [good[0], floats[0], good[1]],
        [garbage, good[2], good[3], floats[1]],
        good[4:],
    ]
    config = influx_config(tmp_path, {"url": influxdb1.url, "database": db})
    async with spool_service(tmp_path) as service, InfluxWriter(config) as writer:
        await spool_segments(service, *segments)
        await forward_everything(Forwarder(service, writer, config), service)
        st = await status(service)
        rows = await service.call(service.spool.quarantined, 100)

    stored = influx_query(influxdb1, db, f'SELECT f FROM "{m}" GROUP BY t', epoch="ns")
    assert sorted((r["t"], r["time"], r["f"]) for r in stored) == sorted(
        [("a", T0, 1)] + [(f"g{i}", T0 + i, i) for i in range(1, 9)]
    )
    assert sorted((reason, line) for _, reason, _, line in rows) == sorted(
        [("type_conflict", floats[0]), ("type_conflict", floats[1]), ("parse_error", garbage)]
    )
    for _, reason, detail, _line in rows:
        message = server_message(detail)
        if reason == "type_conflict":
            assert message == (
                f'partial write: field type conflict: input field "f" on measurement "{m}" is '
                "type float, already exists as type integer dropped=1"
            )
        else:
            assert message == "unable to parse 'this is not line protocol': invalid field format"
    assert st.segments == 0 and st.points_queued == 0
    assert st.counters["points_spooled"] == 11
    assert st.counters["points_delivered"] == 8
    assert {k: v for k, v in st.counters.items() if k.startswith("points_quarantined:")} == {
        "points_quarantined:type_conflict": 2,
        "points_quarantined:parse_error": 1,
    }


# --- 404: wrong API, unknown database -------------------------------------------------------


async def test_v2_api_against_influxdb_1_6_logs_the_fix_and_keeps_the_data(
    influxdb1: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = influx_config(
        tmp_path,
        {"url": influxdb1.url, "api": "v2", "org": "o", "bucket": "b", "token_credential": "tok"},
        {"tok": "token-" + secrets.token_hex(8)},
    )
    lines = [f"{unique('v2')} f=1i {T0}".encode() for _ in range(3)]
    async with spool_service(tmp_path) as service, InfluxWriter(config) as writer:
        await spool_segments(service, lines[:1], lines[1:])
        probe = await writer.probe()
        assert (probe.outcome, probe.status) == (Outcome.NOT_FOUND, 404)
        await run_while_failing(Forwarder(service, writer, config))
        st = await status(service)

    errors = [r.getMessage() for r in caplog.records
              if r.name == "ingest.forwarder" and r.levelno == logging.ERROR]
    assert any('set influxdb.api = "v1"' in e and "/api/v2/write" in e for e in errors), errors
    assert "404" in st.meta[LAST_ERROR]
    assert st.segments == 2 and st.points_queued == 3
    assert st.counters.get("points_delivered", 0) == 0 and st.quarantine_rows == 0


async def test_unknown_database_is_404_and_keeps_the_data(
    influxdb1: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = unique("nodb")
    config = influx_config(tmp_path, {"url": influxdb1.url, "database": db})
    lines = [f"{unique('nodb')} f=1i {T0}".encode()]
    async with spool_service(tmp_path) as service, InfluxWriter(config) as writer:
        await spool_segments(service, lines)
        result = await writer.write(lines[0])
        assert (result.outcome, result.status) == (Outcome.NOT_FOUND, 404)
        assert f'database not found: \\"{db}\\"' in result.message
        await run_while_failing(Forwarder(service, writer, config))
        st = await status(service)

    assert any(f"database {db!r} does not exist" in r.getMessage()
               for r in caplog.records if r.levelno == logging.ERROR)
    assert "not_found (404)" in st.meta[LAST_ERROR] and "database not found" in st.meta[LAST_ERROR]
    assert st.segments == 1 and st.points_queued == 1
    assert st.counters.get("points_delivered", 0) == 0 and st.quarantine_rows == 0


# --- v2 into VictoriaMetrics, with and without gzip -----------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "none"])
async def test_v2_writes_reach_victoriametrics(
    victoria: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str
) -> None:
    gzipped: list[int] = []
    real_gzip = ingest.writer.gzip_fast

    def spy(body: bytes) -> bytes:  # the real compressor, counted
        gzipped.append(len(body))
        return real_gzip(body)

    monkeypatch.setattr(ingest.writer, "gzip_fast", spy)
    m = unique("vm")
    lines = [f"{m},t=s{i % 3} f={i}i {T0 + i * 1_000_000_000}".encode() for i in range(60)]
    assert len(b"\n".join(lines)) > 1024
    config = influx_config(
        tmp_path,
        {"url": victoria.url, "api": "v2", "org": "o", "bucket": "b", "token_credential": "tok",
         "compression": compression},
        {"tok": "vm-ignores-tokens"},
    )
    async with spool_service(tmp_path) as service, InfluxWriter(config) as writer:
        await spool_segments(service, lines[:25], lines[25:])
        await forward_everything(Forwarder(service, writer, config), service)
        st = await status(service)

    assert st.segments == 0 and st.counters["points_delivered"] == 60
    assert len(gzipped) == (1 if compression == "gzip" else 0)
    series = vm_export(victoria, f'{{__name__="{m}_f"}}')
    got = sorted(
        (s["metric"]["t"], ts, value)
        for s in series
        for ts, value in zip(s["timestamps"], s["values"], strict=True)
    )
    assert got == sorted((f"s{i % 3}", T0 // 1_000_000 + i * 1000, i) for i in range(60))


# --- authentication -------------------------------------------------------------------------


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _auth_query(
    server: Server, q: str, user: str = "", password: str = "", db: str = ""
) -> dict[str, Any]:
    form = {"q": q, "db": db} if db else {"q": q}
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if user:
        headers["Authorization"] = _basic(user, password)
    status_code, _, body = _http(
        "POST", f"{server.url}/query", urllib.parse.urlencode(form).encode(), headers
    )
    decoded: dict[str, Any] = json.loads(body)
    errors = [r["error"] for r in decoded.get("results", []) if "error" in r]
    if status_code != 200 or "error" in decoded or errors:
        raise ServerError(f"{q!r}: HTTP {status_code}: {body[:300]!r}")
    return decoded


def start_auth_influxd(base: Path, password: str) -> Server:
    """InfluxDB 1.6 with ``auth-enabled = true`` and one admin user ``admin``/``password``."""

    def configure(data_dir: Path, ports: list[int]) -> list[str]:
        conf = data_dir / "influxdb.conf"
        conf.write_text(
            "reporting-enabled = false\n"
            "reporting-disabled = true\n"
            f'bind-address = "{HOST}:{ports[1]}"\n'
            f'[meta]\n  dir = "{data_dir / "meta"}"\n'
            f'[data]\n  dir = "{data_dir / "data"}"\n  wal-dir = "{data_dir / "wal"}"\n'
            "  query-log-enabled = false\n"
            "[monitor]\n  store-enabled = false\n"
            f'[http]\n  bind-address = "{HOST}:{ports[0]}"\n'
            "  auth-enabled = true\n  log-enabled = false\n"
            '[logging]\n  level = "warn"\n'
        )
        binary = find_binary("influxdb1")
        assert binary is not None
        return [binary, "-config", str(conf)]

    def ready(server: Server, deadline: float) -> None:
        def attempt() -> None:
            status_code, headers, _ = _http("GET", f"{server.url}/ping")
            if status_code != 204 or "x-influxdb-version" not in headers:
                raise ServerError(f"/ping answered {status_code}")
            _check_listener_owner(server)  # the port is our process's, not somebody else's

        _poll(server, deadline, attempt)

    server = _launch("influxdb1", base, configure, 2, ready)
    try:
        # 1.6 lets exactly this statement through without credentials while no admin exists.
        _auth_query(server, f"CREATE USER admin WITH PASSWORD '{password}' WITH ALL PRIVILEGES")
        _auth_query(server, 'CREATE DATABASE "edge"', "admin", password)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def auth_influxdb1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    """(server, admin password) of a private auth-enabled InfluxDB 1.6."""
    if find_binary("influxdb1") is None:
        if os.environ.get("EDGE_TEST_REQUIRE_SERVERS") == "1":
            pytest.fail("influxd is not installed, and EDGE_TEST_REQUIRE_SERVERS=1", pytrace=False)
        pytest.skip("influxd is not installed (./dev test installs it)")
    password = "pw-" + secrets.token_urlsafe(12)
    server = start_auth_influxd(tmp_path_factory.mktemp("auth-influxdb1"), password)
    try:
        yield server, password
    finally:
        server.stop()


def assert_no_secret(text: str, *secret_values: str) -> None:
    for value in secret_values:
        assert value not in text
        assert base64.b64encode(f"admin:{value}".encode()).decode() not in text


async def test_wrong_password_is_an_auth_error_and_keeps_the_data(
    auth_influxdb1: tuple[Server, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, password = auth_influxdb1
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-" + secrets.token_urlsafe(12)
    config = influx_config(
        tmp_path,
        {"url": server.url, "database": "edge", "username": "admin",
         "password_credential": "influx-password"},
        {"influx-password": wrong},
    )
    m = unique("auth")
    lines = [f"{m},t=a f={i}i {T0 + i}".encode() for i in range(4)]
    async with spool_service(tmp_path) as service, InfluxWriter(config) as writer:
        await spool_segments(service, lines)
        result = await writer.write(lines[0])
        assert (result.outcome, result.status) == (Outcome.AUTH, 401)
        await run_while_failing(Forwarder(service, writer, config))
        st = await status(service)
        described = writer.describe()

    assert st.segments == 1 and st.points_queued == 4
    assert st.counters.get("points_delivered", 0) == 0 and st.quarantine_rows == 0
    assert "auth (401)" in st.meta[LAST_ERROR]
    assert any(r.levelno == logging.ERROR and "credentials" in r.getMessage()
               for r in caplog.records)
    assert_no_secret(caplog.text + st.meta[LAST_ERROR] + described, wrong, password)
    nothing = _auth_query(server, f'SELECT count(f) FROM "{m}"', "admin", password, "edge")
    assert nothing["results"] == [{"statement_id": 0}]


async def test_right_password_from_the_credentials_directory_delivers(
    auth_influxdb1: tuple[Server, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server, password = auth_influxdb1
    caplog.set_level(logging.DEBUG)
    config = influx_config(
        tmp_path,
        {"url": server.url, "database": "edge", "username": "admin",
         "password_credential": "influx-password"},
        {"influx-password": password},
    )
    m = unique("auth")
    lines = [f"{m},t=a f={i}i {T0 + i}".encode() for i in range(4)]
    async with spool_service(tmp_path) as service, InfluxWriter(config) as writer:
        assert (await writer.probe()).outcome is Outcome.OK
        await spool_segments(service, lines)
        await forward_everything(Forwarder(service, writer, config), service)
        st = await status(service)

    assert st.segments == 0 and st.counters["points_delivered"] == 4
    result = _auth_query(server, f'SELECT count(f) FROM "{m}"', "admin", password, "edge")
    assert result["results"][0]["series"][0]["values"][0][1] == 4
    assert_no_secret(caplog.text + repr(config) + str(config.model_dump()), password)


# --- a server that never answers ------------------------------------------------------------


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """A TCP server that accepts connections, reads whatever comes, and never answers."""
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        writer.close()

    server = await asyncio.start_server(swallow, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://{HOST}:{port}"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


async def test_a_server_that_never_answers_times_out_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    lines = [f"silent f={i}i {T0 + i}".encode() for i in range(3)]
    async with silent_server() as url:
        config = influx_config(tmp_path, {"url": url, "database": "edge", "timeout_secs": 0.5})
        async with spool_service(tmp_path) as service, InfluxWriter(config) as writer:
            await spool_segments(service, lines)
            started = time.monotonic()
            async with asyncio.timeout(BOUND_SECS):
                result = await writer.write(b"\n".join(lines))
            elapsed = time.monotonic() - started
            assert result.outcome is Outcome.RETRY and result.status is None
            assert result.message == "timeout after 0.5s"
            assert 0.45 <= elapsed < 3.0

            with pytest.raises(TimeoutError):
                async with asyncio.timeout(RETRYING_SECS):
                    await Forwarder(service, writer, config).forward(await queued(service))
            st = await status(service)

    assert st.segments == 1 and st.points_queued == 3
    assert st.counters.get("points_delivered", 0) == 0 and st.quarantine_rows == 0
    assert "retry (no answer): timeout after 0.5s" in st.meta[LAST_ERROR]


# --- idempotence and identity ---------------------------------------------------------------


async def test_a_resent_body_after_a_lost_success_stores_each_point_once(
    influxdb1: Server, tmp_path: Path
) -> None:
    db = create_database(influxdb1)
    m = unique("resend")
    lines = [f"{m},t=s{i % 2} f={i}i {T0 + i * 1_000_000_000}".encode() for i in range(6)]
    config = influx_config(tmp_path, {"url": influxdb1.url, "database": db})
    async with spool_service(tmp_path) as service, InfluxWriter(config) as writer:
        forwarder = Forwarder(service, writer, config)
        # The first delivery succeeds but its 204 is "lost": the same lines are sent again.
        assert (await writer.write(b"\n".join(lines))).outcome is Outcome.OK
        await spool_segments(service, lines)
        await forward_everything(forwarder, service)
        await spool_segments(service, lines)  # and once more, as after a crash before the ack
        await forward_everything(forwarder, service)
        st = await status(service)

    assert st.counters["points_delivered"] == 12  # at-least-once: counted per delivery
    assert counts_by_series(influxdb1, db, m) == {"s0": 3, "s1": 3}
    rows = influx_query(influxdb1, db, f'SELECT f FROM "{m}" GROUP BY t', epoch="ns")
    assert sorted((r["time"], r["f"]) for r in rows) == [
        (T0 + i * 1_000_000_000, i) for i in range(6)
    ]


async def test_two_events_in_the_same_second_are_both_kept(
    influxdb1: Server, tmp_path: Path
) -> None:
    db = create_database(influxdb1)
    m = unique("same_second")
    times = [T0, T0 + 1, T0 + 999_999_999]  # same second, distinct nanoseconds
    lines = [f"{m},t=door f={i}i {ts}".encode() for i, ts in enumerate(times)]
    config = influx_config(tmp_path, {"url": influxdb1.url, "database": db})
    async with spool_service(tmp_path) as service, InfluxWriter(config) as writer:
        await spool_segments(service, lines[:1], lines[1:])
        await forward_everything(Forwarder(service, writer, config), service)

    rows = influx_query(influxdb1, db, f'SELECT f FROM "{m}"', epoch="ns")
    assert [(r["time"], r["f"]) for r in rows] == [(ts, i) for i, ts in enumerate(times)]
