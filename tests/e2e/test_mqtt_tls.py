"""MQTT over TLS: verified against our CA, and refused with a clear error, never downgraded.

A private mosquitto with a TLS listener and a throwaway CA made with openssl.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.gateway import GatewayProcess, mosquitto_with, mqtt_config, wait_for
from tests.servers import find_binary, free_ports


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str, san: str) -> None:
    """``name``-ca.pem / ``name``-server.pem / ``name``-server.key, the server cert for ``san``."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={name} test CA", "-keyout", f"{name}-ca.key",
             "-out", f"{name}-ca.pem", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=broker",
             "-keyout", f"{name}-server.key", "-out", f"{name}-server.csr", cwd=d)
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", f"{name}-server.csr", "-CA", f"{name}-ca.pem",
             "-CAkey", f"{name}-ca.key", "-CAcreateserial", "-days", "2",
             "-extfile", f"{name}.ext", "-out", f"{name}-server.pem", cwd=d)


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A mosquitto with only a TLS listener on 127.0.0.1; yields (port, cert dir)."""
    binary = find_binary("mosquitto")
    if binary is None or shutil.which("openssl") is None:
        pytest.skip("mosquitto or openssl is not installed")
    certs = tmp_path / "certs"
    certs.mkdir()
    _make_ca(certs, "good", "IP:127.0.0.1")
    _make_ca(certs, "other", "IP:127.0.0.1")
    (port,) = free_ports(1)
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"cafile {certs / 'good-ca.pem'}\ncertfile {certs / 'good-server.pem'}\n"
        f"keyfile {certs / 'good-server.key'}\n")
    with mosquitto_with(binary, conf, port):
        yield port, certs


def _publish_tls(port: int, ca: Path, topic: str, n: int) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}",
                    protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=str(ca), cert_reqs=ssl.CERT_REQUIRED)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        infos = [c.publish(topic, b'{"ts": %d, "temperature": 20.5}' % (1_760_000_000_000 + i),
                           qos=1) for i in range(n)]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


def test_tls_with_our_ca_delivers(tls_broker: tuple[int, Path], tmp_path: Path) -> None:
    port, certs = tls_broker
    prefix = "tls" + uuid.uuid4().hex[:6]
    gw = GatewayProcess(tmp_path, mqtt_config(
        tmp_path, port, prefix, mqtt={"tls": {"ca_file": str(certs / "good-ca.pem")}}))
    gw.start()
    try:
        _publish_tls(port, certs / "good-ca.pem", f"{prefix}/s/z/dev-1", 50)
        wait_for(lambda: gw.status().points_queued == 50, 20, "50 points over TLS")
    finally:
        assert gw.terminate() == 0


def test_tls_with_the_wrong_ca_is_refused_clearly_and_never_downgraded(
    tls_broker: tuple[int, Path], tmp_path: Path
) -> None:
    port, certs = tls_broker
    prefix = "tlsbad" + uuid.uuid4().hex[:6]
    gw = GatewayProcess(tmp_path, mqtt_config(
        tmp_path, port, prefix, mqtt={"tls": {"ca_file": str(certs / "other-ca.pem")},
                                      "reconnect_initial_secs": 0.2,
                                      "reconnect_max_secs": 0.5}))
    gw.start()  # READY after the bounded wait: a broker we cannot trust is not a reason to die
    try:
        wait_for(lambda: "TLS failed" in gw.log_tail(), 20, "the TLS error in the log")
        log = gw.log_tail()
        assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate verify failed" in log
        assert "not falling back to plain text" in log
        assert gw.running()
        assert gw.status().counters.get("messages_received", 0) == 0
        assert log.count("TLS failed") == 1  # once, not once per retry
    finally:
        assert gw.terminate() == 0
