"""Fixtures shared by all tests: real servers (tests/servers.py) and a thread-leak check.

Server fixtures use the shared server named by ``EDGE_TEST_*_URL`` when CI started one
(``python -m tests.servers up``), else start a private one for the session. A missing binary skips
the test, except under ``EDGE_TEST_REQUIRE_SERVERS=1`` (CI), where it fails: CI must never pass by
skipping. Tests using these fixtures are marked ``servers`` automatically, so
``pytest -m "not servers"`` runs the pure tests alone.

Shared servers are shared: use a unique measurement, topic or database per test.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.servers import (
    BINARIES,
    ENV_VARS,
    Server,
    ServerError,
    find_binary,
    server_from_url,
    start_influxd,
    start_mosquitto,
    start_victoria_metrics,
    wait_ready,
)

SERVER_FIXTURES = frozenset({"mosquitto", "influxdb1", "victoria", "private_influxdb1"})
# Threads that are finishing (a client's network loop after disconnect) get this long.
THREAD_EXIT_GRACE_SECS = 2.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a server fixture (directly or through another fixture)."""
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.servers)


def _servers_required() -> bool:
    return os.environ.get("EDGE_TEST_REQUIRE_SERVERS") == "1"


def _require_binary(name: str) -> None:
    if find_binary(name) is not None:
        return
    reason = f"{BINARIES[name]} is not installed (./dev test installs it)"
    if _servers_required():
        pytest.fail(f"{reason}, and EDGE_TEST_REQUIRE_SERVERS=1", pytrace=False)
    pytest.skip(reason)


def _session_server(
    name: str, start: Callable[[Path], Server], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    url = os.environ.get(ENV_VARS[name])
    if url:
        shared_dir = Path(os.environ.get("EDGE_TEST_SERVERS_DIR", ".")) / name
        server = server_from_url(name, url, shared_dir)
        try:
            wait_ready(server, timeout_secs=10.0)
        except ServerError as exc:
            pytest.fail(f"{ENV_VARS[name]}={url} does not answer: {exc}", pytrace=False)
        yield server
        return
    _require_binary(name)
    server = start(tmp_path_factory.mktemp(name))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A mosquitto 2.0 broker (anonymous, unlimited queues); ``.url`` is ``mqtt://host:port``."""
    yield from _session_server("mosquitto", start_mosquitto, tmp_path_factory)


@pytest.fixture(scope="session")
def influxdb1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An InfluxDB 1.6 server with database ``edge``; do not stop it (see private_influxdb1)."""
    yield from _session_server("influxdb1", start_influxd, tmp_path_factory)


@pytest.fixture(scope="session")
def victoria(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A VictoriaMetrics 1.79 server (line protocol at /api/v2/write, read with vm_export)."""
    yield from _session_server("victoria", start_victoria_metrics, tmp_path_factory)


@pytest.fixture
def private_influxdb1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An InfluxDB 1.6 of this test's own (database ``edge``): stop, start, pause at will."""
    _require_binary("influxdb1")
    server = start_influxd(tmp_path_factory.mktemp("private-influxdb1"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads running (e.g. a paho loop without loop_stop())."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_EXIT_GRACE_SECS
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        # Waiting on the thread itself is the poll: it returns as soon as the thread ends.
        leaked[0].join(timeout=min(remaining, 0.1))
    names = ", ".join(sorted(t.name for t in leaked))
    pytest.fail(f"test left {len(leaked)} thread(s) running: {names}", pytrace=False)
