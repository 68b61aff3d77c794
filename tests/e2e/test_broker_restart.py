"""The broker goes away and comes back: the gateway reconnects by itself, on MQTT 5 and 3.1.1.

A private mosquitto per test (it is stopped mid-run). Messages acknowledged before the restart
are already in the spool; messages published after it arrive through the reconnected session.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from edge.sim.publisher import Publisher, community, messages
from tests.gateway import GatewayProcess, accounting_holds, mqtt_config, wait_for
from tests.servers import find_binary, start_mosquitto

START_MS = 1_760_000_000_000


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_the_gateway_reconnects_after_a_broker_restart(protocol: str, tmp_path: Path) -> None:
    if find_binary("mosquitto") is None:
        pytest.skip("mosquitto is not installed")
    broker = start_mosquitto(tmp_path / "broker")
    prefix = "rs" + uuid.uuid4().hex[:8]
    gw = GatewayProcess(tmp_path, mqtt_config(tmp_path, broker.port, prefix,
                                              mqtt={"protocol": protocol,
                                                    "reconnect_initial_secs": 0.2,
                                                    "reconnect_max_secs": 1.0}))
    msgs = list(messages(community(10, sites=2, prefix=prefix), 2_000, START_MS))
    try:
        gw.start()
        with Publisher("127.0.0.1", broker.port, client_id=f"pub1-{prefix}") as pub:
            for topic, data in msgs[:1_000]:
                pub.publish(topic, data)
            pub.flush()
        wait_for(lambda: gw.status().counters.get("messages_received", 0) == 1_000, 30,
                 "the first 1,000 messages")
        broker.stop()
        broker.start()
        assert gw.running()
        # The session died with the broker (no persistence): wait for the re-subscription.
        wait_for(lambda: "connected again" in gw.log_tail(100_000), 30, "a reconnect")
        with Publisher("127.0.0.1", broker.port, client_id=f"pub2-{prefix}") as pub:
            for topic, data in msgs[1_000:]:
                pub.publish(topic, data)
            pub.flush()
        wait_for(lambda: gw.status().counters.get("messages_received", 0) == 2_000, 30,
                 "the second 1,000 messages")
        st = gw.status()
        assert st.points_queued == 2_000  # embedded mode: all kept, none twice
        ok, why = accounting_holds(st)
        assert ok, why
        assert gw.log_tail(100_000).count("connection lost") == 1  # logged once, not a storm
    finally:
        if gw.running():
            assert gw.terminate() == 0
        broker.stop()


def test_a_broker_that_is_down_at_boot_is_waited_for(tmp_path: Path) -> None:
    if find_binary("mosquitto") is None:
        pytest.skip("mosquitto is not installed")
    broker = start_mosquitto(tmp_path / "broker")
    broker.stop()
    prefix = "boot" + uuid.uuid4().hex[:8]
    gw = GatewayProcess(tmp_path, mqtt_config(tmp_path, broker.port, prefix,
                                              mqtt={"reconnect_initial_secs": 0.2,
                                                    "reconnect_max_secs": 0.5}))
    try:
        gw.start()  # READY after the bounded wait, without a broker
        assert gw.running()
        broker.start()
        wait_for(lambda: "connected again" in gw.log_tail(100_000), 30, "the first connection")
        with Publisher("127.0.0.1", broker.port, client_id=f"pub-{prefix}") as pub:
            for topic, data in messages(community(5, prefix=prefix), 100, START_MS):
                pub.publish(topic, data)
            pub.flush()
        wait_for(lambda: gw.status().points_queued == 100, 30, "100 points")
        assert gw.log_tail(100_000).count("cannot connect") == 1  # once, not per retry
    finally:
        if gw.running():
            assert gw.terminate() == 0
        broker.stop()
