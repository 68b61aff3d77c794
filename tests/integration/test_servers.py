"""Tests of the real-server harness itself (tests/servers.py and the conftest fixtures).

If these fail, every integration test built on the harness is suspect, so each one checks
something that could really go wrong: data reaching the server we think we started, the port
and data surviving a restart, and the identity check refusing somebody else's server.
"""

from __future__ import annotations

import socket
import threading
import urllib.error
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.servers import (
    Server,
    ServerError,
    influx_query,
    influx_write,
    vm_export,
    vm_write,
    wait_ready,
)

pytestmark = pytest.mark.servers

EVENT_TIMEOUT_SECS = 10.0


def unique(prefix: str) -> str:
    """A name no other test (or earlier run against a shared server) uses."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def test_influx_write_is_queryable(influxdb1: Server) -> None:
    measurement = unique("harness")
    influx_write(
        influxdb1,
        "edge",
        [
            f"{measurement},site=north temperature=21.5,door=true 1700000000000000000",
            f"{measurement},site=south temperature=19.0,door=false 1700000001000000000",
        ],
    )

    rows = influx_query(
        influxdb1,
        "edge",
        f'SELECT temperature, door FROM "{measurement}" GROUP BY site',
        epoch="ns",
    )

    assert sorted(rows, key=lambda r: r["time"]) == [
        {"time": 1700000000000000000, "site": "north", "temperature": 21.5, "door": True},
        {"time": 1700000001000000000, "site": "south", "temperature": 19.0, "door": False},
    ]


def test_influx_query_raises_on_error(influxdb1: Server) -> None:
    with pytest.raises(ServerError, match="database not found"):
        influx_query(influxdb1, unique("nodb"), "SELECT * FROM anything")


def test_vm_line_protocol_write_is_exportable(victoria: Server) -> None:
    measurement = unique("harness")
    vm_write(
        victoria,
        [
            f"{measurement},site=north pm25=12,temperature=21.5 1700000000000000000",
            f"{measurement},site=north pm25=13 1700000060000000000",
        ],
    )

    series = vm_export(victoria, f'{{__name__=~"{measurement}_.*"}}')

    assert series == [
        {
            "metric": {"__name__": f"{measurement}_pm25", "site": "north"},
            "values": [12, 13],
            "timestamps": [1700000000000, 1700000060000],
        },
        {
            "metric": {"__name__": f"{measurement}_temperature", "site": "north"},
            "values": [21.5],
            "timestamps": [1700000000000],
        },
    ]


def test_mosquitto_round_trip_qos1(mosquitto: Server) -> None:
    topic = f"test/{unique('harness')}/env"
    subscribed = threading.Event()
    received: list[mqtt.MQTTMessage] = []
    got_message = threading.Event()

    def on_subscribe(
        client: mqtt.Client, userdata: object, mid: int, reason_codes: object, props: object
    ) -> None:
        subscribed.set()

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        received.append(message)
        got_message.set()

    subscriber = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("sub"))
    publisher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique("pub"))
    subscriber.on_subscribe = on_subscribe
    subscriber.on_message = on_message
    subscriber.connect(mosquitto.host, mosquitto.port)
    subscriber.loop_start()
    publisher.connect(mosquitto.host, mosquitto.port)
    publisher.loop_start()
    try:
        subscriber.subscribe(topic, qos=1)
        assert subscribed.wait(EVENT_TIMEOUT_SECS), "no SUBACK"

        info = publisher.publish(topic, b'{"temperature": 21.5}', qos=1)
        info.wait_for_publish(EVENT_TIMEOUT_SECS)
        assert info.is_published(), "no PUBACK"
        assert got_message.wait(EVENT_TIMEOUT_SECS), "message not delivered"
    finally:
        for client in (publisher, subscriber):
            client.disconnect()
            client.loop_stop()

    assert [(m.topic, m.payload, m.qos) for m in received] == [(topic, b'{"temperature": 21.5}', 1)]


def test_private_influx_restart_keeps_data_and_port(private_influxdb1: Server) -> None:
    server = private_influxdb1
    port, first_pid = server.port, server.proc.pid if server.proc else None
    influx_write(server, "edge", "door,site=north open=true 1700000000000000000")

    server.stop()
    with pytest.raises(OSError):
        socket.create_connection((server.host, port), timeout=1.0).close()
    server.start()

    assert server.port == port
    assert server.proc is not None and server.proc.pid != first_pid
    rows = influx_query(server, "edge", "SELECT open FROM door", epoch="ns")
    assert rows == [{"time": 1700000000000000000, "open": True}]


def test_pause_makes_influx_unresponsive_until_resumed(private_influxdb1: Server) -> None:
    server = private_influxdb1
    server.pause()
    try:
        with pytest.raises((TimeoutError, urllib.error.URLError)):
            influx_query(server, "edge", "SHOW MEASUREMENTS", timeout_secs=0.5)
    finally:
        server.resume()
    assert influx_query(server, "edge", "SHOW MEASUREMENTS") == []


def test_identity_check_refuses_a_server_we_did_not_start(
    influxdb1: Server, private_influxdb1: Server, tmp_path: Path
) -> None:
    # Our private process, but the shared server's port: wait_ready must notice.
    impostor = Server(
        name="influxdb1",
        host=influxdb1.host,
        port=influxdb1.port,
        data_dir=private_influxdb1.data_dir,
        proc=private_influxdb1.proc,
    )
    with pytest.raises(ServerError, match="not ours"):
        wait_ready(impostor, timeout_secs=0.5)

    wait_ready(private_influxdb1, timeout_secs=5.0)
