"""HTTP writer for InfluxDB's two write APIs.

Why a plain HTTP writer instead of influxdb-client: that library costs ~120-200 ms and
~31-41 MiB to import (it loads reactivex), and its batching mode swallows failures into logs;
the gateway needs every response classified (docs/benchmarks.md, ../shared/notes.md).

* v1: ``POST /write?db=..&rp=..&precision=ns`` with HTTP basic auth (InfluxDB 1.x, and 2.x/3.x
  compatibility endpoints).
* v2: ``POST /api/v2/write?org=..&bucket=..&precision=ns`` with ``Authorization: Token ..``
  (InfluxDB 2.x/3.x, Cloud, VictoriaMetrics).

Lines always carry nanosecond timestamps, so ``precision=ns`` is always right.

The writer only talks HTTP and classifies; what to do about each class is the forwarder's job.
"""

from __future__ import annotations

import base64
import enum
import zlib
from dataclasses import dataclass

import aiohttp

from edge.config import InfluxConfig


class Outcome(enum.Enum):
    """How the forwarder must treat a write response."""

    OK = "ok"
    DATA_ERROR = "data_error"  # 400/422: some lines are bad; bisect and quarantine them
    TOO_LARGE = "too_large"  # 413: split the batch
    AUTH = "auth"  # 401/403: keep data, back off, say so loudly
    NOT_FOUND = "not_found"  # 404: wrong API, database or bucket: keep data, back off
    RETRY = "retry"  # 429/5xx/timeouts/connection errors: back off and retry


@dataclass(slots=True, frozen=True)
class WriteResult:
    outcome: Outcome
    status: int | None
    message: str
    retry_after_secs: float | None = None


def classify(status: int, body: str, retry_after: str | None) -> WriteResult:
    """Sort an HTTP answer into an :class:`Outcome`."""
    if 200 <= status < 300:
        return WriteResult(Outcome.OK, status, "")
    message = body.strip()[:500]
    if status in (400, 422):
        return WriteResult(Outcome.DATA_ERROR, status, message)
    if status == 413:
        return WriteResult(Outcome.TOO_LARGE, status, message)
    if status in (401, 403):
        return WriteResult(Outcome.AUTH, status, message)
    if status == 404:
        return WriteResult(Outcome.NOT_FOUND, status, message)
    after: float | None = None
    if retry_after is not None:
        try:
            after = max(0.0, float(retry_after))
        except ValueError:
            after = None  # an HTTP date: fall back to our own backoff
    return WriteResult(Outcome.RETRY, status, message, after)


class InfluxWriter:
    """Posts line-protocol bodies to one InfluxDB endpoint. Constructors do no I/O."""

    def __init__(self, config: InfluxConfig) -> None:
        self.config = config
        base = config.url.rstrip("/")
        if config.api == "v1":
            self.endpoint = f"{base}/write"
            params = {"db": config.database or "", "precision": "ns"}
            if config.retention_policy:
                params["rp"] = config.retention_policy
            self._headers = {"Content-Type": "text/plain; charset=utf-8"}
            if config.username:
                # Built here: aiohttp 3.14 deprecates BasicAuth (a DeprecationWarning per writer).
                pair = f"{config.username}:{config.password() or ''}".encode()
                self._headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        else:
            self.endpoint = f"{base}/api/v2/write"
            params = {"org": config.org or "", "bucket": config.bucket or "", "precision": "ns"}
            self._headers = {
                "Content-Type": "text/plain; charset=utf-8",
                "Authorization": f"Token {config.token() or ''}",
            }
        self._params = params
        self._gzip = config.compression == "gzip"
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> InfluxWriter:
        ssl: bool | object = True
        if self.config.ca_file is not None:
            import ssl as ssl_mod

            ssl = ssl_mod.create_default_context(cafile=str(self.config.ca_file))
        connector = aiohttp.TCPConnector(limit=2, ssl=ssl)  # type: ignore[arg-type]
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_secs),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def describe(self) -> str:
        """Where we write, without secrets (for logs and status)."""
        target = (
            f"db={self.config.database}"
            if self.config.api == "v1"
            else f"org={self.config.org} bucket={self.config.bucket}"
        )
        return f"{self.endpoint} ({target})"

    async def write(self, body: bytes) -> WriteResult:
        """POST one body; never raises for HTTP or network trouble (it is a result)."""
        if self._session is None:
            raise RuntimeError("InfluxWriter used outside 'async with'")
        headers = self._headers
        data = body
        if self._gzip and len(body) > 1024:
            data = gzip_fast(body)
            headers = {**headers, "Content-Encoding": "gzip"}
        try:
            async with self._session.post(
                self.endpoint, params=self._params, data=data, headers=headers
            ) as resp:
                text = await resp.text(errors="replace")
                return classify(resp.status, text, resp.headers.get("Retry-After"))
        except TimeoutError:
            return WriteResult(Outcome.RETRY, None, f"timeout after {self.config.timeout_secs}s")
        except (aiohttp.ClientError, OSError) as exc:
            return WriteResult(Outcome.RETRY, None, f"{type(exc).__name__}: {exc}")

    async def probe(self) -> WriteResult:
        """Check that the configured API exists (an empty write is a no-op on every server)."""
        return await self.write(b"")


def gzip_fast(body: bytes) -> bytes:
    """gzip at level 1: line protocol compresses ~8x even at the fastest level."""
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    return c.compress(body) + c.flush()

