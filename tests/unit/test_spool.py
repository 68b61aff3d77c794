"""Tests of ingest.spool on real SQLite files: a model-based state machine, then targeted cases.

The state machine drives :class:`Spool` through appends, forwarding (peek, then ack some time
later, as the forwarder does while it waits for InfluxDB), retention, quota pressure, SQLite
reporting a full disk, clean reopens and crashes, and compares everything observable with a plain
in-memory model after every step: the queued lines in FIFO order (read through a second
connection), ``bytes_queued``, every counter, the quarantine rows, and the accounting identity.

"Disk full" is SQLite's own ``SQLITE_FULL``, raised by lowering ``PRAGMA max_page_count`` on the
spool's connection: no mock, the real error from the real library at the real statement.

The :class:`SpoolService` tests run the committer on its real worker thread; the only seam is a
wrapper around ``Spool.append`` that counts commits or holds one open.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import tempfile
import threading
import types
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from edge.model import Priority
from edge.sources.http_push import HttpPushIntake
from ingest.spool import (
    Batch,
    Segment,
    Spool,
    SpoolError,
    SpoolFull,
    SpoolService,
    SpoolStatus,
    open_readonly,
)
from tests.gateway import accounting_holds

TEL = Priority.TELEMETRY
EVT = Priority.EVENT
REASONS = ("type_conflict", "parse_error", "too_large")


class FillableSpool(Spool):
    """A :class:`Spool` whose database can be made to report a full disk.

    ``PRAGMA max_page_count`` caps the file at its current size, so SQLite itself raises
    ``sqlite3.OperationalError: database or disk is full`` from whichever statement needs a
    new page, exactly as on a full disk (writes that fit in free pages still succeed).
    """

    def set_disk_full(self, full: bool) -> None:
        db = self._require()
        if full:
            pages = int(db.execute("PRAGMA page_count").fetchone()[0])
            db.execute(f"PRAGMA max_page_count = {pages}")
        else:
            db.execute("PRAGMA max_page_count = 2147483646")


def make_batch(
    telemetry: Sequence[bytes] = (),
    events: Sequence[bytes] = (),
    events_first: bool = False,
    counters: dict[str, int] | None = None,
) -> Batch:
    batch = Batch(counters=dict(counters or {}))
    order = [(EVT, events), (TEL, telemetry)] if events_first else [(TEL, telemetry),
                                                                     (EVT, events)]
    for priority, lines in order:
        if lines:
            batch.lines[priority] = list(lines)
    return batch


def queued_bodies(path: Path) -> list[tuple[int, bytes]]:
    """(priority, body) of every queued segment in id order, read through a second connection."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT priority, body FROM segment ORDER BY id").fetchall()
    finally:
        db.close()
    return [(int(p), bytes(b)) for p, b in rows]


def counters_of(path: Path) -> dict[str, int]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {str(k): int(v) for k, v in db.execute("SELECT name, value FROM counter")}
    finally:
        db.close()


def assert_books_balance(status: SpoolStatus) -> None:
    ok, why = accounting_holds(status)
    assert ok, why


# ------------------------------------------------------------------------------ state machine

MACHINE_MAX_BYTES = 8_000
MACHINE_QUARANTINE_ROWS = 4


@dataclass(eq=False)  # identity matters: the same lines are never two segments
class ModelSegment:
    priority: Priority
    lines: list[bytes]
    created_ns: int

    @property
    def body(self) -> bytes:
        return b"\n".join(self.lines)


@dataclass
class Model:
    """What the spool should contain, computed the plain way."""

    queue: list[ModelSegment] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    quarantine: list[tuple[int, str, str, bytes]] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(len(s.body) for s in self.queue)

    def count(self, name: str, n: int) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


class SpoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # RAM-backed when there is one: fsync is then free, and nothing here tests durability.
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.dir = Path(tempfile.mkdtemp(prefix="spool-machine-", dir=shm))
        self.path = self.dir / "spool.db"
        self.spool = self._open()
        self.model = Model()
        self.crashed: list[Spool] = []  # kept open, as a dead process's file stays as it was
        self.pending: list[tuple[Segment, ModelSegment]] = []  # peeked, not yet acked
        self.disk_full = False
        self.clock_ns = 1_000_000_000
        self.seq = 0
        self.events_live: set[bytes] = set()

    def _open(self) -> FillableSpool:
        spool = FillableSpool(self.path, MACHINE_MAX_BYTES, MACHINE_QUARANTINE_ROWS)
        spool.open()
        return spool

    def _lines(self, sizes: list[int]) -> list[bytes]:
        out = []
        for pad in sizes:
            self.seq += 1
            out.append(b"m,seq=%d v=1 %s" % (self.seq, b"x" * pad))
        return out

    def _disk_full_error(self, exc: sqlite3.OperationalError) -> None:
        """Only the injected fault may fail a write; the model then stays as it was."""
        assert self.disk_full, f"unexpected SQLite error: {exc}"
        assert "full" in str(exc), exc

    # -- rules ---------------------------------------------------------------------------------

    @rule(
        tel=st.lists(st.integers(0, 1500), max_size=4),
        ev=st.lists(st.integers(0, 900), max_size=3),
        events_first=st.booleans(),
        accepted=st.integers(0, 3),
        rejected=st.integers(0, 2),
        tick_secs=st.integers(0, 3),
    )
    def append(self, tel: list[int], ev: list[int], events_first: bool, accepted: int,
               rejected: int, tick_secs: int) -> None:
        self.clock_ns += tick_secs * 1_000_000_000
        # Sequence numbers follow the order the lines are queued in.
        if events_first:
            events, telemetry = self._lines(ev), self._lines(tel)
        else:
            telemetry, events = self._lines(tel), self._lines(ev)
        counters = {}
        if accepted or rejected:
            counters["messages_received"] = accepted + rejected
        if accepted:
            counters["messages_accepted"] = accepted
        if rejected:
            counters["messages_rejected:invalid_json"] = rejected
        batch = make_batch(telemetry, events, events_first, counters)

        order = [(EVT, events), (TEL, telemetry)] if events_first else [(TEL, telemetry),
                                                                         (EVT, events)]
        new = [ModelSegment(p, lines, self.clock_ns) for p, lines in order if lines]
        new_bytes = sum(len(s.body) for s in new)
        dropped: list[ModelSegment] = []
        full = False
        trimmed = 0
        if new and self.model.bytes + new_bytes > MACHINE_MAX_BYTES:
            # Spec: drop the fewest oldest telemetry segments that make the batch fit; if even
            # all of them are not enough, drop the batch's own oldest telemetry lines; if the
            # events alone still do not fit, refuse the whole batch.
            need = self.model.bytes + new_bytes - MACHINE_MAX_BYTES
            for seg in self.model.queue:
                if sum(len(d.body) for d in dropped) >= need:
                    break
                if seg.priority is TEL:
                    dropped.append(seg)
            over = need - sum(len(d.body) for d in dropped)
            if over > 0 and telemetry:
                gone = 0
                while trimmed < len(telemetry) and gone < over:
                    gone += len(telemetry[trimmed]) + 1
                    trimmed += 1
                telemetry = telemetry[trimmed:]
                order = [(EVT, events), (TEL, telemetry)] if events_first else [
                    (TEL, telemetry), (EVT, events)]
                new = [ModelSegment(p, lines, self.clock_ns) for p, lines in order if lines]
                new_bytes = sum(len(s.body) for s in new)
                over = self.model.bytes - sum(len(d.body) for d in dropped) + new_bytes - (
                    MACHINE_MAX_BYTES)
            full = over > 0

        if full:
            event("append: SpoolFull, nothing written")
            with pytest.raises(SpoolFull):
                self.spool.append(batch, self.clock_ns)
            return
        try:
            self.spool.append(batch, self.clock_ns)
        except sqlite3.OperationalError as exc:
            self._disk_full_error(exc)
            event("append: disk full" + (" after making room" if dropped else ""))
            return
        if dropped or trimmed:
            event("append: dropped oldest telemetry" + (" of the batch" if trimmed else ""))
            self.model.queue = [s for s in self.model.queue if s not in dropped]
            self.model.count("points_dropped:quota",
                             sum(len(d.lines) for d in dropped) + trimmed)
        self.model.queue.extend(new)
        self.events_live.update(events)
        for name, n in counters.items():
            self.model.count(name, n)
        spooled = len(telemetry) + len(events) + trimmed
        if spooled:
            self.model.count("points_spooled", spooled)

    @precondition(lambda self: not self.pending)  # like the forwarder: one batch in flight
    @rule(max_lines=st.integers(1, 12), max_bytes=st.integers(1, 5_000))
    def peek(self, max_lines: int, max_bytes: int) -> None:
        got = self.spool.peek(max_lines, max_bytes)
        expected: list[ModelSegment] = []
        lines = size = 0
        for seg in self.model.queue:
            if expected and (lines + len(seg.lines) > max_lines
                             or size + len(seg.body) > max_bytes):
                break
            expected.append(seg)
            lines += len(seg.lines)
            size += len(seg.body)
        assert [(s.n, s.body) for s in got] == [(len(m.lines), m.body) for m in expected]
        assert [s.created_ns for s in got] == [m.created_ns for m in expected]
        self.pending = list(zip(got, expected, strict=True))

    @precondition(lambda self: bool(self.pending))
    @rule(verdicts=st.lists(st.sampled_from((None, *REASONS)), min_size=40, max_size=40))
    def ack(self, verdicts: list[str | None]) -> None:
        """Deliver the peeked lines, quarantining some; meanwhile they may have been dropped."""
        lines = [line for _, m in self.pending for line in m.lines]
        quarantined = [(r, f"server says {r}", line)
                       for r, line in zip(verdicts, lines, strict=False) if r is not None]
        delivered = len(lines) - len(quarantined)
        segments = [s for s, _ in self.pending]
        self.clock_ns += 1
        try:
            self.spool.ack(segments, delivered, quarantined, self.clock_ns)
        except sqlite3.OperationalError as exc:
            self._disk_full_error(exc)
            return
        # Lines whose segment the quota or retention dropped while they were in flight are
        # already counted as dropped: they are taken from the delivered count first, then from
        # the quarantined lines, so every point is counted exactly once.
        gone = sum(len(m.lines) for _, m in self.pending if m not in self.model.queue)
        if gone:
            event("ack: some forwarded segments were dropped meanwhile")
        counted = max(0, delivered - gone)
        skip = gone - (delivered - counted)
        self.model.queue = [s for s in self.model.queue
                            if all(s is not m for _, m in self.pending)]
        self.model.count("points_delivered", counted)
        for _, m in self.pending:
            if m.priority is EVT:
                self.events_live.difference_update(m.lines)
        for reason, _, _ in quarantined[skip:]:
            self.model.count(f"points_quarantined:{reason}", 1)
        self.model.quarantine.extend(
            (self.clock_ns, r, d, line) for r, d, line in quarantined)
        self.pending = []

    @rule(age_secs=st.integers(0, 6))
    def expire(self, age_secs: int) -> None:
        cutoff = self.clock_ns - age_secs * 1_000_000_000
        old = [s for s in self.model.queue if s.priority is TEL and s.created_ns < cutoff]
        try:
            n = self.spool.expire(cutoff)
        except sqlite3.OperationalError as exc:
            self._disk_full_error(exc)
            return
        assert n == sum(len(s.lines) for s in old)
        self.model.queue = [s for s in self.model.queue if s not in old]
        if n:
            self.model.count("points_dropped:retention", n)

    @rule(full=st.booleans())
    def disk(self, full: bool) -> None:
        self.spool.set_disk_full(full)
        self.disk_full = full

    @rule(crash=st.booleans())
    def reopen(self, crash: bool) -> None:
        """Close cleanly, or "crash": abandon the connection as it is and open the file anew."""
        event(f"reopen: crash={crash}")
        if crash:
            self.crashed.append(self.spool)
        else:
            self.spool.close()
        self.spool = self._open()
        self.disk_full = False
        self.pending = []  # the forwarder does not survive a restart either
        assert_books_balance(self.spool.status())

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        st_ = self.spool.status()
        model = self.model
        assert queued_bodies(self.path) == [(int(s.priority), s.body) for s in model.queue]
        assert st_.segments == len(model.queue)
        assert st_.points_queued == sum(len(s.lines) for s in model.queue)
        assert st_.bytes_queued == model.bytes
        assert st_.bytes_queued <= MACHINE_MAX_BYTES
        assert st_.counters == model.counters
        assert st_.quarantine_rows == min(len(model.quarantine), MACHINE_QUARANTINE_ROWS)
        assert self.spool.quarantined(100) == model.quarantine[-MACHINE_QUARANTINE_ROWS:]
        assert_books_balance(st_)

    @invariant()
    def fifo_lines_and_events_kept(self) -> None:
        """Lines are queued in arrival order and no event was ever dropped."""
        queued = [line for s in self.model.queue for line in s.lines]
        got = self.spool.tail(len(queued) + 1)
        seqs = [int(line.split(b"seq=")[1].split(b" ")[0]) for line in got]
        assert seqs == sorted(seqs)  # whatever was dropped, the rest is in arrival order
        assert got == queued
        # Independent of the model's drop logic: every event written and not yet forwarded
        # is still queued.
        queued_events = {line for p, body in queued_bodies(self.path) if p == EVT
                         for line in body.split(b"\n")}
        assert self.events_live <= queued_events

    def teardown(self) -> None:
        self.spool.close()
        for spool in self.crashed:
            spool.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestSpoolStateMachine = SpoolMachine.TestCase
TestSpoolStateMachine.settings = settings(
    max_examples=int(os.environ.get("SPOOL_MACHINE_EXAMPLES", "200")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ------------------------------------------------------------------------ targeted unit tests


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool.db", max_bytes=1_000_000)
    s.open()
    yield s
    s.close()


def fill(s: Spool, *segments: tuple[Priority, list[bytes]], now_ns: int = 1) -> None:
    for priority, lines in segments:
        s.append(Batch(lines={priority: lines}), now_ns)


def garbage_header(path: Path) -> None:
    with path.open("r+b") as f:
        f.write(b"this is not SQLite " * 6)  # over the 100-byte header, magic string included


def truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize("damage", [garbage_header, truncate_half], ids=["header", "truncated"])
def test_a_corrupt_spool_is_moved_aside_counted_and_replaced(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    path = tmp_path / "spool.db"
    s = Spool(path, max_bytes=10_000_000)
    s.open()
    for i in range(40):  # several pages, so truncation cuts real b-tree pages
        fill(s, (TEL, [b"m v=%d %s" % (i, b"x" * 900)] * 4))
    s.close()
    assert not Path(f"{path}-wal").exists()  # a clean close checkpointed everything
    damage(path)
    damaged = path.read_bytes()

    s = Spool(path, max_bytes=10_000_000)
    s.open()
    try:
        aside = [p for p in tmp_path.iterdir() if p.name.startswith("spool.db.corrupt.")
                 and not p.name.endswith(("-wal", "-shm"))]
        assert len(aside) == 1, sorted(p.name for p in tmp_path.iterdir())
        assert aside[0].name[len("spool.db.corrupt."):].isalnum()  # the timestamp
        assert aside[0].read_bytes() == damaged  # kept for inspection, untouched
        st_ = s.status()
        assert st_.counters == {"spool_corrupt_total": 1}
        assert st_.meta["last_corrupt"].startswith(aside[0].name + ": ")
        assert st_.segments == 0
        # The fresh spool works.
        fill(s, (TEL, [b"fresh v=1"]))
        assert [seg.body for seg in s.peek(10, 10_000)] == [b"fresh v=1"]
    finally:
        s.close()

    # A clean reopen of the healthy spool is not another corruption.
    s = Spool(path, max_bytes=10_000_000)
    s.open()
    try:
        assert s.status().counters["spool_corrupt_total"] == 1
        assert s.tail(5) == [b"fresh v=1"]
    finally:
        s.close()


def test_a_spool_that_cannot_be_opened_is_not_taken_for_corrupt(tmp_path: Path) -> None:
    # Locked (a second instance), unreadable or read-only is not corruption: moving the file
    # aside would take the acknowledged backlog out of forwarding.
    path = tmp_path / "spool.db"
    s = Spool(path, max_bytes=10_000_000)
    s.open()
    fill(s, (TEL, [b"m v=1 1"]))
    s.close()
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("INSERT INTO meta VALUES ('held', 'yes')")
        with pytest.raises(sqlite3.OperationalError):
            Spool(path, max_bytes=10_000_000).open()
    finally:
        holder.close()
    assert not [p for p in tmp_path.iterdir() if ".corrupt." in p.name]
    s = Spool(path, max_bytes=10_000_000)
    s.open()
    try:
        assert s.tail(5) == [b"m v=1 1"]
    finally:
        s.close()


def test_open_readonly_on_a_missing_path_raises_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "spool.db"
    with pytest.raises(SpoolError, match="no spool at"):
        open_readonly(path)
    assert not path.parent.exists()


def test_open_readonly_reads_but_cannot_write(spool: Spool) -> None:
    fill(spool, (TEL, [b"a v=1", b"b v=2"]))
    ro = open_readonly(spool.path)
    try:
        assert ro.status().points_queued == 2
        assert ro.tail(1) == [b"b v=2"]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            ro.set_meta("k", "v")
    finally:
        ro.close()


def test_tail_is_the_newest_lines_oldest_first_across_segments(spool: Spool) -> None:
    fill(spool, (TEL, [b"a1", b"a2", b"a3"]), (EVT, [b"b1"]), (TEL, [b"c1", b"c2"]))
    assert spool.tail(1) == [b"c2"]
    assert spool.tail(2) == [b"c1", b"c2"]
    assert spool.tail(3) == [b"b1", b"c1", b"c2"]
    assert spool.tail(4) == [b"a3", b"b1", b"c1", b"c2"]
    assert spool.tail(6) == [b"a1", b"a2", b"a3", b"b1", b"c1", b"c2"]
    assert spool.tail(100) == spool.tail(6)
    assert spool.tail(0) == []  # was: the whole newest segment (`edgegw tail -n 0`)


def test_quarantined_is_the_newest_rows_oldest_first(spool: Spool) -> None:
    fill(spool, (TEL, [b"a v=1", b"b v=2", b"c v=3"]))
    segs = spool.peek(10, 10_000)
    spool.ack(segs, 1, [("type_conflict", "field type conflict: x", b"a v=1"),
                        ("parse_error", "unable to parse 'c v=3'", b"c v=3")], now_ns=7)
    assert spool.quarantined(10) == [
        (7, "type_conflict", "field type conflict: x", b"a v=1"),
        (7, "parse_error", "unable to parse 'c v=3'", b"c v=3"),
    ]
    assert spool.quarantined(1) == [(7, "parse_error", "unable to parse 'c v=3'", b"c v=3")]
    st_ = spool.status()
    assert st_.counters["points_delivered"] == 1
    assert st_.counters["points_quarantined:type_conflict"] == 1
    assert st_.counters["points_quarantined:parse_error"] == 1
    assert_books_balance(st_)


def test_quarantine_rows_are_trimmed_but_every_line_is_counted(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool.db", max_bytes=1_000_000, quarantine_max_rows=5)
    s.open()
    try:
        n = 0
        for round_ in range(4):
            lines = [b"bad%d v=%d" % (round_, i) for i in range(3)]
            fill(s, (TEL, lines))
            s.ack(s.peek(100, 100_000), 0, [("invalid", "bad", ln) for ln in lines],
                  now_ns=round_)
            n += len(lines)
        st_ = s.status()
        assert st_.quarantine_rows == 5
        assert st_.counters["points_quarantined:invalid"] == n == 12
        assert [row[3] for row in s.quarantined(100)] == [
            b"bad2 v=1", b"bad2 v=2", b"bad3 v=0", b"bad3 v=1", b"bad3 v=2"]
        assert_books_balance(st_)
    finally:
        s.close()


def test_events_are_never_dropped_for_the_quota(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool.db", max_bytes=100)
    s.open()
    try:
        fill(s, (EVT, [b"e" * 40]), (TEL, [b"t" * 40]))
        before = s.status()
        with pytest.raises(SpoolFull):  # needs 50 bytes freed; only 40 bytes are telemetry
            s.append(Batch(lines={EVT: [b"f" * 70]}, counters={"messages_received": 1}), 2)
        assert s.status() == before  # nothing written or dropped, not even the counters
        s.append(Batch(lines={TEL: [b"u" * 60]}), 3)  # drops the older telemetry instead
        assert s.tail(10) == [b"e" * 40, b"u" * 60]
        assert s.status().counters["points_dropped:quota"] == 1
        # A commit whose own telemetry cannot fit loses that telemetry (counted) instead of
        # being refused on every retry, which would stall intake for good.
        s.append(Batch(lines={TEL: [b"g" * 70, b"h" * 10]}), 4)
        assert s.tail(10) == [b"e" * 40, b"h" * 10]
        assert s.status().counters["points_dropped:quota"] == 3
    finally:
        s.close()


def test_a_failed_commit_after_making_room_leaves_the_quota_exact(tmp_path: Path) -> None:
    """The quota drop and the insert are one transaction; a full disk undoes both."""
    s = FillableSpool(tmp_path / "spool.db", max_bytes=10_000)
    s.open()
    try:
        fill(s, (TEL, [b"a " + b"x" * 998]), (TEL, [b"b " + b"x" * 998]))
        s.set_disk_full(True)
        big = [b"big " + b"y" * 9_496]  # needs room (both segments) and new pages
        with pytest.raises(sqlite3.OperationalError, match="full"):
            s.append(Batch(lines={TEL: big}), 2)
        assert s.status().segments == 2  # the drops were rolled back with the insert
        s.set_disk_full(False)
        # The spool still knows how full it is: the next append drops what is needed.
        s.append(Batch(lines={TEL: big}), 3)
        st_ = s.status()
        assert st_.bytes_queued == 9_500
        assert st_.counters["points_dropped:quota"] == 2
        assert_books_balance(st_)
    finally:
        s.close()


def test_acking_segments_the_quota_dropped_meanwhile_counts_each_point_once(
    tmp_path: Path,
) -> None:
    """The forwarder holds a batch while InfluxDB is down; intake meanwhile hits the quota."""
    s = Spool(tmp_path / "spool.db", max_bytes=3_000)
    s.open()
    try:
        fill(s, (TEL, [b"a v=1 " + b"x" * 990]), (TEL, [b"b v=1 " + b"x" * 990]))
        in_flight = s.peek(1, 1_000_000)
        assert len(in_flight) == 1
        fill(s, (TEL, [b"c v=1 " + b"x" * 990]), (TEL, [b"d v=1 " + b"x" * 990]))  # drops "a"
        assert s.status().counters["points_dropped:quota"] == 1
        s.ack(in_flight, delivered=1)  # InfluxDB is back: "a" was delivered after all
        st_ = s.status()
        assert st_.counters["points_delivered"] == 0  # already counted as dropped
        assert st_.bytes_queued == 3 * 996
        assert_books_balance(st_)
        # The in-memory size is still right: one more segment drops exactly one.
        fill(s, (TEL, [b"e v=1 " + b"x" * 990]))
        assert s.status().counters["points_dropped:quota"] == 2
        assert s.status().bytes_queued <= 3_000
    finally:
        s.close()


def test_acking_never_deletes_a_newer_segment_that_reused_the_id(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool.db", max_bytes=2_000)
    s.open()
    try:
        fill(s, (TEL, [b"old v=1 " + b"x" * 900]))
        in_flight = s.peek(10, 100_000)
        # A batch that needs the whole quota drops "old"; the emptied table hands its id out again.
        fill(s, (TEL, [b"new v=1 " + b"y" * 1_500]))
        assert s.peek(10, 100_000)[0].id == in_flight[0].id
        s.ack(in_flight, delivered=1)
        assert s.tail(10) == [b"new v=1 " + b"y" * 1_500]  # never sent, so still queued
        assert_books_balance(s.status())
    finally:
        s.close()


def test_crash_without_close_keeps_every_commit(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    s = Spool(path, max_bytes=1_000_000)
    s.open()
    fill(s, (TEL, [b"a v=1"]), (EVT, [b"b v=1"]))
    s.ack(s.peek(1, 100), 1)
    # No close(): the WAL is not checkpointed, as after kill -9. A second connection sees it.
    assert Path(f"{path}-wal").stat().st_size > 0
    again = Spool(path, max_bytes=1_000_000)
    again.open()
    try:
        st_ = again.status()
        assert again.tail(10) == [b"b v=1"]
        assert st_.counters == {"points_spooled": 2, "points_delivered": 1}
        assert_books_balance(st_)
    finally:
        again.close()
        s.close()


# ------------------------------------------------------------------------------ SpoolService


@contextlib.asynccontextmanager
async def running(service: SpoolService) -> AsyncIterator[asyncio.Task[None]]:
    """Open the service and run its committer; on exit close, drain and join its thread."""
    await service.open()
    committer = asyncio.create_task(service.run(), name="spool:committer")
    try:
        yield committer
    finally:
        service.close()
        try:
            async with asyncio.timeout(10):
                await committer
        finally:
            await service.shutdown()


class CountingAppend:
    """Wraps ``Spool.append`` (our own seam) to count group commits, optionally holding one."""

    def __init__(self, spool: Spool) -> None:
        self.inner = spool.append
        self.batches: list[Batch] = []
        self.hold_first = False
        self.entered = threading.Event()
        self.release = threading.Event()
        spool.append = self  # type: ignore[method-assign]

    def __call__(self, batch: Batch, now_ns: int) -> None:
        self.batches.append(batch)
        if self.hold_first and len(self.batches) == 1:
            self.entered.set()
            self.release.wait(10)
        self.inner(batch, now_ns)


def line(i: int) -> bytes:
    return b"air,device=d%d temperature=21.5 %d" % (i % 7, 1_760_000_000_000_000_000 + i)


async def test_concurrent_submits_share_one_commit(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", max_bytes=10_000_000)
    counting = CountingAppend(spool)
    service = SpoolService(spool, commit_interval_secs=0.05)
    async with running(service):

        async def message(i: int) -> None:
            if i % 10 == 9:
                await service.reject("invalid_json")
            else:
                await service.submit(EVT if i % 5 == 0 else TEL, [line(i)])

        async with asyncio.timeout(10):
            await asyncio.gather(*(message(i) for i in range(300)))
        assert len(counting.batches) == 1
        st_ = await service.call(spool.status)
    assert st_.counters["messages_received"] == 300
    assert st_.counters["messages_accepted"] == 270
    assert st_.counters["messages_rejected:invalid_json"] == 30
    assert st_.points_queued == st_.counters["points_spooled"] == 270
    assert st_.segments == 2  # one per priority
    assert_books_balance(st_)


async def test_messages_arriving_during_a_commit_join_the_next_one(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db", max_bytes=10_000_000)
    counting = CountingAppend(spool)
    counting.hold_first = True
    service = SpoolService(spool, commit_interval_secs=0.01)
    async with running(service):
        first = [service.submit(TEL, [line(i)]) for i in range(50)]
        async with asyncio.timeout(10):
            await asyncio.to_thread(counting.entered.wait, 10)
            second = [service.submit(TEL, [line(i)]) for i in range(50, 150)]
            assert not first[0].done()
            counting.release.set()
            await asyncio.gather(*first, *second)
    assert [sum(len(v) for v in b.lines.values()) for b in counting.batches] == [50, 100]
    assert spool.path.exists()
    assert [ln for _, body in queued_bodies(spool.path) for ln in body.split(b"\n")] == [
        line(i) for i in range(150)]


async def test_a_waiter_that_gives_up_does_not_break_the_shared_commit(tmp_path: Path) -> None:
    # HTTP push awaits its commit under a timeout; giving up must not cancel the future that
    # the other messages of the same group commit (MQTT PUBACKs) wait on, nor crash the
    # committer when it completes.
    spool = Spool(tmp_path / "spool.db", max_bytes=10_000_000)
    counting = CountingAppend(spool)
    counting.hold_first = True
    service = SpoolService(spool, commit_interval_secs=0.01)
    async with running(service) as committer:
        other = service.submit(TEL, [line(0)])
        impatient = types.SimpleNamespace(_burst=mock.Mock())
        with mock.patch("edge.sources.http_push.COMMIT_TIMEOUT_SECS", 0.2):
            ok = await HttpPushIntake._commit(impatient, service.submit,  # type: ignore[arg-type]
                                              EVT, [line(1)])
        assert not ok  # answered 503
        counting.release.set()
        async with asyncio.timeout(10):
            await other
        # A waiter that cancels the shared future itself must not crash the committer either.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                await service.submit(TEL, [line(2)])
        await asyncio.sleep(0.2)
        assert not committer.done()
    assert counters_of(spool.path)["messages_accepted"] == 3


async def test_a_future_completes_only_once_a_second_connection_can_read_the_data(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.db"
    service = SpoolService(Spool(path, max_bytes=10_000_000), commit_interval_secs=0.02)
    seen_at_completion: list[tuple[dict[str, int], list[tuple[int, bytes]]]] = []

    def look(_: asyncio.Future[None]) -> None:
        # Registered first, so it runs as the future completes, before any awaiter resumes.
        seen_at_completion.append((counters_of(path), queued_bodies(path)))

    async with running(service):
        futs = [service.submit(TEL, [line(i)]) for i in range(20)]
        futs[0].add_done_callback(look)
        async with asyncio.timeout(10):
            await asyncio.gather(*futs)
        for round_ in range(3):  # and again for later commits
            fut = service.submit(EVT, [b"door,device=x open=true %d" % round_])
            fut.add_done_callback(look)
            async with asyncio.timeout(10):
                await fut
    counters, bodies = seen_at_completion[0]
    assert counters["messages_accepted"] == 20
    assert bodies == [(int(TEL), b"\n".join(line(i) for i in range(20)))]
    for round_, (counters, bodies) in enumerate(seen_at_completion[1:]):
        assert counters["messages_accepted"] == 21 + round_
        assert bodies[-1] == (int(EVT), b"door,device=x open=true %d" % round_)


async def test_close_commits_what_is_pending_at_once(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    # A 60 s commit interval: only close() can make this commit happen within the test.
    service = SpoolService(Spool(path, max_bytes=10_000_000), commit_interval_secs=60)
    await service.open()
    committer = asyncio.create_task(service.run())
    try:
        futs = [service.submit(TEL, [line(i)]) for i in range(10)]
        futs.append(service.reject("too_large"))
        await asyncio.sleep(0)  # let the committer start waiting out its interval
        service.close()
        async with asyncio.timeout(5):
            await committer
        assert all(f.done() and f.exception() is None for f in futs)
    finally:
        service.close()
        if not committer.done():
            committer.cancel()
        await service.shutdown()
    assert counters_of(path)["messages_received"] == 11
    assert len(queued_bodies(path)) == 1


async def test_a_failing_commit_fails_its_futures_and_the_service_recovers(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.db"
    spool = FillableSpool(path, max_bytes=10_000_000)
    service = SpoolService(spool, commit_interval_secs=0.01)
    async with running(service) as committer:
        async with asyncio.timeout(10):
            await service.submit(TEL, [line(0)])
        before = counters_of(path)
        await service.call(spool.set_disk_full, True)

        big = [b"m v=1 " + b"z" * 50_000]  # needs new pages
        failed = [service.submit(TEL, big), service.reject("invalid_json")]
        async with asyncio.timeout(10):
            results = await asyncio.gather(*failed, return_exceptions=True)
        for result in results:
            assert isinstance(result, sqlite3.OperationalError), result
            assert "database or disk is full" in str(result)
        assert service.last_error is not None and "full" in service.last_error
        assert not committer.done()
        assert counters_of(path) == before  # nothing of the failed batch was written

        await service.call(spool.set_disk_full, False)
        async with asyncio.timeout(10):
            await asyncio.gather(service.submit(TEL, big), service.submit(EVT, [line(1)]))
        assert service.last_error is None
        assert not committer.done()
    after = counters_of(path)
    assert after["messages_accepted"] == before["messages_accepted"] + 2
    assert "messages_rejected:invalid_json" not in after  # the failed rejection was not counted


async def test_spool_full_reaches_the_submitters_and_the_service_continues(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "spool.db", max_bytes=200)
    service = SpoolService(spool, commit_interval_secs=0.01)
    async with running(service) as committer:
        async with asyncio.timeout(10):
            await service.submit(EVT, [b"e" * 150])
            with pytest.raises(SpoolFull):
                await service.submit(EVT, [b"f" * 100])
            await service.submit(TEL, [b"t" * 40])  # fits next to the event
        assert not committer.done()
        st_ = await service.call(spool.status)
    assert st_.counters["messages_accepted"] == 2
    assert st_.points_queued == 2
