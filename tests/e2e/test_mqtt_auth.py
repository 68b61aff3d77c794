"""A broker that requires a password: the credential file is used, and a wrong one is refused."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.sim.publisher import Publisher, community, messages
from tests.gateway import GatewayProcess, mosquitto_with, mqtt_config, wait_for
from tests.servers import find_binary, free_ports

PASSWORD = "s3cret-" + uuid.uuid4().hex[:8]


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[int]:
    binary = find_binary("mosquitto")
    passwd = find_binary("mosquitto") and Path("/usr/bin/mosquitto_passwd")
    if binary is None or not passwd or not passwd.exists():
        pytest.skip("mosquitto / mosquitto_passwd not installed")
    pwfile = tmp_path / "passwd"
    for user, pw in (("edgegw", PASSWORD), ("sim", "sim-pw")):
        flag = ["-c"] if not pwfile.exists() else []
        subprocess.run([str(passwd), "-b", *flag, str(pwfile), user, pw], check=True,
                       capture_output=True)
    acl = tmp_path / "acl"
    acl.write_text("user edgegw\ntopic read ok/#\n\nuser sim\ntopic write #\n")
    (port,) = free_ports(1)
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"user root\nlistener {port} 127.0.0.1\nallow_anonymous false\n"
                    f"password_file {pwfile}\nacl_file {acl}\npersistence false\n")
    with mosquitto_with(binary, conf, port):
        yield port


def _gateway(tmp_path: Path, port: int, prefix: str, password: str) -> GatewayProcess:
    creds = tmp_path / "credentials"
    creds.mkdir(exist_ok=True)
    (creds / "mqtt-password").write_text(password + "\n")
    return GatewayProcess(tmp_path, mqtt_config(
        tmp_path, port, prefix, mqtt={"username": "edgegw", "password_credential": "mqtt-password",
                                      "reconnect_initial_secs": 0.2, "reconnect_max_secs": 0.5}))


def test_the_password_from_the_credential_file_is_used(auth_broker: int, tmp_path: Path) -> None:
    prefix = "ok/auth" + uuid.uuid4().hex[:6]
    gw = _gateway(tmp_path, auth_broker, prefix, PASSWORD)
    gw.start()
    try:
        pub = Publisher("127.0.0.1", auth_broker, client_id=f"pub-{prefix}",
                        username="sim", password="sim-pw")
        with pub:
            for topic, data in messages(community(5, prefix=prefix), 100, 1_760_000_000_000):
                pub.publish(topic, data)
            pub.flush()
        wait_for(lambda: gw.status().points_queued == 100, 20, "100 points")
        assert PASSWORD not in gw.log_tail(1_000_000)
    finally:
        assert gw.terminate() == 0


def test_a_wrong_password_is_refused_loudly_once(auth_broker: int, tmp_path: Path) -> None:
    gw = _gateway(tmp_path, auth_broker, "authbad" + uuid.uuid4().hex[:6], "wrong-password")
    gw.start()
    try:
        wait_for(lambda: "refused" in gw.log_tail(), 20, "the refusal in the log")
        time.sleep(1.5)  # several retries happen meanwhile; they must not each log
        log = gw.log_tail(1_000_000)
        assert log.count("broker refused the connection") == 1, log
        assert "wrong-password" not in log
        assert gw.running()
    finally:
        assert gw.terminate() == 0

