"""Forwards spooled lines to InfluxDB and sorts out every kind of failure.

Why: a write can fail in ways that need opposite handling. Retrying a bad line forever blocks
all data behind it; dropping a batch on a transient 503 loses data. The rules:

* 2xx: delete the segments (one transaction, counted as delivered).
* 400/422 (bad lines, type conflicts, beyond retention): bisect the batch; halves that succeed
  are delivered, single lines the server refuses are quarantined with its reason. InfluxDB 1.x
  stores the good lines of a partial write, so bisecting re-sends some of them: harmless,
  because every line carries an explicit timestamp and a re-sent point overwrites itself.
* 413: split the batch in halves.
* 401/403/404: keep the data, back off (capped), log loudly once and record it for
  ``edgegw status``: these are configuration problems, never data errors.
* 429/5xx/timeouts/refused connections: exponential backoff with full jitter, ``Retry-After``
  honoured up to ``retry_after_cap_secs``.

Batching: a write goes out when ``batch_max_lines`` are queued or the oldest queued line has
waited ``flush_interval_ms``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import time
from collections.abc import Callable

from edge.config import InfluxConfig
from ingest.spool import Segment, SpoolService
from ingest.writer import InfluxWriter, Outcome, WriteResult

log = logging.getLogger(__name__)

# Server messages -> short quarantine reasons (the counter label); the full message is kept.
# "unable to parse" comes first: that message quotes the refused line, whose words
# ("conflict", "beyond retention") must not choose the reason.
_REASONS = (
    ("unable to parse", "parse_error"),
    ("field type conflict", "type_conflict"),
    ("conflict", "type_conflict"),
    ("beyond retention", "beyond_retention"),
    ("invalid", "invalid"),
)


def quarantine_reason(message: str) -> str:
    low = message.lower()
    for needle, reason in _REASONS:
        if needle in low:
            return reason
    return "refused"


class Forwarder:
    """Moves segments from the spool to one InfluxDB, in order."""

    def __init__(
        self,
        spool: SpoolService,
        writer: InfluxWriter,
        config: InfluxConfig,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.spool = spool
        self.writer = writer
        self.config = config
        self._rand = rand
        self._attempt = 0
        self._failing: str | None = None
        self.flush_interval = config.flush_interval_ms / 1000

    @property
    def failing(self) -> bool:
        """True while writes fail (server down, refused credentials, ...)."""
        return self._failing is not None

    async def run(self) -> None:
        """Forward until cancelled."""
        await self._probe()
        spool = self.spool
        while True:
            segments: list[Segment] = await spool.call(
                spool.spool.peek, self.config.batch_max_lines, self.config.batch_max_bytes
            )
            if not segments:
                spool.new_data.clear()
                await spool.new_data.wait()
                continue
            lines = sum(s.n for s in segments)
            age = time.time_ns() - segments[0].created_ns
            # Capped: created_ns is wall-clock, and after the clock steps back the age is
            # negative; without the cap the forwarder would sleep for the size of the step.
            wait = min(self.flush_interval, self.flush_interval - age / 1e9)
            if lines < self.config.batch_max_lines and wait > 0:
                await asyncio.sleep(wait)
                segments = await spool.call(
                    spool.spool.peek, self.config.batch_max_lines, self.config.batch_max_bytes
                )
            await self.forward(segments)

    async def forward(self, segments: list[Segment]) -> None:
        """Deliver or quarantine every line of ``segments``, then remove them from the spool."""
        body = b"\n".join(s.body for s in segments)
        quarantined: list[tuple[str, str, bytes]] = []
        delivered = await self._send_body(body, sum(s.n for s in segments), quarantined)
        delay = 0.1
        while True:
            try:
                await self.spool.call(
                    self.spool.spool.ack, segments, delivered, quarantined, time.time_ns()
                )
                return
            except sqlite3.Error as exc:
                # Disk full or I/O error: the lines are in InfluxDB but still in the spool.
                # Retry rather than crash-loop; a re-send after a restart would be harmless.
                log.error("spool: cannot record %d delivered lines (%s); retrying", delivered,
                          exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _send_body(
        self, body: bytes, n: int, quarantined: list[tuple[str, str, bytes]]
    ) -> int:
        while True:
            result = await self.writer.write(body)
            if result.outcome is Outcome.OK:
                await self._recovered()
                return n
            if result.outcome in (Outcome.DATA_ERROR, Outcome.TOO_LARGE):
                await self._recovered()
                return await self._bisect(body.split(b"\n"), result, quarantined)
            await self._failed(result)

    async def _bisect(
        self, lines: list[bytes], result: WriteResult, quarantined: list[tuple[str, str, bytes]]
    ) -> int:
        if len(lines) == 1:
            reason = (
                "too_large" if result.outcome is Outcome.TOO_LARGE
                else quarantine_reason(result.message)
            )
            quarantined.append((reason, result.message, lines[0]))
            log.warning("quarantined a line (%s): %s", reason, result.message)
            return 0
        mid = len(lines) // 2
        delivered = 0
        for half in (lines[:mid], lines[mid:]):
            delivered += await self._send_body(b"\n".join(half), len(half), quarantined)
        return delivered

    async def _probe(self) -> None:
        result = await self.writer.probe()
        if result.outcome is Outcome.NOT_FOUND:
            hint = (
                "this server has no /api/v2/write (InfluxDB 1.x?): set influxdb.api = \"v1\""
                if self.config.api == "v2"
                else f"database {self.config.database!r} does not exist, or this is not an "
                "InfluxDB 1.x-compatible /write endpoint"
            )
            log.error("InfluxDB %s answered 404: %s. Keeping data in the spool.",
                      self.writer.describe(), hint)
            await self._record(f"404 from {self.writer.describe()}: {hint}")
            self._failing = hint  # so that the first successful write clears the record
        elif result.outcome is Outcome.AUTH:
            log.error("InfluxDB %s refused our credentials (%s). Keeping data in the spool.",
                      self.writer.describe(), result.status)

    def backoff_secs(self, result: WriteResult) -> float:
        """Full-jitter exponential backoff; ``Retry-After`` wins, up to its cap."""
        cfg = self.config
        if result.retry_after_secs is not None:
            return min(result.retry_after_secs, cfg.retry_after_cap_secs)
        ceiling = min(cfg.backoff_max_secs,
                      cfg.backoff_initial_secs * 2.0 ** min(self._attempt, 30))
        return ceiling * self._rand()

    async def _failed(self, result: WriteResult) -> None:
        what = f"{result.outcome.value} ({result.status or 'no answer'}): {result.message}"
        if self._failing != what:
            level = logging.ERROR if result.outcome in (Outcome.AUTH, Outcome.NOT_FOUND) else (
                logging.WARNING)
            log.log(level, "InfluxDB write to %s failed: %s; keeping data, retrying",
                    self.writer.describe(), what)
            self._failing = what
            await self._record(what)
        delay = self.backoff_secs(result)
        self._attempt += 1
        await asyncio.sleep(delay)

    async def _recovered(self) -> None:
        self._attempt = 0
        if self._failing is not None:
            log.warning("InfluxDB writes to %s work again", self.writer.describe())
            self._failing = None
            await self._record("")

    async def _record(self, error: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        value = f"{stamp} {error}" if error else ""
        try:
            await self.spool.call(self.spool.spool.set_meta, "forwarder_last_error", value)
        except sqlite3.Error as exc:  # status only: never worth stopping the forwarder for
            log.warning("spool: cannot record the forwarder state: %s", exc)
