"""The durable on-disk spool between intake and InfluxDB.

Why: the gateway acknowledges a message (MQTT PUBACK, HTTP 2xx) only after it is durably
stored, so the broker or device keeps it until then; and the spool is the buffer that rides
out WAN or InfluxDB outages.

Design (measured choices are in docs/benchmarks.md):

* SQLite in WAL mode with ``synchronous=FULL``: a committed transaction survives power loss
  (``NORMAL`` may roll back the last ones). One transaction per *group commit*: all messages
  that arrived while the previous commit ran, or within ``commit_interval_ms``, share one fsync.
* A row is a **segment**: the already-serialised line-protocol lines of one group commit for one
  priority, joined by ``\\n``. Intake and forwarding then cost one row each per batch rather than
  one per message, and the forwarder sends segment bodies as they are.
* Quota by bytes: when a new segment would push the spool past ``max_bytes`` the oldest
  *telemetry* segments are dropped and counted (``points_dropped:quota``); events are never
  dropped; if only events are left the append fails with :class:`SpoolFull` and intake stops
  acknowledging (the broker or device keeps the data).
* Every counter lives in the same database and moves in the same transaction as the data it
  counts, so the accounting identity survives ``kill -9``::

      messages_received = messages_accepted + messages_rejected[reason]
      points_spooled    = points_delivered + points_queued
                          + points_quarantined[reason] + points_dropped[reason]

* On open an integrity check runs; a corrupt file is moved aside as ``<name>.corrupt.<ts>``,
  counted (``spool_corrupt_total``) and a fresh spool is used.

Exceptions::

    SpoolError            base
    ├── SpoolFull         quota reached and nothing droppable: stop acknowledging intake
    └── (sqlite3.Error)   I/O errors such as disk full pass through unchanged: intake must not ack

:class:`Spool` is synchronous and single-threaded; :class:`SpoolService` owns it on one worker
thread and offers the asyncio API with group commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edge.model import Priority

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS segment (
    id INTEGER PRIMARY KEY,
    created_ns INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    n INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS segment_priority ON segment (priority, id);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    created_ns INTEGER NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    line BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counter (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"""

COUNTER_UPSERT = (
    "INSERT INTO counter (name, value) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value"
)


class SpoolError(Exception):
    """Base of the spool's own errors."""


class SpoolFull(SpoolError):
    """The quota is reached and only events (never dropped) are left."""


@dataclass(slots=True)
class Segment:
    """One stored batch of lines."""

    id: int
    created_ns: int
    n: int
    body: bytes


@dataclass(slots=True)
class SpoolStatus:
    """A snapshot for ``edgegw status`` and health reporting."""

    segments: int
    points_queued: int
    bytes_queued: int
    oldest_created_ns: int | None
    counters: dict[str, int]
    meta: dict[str, str]
    quarantine_rows: int


@dataclass(slots=True)
class Batch:
    """What one group commit writes: lines per priority and counter deltas."""

    lines: dict[Priority, list[bytes]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


class Spool:
    """SQLite segment queue. Not thread-safe: use it from one thread only.

    Args:
        path: database file; its directory is created if missing.
        max_bytes: quota for queued line bytes.
        quarantine_max_rows: the oldest quarantined lines beyond this are deleted (still counted).
    """

    def __init__(self, path: Path, max_bytes: int, quarantine_max_rows: int = 10_000) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.quarantine_max_rows = quarantine_max_rows
        self._db: sqlite3.Connection | None = None
        self._bytes = 0
        self._dropped_unlogged = 0
        self._drop_logged_at = -1e9

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Open (creating if needed), check integrity, move a corrupt file aside."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        corrupt_reason = None
        try:
            self._db = self._connect()
            row = self._db.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                corrupt_reason = str(row[0] if row else "no result")
        except sqlite3.OperationalError:
            # Locked, unreadable, read-only, I/O error: not corruption. Moving the file aside
            # would hide the acknowledged backlog; fail and let the operator see why.
            if self._db is not None:
                self._db.close()
                self._db = None
            raise
        except sqlite3.DatabaseError as exc:  # SQLITE_CORRUPT, SQLITE_NOTADB
            corrupt_reason = str(exc)
        if corrupt_reason is not None:
            if self._db is not None:
                self._db.close()
            moved = self._move_aside()
            log.error("spool %s is corrupt (%s): moved aside to %s, starting a fresh spool",
                      self.path, corrupt_reason, moved)
            self._db = self._connect()
            with self._db:
                self._db.execute(COUNTER_UPSERT, ("spool_corrupt_total", 1))
                self._set_meta("last_corrupt", f"{moved.name}: {corrupt_reason}")
        db = self._require()
        row = db.execute("SELECT coalesce(sum(bytes), 0) FROM segment").fetchone()
        self._bytes = int(row[0])

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        # Keep the WAL small on SD cards: checkpoint every ~4 MB.
        db.execute("PRAGMA wal_autocheckpoint=1000")
        db.executescript(SCHEMA)
        db.isolation_level = "DEFERRED"
        return db

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S") + f"{time.time_ns() % 1_000_000_000:09d}"
        target = self.path.with_name(f"{self.path.name}.corrupt.{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(target) + suffix))
        return target

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _require(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError("spool is not open")
        return self._db

    # -- intake ----------------------------------------------------------------------------

    def append(self, batch: Batch, now_ns: int) -> None:
        """Store one group commit durably (one transaction, one fsync).

        Over quota, the oldest telemetry goes first: queued segments, then, if one commit alone
        is larger than the quota, the oldest telemetry lines of this batch (all counted as
        ``points_dropped:quota``). Events are never dropped.

        Raises:
            SpoolFull: the events alone do not fit; nothing was written.
            sqlite3.Error: I/O failure; nothing was written.
        """
        db = self._require()
        lines = {p: ls for p, ls in batch.lines.items() if ls}
        new_bytes = sum(_joined_len(ls) for ls in lines.values())
        freed = dropped = trimmed = 0
        with db:
            if lines and self._bytes + new_bytes > self.max_bytes:
                freed, dropped, ids = self._oldest_telemetry(db, self._bytes + new_bytes
                                                             - self.max_bytes)
                over = self._bytes - freed + new_bytes - self.max_bytes
                tel = lines.get(Priority.TELEMETRY)
                if over > 0 and tel:
                    trimmed, tel = _trim_front(tel, over)
                    new_bytes -= _joined_len(lines[Priority.TELEMETRY]) - _joined_len(tel)
                    if tel:
                        lines[Priority.TELEMETRY] = tel
                    else:
                        del lines[Priority.TELEMETRY]
                    over = self._bytes - freed + new_bytes - self.max_bytes
                if over > 0:
                    raise SpoolFull(
                        f"spool quota of {self.max_bytes} bytes reached and the rest is events"
                    )
                db.executemany("DELETE FROM segment WHERE id = ?", ids)
                self._note_drop(dropped + trimmed)
            rows = [(now_ns, int(p), len(ls), _joined_len(ls), b"\n".join(ls))
                    for p, ls in lines.items()]
            db.executemany(
                "INSERT INTO segment (created_ns, priority, n, bytes, body) VALUES (?,?,?,?,?)",
                rows,
            )
            counters = dict(batch.counters)
            spooled = sum(r[2] for r in rows) + trimmed
            if spooled:
                counters["points_spooled"] = counters.get("points_spooled", 0) + spooled
            if dropped + trimmed:
                counters["points_dropped:quota"] = (
                    counters.get("points_dropped:quota", 0) + dropped + trimmed)
            db.executemany(COUNTER_UPSERT, counters.items())
        # Only now: if the transaction failed, the dropped segments are still there.
        self._bytes += new_bytes - freed

    def _oldest_telemetry(self, db: sqlite3.Connection, need: int
                          ) -> tuple[int, int, list[tuple[int]]]:
        """The oldest telemetry segments worth ``need`` bytes: (bytes, points, ids)."""
        freed = dropped = 0
        ids: list[tuple[int]] = []
        for seg_id, n, nbytes in db.execute(
            "SELECT id, n, bytes FROM segment WHERE priority = ? ORDER BY id",
            (int(Priority.TELEMETRY),),
        ):
            if freed >= need:
                break
            ids.append((seg_id,))
            freed += nbytes
            dropped += n
        return freed, dropped, ids

    def _note_drop(self, points: int) -> None:
        # Once per minute at most: under a full quota every commit drops something.
        self._dropped_unlogged += points
        now = time.monotonic()
        if now - self._drop_logged_at >= 60.0:
            log.warning("spool quota of %d bytes reached: dropped the %d oldest telemetry "
                        "points (since the last report)", self.max_bytes, self._dropped_unlogged)
            self._dropped_unlogged = 0
            self._drop_logged_at = now

    # -- forwarding ------------------------------------------------------------------------

    def peek(self, max_lines: int, max_bytes: int) -> list[Segment]:
        """The oldest segments, at least one, up to ``max_lines`` / ``max_bytes`` together."""
        db = self._require()
        out: list[Segment] = []
        lines = size = 0
        for seg_id, created, n, body in db.execute(
            "SELECT id, created_ns, n, body FROM segment ORDER BY id LIMIT 1000"
        ):
            if out and (lines + n > max_lines or size + len(body) > max_bytes):
                break
            out.append(Segment(seg_id, created, n, body))
            lines += n
            size += len(body)
        return out

    def ack(
        self,
        segments: Sequence[Segment],
        delivered: int,
        quarantined: Iterable[tuple[str, str, bytes]] = (),
        now_ns: int = 0,
    ) -> None:
        """Remove forwarded segments; record delivered and quarantined lines in one transaction.

        ``quarantined`` holds ``(reason, server message, line)`` for each refused line.

        A segment the quota or retention dropped while it was being forwarded is already
        counted as dropped: its lines are not counted again (taken from ``delivered`` first,
        then from the quarantined lines), and if its id was reused by a newer segment, that
        one is not deleted (rowids of deleted rows are reused).
        """
        db = self._require()
        q = list(quarantined)
        gone = gone_bytes = 0
        with db:
            for s in segments:
                cur = db.execute("DELETE FROM segment WHERE id = ? AND body = ?", (s.id, s.body))
                if cur.rowcount == 0:
                    gone += s.n
                    gone_bytes += len(s.body)
            counted = max(0, delivered - gone)
            skip = gone - (delivered - counted)
            counts: dict[str, int] = {"points_delivered": counted}
            for reason, _, _ in q[skip:]:
                key = f"points_quarantined:{reason}"
                counts[key] = counts.get(key, 0) + 1
            if q:
                db.executemany(
                    "INSERT INTO quarantine (created_ns, reason, detail, line) VALUES (?,?,?,?)",
                    [(now_ns, r, d, line) for r, d, line in q],
                )
                db.execute(
                    "DELETE FROM quarantine WHERE id <= "
                    "(SELECT max(id) FROM quarantine) - ?",
                    (self.quarantine_max_rows,),
                )
            db.executemany(COUNTER_UPSERT, counts.items())
        self._bytes -= sum(len(s.body) for s in segments) - gone_bytes

    def expire(self, older_than_ns: int) -> int:
        """Drop telemetry segments created before ``older_than_ns`` (embedded-mode retention)."""
        db = self._require()
        with db:
            row = db.execute(
                "SELECT coalesce(sum(n), 0), coalesce(sum(bytes), 0) FROM segment "
                "WHERE created_ns < ? AND priority = ?",
                (older_than_ns, int(Priority.TELEMETRY)),
            ).fetchone()
            n, nbytes = int(row[0]), int(row[1])
            if n:
                db.execute(
                    "DELETE FROM segment WHERE created_ns < ? AND priority = ?",
                    (older_than_ns, int(Priority.TELEMETRY)),
                )
                db.execute(COUNTER_UPSERT, ("points_dropped:retention", n))
        self._bytes -= nbytes
        return n

    # -- state -----------------------------------------------------------------------------

    def _set_meta(self, key: str, value: str) -> None:
        self._require().execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def set_meta(self, key: str, value: str) -> None:
        """Record a piece of state (last forwarder error, ...) for ``edgegw status``."""
        with self._require():
            self._set_meta(key, value)

    def status(self) -> SpoolStatus:
        db = self._require()
        segs, points, nbytes, oldest = db.execute(
            "SELECT count(*), coalesce(sum(n), 0), coalesce(sum(bytes), 0), min(created_ns) "
            "FROM segment"
        ).fetchone()
        counters = dict(db.execute("SELECT name, value FROM counter").fetchall())
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        qrows = db.execute("SELECT count(*) FROM quarantine").fetchone()[0]
        return SpoolStatus(int(segs), int(points), int(nbytes), oldest, counters, meta, int(qrows))

    def tail(self, n: int) -> list[bytes]:
        """The newest ``n`` queued lines, oldest first."""
        db = self._require()
        out: list[bytes] = []
        if n <= 0:
            return out
        for (body,) in db.execute("SELECT body FROM segment ORDER BY id DESC"):
            lines = body.split(b"\n")
            out[:0] = lines[-(n - len(out)):]
            if len(out) >= n:
                break
        return out

    def quarantined(self, n: int) -> list[tuple[int, str, str, bytes]]:
        """The newest ``n`` quarantined lines: (time, reason, server message, line)."""
        rows = self._require().execute(
            "SELECT created_ns, reason, detail, line FROM quarantine ORDER BY id DESC LIMIT ?",
            (n,),
        ).fetchall()
        return [(int(a), str(b), str(c), bytes(d)) for a, b, c, d in reversed(rows)]


def _joined_len(lines: list[bytes]) -> int:
    """Length of ``b"\\n".join(lines)`` without joining."""
    return sum(map(len, lines)) + len(lines) - 1 if lines else 0


def _trim_front(lines: list[bytes], over: int) -> tuple[int, list[bytes]]:
    """Drop lines from the front until ``over`` bytes are gone: (lines dropped, the rest)."""
    gone = cut = 0
    while cut < len(lines) and gone < over:
        gone += len(lines[cut]) + 1
        cut += 1
    return cut, lines[cut:]


def open_readonly(path: Path) -> Spool:
    """Open an existing spool for inspection (``edgegw status`` / ``tail``) without writing."""
    if not path.exists():
        raise SpoolError(f"no spool at {path}")
    spool = Spool(path, max_bytes=0)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    spool._db = db
    return spool


class SpoolService:
    """Owns a :class:`Spool` on one worker thread and batches intake into group commits.

    Sources call :meth:`submit` (or :meth:`reject`) on the event loop and await the returned
    future: it completes once the lines (and the counters) are committed, and only then may the
    source acknowledge the message. One commit runs at a time; everything that arrives while it
    runs, or within ``commit_interval`` of the first pending message, joins the next one.
    """

    def __init__(
        self,
        spool: Spool,
        commit_interval_secs: float = 0.02,
        commit_max_messages: int = 2000,
    ) -> None:
        self.spool = spool
        self.commit_interval = commit_interval_secs
        self.commit_max = commit_max_messages
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._batch = Batch()
        self._pending = 0
        self._future: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._closing = False
        self.new_data = asyncio.Event()
        self.last_error: str | None = None

    async def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the spool thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        await self.call(self.spool.open)

    def _current(self) -> asyncio.Future[None]:
        fut = self._future
        if fut is None:
            fut = self._future = asyncio.get_running_loop().create_future()
            self._wake.set()
        return fut

    def submit(self, priority: Priority, lines: list[bytes]) -> asyncio.Future[None]:
        """Queue one accepted message's lines; await the result before acknowledging."""
        fut = self._current()
        batch = self._batch
        bucket = batch.lines.get(priority)
        if bucket is None:
            bucket = batch.lines[priority] = []
        bucket.extend(lines)
        c = batch.counters
        c["messages_received"] = c.get("messages_received", 0) + 1
        c["messages_accepted"] = c.get("messages_accepted", 0) + 1
        self._pending += 1
        if self._pending >= self.commit_max:
            self._full.set()
        return fut

    def reject(self, reason: str) -> asyncio.Future[None]:
        """Count one rejected message; await the result before acknowledging it."""
        fut = self._current()
        c = self._batch.counters
        c["messages_received"] = c.get("messages_received", 0) + 1
        key = "messages_rejected:" + reason
        c[key] = c.get(key, 0) + 1
        self._pending += 1
        return fut

    def count(self, name: str, n: int = 1) -> None:
        """Add to a counter in the next commit (no acknowledgement depends on it)."""
        self._batch.count(name, n)

    async def run(self) -> None:
        """The committer loop; returns after :meth:`close` once everything pending is written."""
        loop = asyncio.get_running_loop()
        while True:
            if self._future is None:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._pending < self.commit_max and not self._closing:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.commit_interval):
                        await self._full.wait()
            batch, fut = self._batch, self._future
            self._batch, self._future, self._pending = Batch(), None, 0
            try:
                await loop.run_in_executor(self._executor, self.spool.append, batch,
                                           time.time_ns())
            except (SpoolError, sqlite3.Error) as exc:
                if self.last_error is None:
                    log.error("spool commit failed, not acknowledging intake: %s", exc)
                self.last_error = str(exc)
                if not fut.done():  # a waiter that gave up may have cancelled it
                    fut.set_exception(exc)
                    fut.exception()  # retrieved: the sources see it through their own awaits
                # Do not spin on a full or failing disk.
                await asyncio.sleep(min(1.0, self.commit_interval * 10))
                continue
            if self.last_error is not None:
                log.warning("spool commits work again")
                self.last_error = None
            if not fut.done():  # a waiter that gave up may have cancelled it
                fut.set_result(None)
            self.new_data.set()

    def close(self) -> None:
        """Ask :meth:`run` to commit what is pending and return."""
        self._closing = True
        self._wake.set()
        self._full.set()

    async def shutdown(self) -> None:
        await self.call(self.spool.close)
        self._executor.shutdown(wait=True)
