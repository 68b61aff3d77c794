"""``edgegw`` as an operator runs it: ``python -m edge.cli ...`` in a subprocess.

* ``check-config`` and ``run`` refuse a bad file with exit 78 (EX_CONFIG, which the systemd unit
  does not restart) and the problem located by its key path, before anything starts;
* ``status`` and ``tail`` show what a real run stored; ``--help`` points at examples;
* ``demo`` works with nothing but the mosquitto binary;
* the process lifecycle: embedded mode now and InfluxDB later forwards the whole backlog, and
  SIGTERM with InfluxDB down stops in time and keeps the backlog for the next start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge.sim.publisher import Publisher, community, messages
from ingest.spool import open_readonly
from tests.gateway import (
    REPO,
    GatewayProcess,
    accounting_holds,
    count_points,
    mqtt_config,
    new_database,
    wait_for,
)
from tests.lp_reference import parse_line
from tests.servers import Server, find_binary

EX_CONFIG = 78
START_MS = 1_760_000_000_000


def edgegw(*args: str, env: dict[str, str] | None = None,
           timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m edge.cli ARGS`` from the repository root, without the caller's
    ``$CREDENTIALS_DIRECTORY``, ``$EDGEGW_CONFIG`` or ``$NOTIFY_SOCKET``."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("CREDENTIALS_DIRECTORY", "EDGEGW_CONFIG", "NOTIFY_SOCKET")}
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", *args], cwd=REPO, env={**base, **(env or {})},
        capture_output=True, text=True, timeout=timeout, check=False)


# --- bad configurations -------------------------------------------------------------------

GATEWAY = """\
[gateway]
site = "t"
data_dir = "@TMP@/data"
credentials_dir = "@TMP@/credentials"
"""

MQTT = """
[sources.mqtt]
port = 1883

[[sources.mqtt.topics]]
template = "community/{site}/{zone}/{device}"
decoder = "json"
"""

HTTP = """
[sources.http]
token_credential = "http-token"

[[sources.http.endpoints]]
path = "/plate/gate-1"
decoder = "plate"
device = "gate-1"
"""


@dataclass(frozen=True)
class BadConfig:
    id: str
    text: str | None  # the file, "@TMP@" standing for the test's temp dir; None: no file at all
    messages: tuple[str, ...]  # each must appear in stderr, "@TMP@" expanded
    credentials: dict[str, bytes] = field(default_factory=dict)
    secret: str | None = None  # must never appear in the output


BAD_CONFIGS = [
    BadConfig("unknown decoder", GATEWAY + MQTT + """
[[sources.mqtt.topics]]
template = "zigbee2mqtt/{device}"
decoder = "zigbee"
""", ("sources.mqtt.topics[1].decoder: must be 'json', 'zigbee2mqtt', 'chirpstack' or"
      " 'tasmota'",)),
    BadConfig("unknown key with a suggestion", GATEWAY.replace('site = "t"', 'sitee = "t"') + MQTT,
              ("gateway.sitee: unknown key (did you mean 'site'?)",)),
    BadConfig("unknown key in a nested table", GATEWAY + MQTT + 'colour = "red"\n',
              ("sources.mqtt.topics[0].colour: unknown key",)),
    BadConfig("unknown section", GATEWAY + MQTT + "[influx]\nurl = 'http://x'\n",
              ("influx: unknown key (did you mean 'influxdb'?)",)),
    BadConfig("port as a string", GATEWAY + MQTT.replace("port = 1883", 'port = "1883"'),
              ("sources.mqtt.port: expected an integer (got a string)",)),
    BadConfig("port as a float",
              GATEWAY + HTTP.replace("[sources.http]", "[sources.http]\nport = 8088.0"),
              ("sources.http.port: expected an integer (got a float)",),
              credentials={"http-token": b"tok"}),
    BadConfig("port out of range", GATEWAY + MQTT.replace("port = 1883", "port = 70000"),
              ("sources.mqtt.port: must be at most 65535",)),
    BadConfig("bad log level", GATEWAY + 'log_level = "verbose"\n' + MQTT,
              ("gateway.log_level: must be 'debug', 'info', 'warning' or 'error'",)),
    BadConfig("v1 without database", GATEWAY + MQTT + '[influxdb]\nurl = "http://127.0.0.1:8086"\n',
              ('influxdb.database: required with api = "v1"',)),
    BadConfig("v2 without org, bucket, token", GATEWAY + MQTT
              + '[influxdb]\nurl = "http://127.0.0.1:8086"\napi = "v2"\n',
              ('influxdb.org: required with api = "v2"',
               'influxdb.bucket: required with api = "v2"',
               'influxdb.token_credential: required with api = "v2"')),
    BadConfig("password in the InfluxDB URL", GATEWAY + MQTT
              + '[influxdb]\nurl = "http://edge:hunter2-secret@127.0.0.1:8086"\ndatabase = "d"\n',
              ("influxdb.url: must not contain credentials",), secret="hunter2-secret"),
    BadConfig("missing credential", GATEWAY + HTTP,
              ("sources.http.token_credential: credential 'http-token' not found in"
               " @TMP@/credentials ($CREDENTIALS_DIRECTORY is not set)",)),
    BadConfig("empty credential", GATEWAY + HTTP,
              ("sources.http.token_credential: credential 'http-token' at"
               " @TMP@/credentials/http-token is empty",), credentials={"http-token": b"\n"}),
    BadConfig("pseudonym key too short", GATEWAY + HTTP,
              ("gateway.pseudonym_key_credential: credential 'pseudonym-key' holds 5 bytes",),
              credentials={"http-token": b"tok", "pseudonym-key": b"short"}),
    BadConfig("credential name that is a path", GATEWAY
              + HTTP.replace('"http-token"', '"../../etc/shadow"'),
              ("sources.http.token_credential: a credential name is 1-128 letters",)),
    BadConfig("duplicate endpoint path", GATEWAY + HTTP + """
[[sources.http.endpoints]]
path = "/plate/gate-1"
decoder = "access"
device = "door-1"
""", ("sources.http.endpoints[1].path: same path as endpoints[0]",),
              credentials={"http-token": b"tok"}),
    BadConfig("duplicate subscription", GATEWAY + MQTT + """
[[sources.mqtt.topics]]
template = "community/{a}/{b}/{c}"
decoder = "json"
""", ("sources.mqtt.topics[1].template: same subscription 'community/+/+/+' as topics[0]",)),
    BadConfig("wildcard in a template", GATEWAY + MQTT.replace("{zone}", "+"),
              ("sources.mqtt.topics[0].template: '+' is not allowed",)),
    BadConfig("no topics", GATEWAY + "[sources.mqtt]\ntopics = []\n",
              ("sources.mqtt.topics: needs at least 1 entries",)),
    BadConfig("no source", GATEWAY, ("sources: no source configured",)),
    BadConfig("several problems at once", GATEWAY.replace('site = "t"', 'site = "t/1"')
              + MQTT.replace("port = 1883", 'port = "x"') + "[spool]\nmax_mb = 0\n",
              ("gateway.site: must be 1-64 letters", "sources.mqtt.port: expected an integer",
               "spool.max_mb: must be greater than 0")),
    BadConfig("TOML syntax error", GATEWAY + "\n[sources.mqtt\nport = 1\n",
              ("invalid TOML: ", "(at line 6, column 14)")),
    BadConfig("duplicate TOML key", GATEWAY + MQTT.replace("port = 1883", "port = 1\nport = 2"),
              ("invalid TOML: Cannot overwrite a value (at line 8, column 9)",)),
    BadConfig("no such file", None, ("cannot read the config file: No such file or directory",)),
]


def _write_bad(tmp: Path, case: BadConfig) -> Path:
    path = tmp / "edgegw.toml"
    if case.text is not None:
        path.write_text(case.text.replace("@TMP@", str(tmp)))
    if case.credentials:
        (tmp / "credentials").mkdir()
        for name, data in case.credentials.items():
            (tmp / "credentials" / name).write_bytes(data)
    return path


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=[c.id for c in BAD_CONFIGS])
def test_a_bad_config_exits_78_with_the_located_problem(case: BadConfig, tmp_path: Path) -> None:
    path = _write_bad(tmp_path, case)
    wanted = [m.replace("@TMP@", str(tmp_path)) for m in case.messages]
    check = edgegw("check-config", str(path))
    # `run` must stop at the same point, before it touches a broker, a port or the disk.
    run = edgegw("run", "-c", str(path), env={"NOTIFY_SOCKET": str(tmp_path / "absent.sock")},
                 timeout=30)
    for name, result in (("check-config", check), ("run", run)):
        assert result.returncode == EX_CONFIG, (name, result.stderr)
        assert result.stderr.startswith(f"{path}: configuration error(s):\n"), result.stderr
        for message in wanted:
            assert message in result.stderr, (name, message, result.stderr)
        assert result.stdout == "", (name, result.stdout)
        assert "Traceback" not in result.stderr
        if case.secret is not None:
            assert case.secret not in result.stderr
    assert run.stderr == check.stderr
    assert not (tmp_path / "data").exists(), "run created its data dir from a bad config"


GOOD_CONFIGS = {
    "embedded": (GATEWAY + MQTT,
                 "(mqtt -> spool @TMP@/data/spool.db -> embedded mode (no InfluxDB))"),
    "everything": (GATEWAY + """
[spool]
max_mb = 64

[influxdb]
url = "http://127.0.0.1:8086/"
database = "community"
username = "edgegw"
password_credential = "influx-password"
""" + MQTT + HTTP, "(mqtt, http -> spool @TMP@/data/spool.db -> InfluxDB v1 at"
                   " http://127.0.0.1:8086)"),
}


@pytest.mark.parametrize("name", sorted(GOOD_CONFIGS))
def test_a_good_config_passes_check_config(name: str, tmp_path: Path) -> None:
    text, summary = GOOD_CONFIGS[name]
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "http-token").write_text("token\n")
    (creds / "influx-password").write_text("hunter2-secret\n")
    path = tmp_path / "edgegw.toml"
    path.write_text(text.replace("@TMP@", str(tmp_path)))
    result = edgegw("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: ok {summary.replace('@TMP@', str(tmp_path))}\n"
    assert "hunter2-secret" not in result.stdout + result.stderr
    assert not (tmp_path / "data").exists()  # checking writes nothing


def test_the_annotated_example_config_is_valid(tmp_path: Path) -> None:
    # Its credentials come from $CREDENTIALS_DIRECTORY, as under systemd's LoadCredential=.
    for name in ("influx-password", "mqtt-password", "plate-camera-token"):
        (tmp_path / name).write_text(f"{name}-value\n")
    result = edgegw("check-config", str(REPO / "docs" / "edgegw.example.toml"),
                    env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert ": ok (" in result.stdout


# --- help ---------------------------------------------------------------------------------


def test_help_shows_examples() -> None:
    result = edgegw("--help")
    assert result.returncode == 0, result.stderr
    for text in ("examples:", "edgegw demo", "edgegw check-config /etc/edgegw/edgegw.toml",
                 "edgegw run -c /etc/edgegw/edgegw.toml", "edgegw status", "edgegw tail",
                 "docs/config-reference.md"):
        assert text in result.stdout, text


def test_run_help_names_the_config_path() -> None:
    result = edgegw("run", "--help")
    assert result.returncode == 0, result.stderr
    assert "-c CONFIG, --config CONFIG" in result.stdout
    assert "/etc/edgegw/edgegw.toml" in result.stdout
    assert "$EDGEGW_CONFIG" in result.stdout


def test_no_command_is_a_usage_error() -> None:
    result = edgegw()
    assert result.returncode == 2
    assert "usage: edgegw" in result.stderr


# --- status and tail ----------------------------------------------------------------------


def _status_text(*where: str) -> str:
    result = edgegw("status", *where)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_status_and_tail_show_what_a_real_run_stored(mosquitto: Server, tmp_path: Path) -> None:
    n_good, n_bad = 25, 3
    prefix = "cli" + uuid.uuid4().hex[:8]
    gw = GatewayProcess(tmp_path, mqtt_config(tmp_path, mosquitto.port, prefix))
    data_dir = str(tmp_path / "data")
    sent = list(messages(community(4, sites=2, prefix=prefix), n_good, START_MS))
    gw.start()
    try:
        with Publisher("127.0.0.1", mosquitto.port, client_id=f"pub-{prefix}") as pub:
            for i, (topic, data) in enumerate(sent):
                pub.publish(topic, data)
                if i < n_bad:
                    pub.publish(topic, b"{not json")
            pub.flush()
        total = n_good + n_bad
        wait_for(lambda: gw.status().counters.get("messages_received", 0) == total, 20,
                 f"{total} messages committed")
        # While the gateway runs (the spool is in WAL mode: readers do not block it).
        assert f"received {total}, accepted {n_good}" in _status_text("--data-dir", data_dir)
    finally:
        assert gw.terminate() == 0

    spool_path = tmp_path / "data" / "spool.db"
    for where in (("--data-dir", data_dir), ("-c", str(gw.config_path))):
        text = _status_text(*where)
        lines = text.splitlines()
        assert lines[0] == f"spool            {spool_path}", text
        assert lines[1].startswith(f"queued           {n_good} points, "), text
        assert " segments; oldest unsent " in lines[1] and lines[1].endswith(" s"), text
        assert lines[2] == f"messages         received {total}, accepted {n_good}", text
        assert lines[3] == f"points           spooled {n_good}, delivered 0", text
        assert lines[4] == f"rejected         invalid_json={n_bad}", text
        assert lines[5] == "quarantined      none", text
        assert lines[6] == "dropped          none", text
        assert lines[7] == "last error       none", text

    result = edgegw("status", "--data-dir", data_dir, "--json")
    assert result.returncode == 0, result.stderr
    st = json.loads(result.stdout)
    assert st["spool"] == str(spool_path)
    assert st["points_queued"] == n_good
    assert st["bytes_queued"] > 0
    assert st["quarantine_rows"] == 0
    assert st["counters"] == {
        "messages_received": total, "messages_accepted": n_good,
        "messages_rejected:invalid_json": n_bad, "points_spooled": n_good,
    }
    assert st["oldest_unsent_age_secs"] >= 0

    result = edgegw("tail", "--data-dir", data_dir, "-n", "3")
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert len(out) == 3, result.stdout
    points = [parse_line(line.encode()) for line in out]
    # The newest three are the last three published (times are unique per device).
    expected = set()
    for topic, data in sent[-3:]:
        _, site, zone, device = topic.split("/")
        expected.add((site, zone, device, json.loads(data)["ts"] * 1_000_000))
    assert {(t["site"], t["zone"], t["device"], ts) for _, t, _, ts in points} == expected
    for measurement, tags, fields, _ in points:
        assert measurement == "environment" and tags["kind"] == "air"
        assert set(fields) == {"seq", "temperature", "humidity", "pm25"}

    everything = edgegw("tail", "--data-dir", data_dir, "-n", "1000")
    assert len(everything.stdout.splitlines()) == n_good


@pytest.mark.parametrize("command", ["status", "tail"])
def test_status_and_tail_of_a_missing_spool_fail_clearly(command: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = edgegw(command, "--data-dir", str(missing))
    assert result.returncode == 1
    assert result.stderr == f"edgegw {command}: no spool at {missing / 'spool.db'}\n"
    assert result.stdout == ""
    assert not missing.exists(), f"{command} created the spool it was asked to inspect"


def test_status_with_a_bad_config_exits_78(tmp_path: Path) -> None:
    path = tmp_path / "edgegw.toml"
    path.write_text(GATEWAY.replace("@TMP@", str(tmp_path)))
    result = edgegw("status", "-c", str(path))
    assert result.returncode == EX_CONFIG
    assert "sources: no source configured" in result.stderr


# --- demo ---------------------------------------------------------------------------------


@pytest.mark.servers
def test_demo_runs_with_nothing_but_mosquitto(tmp_path: Path) -> None:
    if find_binary("mosquitto") is None:
        if os.environ.get("EDGE_TEST_REQUIRE_SERVERS") == "1":
            pytest.fail("mosquitto is not installed, and EDGE_TEST_REQUIRE_SERVERS=1")
        pytest.skip("mosquitto is not installed")
    data_dir = tmp_path / "demo"
    # PATH as a login shell has it: the demo must find /usr/sbin/mosquitto on its own.
    result = edgegw("demo", "--seconds", "6", "--rate", "50", "--data-dir", str(data_dir),
                    env={"PATH": "/usr/local/bin:/usr/bin:/bin"}, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "embedded mode" in result.stdout
    assert f"edgegw status --data-dir {data_dir}" in result.stdout
    spool = open_readonly(data_dir / "spool.db")
    try:
        st = spool.status()
        lines = spool.tail(5)
    finally:
        spool.close()
    assert st.points_queued >= 100, st
    assert st.counters.get("messages_received", 0) == st.counters.get("messages_accepted", 0)
    ok, why = accounting_holds(st)
    assert ok, why
    assert all(parse_line(line)[0] == "environment" for line in lines)


# --- lifecycle: embedded now, InfluxDB later; SIGTERM with a backlog -----------------------






def _publish(mosquitto: Server, prefix: str, n: int) -> None:
    with Publisher("127.0.0.1", mosquitto.port, client_id=f"pub-{prefix}") as pub:
        for topic, data in messages(community(20, sites=2, prefix=prefix), n, START_MS):
            pub.publish(topic, data)
        pub.flush()


def _restart_with(gw: GatewayProcess, config: dict[str, object]) -> None:
    gw.config = config
    gw.start()


def test_embedded_backlog_is_forwarded_once_influxdb_is_configured(
    mosquitto: Server, influxdb1: Server, tmp_path: Path
) -> None:
    n = 500
    prefix = "emb" + uuid.uuid4().hex[:8]
    gw = GatewayProcess(tmp_path, mqtt_config(tmp_path, mosquitto.port, prefix))
    assert "influxdb" not in gw.config
    gw.start()
    try:
        _publish(mosquitto, prefix, n)
        wait_for(lambda: gw.status().points_queued == n, 20, f"{n} points in the spool")
    finally:
        assert gw.terminate() == 0
    assert gw.status().points_queued == n

    db = new_database(influxdb1)
    _restart_with(gw, mqtt_config(tmp_path, mosquitto.port, prefix,
                                  influx={"url": influxdb1.url, "api": "v1", "database": db}))
    assert "[influxdb]" in gw.config_path.read_text()
    try:
        wait_for(lambda: count_points(influxdb1, db) >= n, 30, f"the {n} backlog points")
        wait_for(lambda: gw.status().points_queued == 0, 10, "an empty spool")
        assert count_points(influxdb1, db) == n
        st = gw.status()
        ok, why = accounting_holds(st)
        assert ok, why
        assert st.counters["points_delivered"] == n
        assert st.counters["messages_received"] == n
    finally:
        assert gw.terminate() == 0


def test_sigterm_with_influxdb_down_stops_in_time_and_keeps_the_backlog(
    mosquitto: Server, private_influxdb1: Server, tmp_path: Path
) -> None:
    n = 2_000
    influx = private_influxdb1
    db = new_database(influx)
    prefix = "term" + uuid.uuid4().hex[:8]
    config = mqtt_config(tmp_path, mosquitto.port, prefix,
                         influx={"url": influx.url, "api": "v1", "database": db})
    gw = GatewayProcess(tmp_path, config)
    gw.start()
    try:
        influx.stop()
        _publish(mosquitto, prefix, n)
        wait_for(lambda: gw.status().points_queued == n, 30, f"{n} points spooled")
        assert gw.status().meta.get("forwarder_last_error"), "the outage was not noticed"
    finally:
        t0 = time.monotonic()
        code = gw.terminate(timeout=30)  # also fails without STOPPING=1
        took = time.monotonic() - t0
    assert code == 0
    # The forwarder gets 20 s of grace to drain (below the unit's TimeoutStopSec=30).
    assert took < 10, f"SIGTERM took {took:.1f} s"
    assert gw.status().points_queued == n

    influx.start()
    _restart_with(gw, config)
    try:
        wait_for(lambda: count_points(influx, db) >= n, 60, f"all {n} points after the restart")
        wait_for(lambda: gw.status().points_queued == 0, 10, "an empty spool")
        assert count_points(influx, db) == n
        st = gw.status()
        ok, why = accounting_holds(st)
        assert ok, why
        assert st.counters["points_delivered"] == n
    finally:
        assert gw.terminate() == 0

