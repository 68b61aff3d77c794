"""Unit tests of ingest.forwarder (and ingest.writer.classify) with a scripted writer.

The only fake is at our own seam: :class:`ScriptedWriter` has the three methods the forwarder
uses (``write``, ``probe``, ``describe``) and answers each body from a script, the way a server
would. The spool is real (SQLite in ``tmp_path``), so every assertion about what was kept,
delivered, quarantined and counted is read back from the same database the gateway uses.
``asyncio.sleep`` is replaced by a recorder, so backoff delays are checked exactly and the tests
never wait.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.config import InfluxConfig
from edge.model import Priority
from ingest.forwarder import Forwarder, quarantine_reason
from ingest.spool import Batch, Segment, Spool, SpoolService, SpoolStatus
from ingest.writer import InfluxWriter, Outcome, WriteResult, classify

# Every forwarder run below is bounded: a bug that loops forever fails instead of hanging.
BOUND_SECS = 10.0
T0 = 1_700_000_000_000_000_000
OK = WriteResult(Outcome.OK, 204, "")
LAST_ERROR = "forwarder_last_error"

Answer = Callable[[bytes], WriteResult]


class ScriptedWriter:
    """Stands in for :class:`InfluxWriter`: answers each body from ``answer`` and records it.

    ``answer`` is either a function of the body or a list of results used in order.
    ``before_write(call_index)`` runs before each answer (to look at the spool mid-retry).
    ``stored`` holds the lines of every body answered 2xx, in the order they were stored.
    """

    def __init__(
        self,
        answer: Answer | Sequence[WriteResult],
        probe_result: WriteResult = OK,
        before_write: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self.answer: Answer = answer if callable(answer) else scripted(answer)
        self.probe_result = probe_result
        self.before_write = before_write
        self.bodies: list[bytes] = []
        self.stored: list[bytes] = []
        self.probes = 0
        self._wrote = asyncio.Event()

    async def write(self, body: bytes) -> WriteResult:
        if self.before_write is not None:
            await self.before_write(len(self.bodies))
        self.bodies.append(body)
        result = self.answer(body)
        if result.outcome is Outcome.OK:
            self.stored.extend(body.split(b"\n"))
        self._wrote.set()
        return result

    async def until_stored(self, lines: Sequence[bytes]) -> None:
        """Wait until exactly ``lines`` were stored (the spool ack may still be on its way)."""
        while self.stored != list(lines):
            self._wrote.clear()
            await self._wrote.wait()

    async def probe(self) -> WriteResult:
        self.probes += 1
        return self.probe_result

    def describe(self) -> str:
        return "http://influx.invalid/write (db=test)"


def scripted(results: Sequence[WriteResult]) -> Answer:
    """Answer the n-th write with ``results[n]`` (running out is a test failure)."""
    script = iter(results)
    return lambda body: next(script)


def influx_config(**overrides: Any) -> InfluxConfig:
    settings_: dict[str, Any] = {
        "url": "http://influx.invalid",
        "database": "test",
        "backoff_initial_secs": 1.0,
        "backoff_max_secs": 8.0,
        "retry_after_cap_secs": 300.0,
    }
    settings_.update(overrides)
    return InfluxConfig(**settings_)


def make_forwarder(
    service: SpoolService,
    writer: ScriptedWriter,
    config: InfluxConfig | None = None,
    rand: Callable[[], float] = lambda: 0.5,
) -> Forwarder:
    # The forwarder is typed against InfluxWriter; the scripted writer has the same surface.
    return Forwarder(service, cast(InfluxWriter, writer), config or influx_config(), rand=rand)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[SpoolService]:
    svc = SpoolService(Spool(tmp_path / "spool.db", max_bytes=64 << 20))
    await svc.open()
    try:
        yield svc
    finally:
        await svc.shutdown()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every delay the forwarder asks ``asyncio.sleep`` for; nothing really waits."""
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay: float, result: Any = None) -> Any:
        delays.append(delay)
        await real_sleep(0)
        return result

    monkeypatch.setattr("ingest.forwarder.asyncio.sleep", record)
    return delays


async def spool_segments(
    service: SpoolService, *segments: Sequence[bytes], priority: Priority = Priority.TELEMETRY
) -> None:
    """Append each group of lines as one segment (one group commit each)."""
    for lines in segments:
        batch = Batch(lines={priority: list(lines)})
        await service.call(service.spool.append, batch, time.time_ns())


async def queued(service: SpoolService, max_lines: int = 1 << 30) -> list[Segment]:
    segments: list[Segment] = await service.call(service.spool.peek, max_lines, 1 << 40)
    return segments


async def status(service: SpoolService) -> SpoolStatus:
    result: SpoolStatus = await service.call(service.spool.status)
    return result


async def quarantined(service: SpoolService) -> list[tuple[str, str, bytes]]:
    rows = await service.call(service.spool.quarantined, 1000)
    return [(reason, detail, line) for _, reason, detail, line in rows]


async def until_drained(service: SpoolService) -> None:
    """Wait until every segment was acknowledged (the spool has no ack notification: poll)."""
    while (await status(service)).segments:  # noqa: ASYNC110 - polling a database, not a flag
        await asyncio.sleep(0.005)


async def forward_all(
    forwarder: Forwarder, service: SpoolService, max_lines: int = 1 << 30
) -> None:
    async with asyncio.timeout(BOUND_SECS):
        while segments := await queued(service, max_lines):
            await forwarder.forward(segments)


def lines_of(n: int, start: int = 0, measurement: str = "m") -> list[bytes]:
    return [f"{measurement},t=s{i} f={i}i {T0 + i}".encode() for i in range(start, start + n)]


def quarantine_counters(counters: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counters.items() if k.startswith("points_quarantined:")}


# --- 400/422: bisect and quarantine exactly the bad lines -------------------------------------

TYPE_BAD = b"BADTYPE"
PARSE_BAD = b"BADPARSE"


def influx_like_400(status_code: int = 400) -> Answer:
    """Refuse any body holding a marked line, with InfluxDB's JSON message about that line."""

    def answer(body: bytes) -> WriteResult:
        for line in body.split(b"\n"):
            if TYPE_BAD in line:
                message = (
                    'partial write: field type conflict: input field "f" on measurement '
                    f'"{line.split(b",")[0].decode()}" is type float, already exists as type '
                    "integer dropped=1"
                )
                return classify(status_code, json.dumps({"error": message}), None)
            if PARSE_BAD in line:
                message = f"unable to parse '{line.decode()}': invalid field format"
                return classify(status_code, json.dumps({"error": message}), None)
        return OK

    return answer


@pytest.mark.parametrize("status_code", [400, 422])
async def test_partial_write_quarantines_exactly_the_bad_lines(
    service: SpoolService, sleeps: list[float], status_code: int
) -> None:
    good = lines_of(17)
    bad = {  # index in the batch -> (line, the reason it must be quarantined with)
        3: (b"m,t=x3 f=3.5,mark=" + TYPE_BAD + b" 1", "type_conflict"),
        4: (b"garbage " + PARSE_BAD, "parse_error"),
        11: (b"m,t=x11 f=11.5,mark=" + TYPE_BAD + b" 2", "type_conflict"),
        # InfluxDB quotes the refused line in its message: the line's words must not matter.
        19: (PARSE_BAD + b" conflict-looking but unparseable", "parse_error"),
    }
    everything = list(good)
    for index in sorted(bad):
        everything.insert(index, bad[index][0])
    await spool_segments(service, everything[:5], everything[5:12], everything[12:])
    writer = ScriptedWriter(influx_like_400(status_code))

    await forward_all(make_forwarder(service, writer), service)

    assert writer.stored == good  # every good line once, in order
    assert await quarantined(service) == [
        (reason, influx_like_400()(line).message, line) for line, reason in
        (bad[i] for i in sorted(bad))
    ]
    st_ = await status(service)
    assert st_.segments == 0
    assert st_.counters["points_delivered"] == len(good)
    assert quarantine_counters(st_.counters) == {
        "points_quarantined:type_conflict": 2,
        "points_quarantined:parse_error": 2,
    }
    assert st_.counters["points_spooled"] == len(everything)
    assert sleeps == []  # a data error is never a reason to wait


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    marks=st.lists(st.sampled_from([None, None, None, TYPE_BAD, PARSE_BAD]), min_size=1,
                   max_size=40),
    cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=4),
)
def test_bisect_quarantines_exactly_the_bad_lines_for_any_layout(
    marks: list[bytes | None], cuts: list[int]
) -> None:
    lines = [
        f"m,t=s{i} f={i}i {T0 + i}".encode() + (b"" if mark is None else b",x=" + mark)
        for i, mark in enumerate(marks)
    ]
    bounds = sorted({0, len(lines), *(c for c in cuts if c < len(lines))})
    segments = [lines[a:b] for a, b in itertools.pairwise(bounds)]

    async def scenario(directory: Path) -> None:
        svc = SpoolService(Spool(directory / "spool.db", max_bytes=64 << 20))
        await svc.open()
        try:
            await spool_segments(svc, *segments)
            writer = ScriptedWriter(influx_like_400())
            await forward_all(make_forwarder(svc, writer), svc)
            good = [ln for ln, mark in zip(lines, marks, strict=True) if mark is None]
            bad = [ln for ln, mark in zip(lines, marks, strict=True) if mark is not None]
            assert writer.stored == good
            assert [line for _, _, line in await quarantined(svc)] == bad
            st_ = await status(svc)
            assert st_.segments == 0
            assert st_.counters.get("points_delivered", 0) == len(good)
            assert sum(quarantine_counters(st_.counters).values()) == len(bad)
        finally:
            await svc.shutdown()

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(scenario(Path(directory)))


# --- 413: split ------------------------------------------------------------------------------


async def test_413_splits_the_batch_in_halves(service: SpoolService, sleeps: list[float]) -> None:
    lines = lines_of(8)
    await spool_segments(service, lines[:3], lines[3:])

    def at_most_two_lines(body: bytes) -> WriteResult:
        too_big = body.count(b"\n") + 1 > 2
        return classify(413, "Request Entity Too Large", None) if too_big else OK

    writer = ScriptedWriter(at_most_two_lines)
    await forward_all(make_forwarder(service, writer), service)

    assert [b.count(b"\n") + 1 for b in writer.bodies] == [8, 4, 2, 2, 4, 2, 2]
    assert writer.stored == lines
    st_ = await status(service)
    assert st_.counters["points_delivered"] == 8 and st_.segments == 0
    assert await quarantined(service) == []
    assert sleeps == []


async def test_413_on_a_single_line_quarantines_it_as_too_large(
    service: SpoolService, sleeps: list[float]
) -> None:
    huge = b"m,t=huge s=\"" + b"x" * 5000 + b"\" " + str(T0).encode()
    lines = [*lines_of(3), huge, *lines_of(3, start=3)]
    await spool_segments(service, lines)

    def size_limit(body: bytes) -> WriteResult:
        return classify(413, "too large", None) if len(body) > 4000 else OK

    writer = ScriptedWriter(size_limit)
    await forward_all(make_forwarder(service, writer), service)

    assert writer.stored == [ln for ln in lines if ln != huge]
    assert await quarantined(service) == [("too_large", "too large", huge)]
    st_ = await status(service)
    assert st_.counters["points_delivered"] == 6
    assert quarantine_counters(st_.counters) == {"points_quarantined:too_large": 1}


# --- 401/403/404: keep data, back off, record, recover --------------------------------------


@pytest.mark.parametrize(
    ("code", "body", "outcome"),
    [
        (401, '{"error":"authorization failed"}', "auth"),
        (403, '{"error":"forbidden"}', "auth"),
        (404, '{"error":"database not found: \\"test\\""}', "not_found"),
    ],
)
async def test_config_errors_keep_data_record_the_error_then_clear_it(
    service: SpoolService,
    sleeps: list[float],
    caplog: pytest.LogCaptureFixture,
    code: int,
    body: str,
    outcome: str,
) -> None:
    lines = lines_of(5)
    await spool_segments(service, lines[:2], lines[2:])
    seen: list[SpoolStatus] = []

    async def look(call: int) -> None:
        seen.append(await status(service))

    failure = classify(code, body, None)
    writer = ScriptedWriter([failure, failure, OK], before_write=look)
    forwarder = make_forwarder(service, writer)

    await forward_all(forwarder, service)

    # While failing: every line still queued, nothing delivered, the error recorded.
    assert len(seen) == 3 and LAST_ERROR not in seen[0].meta
    for snapshot in seen[1:]:
        assert snapshot.points_queued == 5 and snapshot.segments == 2
        assert snapshot.counters.get("points_delivered", 0) == 0
        assert snapshot.quarantine_rows == 0
        error = snapshot.meta[LAST_ERROR]
        assert f"{outcome} ({code}): {failure.message}" in error
        assert time.strptime(error.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%SZ")
    # Then: delivered once, error cleared, retried with backoff (never quarantined).
    assert writer.stored == lines
    final = await status(service)
    assert final.segments == 0 and final.counters["points_delivered"] == 5
    assert final.meta[LAST_ERROR] == ""
    assert quarantine_counters(final.counters) == {}
    assert len(sleeps) == 2
    errors = [
        r for r in caplog.records if r.name == "ingest.forwarder" and r.levelno >= logging.ERROR
    ]
    assert len(errors) == 1, "the same failure is logged loudly once, not once per retry"
    assert "work again" in caplog.text


# --- 429/5xx/timeouts: backoff ---------------------------------------------------------------


@pytest.mark.parametrize("cap", [300.0, 2.0, 0.5])
async def test_retry_after_is_honoured_up_to_its_cap(
    service: SpoolService, sleeps: list[float], cap: float
) -> None:
    await spool_segments(service, lines_of(3))
    writer = ScriptedWriter([classify(503, "busy", "2"), OK])
    config = influx_config(retry_after_cap_secs=cap, backoff_max_secs=1.0, backoff_initial_secs=0.1)

    await forward_all(make_forwarder(service, writer, config, rand=lambda: 0.0), service)

    assert sleeps == [min(2.0, cap)]
    assert writer.stored == lines_of(3)


@pytest.mark.parametrize(
    "failure",
    [
        classify(429, "slow down", None),
        classify(500, "internal error", None),
        classify(502, "bad gateway", None),
        classify(503, "unavailable", "Wed, 21 Oct 2015 07:28:00 GMT"),  # a date: our own backoff
        classify(504, "gateway timeout", None),
        WriteResult(Outcome.RETRY, None, "timeout after 10.0s"),
        WriteResult(Outcome.RETRY, None, "ClientConnectorError: connection refused"),
    ],
    ids=["429", "500", "502", "503-date", "504", "timeout", "refused"],
)
async def test_without_retry_after_delays_are_full_jitter_exponential(
    service: SpoolService, sleeps: list[float], failure: WriteResult
) -> None:
    await spool_segments(service, lines_of(2))
    draws = [0.9, 0.5, 0.25, 1.0, 0.75, 0.1]
    rand = iter(draws)
    writer = ScriptedWriter([failure] * len(draws) + [OK])
    config = influx_config(backoff_initial_secs=0.5, backoff_max_secs=3.0)
    forwarder = make_forwarder(service, writer, config, rand=lambda: next(rand))

    await forward_all(forwarder, service)

    ceilings = [min(3.0, 0.5 * 2**attempt) for attempt in range(len(draws))]
    assert ceilings == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert sleeps == pytest.approx([c * r for c, r in zip(ceilings, draws, strict=True)])
    assert writer.stored == lines_of(2)

    # Success resets the exponent: the next failure starts again at backoff_initial_secs.
    sleeps.clear()
    await spool_segments(service, lines_of(1, start=10))
    writer.answer = scripted([failure, OK])
    rand = iter([1.0])
    await forward_all(forwarder, service)
    assert sleeps == [0.5]


async def test_default_jitter_stays_within_its_ceiling(
    service: SpoolService, sleeps: list[float]
) -> None:
    await spool_segments(service, lines_of(1))
    failures = 12
    writer = ScriptedWriter([classify(503, "", None)] * failures + [OK])
    config = influx_config(backoff_initial_secs=0.25, backoff_max_secs=4.0)
    forwarder = Forwarder(service, cast(InfluxWriter, writer), config)  # random.random

    await forward_all(forwarder, service)

    assert len(sleeps) == failures
    for attempt, delay in enumerate(sleeps):
        assert 0.0 <= delay <= min(4.0, 0.25 * 2**attempt)


# --- order -----------------------------------------------------------------------------------


async def test_bodies_go_out_in_fifo_order_across_segments_and_batches(
    service: SpoolService, sleeps: list[float]
) -> None:
    segments = [lines_of(3, start=3 * k, measurement=f"m{k}") for k in range(7)]
    for k, segment in enumerate(segments):
        # Events and telemetry interleave: order is by arrival, not by priority.
        await spool_segments(service, segment, priority=Priority(k % 2))
    writer = ScriptedWriter(lambda body: OK)

    # At most 7 lines per request: two segments (6 lines) per batch.
    await forward_all(make_forwarder(service, writer, influx_config(batch_max_lines=7)),
                      service, max_lines=7)

    assert writer.bodies == [
        b"\n".join(segments[0] + segments[1]),
        b"\n".join(segments[2] + segments[3]),
        b"\n".join(segments[4] + segments[5]),
        b"\n".join(segments[6]),
    ]
    assert writer.stored == [line for segment in segments for line in segment]


async def test_run_delivers_in_order_and_waits_for_new_data(
    service: SpoolService,
) -> None:
    committer = asyncio.create_task(service.run())
    writer = ScriptedWriter(lambda body: OK)
    config = influx_config(flush_interval_ms=1, batch_max_lines=4)
    runner = asyncio.create_task(make_forwarder(service, writer, config).run())
    try:
        expected: list[bytes] = []
        for k in range(5):
            lines = lines_of(3, start=3 * k)
            expected += lines
            await service.submit(Priority.TELEMETRY, lines)
        async with asyncio.timeout(BOUND_SECS):
            await writer.until_stored(expected)
            await until_drained(service)
        assert writer.probes == 1
    finally:
        runner.cancel()
        service.close()
        await asyncio.gather(runner, return_exceptions=True)
        async with asyncio.timeout(BOUND_SECS):
            await committer


async def test_a_clock_step_back_does_not_delay_forwarding(
    service: SpoolService, sleeps: list[float]
) -> None:
    # Spooled before the clock stepped back an hour: the segment looks an hour "young".
    batch = Batch(lines={Priority.TELEMETRY: lines_of(2)})
    await service.call(service.spool.append, batch, time.time_ns() + 3600 * 10**9)
    writer = ScriptedWriter(lambda body: OK)
    runner = asyncio.create_task(make_forwarder(service, writer).run())
    try:
        async with asyncio.timeout(BOUND_SECS):
            await until_drained(service)
        assert max(sleeps) <= influx_config().flush_interval_ms / 1000
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


# --- the startup probe -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("api", "hint"),
    [
        ("v2", 'set influxdb.api = "v1"'),
        ("v1", "database 'test' does not exist"),
    ],
)
async def test_probe_404_is_logged_with_the_fix_and_cleared_once_writes_work(
    service: SpoolService,
    sleeps: list[float],
    caplog: pytest.LogCaptureFixture,
    api: str,
    hint: str,
) -> None:
    """A 404 at startup is reported; once writes succeed, ``edgegw status`` must not keep it."""
    extra: dict[str, Any] = (
        {"api": "v2", "org": "o", "bucket": "b", "token_credential": "t", "database": None}
        if api == "v2"
        else {}
    )
    config = influx_config(**extra)
    not_found = classify(404, "404 page not found", None)
    recorded: list[str] = []

    async def look(call: int) -> None:
        recorded.append((await status(service)).meta.get(LAST_ERROR, ""))

    writer = ScriptedWriter(lambda body: OK, probe_result=not_found, before_write=look)
    await spool_segments(service, lines_of(2))
    runner = asyncio.create_task(make_forwarder(service, writer, config).run())
    try:
        async with asyncio.timeout(BOUND_SECS):
            await until_drained(service)
        assert writer.stored == lines_of(2)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

    assert hint in recorded[0] and "404" in recorded[0]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(hint in message for message in errors), errors
    assert (await status(service)).meta[LAST_ERROR] == ""


# --- classify() and quarantine_reason() ------------------------------------------------------


@pytest.mark.parametrize(
    ("status_code", "body", "retry_after", "expected"),
    [
        (200, "", None, WriteResult(Outcome.OK, 200, "")),
        (204, "ignored", None, WriteResult(Outcome.OK, 204, "")),
        (400, ' {"error":"unable to parse"}\n', None,
         WriteResult(Outcome.DATA_ERROR, 400, '{"error":"unable to parse"}')),
        (422, "unprocessable", None, WriteResult(Outcome.DATA_ERROR, 422, "unprocessable")),
        (413, "too big", "5", WriteResult(Outcome.TOO_LARGE, 413, "too big")),
        (401, "authorization failed", None, WriteResult(Outcome.AUTH, 401, "authorization failed")),
        (403, "forbidden", None, WriteResult(Outcome.AUTH, 403, "forbidden")),
        (404, "404 page not found\n", None,
         WriteResult(Outcome.NOT_FOUND, 404, "404 page not found")),
        (429, "slow", "2", WriteResult(Outcome.RETRY, 429, "slow", 2.0)),
        (429, "slow", None, WriteResult(Outcome.RETRY, 429, "slow", None)),
        (500, "boom", None, WriteResult(Outcome.RETRY, 500, "boom")),
        (502, "", None, WriteResult(Outcome.RETRY, 502, "")),
        (503, "busy", "1.5", WriteResult(Outcome.RETRY, 503, "busy", 1.5)),
        (503, "busy", "-3", WriteResult(Outcome.RETRY, 503, "busy", 0.0)),
        (503, "busy", "Wed, 21 Oct 2015 07:28:00 GMT", WriteResult(Outcome.RETRY, 503, "busy")),
        (504, "", None, WriteResult(Outcome.RETRY, 504, "")),
    ],
)
def test_classify(
    status_code: int, body: str, retry_after: str | None, expected: WriteResult
) -> None:
    assert classify(status_code, body, retry_after) == expected


def test_classify_keeps_at_most_500_characters_of_the_message() -> None:
    assert classify(400, "x" * 10_000, None).message == "x" * 500


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        # InfluxDB 1.6, as it answers (JSON body).
        ('{"error":"partial write: field type conflict: input field \\"f\\" on measurement '
         '\\"m\\" is type float, already exists as type integer dropped=1"}', "type_conflict"),
        ('{"error":"unable to parse \'this is not line protocol\': invalid field format"}',
         "parse_error"),
        ('{"error":"partial write: points beyond retention policy dropped=1"}',
         "beyond_retention"),
        # InfluxDB 2.x wraps the same messages in {"code":"invalid", ...}.
        ('{"code":"invalid","message":"failure writing points to database: partial write: '
         'field type conflict: input field \\"f\\" on measurement \\"m\\" is type string, '
         'already exists as type float dropped=1"}', "type_conflict"),
        ('{"code":"invalid","message":"unable to parse \'m f=\': missing field value"}',
         "parse_error"),
        ('{"code":"invalid","message":"failure writing points to database: partial write: '
         'points beyond retention policy dropped=1"}', "beyond_retention"),
        ("schema conflict on series", "type_conflict"),
        ('{"code":"invalid","message":"timestamp out of range"}', "invalid"),
        ("UNABLE TO PARSE 'x'", "parse_error"),
        # The server quotes the refused line: its content must not choose the reason.
        ("unable to parse 'door_conflict,site=a x': invalid field format", "parse_error"),
        ("unable to parse 'beyond retention x': invalid field format", "parse_error"),
        ("", "refused"),
        ("something else entirely", "refused"),
    ],
)
def test_quarantine_reason(message: str, reason: str) -> None:
    assert quarantine_reason(message) == reason

