"""The gateway's configuration: one TOML file, validated into typed, immutable models.

Everything else in the gateway is built from a :class:`Config`, so a bad file has to stop the
daemon before it touches a broker or a disk, with every problem listed at once and located by
its key path (``sources.mqtt.topics[2].decoder: must be ...``). The CLI turns a
:class:`ConfigError` into exit status 78 (EX_CONFIG), which the unit's
``RestartPreventExitStatus=78`` treats as "do not restart".

The rules the models follow (``docs/config-reference.md`` is generated from them by
``python -m edge.config reference``):

* Unknown keys are errors and values are not coerced across TOML types: ``port = "1883"`` is an
  error, not 1883. Every key has a description, units are in key names (``timeout_secs``,
  ``max_mb``) and choices are enumerations, not booleans.
* Cross-field checks run at load time: duplicate subscriptions, ``api = "v2"`` without a token,
  a username without a password, missing TLS files.
* Secrets never appear in the file. A ``*_credential`` key names a credential, read at load time
  from ``$CREDENTIALS_DIRECTORY/<name>`` (systemd ``LoadCredential=``), then from
  ``<gateway.credentials_dir>/<name>``. The values live in private attributes as
  :class:`~pydantic.SecretStr`, so they are absent from ``repr()``, ``model_dump()`` and error
  messages, and are reached only through methods such as :meth:`InfluxConfig.token`.
* Values derived from another section (``spool.path``, ``sources.mqtt.client_id``, the ``site`` of
  a topic or an endpoint) are filled in at load time: a loaded config is complete, and dumping and
  re-loading it gives an equal config.

Exceptions::

    Exception
     └── ConfigError      the file or its values are wrong; .problems lists every problem
                          found, each "key.path[1].key: message"

Asking a model for a secret it never resolved (one built directly, such as
``HttpPushSource(...)``, instead of by :func:`load_config` / :func:`parse_config`) raises
``RuntimeError``: that is a bug in the caller, not a problem of the file.
"""

from __future__ import annotations

import datetime
import difflib
import functools
import inspect
import json
import os
import re
import secrets
import sys
import tempfile
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

import annotated_types
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretBytes,
    SecretStr,
    Strict,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

__all__ = [
    "Config",
    "ConfigError",
    "GatewayConfig",
    "HttpEndpoint",
    "HttpPushSource",
    "InfluxConfig",
    "MqttSource",
    "MqttTls",
    "MqttTopic",
    "Sources",
    "SpoolConfig",
    "demo_config",
    "load_config",
    "load_pseudonym_key",
    "parse_config",
    "reference_markdown",
]

PSEUDONYM_KEY_FILE = "pseudonym.key"
"""Name of the generated pseudonym key in ``gateway.data_dir`` (used without a credential)."""

_PSEUDONYM_KEY_MIN_BYTES = 16  # below this, HMAC pseudonyms of small ID spaces can be brute-forced
_GENERATED_KEY_BYTES = 32


class ConfigError(Exception):
    """The configuration cannot be used.

    Attributes:
        problems: every problem found, each ``"key.path[index].key: message"``, or
            ``"<file>: message"`` when the file itself cannot be read or parsed.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self.problems)  # args round-trip through pickle

    def __str__(self) -> str:
        return "\n".join(self.problems)


# --- value types --------------------------------------------------------------------------

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_CREDENTIAL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_MEASUREMENT_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_FIELD_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_HTTP_PATH_RE = re.compile(r"/[A-Za-z0-9._~/-]*")


def _check_id(value: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise ValueError(
            "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


def _check_credential_name(value: str) -> str:
    # A name, not a path: no '/' means it cannot leave the credential directories.
    if not _CREDENTIAL_RE.fullmatch(value):
        raise ValueError(
            "a credential name is 1-128 letters, digits, '.', '_' or '-', starting with a"
            " letter or digit (the secret itself never goes in this file)"
        )
    return value


def _check_measurement(value: str) -> str:
    if not _MEASUREMENT_RE.fullmatch(value):
        raise ValueError("must be a letter followed by up to 63 letters, digits or '_'")
    return value


def _check_field_name(value: str) -> str:
    if not _FIELD_NAME_RE.fullmatch(value) or value == "time":
        raise ValueError(
            "a field name is a letter or '_' followed by letters, digits or '_' (not 'time')"
        )
    return value


Ident = Annotated[str, AfterValidator(_check_id)]
CredentialName = Annotated[str, AfterValidator(_check_credential_name)]
NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
# TOML has no path type: paths are strings, so Path is the one type coerced in strict mode.
LaxPath = Annotated[Path, Strict(False)]


# --- credentials --------------------------------------------------------------------------

_STORE_KEY = "edge.config.credentials"


class _CredentialProblem(Exception):
    """A credential exists but cannot be used (empty, unreadable)."""


@dataclass(slots=True)
class _CredentialStore:
    """Where credentials are looked up during one validation (passed as validation context).

    ``credentials_dir`` is set when ``[gateway]`` has validated: :class:`Config` declares it
    first, so the sections that read credentials know both places to look.
    """

    env: Mapping[str, str]
    credentials_dir: Path | None = None

    def _directories(self) -> list[Path]:
        dirs = []
        systemd_dir = self.env.get("CREDENTIALS_DIRECTORY")
        if systemd_dir:
            dirs.append(Path(systemd_dir))
        if self.credentials_dir is not None:
            dirs.append(self.credentials_dir)
        return dirs

    def read(self, name: str) -> bytes | None:
        """Return the credential's bytes minus one trailing newline, or None if not found.

        Raises:
            _CredentialProblem: the file exists but is empty or unreadable.
        """
        for directory in self._directories():
            path = directory / name
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                raise _CredentialProblem(
                    f"cannot read credential {name!r} at {path}: {reason}"
                ) from None
            if data.endswith(b"\n"):
                data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
            if not data:
                raise _CredentialProblem(f"credential {name!r} at {path} is empty")
            return data
        return None

    def not_found(self, name: str) -> str:
        """The message for a credential that is in neither place."""
        where = str(self.credentials_dir)
        if self.env.get("CREDENTIALS_DIRECTORY"):
            return f"credential {name!r} not found in $CREDENTIALS_DIRECTORY or {where}"
        return f"credential {name!r} not found in {where} ($CREDENTIALS_DIRECTORY is not set)"


def _store(info: ValidationInfo) -> _CredentialStore | None:
    context = info.context
    if isinstance(context, dict):
        store = context.get(_STORE_KEY)
        if isinstance(store, _CredentialStore):
            return store
    return None


# --- section base classes -----------------------------------------------------------------

Problem = tuple[str, str]
"""A cross-field problem: (key path relative to the section, message)."""


def _problems_error(problems: Sequence[Problem]) -> PydanticCustomError:
    summary = "; ".join(f"{sub}: {msg}" if sub else msg for sub, msg in problems)
    return PydanticCustomError("config_problems", summary, {"problems": list(problems)})


class _Section(BaseModel):
    """Base of every config model: strict, closed, immutable, cross-checked."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    def _problems(self, store: _CredentialStore | None) -> list[Problem]:
        """Cross-field checks and credential reads, run once every field is valid.

        Args:
            store: where credentials are found, or None when the model is built without
                loading (then credentials stay unresolved).

        Returns:
            Every problem found; empty if the section is fine.
        """
        del store
        return []

    @model_validator(mode="after")
    def _check_section(self, info: ValidationInfo) -> Self:
        problems = self._problems(_store(info))
        if problems:
            raise _problems_error(problems)
        return self


class _CredentialHolder(_Section):
    """A section with ``*_credential`` keys whose values are read at load time."""

    _secrets: dict[str, SecretStr] = PrivateAttr(default_factory=dict)

    def _resolve_credentials(self, store: _CredentialStore | None, *fields: str) -> list[Problem]:
        if store is None or store.credentials_dir is None:
            return []  # built directly, or [gateway] is invalid (reported there)
        problems: list[Problem] = []
        for field in fields:
            name = getattr(self, field)
            if name is None:
                continue
            try:
                raw = store.read(name)
            except _CredentialProblem as exc:
                problems.append((field, str(exc)))
                continue
            if raw is None:
                problems.append((field, store.not_found(name)))
                continue
            try:
                self._secrets[field] = SecretStr(raw.decode("utf-8"))
            except UnicodeDecodeError:
                problems.append((field, f"credential {name!r} is not valid UTF-8 text"))
        return problems

    def _secret(self, field: str) -> str | None:
        name = getattr(self, field)
        if name is None:
            return None
        secret = self._secrets.get(field)
        if secret is None:
            raise RuntimeError(
                f"credential {name!r} ({type(self).__name__}.{field}) was never read:"
                " build the config with load_config() or parse_config()"
            )
        return secret.get_secret_value()


def _check_file(problems: list[Problem], key: str, path: Path | None) -> None:
    if path is not None and not path.is_file():
        problems.append((key, f"file {path} does not exist"))


# --- [gateway] ----------------------------------------------------------------------------


class GatewayConfig(_Section):
    """Identity of this gateway and where it keeps its state and credentials."""

    site: Ident = Field(
        default="demo",
        description="Community / site id, the `site` tag of every point unless a topic or"
        " endpoint says otherwise.",
    )
    data_dir: LaxPath = Field(
        default=Path("/var/lib/edgegw"),
        description="Directory for the spool and the generated pseudonym key"
        " (systemd `StateDirectory=`).",
    )
    credentials_dir: LaxPath = Field(
        default=Path("/etc/edgegw/credentials"),
        description="Where `*_credential` names are looked up when `$CREDENTIALS_DIRECTORY`"
        " (systemd `LoadCredential=`) does not have them. One file per credential;"
        " one trailing newline is ignored.",
    )
    pseudonym_key_credential: CredentialName = Field(
        default="pseudonym-key",
        description="Credential holding the HMAC-SHA-256 key that pseudonymises card numbers"
        " and plates (at least 16 bytes; 32 random bytes recommended). If it is not found,"
        f" 32 random bytes are generated once into `<data_dir>/{PSEUDONYM_KEY_FILE}` (mode 0600)"
        " and reused. Changing the key changes every pseudonym.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level written to the journal."
    )

    _pseudonym_key: SecretBytes | None = PrivateAttr(default=None)

    def _problems(self, store: _CredentialStore | None) -> list[Problem]:
        if store is None:
            return []
        store.credentials_dir = self.credentials_dir
        name = self.pseudonym_key_credential
        try:
            raw = store.read(name)
        except _CredentialProblem as exc:
            return [("pseudonym_key_credential", str(exc))]
        if raw is None:
            return []  # not an error: load_pseudonym_key() falls back to a generated key
        if len(raw) < _PSEUDONYM_KEY_MIN_BYTES:
            return [
                (
                    "pseudonym_key_credential",
                    f"credential {name!r} holds {len(raw)} bytes; a pseudonym key needs at"
                    f" least {_PSEUDONYM_KEY_MIN_BYTES} (32 random bytes recommended)",
                )
            ]
        self._pseudonym_key = SecretBytes(raw)
        return []

    def pseudonym_key(self) -> bytes:
        """Return the pseudonym HMAC key; see :func:`load_pseudonym_key`."""
        return load_pseudonym_key(self)


def load_pseudonym_key(gateway: GatewayConfig) -> bytes:
    """Return the key that pseudonymises card numbers and plates.

    The credential named by ``gateway.pseudonym_key_credential`` if it was found at load time;
    otherwise ``<data_dir>/pseudonym.key``, created on first use with 32 random bytes (mode
    0600, atomically: a concurrent first use by another process ends with both using the same
    key) and read on every later use. The key is cached on ``gateway``.

    Args:
        gateway: the loaded ``[gateway]`` section.

    Returns:
        The key bytes.

    Raises:
        ConfigError: the key file cannot be read or created, or is too short.
    """
    if gateway._pseudonym_key is not None:
        return gateway._pseudonym_key.get_secret_value()
    path = gateway.data_dir / PSEUDONYM_KEY_FILE
    try:
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            key = _create_key_file(path)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError([f"gateway.data_dir: pseudonym key {path}: {reason}"]) from None
    if len(key) < _PSEUDONYM_KEY_MIN_BYTES:
        raise ConfigError(
            [
                f"gateway.data_dir: pseudonym key {path} holds {len(key)} bytes, expected"
                f" {_GENERATED_KEY_BYTES}; replacing it changes every pseudonym already stored"
            ]
        )
    gateway._pseudonym_key = SecretBytes(key)
    return key


def _create_key_file(path: Path) -> bytes:
    """Create ``path`` with a new random key, or return the key another process just created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(_GENERATED_KEY_BYTES)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{PSEUDONYM_KEY_FILE}.", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(key)
            tmp.flush()
            os.fsync(tmp.fileno())
        # link() never replaces an existing file (rename would): the first creator wins and
        # the key is complete on disk before it has its final name.
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            return path.read_bytes()
    finally:
        os.unlink(tmp_name)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return key


# --- [spool] ------------------------------------------------------------------------------


class SpoolConfig(_Section):
    """The SQLite spool: every point is committed here before it is acknowledged."""

    path: LaxPath | None = Field(
        default=None,
        description="Spool database file. Unset: `<gateway.data_dir>/spool.db`"
        " (filled in at load time).",
    )
    max_mb: float = Field(
        default=512.0,
        gt=0,
        description="Size quota. When reached, the oldest telemetry is dropped (counted);"
        " events are never dropped.",
    )
    retention_hours: float = Field(
        default=168.0,
        gt=0,
        description="Age after which unsent points are deleted; applies only when no"
        " `[influxdb]` is configured (embedded mode, data stays in the spool).",
    )
    commit_interval_ms: int = Field(
        default=100,
        ge=1,
        le=1000,
        description="Longest time a received message waits for its commit (and so its"
        " acknowledgement). Longer means fewer fsyncs (less CPU and SD-card wear) and more"
        " latency; at high rates a commit starts early, as soon as commit_max_messages or half"
        " the MQTT receive_maximum are waiting.",
    )
    commit_max_messages: int = Field(
        default=2000,
        ge=1,
        le=100_000,
        description="Messages per commit at most; a full batch commits at once.",
    )
    quarantine_max_rows: int = Field(
        default=10_000,
        ge=1,
        description="Rows rejected by InfluxDB as invalid kept for inspection; the oldest"
        " are deleted beyond this.",
    )

    def resolved_path(self, gateway: GatewayConfig) -> Path:
        """Return the spool file: ``path``, or ``<gateway.data_dir>/spool.db`` when unset."""
        return self.path if self.path is not None else gateway.data_dir / "spool.db"


# --- [influxdb] ---------------------------------------------------------------------------

_V1_KEYS = ("database", "retention_policy", "username", "password_credential")
_V2_KEYS = ("org", "bucket", "token_credential")


class InfluxConfig(_CredentialHolder):
    """Where the spool forwards points, in batches of line protocol over HTTP."""

    url: str = Field(
        description="Base URL of the server, `http://` or `https://`, e.g."
        " `http://127.0.0.1:8086`; a path prefix is kept (reverse proxies). No credentials"
        " in the URL.",
    )
    api: Literal["v1", "v2"] = Field(
        default="v1",
        description="`v1`: `/write?db=` (InfluxDB 1.x, VictoriaMetrics, 2.x/3.x compatibility);"
        " `v2`: `/api/v2/write?org=&bucket=` with a token.",
    )
    database: NonEmptyStr | None = Field(default=None, description="v1: database. Required for v1.")
    retention_policy: NonEmptyStr | None = Field(
        default=None, description="v1: retention policy. Unset: the database's default."
    )
    username: NonEmptyStr | None = Field(
        default=None, description="v1: user name; requires `password_credential`."
    )
    password_credential: CredentialName | None = Field(
        default=None, description="v1: credential holding the password; requires `username`."
    )
    org: NonEmptyStr | None = Field(default=None, description="v2: organisation. Required for v2.")
    bucket: NonEmptyStr | None = Field(default=None, description="v2: bucket. Required for v2.")
    token_credential: CredentialName | None = Field(
        default=None, description="v2: credential holding the API token. Required for v2."
    )
    batch_max_lines: int = Field(
        default=5000, ge=1, description="Points per write request at most."
    )
    batch_max_bytes: int = Field(
        default=4_000_000,
        ge=1024,
        description="Uncompressed bytes of line protocol per write request at most.",
    )
    flush_interval_ms: int = Field(
        default=200,
        ge=1,
        le=60_000,
        description="Longest time a point waits for its batch to fill before it is sent.",
    )
    timeout_secs: float = Field(default=10.0, gt=0, description="Timeout of one write request.")
    compression: Literal["gzip", "none"] = Field(
        default="gzip", description="Content encoding of write requests."
    )
    backoff_initial_secs: float = Field(
        default=1.0, gt=0, description="First retry delay after a failed write (full jitter)."
    )
    backoff_max_secs: float = Field(
        default=60.0,
        gt=0,
        description="Longest retry delay; at least `backoff_initial_secs`.",
    )
    retry_after_cap_secs: float = Field(
        default=300.0,
        gt=0,
        description="Longest delay honoured from a server's `Retry-After` header.",
    )
    ca_file: LaxPath | None = Field(
        default=None,
        description="CA bundle (PEM) for an `https://` URL. Unset: the system trust store."
        " Certificate and host name are always verified.",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        # Messages never repeat the URL: a mistaken one may carry a password.
        try:
            parts = urlsplit(url)
            _ = parts.port  # raises ValueError on a bad port
        except ValueError:
            raise ValueError("not a valid URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:8086")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "must not contain credentials: use username and password_credential,"
                " or token_credential"
            )
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return url.rstrip("/")

    def _problems(self, store: _CredentialStore | None) -> list[Problem]:
        problems: list[Problem] = []
        if self.api == "v1":
            if self.database is None:
                problems.append(("database", 'required with api = "v1"'))
            problems += [
                (key, 'only used with api = "v2"')
                for key in _V2_KEYS
                if getattr(self, key) is not None
            ]
            if self.username is not None and self.password_credential is None:
                problems.append(("password_credential", "required when username is set"))
            if self.password_credential is not None and self.username is None:
                problems.append(("username", "required when password_credential is set"))
        else:
            problems += [
                (key, 'required with api = "v2"') for key in _V2_KEYS if getattr(self, key) is None
            ]
            problems += [
                (key, 'only used with api = "v1"')
                for key in _V1_KEYS
                if getattr(self, key) is not None
            ]
        if self.backoff_max_secs < self.backoff_initial_secs:
            problems.append(("backoff_max_secs", "must be at least backoff_initial_secs"))
        if self.ca_file is not None and not self.url.startswith("https://"):
            problems.append(("ca_file", "only used with an https:// URL"))
        _check_file(problems, "ca_file", self.ca_file)
        return problems + self._resolve_credentials(
            store, "password_credential", "token_credential"
        )

    def password(self) -> str | None:
        """Return the v1 password, or None when ``password_credential`` is unset."""
        return self._secret("password_credential")

    def token(self) -> str | None:
        """Return the v2 API token, or None when ``token_credential`` is unset."""
        return self._secret("token_credential")


# --- [sources.mqtt] -----------------------------------------------------------------------


class MqttTls(_Section):
    """TLS to the broker. Present means TLS is on; the broker's certificate and host name are
    always verified (there is no switch to turn verification off)."""

    ca_file: LaxPath | None = Field(
        default=None,
        description="CA bundle (PEM) that signed the broker's certificate."
        " Unset: the system trust store.",
    )
    cert_file: LaxPath | None = Field(
        default=None, description="Client certificate (PEM) for mutual TLS; requires `key_file`."
    )
    key_file: LaxPath | None = Field(
        default=None, description="Private key (PEM) of `cert_file`; requires `cert_file`."
    )

    def _problems(self, store: _CredentialStore | None) -> list[Problem]:
        problems: list[Problem] = []
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            problems.append((missing, "cert_file and key_file go together"))
        for key in ("ca_file", "cert_file", "key_file"):
            _check_file(problems, key, getattr(self, key))
        return problems


_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class _TemplateShape:
    levels: tuple[str, ...]  # the template's levels before a trailing '#'
    literals: tuple[tuple[int, str], ...]  # (level index, text)
    names: tuple[tuple[int, str], ...]  # (level index, placeholder name)
    multi_level: bool  # the template ends in '#'
    subscription: str


@functools.lru_cache(maxsize=256)
def _template_shape(template: str) -> _TemplateShape:
    """Parse a topic template (cached: ``match`` runs per message).

    Raises:
        ValueError: the template is not valid; the message says why.
    """
    if not template:
        raise ValueError("must not be empty")
    if "\x00" in template:
        raise ValueError("must not contain NUL")
    parts = template.split("/")
    literals: list[tuple[int, str]] = []
    names: list[tuple[int, str]] = []
    multi_level = False
    for index, level in enumerate(parts):
        placeholder = _PLACEHOLDER_RE.fullmatch(level)
        if level == "#":
            if index != len(parts) - 1:
                raise ValueError("'#' is allowed only as the last level")
            multi_level = True
        elif placeholder is not None:
            name = placeholder.group(1)
            if any(name == seen for _, seen in names):
                raise ValueError(f"placeholder {{{name}}} appears twice")
            names.append((index, name))
        elif "{" in level or "}" in level:
            raise ValueError(
                f"level {level!r}: a placeholder is a whole level, an identifier in braces"
                " such as {device}"
            )
        elif "+" in level:
            raise ValueError("'+' is not allowed: name the level instead, e.g. {device}")
        elif "#" in level:
            raise ValueError("'#' is allowed only as the whole last level")
        else:
            literals.append((index, level))
    levels = tuple(parts[:-1] if multi_level else parts)
    subscription = "/".join("+" if _PLACEHOLDER_RE.fullmatch(p) else p for p in parts)
    return _TemplateShape(levels, tuple(literals), tuple(names), multi_level, subscription)


def _check_template(template: str) -> str:
    _template_shape(template)
    return template


class MqttTopic(_Section):
    """One subscription and how to turn its messages into points.

    Placeholders in the template (a whole level each: `{site}`, `{zone}`, `{device}`, `{kind}`,
    or any other identifier, which is matched but not used as a tag) capture the topic's
    levels; a captured value takes precedence over the key of the same name below. The
    subscription is the template with every placeholder replaced by `+`.
    """

    template: Annotated[str, AfterValidator(_check_template)] = Field(
        description="Topic with placeholders, e.g. `community/{site}/{zone}/{device}` or"
        " `zigbee2mqtt/{device}`. No `+`; a `#` only as the whole last level.",
    )
    decoder: Literal["json", "zigbee2mqtt", "chirpstack", "tasmota"] = Field(
        description="Payload format.",
    )
    measurement: Annotated[str, AfterValidator(_check_measurement)] = Field(
        default="environment",
        description="InfluxDB measurement of the points (see docs/schema.md).",
    )
    kind: Ident = Field(
        default="sensor", description="`kind` tag, unless the template has `{kind}`."
    )
    site: Ident | None = Field(
        default=None,
        description="`site` tag, unless the template has `{site}`. Unset: `gateway.site`"
        " (filled in at load time).",
    )
    zone: Ident = Field(
        default="default", description="`zone` tag, unless the template has `{zone}`."
    )
    field_map: dict[NonEmptyStr, Annotated[str, AfterValidator(_check_field_name)]] = Field(
        default_factory=dict,
        description="json decoder: payload key → field name, for keys to rename.",
    )
    timestamp_field: str | None = Field(
        default="ts",
        description='Payload key holding the point time. `""` (TOML has no null): none,'
        " the time of receipt is used.",
    )
    timestamp_unit: Literal["s", "ms", "us", "ns"] = Field(
        default="ms", description="Unit of the number in `timestamp_field`."
    )

    @field_validator("timestamp_field")
    @classmethod
    def _no_timestamp_field(cls, value: str | None) -> str | None:
        return value or None

    @property
    def subscription(self) -> str:
        """The MQTT subscription: the template with placeholders replaced by ``+``."""
        return _template_shape(self.template).subscription

    def match(self, topic: str) -> dict[str, str] | None:
        """Match a received topic against the template.

        Args:
            topic: the topic of a received message.

        Returns:
            Placeholder name → level text (every placeholder, used as a tag or not), or None
            if the topic does not match or a placeholder's level is empty.
        """
        shape = _template_shape(self.template)
        levels = topic.split("/")
        count = len(shape.levels)
        if len(levels) != count and not (shape.multi_level and len(levels) > count):
            return None
        for index, literal in shape.literals:
            if levels[index] != literal:
                return None
        values: dict[str, str] = {}
        for index, name in shape.names:
            value = levels[index]
            if not value:
                return None
            values[name] = value
        return values

    def build(self, values: Mapping[str, str]) -> str:
        """Build a topic this template matches (simulated devices, tests).

        Args:
            values: a value for every placeholder; extra keys are ignored. A trailing ``#``
                matches the built topic without adding levels.

        Returns:
            The topic.

        Raises:
            KeyError: a placeholder has no value.
            ValueError: a value is empty or contains ``/``, ``+``, ``#`` or NUL.
        """
        shape = _template_shape(self.template)
        levels = list(shape.levels)
        for index, name in shape.names:
            value = values[name]
            if not value or any(c in value for c in "/+#\x00"):
                raise ValueError(f"placeholder {{{name}}}: {value!r} is not one topic level")
            levels[index] = value
        return "/".join(levels)


class MqttSource(_CredentialHolder):
    """The MQTT intake: a persistent session whose messages are acknowledged only after their
    spool commit, so a broker holds what the gateway has not stored."""

    host: NonEmptyStr = Field(default="127.0.0.1", description="Broker host name or address.")
    port: int = Field(
        default=1883, ge=1, le=65535, description="Broker port (8883 is usual for TLS)."
    )
    protocol: Literal["5", "3.1.1"] = Field(
        default="5", description='MQTT protocol version (`5` or `"5"`).'
    )
    client_id: NonEmptyStr | None = Field(
        default=None,
        description="Client id; it keys the broker's session, so keep it stable and unique."
        " Unset: `edgegw-<gateway.site>` (filled in at load time).",
    )
    username: NonEmptyStr | None = Field(
        default=None, description="User name, if the broker wants one."
    )
    password_credential: CredentialName | None = Field(
        default=None, description="Credential holding the password; requires `username`."
    )
    tls: MqttTls | None = Field(
        default=None,
        description="TLS settings; absent: plain TCP (use only on loopback or a trusted LAN).",
    )
    keepalive_secs: int = Field(
        default=30,
        ge=1,
        le=65535,
        description="Keepalive interval; a dead connection is noticed after about 1.5 times this.",
    )
    session_expiry_secs: int = Field(
        default=604_800,
        ge=0,
        le=4_294_967_295,
        description="MQTT 5: how long the broker keeps the session (and queues QoS 1"
        " messages) while the gateway is away. 0 loses them on every reconnect.",
    )
    receive_maximum: int = Field(
        default=1000,
        ge=1,
        le=65535,
        description="MQTT 5: unacknowledged QoS 1 messages the broker may send at once"
        " (mosquitto also caps this with its `max_inflight_messages`).",
    )
    max_payload_bytes: int = Field(
        default=65536,
        ge=1,
        le=268_435_455,
        description="Larger payloads are rejected (counted) without decoding.",
    )
    max_json_depth: int = Field(
        default=16, ge=1, le=256, description="Deeper JSON payloads are rejected (counted)."
    )
    reconnect_initial_secs: float = Field(
        default=1.0,
        gt=0,
        description="First reconnect delay after a lost connection (full jitter).",
    )
    reconnect_max_secs: float = Field(
        default=60.0,
        gt=0,
        description="Longest reconnect delay; at least `reconnect_initial_secs`.",
    )
    topics: list[MqttTopic] = Field(min_length=1, description="Subscriptions; at least one.")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_string(cls, value: object) -> object:
        # `protocol = 5` is the natural way to write it in TOML.
        return "5" if value == 5 and type(value) is int else value

    def _problems(self, store: _CredentialStore | None) -> list[Problem]:
        problems: list[Problem] = []
        if self.password_credential is not None and self.username is None:
            problems.append(("username", "required when password_credential is set"))
        if self.reconnect_max_secs < self.reconnect_initial_secs:
            problems.append(("reconnect_max_secs", "must be at least reconnect_initial_secs"))
        first: dict[str, int] = {}
        for index, topic in enumerate(self.topics):
            earlier = first.setdefault(topic.subscription, index)
            if earlier != index:
                problems.append(
                    (
                        f"topics[{index}].template",
                        f"same subscription {topic.subscription!r} as topics[{earlier}]",
                    )
                )
        return problems + self._resolve_credentials(store, "password_credential")

    def password(self) -> str | None:
        """Return the broker password, or None when ``password_credential`` is unset."""
        return self._secret("password_credential")

    def _with_defaults(self, gateway: GatewayConfig) -> MqttSource:
        topics = [t if t.site else t.model_copy(update={"site": gateway.site}) for t in self.topics]
        client_id = self.client_id or f"edgegw-{gateway.site}"
        return self.model_copy(update={"client_id": client_id, "topics": topics})


# --- [sources.http] -----------------------------------------------------------------------


def _check_http_path(path: str) -> str:
    if not _HTTP_PATH_RE.fullmatch(path):
        raise ValueError(
            "must start with '/' and contain only letters, digits and '/', '.', '_', '~', '-'"
        )
    return path


class HttpEndpoint(_Section):
    """One URL path that devices POST to, and the device it stands for."""

    path: Annotated[str, AfterValidator(_check_http_path)] = Field(
        description="URL path, e.g. `/plate/gate-1`; unique within the source.",
    )
    decoder: Literal["plate", "access"] = Field(
        description="Body format: `plate` (a camera's plate read), `access` (a door"
        " controller's access event).",
    )
    site: Ident | None = Field(
        default=None, description="`site` tag. Unset: `gateway.site` (filled in at load time)."
    )
    zone: Ident = Field(default="default", description="`zone` tag, e.g. `car-park-b1`.")
    device: Ident = Field(description="`device` tag, e.g. `gate-1`.")


class HttpPushSource(_CredentialHolder):
    """An HTTP listener for devices that push events (plate cameras, access controllers).

    Every request must carry `Authorization: Bearer <token>`; there is no unauthenticated mode.
    """

    host: NonEmptyStr = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(
        default=8088, ge=0, le=65535, description="Port to listen on (0: any free port)."
    )
    token_credential: CredentialName = Field(
        description="Credential holding the bearer token devices must send. Required.",
    )
    max_body_bytes: int = Field(
        default=262_144, ge=1, description="Larger request bodies are refused (413)."
    )
    endpoints: list[HttpEndpoint] = Field(
        min_length=1,
        description="Accepted paths; at least one.",
    )

    def _problems(self, store: _CredentialStore | None) -> list[Problem]:
        problems: list[Problem] = []
        first: dict[str, int] = {}
        for index, endpoint in enumerate(self.endpoints):
            earlier = first.setdefault(endpoint.path, index)
            if earlier != index:
                problems.append((f"endpoints[{index}].path", f"same path as endpoints[{earlier}]"))
        return problems + self._resolve_credentials(store, "token_credential")

    def token(self) -> str:
        """Return the bearer token devices must present."""
        token = self._secret("token_credential")
        assert token is not None  # token_credential is required
        return token

    def _with_defaults(self, gateway: GatewayConfig) -> HttpPushSource:
        endpoints = [
            e if e.site else e.model_copy(update={"site": gateway.site}) for e in self.endpoints
        ]
        return self.model_copy(update={"endpoints": endpoints})


# --- the whole file -----------------------------------------------------------------------


class Sources(_Section):
    """Where readings and events come from. At least one source is required."""

    mqtt: MqttSource | None = Field(default=None, description="MQTT intake; absent: none.")
    http: HttpPushSource | None = Field(default=None, description="HTTP push intake; absent: none.")

    def _problems(self, store: _CredentialStore | None) -> list[Problem]:
        if self.mqtt is None and self.http is None:
            return [("", "no source configured: add [sources.mqtt] and/or [sources.http]")]
        return []


class Config(_Section):
    """The whole configuration file."""

    # Field order matters: [gateway] validates first and tells the credential store about
    # credentials_dir before the sections that read credentials.
    gateway: GatewayConfig = Field(
        default_factory=lambda: GatewayConfig(), description="Every key has a default."
    )
    spool: SpoolConfig = Field(
        default_factory=lambda: SpoolConfig(), description="Every key has a default."
    )
    influxdb: InfluxConfig | None = Field(
        default=None,
        description="Where to forward points. Absent: embedded mode, points stay in the"
        " spool for `spool.retention_hours`.",
    )
    sources: Sources = Field(description="At least one of its sections.")

    @model_validator(mode="before")
    @classmethod
    def _validate_absent_sections(cls, data: object) -> object:
        # An absent section is validated as an empty table so that its checks run too: the
        # credential store must learn credentials_dir, and "no source configured" beats
        # "sources: required key is missing".
        if isinstance(data, dict):
            return {"gateway": {}, "spool": {}, "sources": {}} | data
        return data

    @field_validator("spool")
    @classmethod
    def _fill_spool_path(cls, spool: SpoolConfig, info: ValidationInfo) -> SpoolConfig:
        gateway = info.data.get("gateway")
        if spool.path is None and isinstance(gateway, GatewayConfig):
            return spool.model_copy(update={"path": spool.resolved_path(gateway)})
        return spool

    @field_validator("sources")
    @classmethod
    def _fill_sources(cls, sources: Sources, info: ValidationInfo) -> Sources:
        gateway = info.data.get("gateway")
        if not isinstance(gateway, GatewayConfig):
            return sources
        return sources.model_copy(
            update={
                "mqtt": sources.mqtt._with_defaults(gateway) if sources.mqtt else None,
                "http": sources.http._with_defaults(gateway) if sources.http else None,
            }
        )


# --- loading ------------------------------------------------------------------------------


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate the config file, and read the credentials it names.

    Args:
        path: the TOML file.
        env: environment to find ``CREDENTIALS_DIRECTORY`` in; default ``os.environ``.

    Returns:
        The complete configuration.

    Raises:
        ConfigError: the file cannot be read, is not valid TOML, or has invalid values or
            missing credentials; every problem found is listed.
    """
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError([f"{path}: cannot read the config file: {reason}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not valid UTF-8"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    return parse_config(data, env)


def parse_config(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """Validate an already parsed config (tests, embedded defaults) and read its credentials.

    Args:
        data: the TOML document as a mapping.
        env: environment to find ``CREDENTIALS_DIRECTORY`` in; default ``os.environ``.

    Returns:
        The complete configuration.

    Raises:
        ConfigError: invalid values or missing credentials; every problem found is listed.
    """
    store = _CredentialStore(env=os.environ if env is None else env)
    try:
        return Config.model_validate(dict(data), context={_STORE_KEY: store})
    except ValidationError as exc:
        raise ConfigError(_describe_errors(exc)) from None


def demo_config(data_dir: Path, mqtt_port: int) -> Config:
    """Return the configuration of ``edgegw demo``: no InfluxDB, a local broker, no secrets.

    Args:
        data_dir: state directory (spool, generated pseudonym key); credentials are looked up
            only in ``data_dir/credentials``, never in the system's.
        mqtt_port: port of the demo broker on 127.0.0.1.

    Returns:
        Site ``demo`` subscribed to ``community/{site}/{zone}/{device}`` (json, measurement
        ``environment``, kind ``air``) and ``zigbee2mqtt/{device}``.
    """
    data = {
        "gateway": {
            "site": "demo",
            "data_dir": data_dir,
            "credentials_dir": data_dir / "credentials",
        },
        "sources": {
            "mqtt": {
                "host": "127.0.0.1",
                "port": mqtt_port,
                "topics": [
                    {
                        "template": "community/{site}/{zone}/{device}",
                        "decoder": "json",
                        "measurement": "environment",
                        "kind": "air",
                    },
                    {"template": "zigbee2mqtt/{device}", "decoder": "zigbee2mqtt"},
                ],
            }
        },
    }
    return parse_config(data, env={})


# --- error messages -----------------------------------------------------------------------

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")

_TYPE_MESSAGES = {
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "string_type": "expected a string",
    "bool_type": "expected a boolean",
    "list_type": "expected an array",
    "dict_type": "expected a table",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
    "path_type": "expected a path (a string)",
}


_BOUND_MESSAGES = {
    "greater_than": "greater than",
    "greater_than_equal": "at least",
    "less_than": "less than",
    "less_than_equal": "at most",
}


def _key_path(loc: Sequence[str | int]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            key = part if _BARE_KEY_RE.fullmatch(part) else json.dumps(part)
            path = f"{path}.{key}" if path else key
    return path


def _join(path: str, sub: str) -> str:
    if not sub:
        return path
    if not path or sub.startswith("["):
        return path + sub
    return f"{path}.{sub}"


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, datetime.date | datetime.time):
        return "a date/time"
    if value is None:
        return "nothing"
    return type(value).__name__


def _unknown_key_message(loc: Sequence[str | int]) -> str:
    model = _model_at(loc[:-1])
    key = loc[-1]
    if model is None or not isinstance(key, str):
        return "unknown key"
    known = list(model.model_fields)
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return f"unknown key (expected one of: {', '.join(known)})"


def _describe_errors(exc: ValidationError) -> list[str]:
    """Turn pydantic's errors into path-qualified lines that never quote a value."""
    problems: list[str] = []
    for error in exc.errors(include_url=False):
        loc = list(error["loc"])
        prefix = ""
        if loc and loc[-1] == "[key]":  # the error is about a table key, not its value
            loc.pop()
            prefix = "key: "
        path = _key_path(loc)
        kind = error["type"]
        ctx = error.get("ctx", {})
        if kind == "config_problems":
            problems += [f"{_join(path, sub)}: {msg}" for sub, msg in ctx["problems"]]
            continue
        if kind == "missing":
            message = "required key is missing"
        elif kind == "extra_forbidden":
            message = _unknown_key_message(loc)
        elif kind == "value_error":
            message = str(ctx["error"])
        elif kind == "literal_error":
            message = f"must be {ctx['expected']}"
        elif kind in _BOUND_MESSAGES:
            bound = next(iter(ctx.values()))
            message = f"must be {_BOUND_MESSAGES[kind]} {bound}"
        elif kind == "string_too_short" and ctx.get("min_length") == 1:
            message = "must not be empty"
        elif kind == "too_short":
            message = f"needs at least {ctx['min_length']} entries"
        elif kind in _TYPE_MESSAGES:
            message = f"{_TYPE_MESSAGES[kind]} (got {_toml_type(error['input'])})"
        else:
            message = error["msg"]
        problems.append(f"{path or '(top level)'}: {prefix}{message}")
    return problems


# --- the reference document ---------------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``| None`` from a field annotation."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _annotated_metadata(annotation: Any) -> list[Any]:
    """The ``Annotated`` metadata found anywhere in an annotation."""
    found: list[Any] = []
    if typing.get_origin(annotation) is Annotated:
        found += annotation.__metadata__
    for arg in typing.get_args(annotation):
        found += _annotated_metadata(arg)
    return found


def _section_model(annotation: Any) -> tuple[type[BaseModel], bool] | None:
    """The model a field holds, and whether it is an array of them; None for plain values."""
    inner = _unwrap(annotation)
    is_array = typing.get_origin(inner) is list
    if is_array:
        inner = _unwrap(typing.get_args(inner)[0])
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        return inner, is_array
    return None


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue  # an array element: the model is the array's
        field = model.model_fields.get(part)
        section = _section_model(field.annotation) if field is not None else None
        if section is None:
            return None
        model = section[0]
    return model


_SCALAR_NAMES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
}


_VALIDATED_NAMES: dict[Any, str] = {
    _check_id: "identifier",
    _check_credential_name: "credential name",
}


def _type_text(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    for item in [*metadata, *_annotated_metadata(annotation)]:
        if isinstance(item, AfterValidator) and item.func in _VALIDATED_NAMES:
            return _VALIDATED_NAMES[item.func]
    inner = _unwrap(annotation)
    origin = typing.get_origin(inner)
    if origin is Literal:
        return "one of " + ", ".join(f'`"{v}"`' for v in typing.get_args(inner))
    if origin is dict:
        key, value = (_type_text(a) for a in typing.get_args(inner))
        return f"table ({key} → {value})"
    if origin is list:
        return f"array of {_type_text(typing.get_args(inner)[0])}"
    return _SCALAR_NAMES.get(inner, getattr(inner, "__name__", str(inner)))


def _constraint_text(field: FieldInfo) -> str:
    words = []
    for item in field.metadata:
        if isinstance(item, annotated_types.Gt):
            words.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Ge):
            words.append(f"≥ {item.ge}")
        elif isinstance(item, annotated_types.Lt):
            words.append(f"< {item.lt}")
        elif isinstance(item, annotated_types.Le):
            words.append(f"≤ {item.le}")
    return ", ".join(words)


def _toml_value(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str | Path):
        return f"`{json.dumps(str(value))}`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _document(
    model: type[BaseModel], toml_path: str, is_array: bool, intro: str, out: list[str]
) -> None:
    plain = [
        (name, field)
        for name, field in model.model_fields.items()
        if _section_model(field.annotation) is None
    ]
    if toml_path:
        header = f"[[{toml_path}]]" if is_array else f"[{toml_path}]"
        out += [f"## `{header}`", "", inspect.cleandoc(model.__doc__ or ""), ""]
        if intro:
            out += [intro, ""]
    if plain:
        out += ["| Key | Type | Default | Description |", "|---|---|---|---|"]
        for name, field in plain:
            kind = _type_text(field.annotation, field.metadata)
            constraints = _constraint_text(field)
            if constraints:
                kind += f", {constraints}"
            default = (
                "**required**"
                if field.is_required()
                else _toml_value(field.get_default(call_default_factory=True))
            )
            description = field.description or ""
            out.append(f"| `{name}` | {_cell(kind)} | {default} | {_cell(description)} |")
        out.append("")
    for name, field in model.model_fields.items():
        section = _section_model(field.annotation)
        if section is None:
            continue
        nested, nested_is_array = section
        presence = "Required." if field.is_required() else "Optional."
        child_intro = f"{presence} {field.description or ''}".strip()
        child_path = f"{toml_path}.{name}" if toml_path else name
        _document(nested, child_path, nested_is_array, child_intro, out)


_REFERENCE_INTRO = """\
# Configuration reference

<!-- Generated from edge/config.py by `python -m edge.config reference`; do not edit. -->

The gateway reads one TOML file (`edgegw check-config FILE` validates it; a bad file makes the
daemon exit with status 78). Unknown keys are errors, values must have the TOML type shown
(`port = "1883"` is an error), and every problem is reported with its key path, e.g.
`sources.mqtt.topics[1].decoder: must be ...`. An annotated example is in
[edgegw.example.toml](edgegw.example.toml).

Secrets are never written in this file. A key ending in `_credential` names a credential: a
file read at start-up from `$CREDENTIALS_DIRECTORY/<name>` (systemd `LoadCredential=`), or else
from `<gateway.credentials_dir>/<name>`. One trailing newline is ignored; a missing or empty
file is an error (except `pseudonym_key_credential`, which falls back to a generated key).

Types: an *identifier* (a tag value such as a site, zone or device) is 1-64 letters, digits,
`.`, `_` or `-`, starting with a letter or digit; a *credential name* is the same with up to
128 characters; a *path* is a string; a *number* may be written as an integer.
"""


def reference_markdown() -> str:
    """Return the configuration reference (Markdown), generated from the models.

    Returns:
        Every section, key, type, default and description; ``docs/config-reference.md``.
    """
    out = [_REFERENCE_INTRO]
    _document(Config, "", False, "", out)
    return "\n".join(out).rstrip("\n") + "\n"


def _main(argv: Sequence[str]) -> int:
    if list(argv) == ["reference"]:
        sys.stdout.write(reference_markdown())
        return 0
    sys.stderr.write("usage: python -m edge.config reference\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
