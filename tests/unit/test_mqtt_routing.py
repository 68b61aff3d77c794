"""Topic routing of the MQTT intake: templates to tags, and topics no template can use."""

from __future__ import annotations

from pathlib import Path

from edge.config import parse_config
from edge.sources.mqtt import MqttIntake
from ingest.spool import Spool, SpoolService


def _intake(tmp_path: Path) -> MqttIntake:
    config = parse_config({
        "gateway": {"site": "home", "data_dir": str(tmp_path), "credentials_dir": str(tmp_path)},
        "sources": {"mqtt": {"topics": [
            {"template": "community/{site}/{zone}/{device}", "decoder": "json",
             "measurement": "environment", "kind": "air"},
            {"template": "zigbee2mqtt/{device}", "decoder": "zigbee2mqtt", "zone": "lobby"},
        ]}},
    }, env={})
    assert config.sources.mqtt is not None
    spool = SpoolService(Spool(tmp_path / "spool.db", max_bytes=1 << 20))
    return MqttIntake(config.sources.mqtt, "home", spool)


def test_templates_give_tags_and_static_defaults(tmp_path: Path) -> None:
    intake = _intake(tmp_path)
    found = intake.route("community/north/b3/air-7")
    assert found is not None
    route = found[0]
    assert (route.site, route.zone, route.device, route.kind) == ("north", "b3", "air-7", "air")
    found = intake.route("zigbee2mqtt/hall_sensor")
    assert found is not None
    assert (found[0].site, found[0].zone, found[0].device) == ("home", "lobby", "hall_sensor")


def test_topics_no_template_can_use_are_rejected_not_raised(tmp_path: Path) -> None:
    intake = _intake(tmp_path)
    # Matches no template (too many levels), and a level that cannot be a tag value.
    for topic in ("community/a/b/c/d", "zigbee2mqtt/bad\x01name", "zigbee2mqtt/" + "x" * 300):
        assert intake.route(topic) is None
        reason, lines = intake._decode(topic, b'{"temperature": 20}')
        assert (reason, lines) == ("unknown_topic", [])
    reason, lines = intake._decode("community/n/z/d", b'{"temperature": 20}')
    assert reason is None and len(lines) == 1
    assert lines[0].startswith(b"environment,device=d,kind=air,site=n,zone=z temperature=20.0 ")
