"""The gateway as a real process for end-to-end tests: config file, NOTIFY_SOCKET, signals.

``GatewayProcess`` writes a TOML config, starts ``python -m edge.cli run -c FILE`` with a
``NOTIFY_SOCKET`` in the test's temp dir, waits for ``READY=1`` (never a sleep), and offers
``terminate()`` (SIGTERM, expects ``STOPPING=1`` and exit 0) and ``kill9()``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.spool import SpoolStatus, open_readonly
from tests.servers import Server, influx_query

REPO = Path(__file__).resolve().parent.parent


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(sections: dict[str, Any]) -> str:
    """Just enough TOML for test configs: tables, arrays of tables, scalars, inline tables."""
    out: list[str] = []
    for name, body in sections.items():
        if isinstance(body, list):
            for item in body:
                out.append(f"[[{name}]]")
                out.extend(f"{k} = {toml_value(v)}" for k, v in item.items())
        else:
            out.append(f"[{name}]")
            out.extend(f"{k} = {toml_value(v)}" for k, v in body.items())
        out.append("")
    return "\n".join(out)


def mqtt_config(
    tmp: Path,
    mqtt_port: int,
    prefix: str,
    influx: dict[str, Any] | None = None,
    spool: dict[str, Any] | None = None,
    mqtt: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A gateway config reading ``<prefix>/{site}/{zone}/{device}`` JSON from MQTT."""
    sections: dict[str, Any] = {
        "gateway": {"site": "test", "data_dir": str(tmp / "data"),
                    "credentials_dir": str(tmp / "credentials")},
        "spool": spool or {},
    }
    if influx is not None:
        sections["influxdb"] = {"flush_interval_ms": 100, "backoff_initial_secs": 0.1,
                                "backoff_max_secs": 1.0, **influx}
    sections["sources.mqtt"] = {"host": "127.0.0.1", "port": mqtt_port,
                                "client_id": f"edgegw-{prefix}", **(mqtt or {})}
    sections["sources.mqtt.topics"] = [{
        "template": prefix + "/{site}/{zone}/{device}", "decoder": "json",
        "measurement": "environment", "kind": "air",
    }]
    return sections


@dataclass
class GatewayProcess:
    tmp: Path
    config: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    notify: socket.socket | None = None
    messages: list[str] = field(default_factory=list)

    @property
    def config_path(self) -> Path:
        return self.tmp / "edgegw.toml"

    @property
    def spool_path(self) -> Path:
        return Path(self.config["gateway"]["data_dir"]) / "spool.db"

    def start(self, timeout: float = 20.0) -> None:
        self.config_path.write_text(to_toml(self.config))
        sock_path = self.tmp / f"notify-{uuid.uuid4().hex[:8]}.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(sock_path))
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "PYTHONUNBUFFERED": "1"}
        self.log = open(self.tmp / "gateway.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "run", "-c", str(self.config_path)],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.wait_notify("READY=1", timeout)

    def wait_notify(self, wanted: str, timeout: float) -> None:
        assert self.notify is not None
        deadline = time.monotonic() + timeout
        while wanted not in self.messages:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc is not None and self.proc.poll() is not None
                             and wanted == "READY=1"):
                raise AssertionError(f"no {wanted} from the gateway; log:\n{self.log_tail()}")
            self.notify.settimeout(min(left, 0.5))
            try:
                data = self.notify.recv(4096)
            except TimeoutError:
                continue
            self.messages.extend(data.decode().split("\n"))

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.wait_notify("STOPPING=1", 1.0)
        self._cleanup()
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._cleanup()

    def _cleanup(self) -> None:
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        self.messages = []
        self.log.close()

    def status(self) -> SpoolStatus:
        spool = open_readonly(self.spool_path)
        try:
            return spool.status()
        finally:
            spool.close()

    def log_tail(self, n: int = 4000) -> str:
        path = self.tmp / "gateway.log"
        return path.read_bytes()[-n:].decode("utf-8", "replace") if path.exists() else ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@contextlib.contextmanager
def mosquitto_with(binary: str, conf: Path, port: int) -> Iterator[None]:
    """Run mosquitto with a hand-written config (TLS, passwords: what tests.servers does not
    cover) until the context ends; ready once its listener accepts TCP connections."""
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError(f"mosquitto with {conf} did not start") from None
                time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def new_database(influx: Server) -> str:
    """A fresh, uniquely named InfluxDB 1.x database (shared servers serve many tests)."""
    db = "t" + uuid.uuid4().hex[:12]
    influx_query(influx, "", f'CREATE DATABASE "{db}"')
    return db


def count_points(influx: Server, db: str, measurement: str = "environment",
                 field: str = "temperature") -> int:
    """How many points of ``measurement`` have ``field`` (0 for an empty database)."""
    rows = influx_query(influx, db, f'SELECT count("{field}") FROM "{measurement}"')
    return int(rows[0]["count"]) if rows else 0


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll ``check`` until it is true or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def accounting_holds(st: SpoolStatus) -> tuple[bool, str]:
    """Both accounting identities of docs/architecture.md, with a readable explanation."""
    c = st.counters
    rejected = sum(v for k, v in c.items() if k.startswith("messages_rejected:"))
    quarantined = sum(v for k, v in c.items() if k.startswith("points_quarantined:"))
    dropped = sum(v for k, v in c.items() if k.startswith("points_dropped:"))
    msgs = c.get("messages_received", 0) == c.get("messages_accepted", 0) + rejected
    points = c.get("points_spooled", 0) == (
        c.get("points_delivered", 0) + st.points_queued + quarantined + dropped)
    return msgs and points, f"counters={c} queued={st.points_queued}"
