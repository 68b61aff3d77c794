"""Tests of edge.config: error messages, credentials, pseudonym key, topic templates, docs."""

from __future__ import annotations

import os
import pickle
import stat
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from edge.config import (
    PSEUDONYM_KEY_FILE,
    Config,
    ConfigError,
    HttpPushSource,
    MqttTopic,
    demo_config,
    load_config,
    load_pseudonym_key,
    parse_config,
    reference_markdown,
)

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cret-Value-42"

MQTT = """
[sources.mqtt]
[[sources.mqtt.topics]]
template = "a/{device}"
decoder = "json"
"""

V1 = """
[influxdb]
url = "http://127.0.0.1:8086"
database = "community"
"""


@pytest.fixture
def creds(tmp_path: Path) -> Path:
    """A $CREDENTIALS_DIRECTORY with a few credentials."""
    directory = tmp_path / "run-credentials"
    directory.mkdir()
    (directory / "influx-token").write_text(SECRET + "\n")
    (directory / "http-token").write_text(SECRET)
    (directory / "empty").write_text("")
    (directory / "newline-only").write_text("\n")
    return directory


def load_text(tmp_path: Path, text: str, env: Mapping[str, str], *, gateway: bool = True) -> Config:
    """Write ``text`` after a [gateway] header pointing at an empty credentials_dir, and load.

    Keys at the top of ``text`` (before any table header) land in [gateway].
    """
    if gateway:
        header = f'[gateway]\ncredentials_dir = "{tmp_path / "etc-credentials"}"\n'
        text = header + textwrap.dedent(text)
    path = tmp_path / "edgegw.toml"
    path.write_text(text)
    return load_config(path, env=env)


# --- error table --------------------------------------------------------------------------

ERROR_CASES = [
    pytest.param(
        "[spool]\nretention_hour = 1\n" + MQTT,
        "spool.retention_hour: unknown key (did you mean 'retention_hours'?)",
        id="unknown-key",
    ),
    pytest.param(
        "[spool]\nbogus = 1\n" + MQTT,
        "spool.bogus: unknown key (expected one of: path, max_mb,",
        id="unknown-key-no-suggestion",
    ),
    pytest.param(
        MQTT.replace("[sources.mqtt]", '[sources.mqtt]\nport = "1883"'),
        "sources.mqtt.port: expected an integer (got a string)",
        id="wrong-type",
    ),
    pytest.param(
        "[spool]\nmax_mb = true\n" + MQTT,
        "spool.max_mb: expected a number (got a boolean)",
        id="bool-is-not-a-number",
    ),
    pytest.param(
        'log_level = "verbose"\n' + MQTT,
        "gateway.log_level: must be 'debug', 'info', 'warning' or 'error'",
        id="bad-enum",
    ),
    pytest.param(
        "[sources.mqtt]\n[[sources.mqtt.topics]]\ntemplate = 'a/{device}'\n",
        "sources.mqtt.topics[0].decoder: required key is missing",
        id="missing-required",
    ),
    pytest.param(
        MQTT + "[[sources.mqtt.topics]]\ntemplate = 'b/{device}'\ndecoder = 'xml'\n",
        "sources.mqtt.topics[1].decoder: must be 'json', 'zigbee2mqtt', 'chirpstack' or 'tasmota'",
        id="list-index-path",
    ),
    pytest.param(
        "[sources.mqtt]\ntopics = []\n",
        "sources.mqtt.topics: needs at least 1 entries",
        id="no-topics",
    ),
    pytest.param(
        MQTT.replace("a/{device}", "a/{device}-x"),
        "sources.mqtt.topics[0].template: level '{device}-x': a placeholder is a whole level",
        id="template-partial-level",
    ),
    pytest.param(
        MQTT.replace("a/{device}", "a/+/{device}"),
        "sources.mqtt.topics[0].template: '+' is not allowed",
        id="template-plus",
    ),
    pytest.param(
        MQTT.replace("a/{device}", "a/#/{device}"),
        "sources.mqtt.topics[0].template: '#' is allowed only as the last level",
        id="template-hash-not-last",
    ),
    pytest.param(
        MQTT.replace("a/{device}", "{device}/x/{device}"),
        "sources.mqtt.topics[0].template: placeholder {device} appears twice",
        id="template-duplicate-placeholder",
    ),
    pytest.param(
        MQTT + "[[sources.mqtt.topics]]\ntemplate = 'a/{sensor}'\ndecoder = 'tasmota'\n",
        "sources.mqtt.topics[1].template: same subscription 'a/+' as topics[0]",
        id="duplicate-subscriptions",
    ),
    pytest.param(
        MQTT.replace("[sources.mqtt]", "[sources.mqtt]\nreconnect_max_secs = 0.5"),
        "sources.mqtt.reconnect_max_secs: must be at least reconnect_initial_secs",
        id="reconnect-max-below-initial",
    ),
    pytest.param(
        MQTT.replace("[sources.mqtt]", "[sources.mqtt]\nreceive_maximum = 0"),
        "sources.mqtt.receive_maximum: must be at least 1",
        id="out-of-range",
    ),
    pytest.param(
        MQTT.replace(
            "[sources.mqtt]", "[sources.mqtt]\n[sources.mqtt.tls]\nca_file = '/nonexistent/ca.pem'"
        ),
        "sources.mqtt.tls.ca_file: file /nonexistent/ca.pem does not exist",
        id="tls-file-missing",
    ),
    pytest.param(
        'site = "north court"\n' + MQTT,
        "gateway.site: must be 1-64 letters, digits,",
        id="site-not-id-safe",
    ),
    pytest.param(
        MQTT.replace("[sources.mqtt]", "[sources.mqtt]\npassword_credential = '../../etc/shadow'"),
        "sources.mqtt.password_credential: a credential name is",
        id="credential-name-is-a-name",
    ),
    pytest.param(
        '[influxdb]\nurl = "http://127.0.0.1:8086"\n' + MQTT,
        'influxdb.database: required with api = "v1"',
        id="v1-without-database",
    ),
    pytest.param(
        '[influxdb]\nurl = "http://127.0.0.1:8086"\napi = "v2"\norg = "o"\nbucket = "b"\n' + MQTT,
        'influxdb.token_credential: required with api = "v2"',
        id="v2-without-token",
    ),
    pytest.param(
        V1 + 'username = "edgegw"\n' + MQTT,
        "influxdb.password_credential: required when username is set",
        id="username-without-password",
    ),
    pytest.param(
        V1 + 'org = "o"\n' + MQTT,
        'influxdb.org: only used with api = "v2"',
        id="v2-key-with-v1",
    ),
    pytest.param(
        V1.replace("http://127.0.0.1:8086", "ftp://127.0.0.1") + MQTT,
        "influxdb.url: must be an http:// or https:// URL",
        id="bad-url",
    ),
    pytest.param(
        '[influxdb]\nurl = "http://127.0.0.1:8086"\napi = "v2"\norg = "o"\nbucket = "b"\n'
        'token_credential = "no-such-token"\n' + MQTT,
        "influxdb.token_credential: credential 'no-such-token' not found in"
        " $CREDENTIALS_DIRECTORY or ",
        id="missing-credential-file",
    ),
    pytest.param(
        "[sources.http]\ntoken_credential = 'empty'\n"
        "[[sources.http.endpoints]]\npath = '/plate'\ndecoder = 'plate'\ndevice = 'gate-1'\n",
        "sources.http.token_credential: credential 'empty' at ",
        id="empty-credential",
    ),
    pytest.param(
        "[sources.http]\ntoken_credential = 'newline-only'\n"
        "[[sources.http.endpoints]]\npath = '/plate'\ndecoder = 'plate'\ndevice = 'gate-1'\n",
        "/newline-only is empty",
        id="credential-only-a-newline",
    ),
    pytest.param(
        "[sources.http]\n[[sources.http.endpoints]]\npath = '/plate'\ndecoder = 'plate'\n"
        "device = 'gate-1'\n",
        "sources.http.token_credential: required key is missing",
        id="http-without-token",
    ),
    pytest.param(
        "[sources.http]\ntoken_credential = 'http-token'\n"
        "[[sources.http.endpoints]]\npath = '/plate'\ndecoder = 'plate'\ndevice = 'gate-1'\n"
        "[[sources.http.endpoints]]\npath = '/plate'\ndecoder = 'access'\ndevice = 'door-1'\n",
        "sources.http.endpoints[1].path: same path as endpoints[0]",
        id="duplicate-http-path",
    ),
    pytest.param("[spool]\nmax_mb = 1\n", "sources: no source configured", id="no-sources"),
    pytest.param(
        MQTT + "[spool]\nmax_mb = \n",
        "invalid TOML: Invalid value (at line 9, column 10)",  # 2 header lines + 7,
        id="toml-syntax-error",
    ),
]


@pytest.mark.parametrize(("snippet", "expected"), ERROR_CASES)
def test_error_cases(tmp_path: Path, creds: Path, snippet: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, snippet, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems
    assert str(caught.value) == "\n".join(caught.value.problems)


def test_config_error_keeps_its_problems_through_pickle() -> None:
    error = ConfigError(["a.b: one", "c[0]: two"])
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.problems, str(copy)) == (["a.b: one", "c[0]: two"], "a.b: one\nc[0]: two")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.problems == [
        f"{path}: cannot read the config file: No such file or directory"
    ]


def test_every_problem_is_reported_at_once(tmp_path: Path, creds: Path) -> None:
    text = """\
        log_level = "loud"
        [spool]
        max_mb = -1
        [influxdb]
        url = "http://127.0.0.1:8086"
        api = "v2"
        [sources.mqtt]
        [[sources.mqtt.topics]]
        template = "a/{device}"
        decoder = "json"
        [[sources.mqtt.topics]]
        template = "b/{device}"
        decoder = "yaml"
        """
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text, {"CREDENTIALS_DIRECTORY": str(creds)})
    paths = [problem.split(":")[0] for problem in caught.value.problems]
    assert paths == [
        "gateway.log_level",
        "spool.max_mb",
        "influxdb.org",
        "influxdb.bucket",
        "influxdb.token_credential",
        "sources.mqtt.topics[1].decoder",
    ]


def test_missing_credential_without_credentials_directory(tmp_path: Path) -> None:
    text = "[sources.http]\ntoken_credential = 'http-token'\n"
    text += "[[sources.http.endpoints]]\npath = '/p'\ndecoder = 'plate'\ndevice = 'gate-1'\n"
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text, {})
    assert caught.value.problems == [
        f"sources.http.token_credential: credential 'http-token' not found in"
        f" {tmp_path / 'etc-credentials'} ($CREDENTIALS_DIRECTORY is not set)"
    ]


# --- credentials and secrets --------------------------------------------------------------


def full_config(tmp_path: Path, creds: Path) -> Config:
    (creds / "influx-password").write_text(SECRET + "-influx\n")
    (creds / "mqtt-password").write_text(SECRET + "-mqtt")
    text = V1 + 'username = "edgegw"\npassword_credential = "influx-password"\n'
    text += MQTT.replace(
        "[sources.mqtt]", '[sources.mqtt]\nusername = "gw"\npassword_credential = "mqtt-password"'
    )
    text += "[sources.http]\ntoken_credential = 'http-token'\n"
    text += "[[sources.http.endpoints]]\npath = '/p'\ndecoder = 'plate'\ndevice = 'gate-1'\n"
    return load_text(tmp_path, text, {"CREDENTIALS_DIRECTORY": str(creds)})


def test_secrets_are_read_at_load_time(tmp_path: Path, creds: Path) -> None:
    config = full_config(tmp_path, creds)
    assert config.influxdb is not None and config.sources.mqtt and config.sources.http
    assert config.influxdb.password() == SECRET + "-influx"  # one trailing newline stripped
    assert config.influxdb.token() is None
    assert config.sources.mqtt.password() == SECRET + "-mqtt"
    assert config.sources.http.token() == SECRET


def test_secrets_never_shown(tmp_path: Path, creds: Path) -> None:
    config = full_config(tmp_path, creds)
    for text in (repr(config), str(config), str(config.model_dump()), config.model_dump_json()):
        assert SECRET not in text
    assert "http-token" in config.model_dump_json()  # the credential's name is fine


def test_secrets_not_in_errors(tmp_path: Path, creds: Path) -> None:
    # The secret pasted where its name belongs: rejected without being repeated.
    text = MQTT.replace("[sources.mqtt]", f'[sources.mqtt]\npassword_credential = "{SECRET}!"')
    text += f'[influxdb]\nurl = "http://gw:{SECRET}@127.0.0.1:8086"\ndatabase = "d"\n'
    text += "[sources.http]\ntoken_credential = 'http-token'\nendpoints = 3\n"
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert len(caught.value.problems) == 3
    assert SECRET not in str(caught.value)
    assert SECRET not in repr(caught.value)


def test_credentials_directory_wins_then_credentials_dir(tmp_path: Path, creds: Path) -> None:
    etc = tmp_path / "etc-credentials"
    etc.mkdir()
    (etc / "http-token").write_text("from-etc")
    (etc / "only-in-etc").write_text("etc-only\n\n")
    text = "[sources.http]\ntoken_credential = '{name}'\n"
    text += "[[sources.http.endpoints]]\npath = '/p'\ndecoder = 'plate'\ndevice = 'gate-1'\n"

    def token(name: str, env: Mapping[str, str]) -> str:
        http = load_text(tmp_path, text.format(name=name), env).sources.http
        assert http is not None
        return http.token()

    assert token("http-token", {"CREDENTIALS_DIRECTORY": str(creds)}) == SECRET
    assert token("http-token", {}) == "from-etc"
    assert token("only-in-etc", {"CREDENTIALS_DIRECTORY": str(creds)}) == "etc-only\n"


def test_unloaded_model_refuses_to_guess_a_secret() -> None:
    http = HttpPushSource.model_validate(
        {"token_credential": "t", "endpoints": [{"path": "/p", "decoder": "plate", "device": "d"}]}
    )
    with pytest.raises(RuntimeError, match="never read"):
        http.token()


# --- pseudonym key ------------------------------------------------------------------------


def test_pseudonym_key_generated_once_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    first = demo_config(data_dir, 1883)
    key = first.gateway.pseudonym_key()
    path = data_dir / PSEUDONYM_KEY_FILE
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == key
    assert [p.name for p in data_dir.iterdir()] == [PSEUDONYM_KEY_FILE]  # no temp file left
    again = demo_config(data_dir, 1883)
    assert load_pseudonym_key(again.gateway) == key
    assert demo_config(tmp_path / "other", 1883).gateway.pseudonym_key() != key


def test_pseudonym_key_from_credential(tmp_path: Path, creds: Path) -> None:
    (creds / "pseudonym-key").write_bytes(b"k" * 32 + b"\n")
    data_dir = tmp_path / "state"
    config = load_text(
        tmp_path, f'data_dir = "{data_dir}"\n' + MQTT, {"CREDENTIALS_DIRECTORY": str(creds)}
    )
    assert config.gateway.pseudonym_key() == b"k" * 32
    assert not data_dir.exists()  # nothing generated
    assert "kkkk" not in repr(config)


def test_pseudonym_key_credential_too_short(tmp_path: Path, creds: Path) -> None:
    (creds / "pseudonym-key").write_text("short")
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, MQTT, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert caught.value.problems == [
        "gateway.pseudonym_key_credential: credential 'pseudonym-key' holds 5 bytes;"
        " a pseudonym key needs at least 16 (32 random bytes recommended)"
    ]


def test_truncated_pseudonym_key_file_is_an_error(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    data_dir.mkdir()
    (data_dir / PSEUDONYM_KEY_FILE).write_bytes(b"")
    with pytest.raises(ConfigError, match="holds 0 bytes"):
        demo_config(data_dir, 1883).gateway.pseudonym_key()


# --- topic templates ----------------------------------------------------------------------


def topic(template: str) -> MqttTopic:
    return MqttTopic.model_validate({"template": template, "decoder": "json"})


@pytest.mark.parametrize(
    ("template", "subscription", "received", "expected"),
    [
        (
            "community/{site}/{zone}/{device}",
            "community/+/+/+",
            "community/north/b3/air-7",
            {"site": "north", "zone": "b3", "device": "air-7"},
        ),
        ("community/{site}/{zone}/{device}", "community/+/+/+", "community/north/b3", None),
        ("community/{site}/{zone}/{device}", "community/+/+/+", "community/n/b3/a/x", None),
        ("community/{site}/{zone}/{device}", "community/+/+/+", "other/n/b3/a", None),
        ("community/{site}/{zone}/{device}", "community/+/+/+", "community//b3/a", None),
        ("zigbee2mqtt/{device}", "zigbee2mqtt/+", "zigbee2mqtt/kitchen", {"device": "kitchen"}),
        ("zigbee2mqtt/{device}", "zigbee2mqtt/+", "zigbee2mqtt/kitchen/availability", None),
        ("tele/{device}/#", "tele/+/#", "tele/plug-1/SENSOR", {"device": "plug-1"}),
        ("tele/{device}/#", "tele/+/#", "tele/plug-1", {"device": "plug-1"}),
        ("tele/{device}/#", "tele/+/#", "tele", None),
        (
            "application/{app}/device/{device}/event/up",
            "application/+/device/+/event/up",
            "application/7/device/0011aabb/event/up",
            {"app": "7", "device": "0011aabb"},
        ),
    ],
)
def test_template_match(
    template: str, subscription: str, received: str, expected: dict[str, str] | None
) -> None:
    assert topic(template).subscription == subscription
    assert topic(template).match(received) == expected


def mqtt_matches(subscription: str, received: str) -> bool:
    """Reference MQTT topic filter semantics (MQTT 5 section 4.7)."""
    sub, levels = subscription.split("/"), received.split("/")
    for index, part in enumerate(sub):
        if part == "#":
            return True
        if index >= len(levels) or (part != "+" and part != levels[index]):
            return False
    return len(sub) == len(levels)


level_text = st.text(
    alphabet=st.characters(exclude_characters="/+#{}\x00", exclude_categories=["Cs"]),
    min_size=1,
    max_size=12,
)
names = st.sampled_from(["site", "zone", "device", "kind", "app", "x1"])


@st.composite
def templates(draw: st.DrawFn) -> tuple[str, dict[str, str]]:
    """A random template and values for its placeholders."""
    placeholders = draw(st.lists(names, unique=True, max_size=4))
    literals = draw(st.lists(level_text, max_size=4))
    levels = [f"{{{n}}}" for n in placeholders] + literals
    levels = draw(st.permutations(levels)) if levels else ["fixed"]
    if draw(st.booleans()):
        levels = [*levels, "#"]
    values = {n: draw(level_text) for n in placeholders}
    return "/".join(levels), values


@given(templates())
def test_match_returns_what_build_put_in(case: tuple[str, dict[str, str]]) -> None:
    template, values = case
    t = topic(template)
    built = t.build(values)
    assert t.match(built) == values
    assert mqtt_matches(t.subscription, built)


@given(templates(), st.lists(level_text | st.just(""), min_size=1, max_size=6))
def test_match_agrees_with_the_subscription(
    case: tuple[str, dict[str, str]], levels: list[str]
) -> None:
    t = topic(case[0])
    received = "/".join(levels)
    if t.match(received) is not None:
        assert mqtt_matches(t.subscription, received)


def test_build_rejects_values_that_are_not_one_level() -> None:
    with pytest.raises(ValueError, match="not one topic level"):
        topic("a/{device}").build({"device": "x/y"})


# --- demo, example, round trip, reference ---------------------------------------------------


def test_demo_config(tmp_path: Path) -> None:
    config = demo_config(tmp_path, 18830)
    mqtt = config.sources.mqtt
    assert mqtt is not None and config.influxdb is None and config.sources.http is None
    assert (config.gateway.site, mqtt.host, mqtt.port) == ("demo", "127.0.0.1", 18830)
    assert mqtt.client_id == "edgegw-demo"
    assert [(t.template, t.decoder, t.kind, t.site) for t in mqtt.topics] == [
        ("community/{site}/{zone}/{device}", "json", "air", "demo"),
        ("zigbee2mqtt/{device}", "zigbee2mqtt", "sensor", "demo"),
    ]
    assert config.spool.path == tmp_path / "spool.db"
    assert config.spool.resolved_path(config.gateway) == tmp_path / "spool.db"


def test_example_config_loads(tmp_path: Path) -> None:
    for name in ("influx-password", "mqtt-password", "plate-camera-token"):
        (tmp_path / name).write_text(f"{name}-value\n")
    config = load_config(
        REPO / "docs" / "edgegw.example.toml", {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    )
    assert config.influxdb is not None and config.influxdb.password() == "influx-password-value"
    assert config.sources.mqtt is not None and config.sources.http is not None
    assert {t.decoder for t in config.sources.mqtt.topics} == {
        "json",
        "zigbee2mqtt",
        "chirpstack",
        "tasmota",
    }
    assert config.sources.http.token() == "plate-camera-token-value"
    assert config.sources.mqtt.topics[1].timestamp_field is None


def test_dump_and_reload_gives_an_equal_config(tmp_path: Path, creds: Path) -> None:
    config = full_config(tmp_path, creds)
    assert parse_config(config.model_dump(), {"CREDENTIALS_DIRECTORY": str(creds)}) == config


def test_models_are_immutable(tmp_path: Path) -> None:
    config = demo_config(tmp_path, 1883)
    with pytest.raises(ValueError, match="frozen"):
        config.gateway.site = "elsewhere"


def models_in(annotation: object) -> list[type[BaseModel]]:
    """The models an annotation mentions (``X | None``, ``list[X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in models_in(arg)]


def test_every_key_has_a_description() -> None:
    seen: set[type[BaseModel]] = set()
    pending: list[type[BaseModel]] = [Config]
    while pending:
        model = pending.pop()
        seen.add(model)
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            pending += [m for m in models_in(field.annotation) if m not in seen]
    assert len(seen) == 10


def test_reference_doc_is_generated() -> None:
    committed = (REPO / "docs" / "config-reference.md").read_text()
    assert committed == reference_markdown(), (
        "run: python -m edge.config reference > docs/config-reference.md"
    )


def test_reference_mentions_every_section_and_key() -> None:
    doc = reference_markdown()
    for header in (
        "[gateway]",
        "[spool]",
        "[influxdb]",
        "[sources.mqtt]",
        "[sources.mqtt.tls]",
        "[[sources.mqtt.topics]]",
        "[sources.http]",
        "[[sources.http.endpoints]]",
    ):
        assert f"## `{header}`" in doc
    assert "| `retry_after_cap_secs` | number, > 0 | `300.0` |" in doc
    assert "| `token_credential` | credential name | **required** |" in doc


def test_reference_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge.config", "reference"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.stdout == reference_markdown()
