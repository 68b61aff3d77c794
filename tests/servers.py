"""Real mosquitto, influxd and victoria-metrics on loopback, for integration tests and CI.

Our protocol code is only as good as the peer it was tested against, so tests talk to the real
servers Debian ships (mosquitto 2.0, InfluxDB 1.6, VictoriaMetrics 1.79), never to mocks. Each
server gets a random free port on 127.0.0.1 and a data directory of its own, so several test runs,
and the system services a package install may have started on the default ports, never collide.

A server counts as started only when it answers its protocol (an MQTT CONNACK, InfluxDB's
``/ping``, VictoriaMetrics' ``/health``) *and* the listening socket belongs to the process we
started (``/proc``), and InfluxDB / VictoriaMetrics also report our data directory. Waiting is
always a poll with a deadline, never a fixed sleep.

Used two ways:

* in-process, by ``tests/conftest.py`` fixtures (``start_mosquitto`` and friends);
* as a CLI for CI, which starts one set of servers for the whole run::

      python -m tests.servers up --dir DIR     # writes DIR/env (shell exports) and DIR/*.pid
      python -m tests.servers down --dir DIR

Exceptions: everything raised on purpose is a :class:`ServerError`.

Stdlib only, Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BINARIES",
    "ENV_VARS",
    "HOST",
    "Server",
    "ServerError",
    "find_binary",
    "influx_query",
    "influx_write",
    "server_from_url",
    "start_influxd",
    "start_mosquitto",
    "start_victoria_metrics",
    "vm_export",
    "vm_write",
    "wait_ready",
]

HOST = "127.0.0.1"
START_TIMEOUT_SECS = 30.0
STOP_TIMEOUT_SECS = 10.0
HTTP_TIMEOUT_SECS = 10.0
# How long one readiness attempt may block before we look at the clock and the process again.
POLL_INTERVAL_SECS = 0.05
# A random port can be taken by someone else between our probe and the server's bind: retry.
PORT_ATTEMPTS = 3

#: Server name -> executable. The names are also the conftest fixture names.
BINARIES: Mapping[str, str] = {
    "mosquitto": "mosquitto",
    "influxdb1": "influxd",
    "victoria": "victoria-metrics",
}

#: Server name -> environment variable carrying the URL of a shared (CI-started) server.
ENV_VARS: Mapping[str, str] = {
    "mosquitto": "EDGE_TEST_MQTT_URL",
    "influxdb1": "EDGE_TEST_INFLUX1_URL",
    "victoria": "EDGE_TEST_VM_URL",
}

# Debian keeps mosquitto in /usr/sbin, which is not on a normal user's PATH.
_EXTRA_PATH = ("/usr/sbin", "/usr/local/sbin", "/sbin")

# Never send loopback test traffic through an http_proxy that CI may have set for PyPI.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """A server did not start or stop in time, is not the one we started, or returned an error."""


ReadyCheck = Callable[["Server", float], None]


@dataclass
class Server:
    """One server process listening on ``host:port``.

    ``proc`` is ``None`` for a server somebody else started (CI's shared servers): such a server
    can be used but not stopped, restarted or paused from here.

    Attributes:
        name: ``"mosquitto"``, ``"influxdb1"`` or ``"victoria"``.
        host: Always 127.0.0.1 for servers we start.
        port: The client port (MQTT or HTTP).
        data_dir: Config, data and ``server.log`` of this server.
        proc: The running (or last) process, if we started it.
        argv: Command line used by :meth:`start`.
        ready_check: Called as ``ready_check(server, deadline)`` after each start.
    """

    name: str
    host: str
    port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    argv: list[str] = field(default_factory=list, repr=False)
    ready_check: ReadyCheck | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT`` for mosquitto, ``http://127.0.0.1:PORT`` otherwise."""
        scheme = "mqtt" if self.name == "mosquitto" else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The server's stdout and stderr, kept across restarts."""
        return self.data_dir / "server.log"

    @property
    def running(self) -> bool:
        """Whether the process we started is alive (paused counts as alive)."""
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start (or restart) the server on the same port and data directory; wait until ready.

        Raises:
            ServerError: already running, not ours to start, or not ready within the deadline
                (the process is then stopped and the message ends with its log).
        """
        if not self.argv:
            raise ServerError(f"{self.name} at {self.url} was not started by us: cannot start it")
        if self.running:
            raise ServerError(f"{self.name} at {self.url} is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                # Own session: a terminal's Ctrl-C reaches pytest, whose fixtures stop us in order.
                start_new_session=True,
            )
        try:
            if self.ready_check is not None:
                self.ready_check(self, time.monotonic() + START_TIMEOUT_SECS)
        except BaseException as exc:
            self.stop()
            if isinstance(exc, ServerError):
                raise ServerError(f"{exc}\n--- {self.log_path} ---\n{self.log_tail()}") from exc
            raise

    def stop(self) -> None:
        """SIGTERM, wait up to 10 s, then SIGKILL. Does nothing if the process already ended.

        Raises:
            ServerError: the server was not started by us.
        """
        proc = self._own_proc()
        if proc.poll() is not None:
            return
        proc.terminate()
        # A paused process would only see the SIGTERM once continued.
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        try:
            proc.wait(timeout=STOP_TIMEOUT_SECS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing is answered."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Continue a paused server (SIGCONT)."""
        self._signal(signal.SIGCONT)

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The last bytes of the server's log, for error messages."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - max_bytes))
                return log.read().decode(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"

    def _own_proc(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise ServerError(f"{self.name} at {self.url} was not started by us")
        return self.proc

    def _signal(self, signum: signal.Signals) -> None:
        proc = self._own_proc()
        if proc.poll() is not None:
            raise ServerError(f"{self.name} at {self.url} is not running")
        os.kill(proc.pid, signum)


# --- starting servers ------------------------------------------------------------------------


def find_binary(name: str) -> str | None:
    """Path of the executable for server ``name`` (a key of :data:`BINARIES`), or None."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_EXTRA_PATH])
    return shutil.which(BINARIES[name], path=path)


def _require_binary(name: str) -> str:
    binary = find_binary(name)
    if binary is None:
        raise ServerError(f"{BINARIES[name]} not found (Debian package: see ./dev)")
    return binary


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago (kernel's choice)."""
    with contextlib.ExitStack() as stack:
        # Hold every socket until all are chosen, so the kernel cannot hand out one port twice.
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((HOST, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def _launch(
    name: str,
    base: Path,
    configure: Callable[[Path, list[int]], list[str]],
    ports_needed: int,
    ready_check: ReadyCheck,
) -> Server:
    """Create ``base/name``, pick ports, write config via ``configure``, start, retry on clash.

    ``configure(data_dir, ports)`` returns argv; ``ports[0]`` is the client port.
    """
    data_dir = (base / name).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, PORT_ATTEMPTS + 1):
        ports = free_ports(ports_needed)
        server = Server(
            name=name,
            host=HOST,
            port=ports[0],
            data_dir=data_dir,
            argv=configure(data_dir, ports),
            ready_check=ready_check,
        )
        try:
            server.start()
        except ServerError as exc:
            # Somebody took a port between our probe and the server's bind: try others. Any other
            # failure would only repeat itself.
            if attempt == PORT_ATTEMPTS or "address already in use" not in str(exc).lower():
                raise
            continue
        return server
    raise AssertionError("unreachable")


def start_mosquitto(base: Path) -> Server:
    """Start mosquitto on a random loopback port, anonymous, no persistence, unlimited queues.

    ``max_inflight_messages`` stays at the broker default (20), as in production.

    Raises:
        ServerError: binary missing or the broker did not come up.
    """
    binary = _require_binary("mosquitto")

    def configure(data_dir: Path, ports: list[int]) -> list[str]:
        conf = data_dir / "mosquitto.conf"
        conf.write_text(
            f"# written by tests/servers.py\n"
            f"listener {ports[0]} {HOST}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            # 0 = no limit: tests queue bursts for offline persistent sessions.
            "max_queued_messages 0\n"
            "log_dest stderr\n"
        )
        return [binary, "-c", str(conf)]

    return _launch("mosquitto", base, configure, 1, _mosquitto_ready)


def start_influxd(base: Path, database: str = "edge") -> Server:
    """Start InfluxDB 1.6 on random loopback ports (HTTP and RPC) and create ``database``.

    Raises:
        ServerError: binary missing or the server did not come up.
    """
    binary = _require_binary("influxdb1")

    def configure(data_dir: Path, ports: list[int]) -> list[str]:
        conf = data_dir / "influxdb.conf"
        conf.write_text(
            "# written by tests/servers.py\n"
            # Debian's build spells the phone-home switch "reporting-enabled"; upstream 1.x reads
            # "reporting-disabled". Unknown keys are ignored, so say both.
            "reporting-enabled = false\n"
            "reporting-disabled = true\n"
            f'bind-address = "{HOST}:{ports[1]}"\n'
            "[meta]\n"
            f'  dir = "{data_dir / "meta"}"\n'
            "[data]\n"
            f'  dir = "{data_dir / "data"}"\n'
            f'  wal-dir = "{data_dir / "wal"}"\n'
            "  query-log-enabled = false\n"
            "[monitor]\n"
            # Otherwise an _internal database is written every 10 s.
            "  store-enabled = false\n"
            "[http]\n"
            f'  bind-address = "{HOST}:{ports[0]}"\n'
            "  log-enabled = false\n"
            "[logging]\n"
            '  level = "warn"\n'
        )
        return [binary, "-config", str(conf)]

    server = _launch("influxdb1", base, configure, 2, _influxd_ready)
    try:
        influx_query(server, "", f'CREATE DATABASE "{database}"')
    except BaseException:
        server.stop()
        raise
    return server


def start_victoria_metrics(base: Path) -> Server:
    """Start VictoriaMetrics on a random loopback port.

    Retention is 100 years so tests may write old timestamps (the default, one month, silently
    drops them) and the response cache is off so fresh writes are never hidden.

    Raises:
        ServerError: binary missing or the server did not come up.
    """
    binary = _require_binary("victoria")

    def configure(data_dir: Path, ports: list[int]) -> list[str]:
        return [
            binary,
            f"-httpListenAddr={HOST}:{ports[0]}",
            f"-storageDataPath={data_dir / 'data'}",
            "-retentionPeriod=100y",
            "-search.disableCache",
            "-loggerLevel=WARN",
        ]

    return _launch("victoria", base, configure, 1, _vm_ready)


def server_from_url(name: str, url: str, data_dir: Path) -> Server:
    """A :class:`Server` for a server somebody else started (``proc`` is None).

    Raises:
        ServerError: the URL has no host or port.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ServerError(f"{name}: {url!r} needs a host and a port")
    return Server(name=name, host=parts.hostname, port=parts.port, data_dir=data_dir)


# --- readiness and identity ------------------------------------------------------------------


def wait_ready(server: Server, timeout_secs: float = START_TIMEOUT_SECS) -> None:
    """Poll until ``server`` answers (and, if we started it, proves it is ours).

    Raises:
        ServerError: not ready before the deadline.
    """
    check = {"mosquitto": _mosquitto_ready, "influxdb1": _influxd_ready, "victoria": _vm_ready}
    check[server.name](server, time.monotonic() + timeout_secs)


def _poll(server: Server, deadline: float, attempt: Callable[[], None]) -> None:
    """Run ``attempt`` until it returns; fail early if our process died, late at ``deadline``."""
    last_error: BaseException | None = None
    while True:
        if server.proc is not None and server.proc.poll() is not None:
            raise ServerError(
                f"{server.name} exited with status {server.proc.returncode} while starting"
            )
        try:
            attempt()
        except (OSError, ServerError, ValueError, http.client.HTTPException) as exc:
            last_error = exc
        else:
            return
        if time.monotonic() >= deadline:
            raise ServerError(f"{server.name} at {server.url} not ready in time: {last_error}")
        # The pause between attempts doubles as a wait on the process, so a crash ends it early.
        if server.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.proc.wait(timeout=POLL_INTERVAL_SECS)
        else:
            time.sleep(POLL_INTERVAL_SECS)


def _mosquitto_ready(server: Server, deadline: float) -> None:
    def attempt() -> None:
        _mqtt_connack(server.host, server.port)
        _check_listener_owner(server)

    _poll(server, deadline, attempt)


def _influxd_ready(server: Server, deadline: float) -> None:
    def attempt() -> None:
        status, headers, _ = _http("GET", f"{server.url}/ping")
        if status != 204 or "x-influxdb-version" not in headers:
            raise ServerError(f"/ping answered {status}, not InfluxDB's 204")
        if server.proc is None:
            return
        diagnostics = _diagnostics(server)
        pid = diagnostics.get("system", {}).get("PID")
        data = diagnostics.get("config-data", {}).get("dir")
        if pid != server.proc.pid or data != str(server.data_dir / "data"):
            raise ServerError(
                f"port {server.port} is InfluxDB pid {pid} with data {data}: not ours"
            )
        _check_listener_owner(server)

    _poll(server, deadline, attempt)


def _diagnostics(server: Server) -> dict[str, dict[str, Any]]:
    body = _json_request("POST", f"{server.url}/query", {"q": "SHOW DIAGNOSTICS"})
    sections: dict[str, dict[str, Any]] = {}
    for result in body.get("results", []):
        for series in result.get("series", []):
            values = series.get("values") or [[]]
            sections[series["name"]] = dict(zip(series["columns"], values[0], strict=False))
    return sections


def _vm_ready(server: Server, deadline: float) -> None:
    def attempt() -> None:
        status, _, body = _http("GET", f"{server.url}/health")
        if status != 200 or body.strip() != b"OK":
            raise ServerError(f"/health answered {status} {body[:100]!r}")
        if server.proc is None:
            return
        _, _, flags = _http("GET", f"{server.url}/flags")
        expected = f'-storageDataPath="{server.data_dir / "data"}"'
        if expected not in flags.decode(errors="replace").splitlines():
            raise ServerError(f"port {server.port} is a VictoriaMetrics with other data: not ours")
        _check_listener_owner(server)

    _poll(server, deadline, attempt)


def _mqtt_connack(host: str, port: int) -> None:
    """Complete an MQTT 3.1.1 CONNECT/CONNACK handshake, then DISCONNECT."""
    client_id = b"edge-test-probe"
    variable = b"\x00\x04MQTT\x04\x02\x00\x0a"  # protocol name, level 4, clean session, keepalive
    payload = len(client_id).to_bytes(2, "big") + client_id
    body = variable + payload
    with socket.create_connection((host, port), timeout=1.0) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        reply = b""
        while len(reply) < 4:
            chunk = sock.recv(4 - len(reply))
            if not chunk:
                raise ServerError("broker closed the connection before CONNACK")
            reply += chunk
        if reply != b"\x20\x02\x00\x00":
            raise ServerError(f"unexpected CONNACK {reply!r}")
        sock.sendall(b"\xe0\x00")


def _check_listener_owner(server: Server) -> None:
    """Raise unless the socket listening on ``server.port`` is one of our process's fds."""
    if server.proc is None or not Path("/proc/self/fd").is_dir():
        return
    inodes = _listening_inodes(server.port)
    if not inodes:
        raise ServerError(f"nothing listens on port {server.port} yet")
    fd_dir = Path(f"/proc/{server.proc.pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return
    raise ServerError(f"port {server.port} is held by a process other than pid {server.proc.pid}")


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes in LISTEN state on ``port`` (any address), from /proc/net/tcp{,6}."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines)  # header
            for line in lines:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    return inodes


# --- HTTP helpers for tests ------------------------------------------------------------------


def _http(
    method: str,
    url: str,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_secs: float = HTTP_TIMEOUT_SECS,
) -> tuple[int, Mapping[str, str], bytes]:
    """One request -> (status, headers with lower-case names, body).

    HTTP error statuses are returned; connection errors and timeouts raise OSError.
    """
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with _HTTP.open(request, timeout=timeout_secs) as response:
            return response.status, _lower_keys(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, _lower_keys(exc.headers.items()), exc.read()


def _lower_keys(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {key.lower(): value for key, value in items}


def _json_request(
    method: str, url: str, form: Mapping[str, str], timeout_secs: float = HTTP_TIMEOUT_SECS
) -> dict[str, Any]:
    status, _, body = _http(
        method,
        url,
        urllib.parse.urlencode(form).encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
        timeout_secs,
    )
    try:
        decoded: dict[str, Any] = json.loads(body)
    except ValueError as exc:
        raise ServerError(f"{url}: HTTP {status}, not JSON: {body[:200]!r}") from exc
    if status >= 400 or "error" in decoded:
        raise ServerError(f"{url}: HTTP {status}: {decoded.get('error', body[:200])}")
    return decoded


def influx_write(
    server: Server, db: str, lines: str | Iterable[str], precision: str = "ns"
) -> None:
    """Write line protocol through InfluxDB 1.x ``/write``.

    Raises:
        ServerError: any answer but 204.
    """
    text = lines if isinstance(lines, str) else "\n".join(lines)
    query = urllib.parse.urlencode({"db": db, "precision": precision})
    status, _, body = _http("POST", f"{server.url}/write?{query}", text.encode())
    if status != 204:
        raise ServerError(f"influx /write: HTTP {status}: {body[:300]!r}")


def influx_query(
    server: Server,
    db: str,
    q: str,
    *,
    epoch: str | None = None,
    timeout_secs: float = HTTP_TIMEOUT_SECS,
) -> list[dict[str, Any]]:
    """Run InfluxQL ``q`` and flatten the answer into rows.

    Each row is ``{"time": ..., column: value, ...}`` plus the series' GROUP BY tags, for every
    series of every statement. Times are RFC 3339 strings unless ``epoch`` ("ns", "ms", "s", ...)
    asks for integers.

    Raises:
        ServerError: HTTP error or an error in any statement.
        OSError: no connection, or no answer within ``timeout_secs`` (TimeoutError).
    """
    form = {"q": q}
    if db:
        form["db"] = db
    if epoch is not None:
        form["epoch"] = epoch
    body = _json_request("POST", f"{server.url}/query", form, timeout_secs)
    rows: list[dict[str, Any]] = []
    for result in body.get("results", []):
        if "error" in result:
            raise ServerError(f"influx query {q!r}: {result['error']}")
        for series in result.get("series", []):
            tags = series.get("tags", {})
            for values in series.get("values", []):
                rows.append({**tags, **dict(zip(series["columns"], values, strict=True))})
    return rows


def vm_write(server: Server, lines: str | Iterable[str]) -> None:
    """Write line protocol through VictoriaMetrics' ``/api/v2/write`` (ns precision).

    Raises:
        ServerError: any answer but 204.
    """
    text = lines if isinstance(lines, str) else "\n".join(lines)
    status, _, body = _http("POST", f"{server.url}/api/v2/write", text.encode())
    if status != 204:
        raise ServerError(f"vm /api/v2/write: HTTP {status}: {body[:300]!r}")


def vm_export(server: Server, match: str) -> list[dict[str, Any]]:
    """Flush VictoriaMetrics, then export every sample of the series matching ``match``.

    Returns one dict per series: ``{"metric": {"__name__": ..., tag: ...}, "values": [...],
    "timestamps": [ms, ...]}``, sorted by metric. Line protocol ``m,tags f=..`` is series ``m_f``.

    Raises:
        ServerError: HTTP error.
    """
    status, _, body = _http("GET", f"{server.url}/internal/force_flush")
    if status != 200:
        raise ServerError(f"vm /internal/force_flush: HTTP {status}: {body[:300]!r}")
    # The default end is "now" in whole seconds, which hides points written this second.
    end = int(time.time()) + 10 * 365 * 86400
    form = urllib.parse.urlencode({"match[]": match, "start": "0", "end": str(end)})
    status, _, body = _http("POST", f"{server.url}/api/v1/export", form.encode())
    if status != 200:
        raise ServerError(f"vm /api/v1/export: HTTP {status}: {body[:300]!r}")
    series = [json.loads(line) for line in body.splitlines() if line.strip()]
    return sorted(series, key=lambda s: json.dumps(s["metric"], sort_keys=True))


# --- CLI for CI ------------------------------------------------------------------------------

_STARTERS: Mapping[str, Callable[[Path], Server]] = {
    "mosquitto": start_mosquitto,
    "influxdb1": start_influxd,
    "victoria": start_victoria_metrics,
}


def _up(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    directory = directory.resolve()
    started: list[Server] = []
    exports = [f"export EDGE_TEST_SERVERS_DIR={shlex.quote(str(directory))}"]
    for name, starter in _STARTERS.items():
        if find_binary(name) is None:
            print(f"servers: {BINARIES[name]} not installed, not starting {name}", file=sys.stderr)
            continue
        try:
            server = starter(directory)
        except ServerError as exc:
            print(f"servers: {name} failed to start: {exc}", file=sys.stderr)
            for other in started:
                other.stop()
            return 1
        started.append(server)
        assert server.proc is not None
        (directory / f"{name}.pid").write_text(f"{server.proc.pid}\n")
        exports.append(f"export {ENV_VARS[name]}={shlex.quote(server.url)}")
        print(f"servers: {name} pid {server.proc.pid} at {server.url}, data in {server.data_dir}")
    (directory / "env").write_text("\n".join(exports) + "\n")
    print(f"servers: source {directory / 'env'}")
    return 0


def _process_gone(pid: int) -> bool:
    """True if ``pid`` no longer exists or is a zombie (not our child, so we cannot reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _down(directory: Path) -> int:
    directory = directory.resolve()
    status = 0
    for pid_file in sorted(directory.glob("*.pid")):
        pid = int(pid_file.read_text())
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            cmdline = ""
        # A recycled pid belongs to somebody else: only signal a process that uses our directory.
        if str(directory) in cmdline and not _process_gone(pid):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)
            deadline = time.monotonic() + STOP_TIMEOUT_SECS
            while not _process_gone(pid) and time.monotonic() < deadline:
                time.sleep(POLL_INTERVAL_SECS)
            if not _process_gone(pid):
                print(f"servers: {pid_file.stem} ignored SIGTERM, killing", file=sys.stderr)
                os.kill(pid, signal.SIGKILL)
                status = 1
            print(f"servers: stopped {pid_file.stem} (pid {pid})")
        pid_file.unlink()
    return status


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.servers {up,down} --dir DIR``."""
    parser = argparse.ArgumentParser(prog="python -m tests.servers", description=__doc__)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, required=True, help="state directory")
    args = parser.parse_args(argv)
    return _up(args.dir) if args.action == "up" else _down(args.dir)


if __name__ == "__main__":
    sys.exit(main())
