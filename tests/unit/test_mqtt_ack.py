"""PUBACKs of the MQTT intake: sent after the commit, and never for a mid the broker forgot."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path

from edge.config import parse_config
from edge.sources.mqtt import MqttIntake
from ingest.spool import Spool, SpoolService


class FakeClient:
    """The parts of gmqtt's Client that the intake's callbacks touch."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.subscriptions: list[object] = []
        self._package_handler = types.SimpleNamespace(
            _send_puback=self.sent.append,
            id_generator=types.SimpleNamespace(_used_ids=set()),
        )

    def subscribe(self, topic: str, qos: int) -> None:
        self.subscriptions.append(topic)


async def test_a_mid_from_a_session_the_broker_dropped_is_not_acknowledged(
    tmp_path: Path,
) -> None:
    config = parse_config({
        "gateway": {"site": "home", "data_dir": str(tmp_path), "credentials_dir": str(tmp_path)},
        "sources": {"mqtt": {"topics": [
            {"template": "community/{site}/{zone}/{device}", "decoder": "json"}]}},
    }, env={})
    assert config.sources.mqtt is not None
    service = SpoolService(Spool(tmp_path / "spool.db", max_bytes=1 << 20),
                           commit_interval_secs=0.01)
    await service.open()
    intake = MqttIntake(config.sources.mqtt, "home", service)
    client = FakeClient()
    intake._gmqtt = client  # type: ignore[assignment]
    intake._on_connect(client, 0, 0, {})  # type: ignore[arg-type]
    committer = asyncio.create_task(service.run())
    try:
        # Received, then the connection drops before the commit; the broker restarted without
        # the session, so its mid 5 may now name another message it has not yet sent us.
        intake.on_qos1(5, b'{"temperature": 20}', "community/n/z/a", {})
        intake._on_connect(client, 0, 0, {})  # type: ignore[arg-type]
        intake.on_qos1(7, b'{"temperature": 21}', "community/n/z/b", {})
        # A reconnect that kept the session: the broker redelivers the same mids.
        intake._on_connect(client, 1, 0, {})  # type: ignore[arg-type]
        intake.on_qos1(8, b'{"temperature": 22}', "community/n/z/c", {})
        async with asyncio.timeout(10):
            while intake._inflight:  # noqa: ASYNC110 (a counter, as in MqttIntake)
                await asyncio.sleep(0.01)
        assert client.sent == [7, 8]
        assert client.subscriptions == ["community/+/+/+"]  # not one more per reconnect
    finally:
        service.close()
        await committer
        await service.shutdown()
