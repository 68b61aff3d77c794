"""The gateway as a process, end to end on real servers: mosquitto → spool → InfluxDB.

Every test uses its own topic prefix, MQTT client id and database, so the shared servers that CI
starts can serve them all.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from pathlib import Path

import orjson
import pytest

from edge.sim.publisher import Publisher, community, messages
from tests.gateway import (
    GatewayProcess,
    accounting_holds,
    count_points,
    mqtt_config,
    new_database,
    wait_for,
)
from tests.servers import Server, influx_query, vm_export

START_MS = 1_760_000_000_000  # fixed point times: the expected points are known exactly








def _publish(mosquitto: Server, prefix: str, n: int, sensors: int = 100) -> list[tuple[str, bytes]]:
    msgs = list(messages(community(sensors, sites=3, prefix=prefix), n, START_MS))
    with Publisher("127.0.0.1", mosquitto.port, client_id=f"pub-{prefix}") as pub:
        for topic, data in msgs:
            pub.publish(topic, data)
        pub.flush()
    return msgs


def _subscribe_once(gw: GatewayProcess) -> None:
    """Start and stop the gateway once so its persistent session exists at the broker."""
    gw.start()
    assert gw.terminate() == 0


def test_ten_thousand_messages_arrive_exactly_once_in_influxdb_v1(
    mosquitto: Server, influxdb1: Server, tmp_path: Path
) -> None:
    n = 10_000
    db = new_database(influxdb1)
    prefix = "e2e" + uuid.uuid4().hex[:8]
    gw = GatewayProcess(tmp_path, mqtt_config(
        tmp_path, mosquitto.port, prefix,
        influx={"url": influxdb1.url, "api": "v1", "database": db}))
    gw.start()
    try:
        msgs = _publish(mosquitto, prefix, n)
        wait_for(lambda: count_points(influxdb1, db) >= n, 60, f"{n} points in InfluxDB")
        wait_for(lambda: gw.status().points_queued == 0, 10, "an empty spool")
        # Exactly N: nothing lost, nothing doubled.
        assert count_points(influxdb1, db) == n
        # Tags, fields and timestamps of a sample are what was published.
        for topic, data in random.Random(7).sample(msgs, 20):
            _, site, zone, device = topic.split("/")
            sent = orjson.loads(data)
            rows = influx_query(
                influxdb1, db,
                f"SELECT * FROM environment WHERE device = '{device}' "
                f"AND time = {sent['ts']}ms", epoch="ms")
            assert len(rows) == 1, rows
            row = rows[0]
            assert (row["site"], row["zone"], row["kind"]) == (site, zone, "air")
            assert row["time"] == sent["ts"]
            for key in ("temperature", "humidity", "pm25"):
                assert row[key] == pytest.approx(sent[key])
        st = gw.status()
        ok, why = accounting_holds(st)
        assert ok, why
        assert st.counters["messages_received"] == n
        assert st.counters["points_delivered"] == n
    finally:
        assert gw.terminate() == 0


def test_the_v2_api_delivers_into_victoriametrics(
    mosquitto: Server, victoria: Server, tmp_path: Path
) -> None:
    n = 10_000
    prefix = "vm" + uuid.uuid4().hex[:8]
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "influx-token").write_text("test-token\n")
    gw = GatewayProcess(tmp_path, mqtt_config(
        tmp_path, mosquitto.port, prefix,
        influx={"url": victoria.url, "api": "v2", "org": "community", "bucket": "edge",
                "token_credential": "influx-token"}))
    # A site name unique to this test keeps other tests' series out of the count.
    msgs = list(messages(community(50, sites=2, prefix=prefix), n, START_MS))
    site_tag = f"{prefix}"
    gw.config["sources.mqtt.topics"][0]["site"] = site_tag
    gw.config["sources.mqtt.topics"][0]["template"] = prefix + "/{ignored}/{zone}/{device}"
    gw.start()
    try:
        with Publisher("127.0.0.1", mosquitto.port, client_id=f"pub-{prefix}") as pub:
            for topic, data in msgs:
                pub.publish(topic, data)
            pub.flush()

        def stored() -> int:
            series = vm_export(victoria, f'environment_temperature{{site="{site_tag}"}}')
            return sum(len(s["timestamps"]) for s in series)

        wait_for(lambda: stored() >= n, 60, f"{n} samples in VictoriaMetrics", interval=0.5)
        assert stored() == n
        sample = vm_export(victoria, f'environment_pm25{{site="{site_tag}",device="air-0001"}}')
        assert len(sample) == 1
        sent = [orjson.loads(d) for t, d in msgs if t.endswith("/air-0001")]
        assert sample[0]["timestamps"] == [m["ts"] for m in sent]
        assert sample[0]["values"] == pytest.approx([m["pm25"] for m in sent])
    finally:
        assert gw.terminate() == 0


def test_influxdb_outage_loses_nothing_and_keeps_order(
    mosquitto: Server, private_influxdb1: Server, tmp_path: Path
) -> None:
    influx = private_influxdb1
    db = new_database(influx)
    prefix = "out" + uuid.uuid4().hex[:8]
    gw = GatewayProcess(tmp_path, mqtt_config(
        tmp_path, mosquitto.port, prefix,
        influx={"url": influx.url, "api": "v1", "database": db}))
    gw.start()
    try:
        first = _publish(mosquitto, prefix, 1_000, sensors=10)
        wait_for(lambda: count_points(influx, db) == 1_000, 30, "the first 1,000 points")
        influx.stop()
        n_down = 4_000
        msgs = list(messages(community(10, sites=3, prefix=prefix), 1_000 + n_down, START_MS))
        with Publisher("127.0.0.1", mosquitto.port, client_id=f"pub-{prefix}") as pub:
            for topic, data in msgs[1_000:]:
                pub.publish(topic, data)
            pub.flush()
        wait_for(lambda: gw.status().points_queued == n_down, 30, "the outage data spooled")
        assert gw.running()
        influx.start()
        wait_for(lambda: count_points(influx, db) == 1_000 + n_down, 60, "all points back")
        # Per device, the stored series is the published sequence with no gap.
        rows = influx_query(influx, db, "SELECT seq FROM environment WHERE device = 'air-0003'")
        per_device = len(first + msgs[1_000:]) // 10
        assert [r["seq"] for r in rows] == [float(i) for i in range(per_device)]
        st = gw.status()
        assert st.meta.get("forwarder_last_error", "") == ""  # recovered, and said so
        ok, why = accounting_holds(st)
        assert ok, why
    finally:
        assert gw.terminate() == 0


def test_kill_9_at_random_moments_loses_no_acknowledged_message(
    mosquitto: Server, influxdb1: Server, tmp_path: Path
) -> None:
    n = 20_000
    db = new_database(influxdb1)
    prefix = "k9" + uuid.uuid4().hex[:8]
    gw = GatewayProcess(tmp_path, mqtt_config(
        tmp_path, mosquitto.port, prefix,
        influx={"url": influxdb1.url, "api": "v1", "database": db}))
    _subscribe_once(gw)  # the broker queues for our session while we are dead
    msgs = list(messages(community(100, sites=3, prefix=prefix), n, START_MS))
    done = threading.Event()
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            with Publisher("127.0.0.1", mosquitto.port, client_id=f"pub-{prefix}") as pub:
                for topic, data in msgs:
                    pub.publish(topic, data, window=500)
                    time.sleep(0.0001)
                pub.flush()  # every message acknowledged by the broker
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            done.set()

    publisher = threading.Thread(target=publish, name="publisher")
    publisher.start()
    rng = random.Random(2)
    kills = 0
    try:
        gw.start()
        for _ in range(4):
            time.sleep(rng.uniform(0.2, 1.2))
            gw.kill9()
            kills += 1
            gw.start()
        publisher.join(120)
        assert not errors, errors
        assert done.is_set()
        wait_for(lambda: count_points(influxdb1, db) >= n, 90, f"{n} distinct points")
        # Duplicates are identical points (same series and time), so the count is exact.
        assert count_points(influxdb1, db) == n
        assert kills == 4
        wait_for(lambda: gw.status().points_queued == 0, 10, "an empty spool")
        ok, why = accounting_holds(gw.status())
        assert ok, why
    finally:
        if gw.running():
            assert gw.terminate() == 0
        publisher.join(10)


BAD_PAYLOADS: list[tuple[bytes, str]] = [
    (b"{not json", "invalid_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (b'{"ts": 1760000000000, "temperature": "hot"}', "wrong_type"),
    (b'{"ts": 1760000000000, "temperature": NaN}', "non_finite"),
    (b'{"ts": 1760000000000, "temperature": -Infinity}', "non_finite"),
    (b'{"ts": 1760000000000, "temperature": 1e400}', "non_finite"),
    (b'{"ts": 1760000000000, "temperature": 1}' + b" " * 1_000_000, "too_large"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "too_deep"),
    (b'{"ts": 1760000000000, "a":' + b"[" * 100 + b"]" * 100 + b"}", "too_deep"),
]


def test_malformed_payloads_are_counted_and_good_data_keeps_flowing(
    mosquitto: Server, influxdb1: Server, tmp_path: Path
) -> None:
    db = new_database(influxdb1)
    prefix = "bad" + uuid.uuid4().hex[:8]
    gw = GatewayProcess(tmp_path, mqtt_config(
        tmp_path, mosquitto.port, prefix,
        influx={"url": influxdb1.url, "api": "v1", "database": db}))
    gw.start()
    good = list(messages(community(5, sites=1, prefix=prefix), 500, START_MS))
    rounds = 20
    expected: dict[str, int] = {}
    try:
        with Publisher("127.0.0.1", mosquitto.port, client_id=f"pub-{prefix}") as pub:
            for i, (topic, data) in enumerate(good):
                pub.publish(topic, data)
                if i < rounds:
                    for bad, reason in BAD_PAYLOADS:
                        pub.publish(topic, bad)
                        expected[reason] = expected.get(reason, 0) + 1
            pub.flush()
        wait_for(lambda: count_points(influxdb1, db) == len(good), 30, "all good points")
        assert gw.running()
        counters = gw.status().counters
        rejected = {k.split(":", 1)[1]: v for k, v in counters.items()
                    if k.startswith("messages_rejected:")}
        assert rejected == expected
        # Logged once per burst, not once per message.
        log = gw.log_tail(1_000_000)
        assert log.count("rejected payload") <= len(BAD_PAYLOADS) * 2, log[-3000:]
    finally:
        assert gw.terminate() == 0

