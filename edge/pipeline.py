"""Builds the gateway's stages and owns their tasks: start order, stop order, readiness.

Topology (docs/architecture.md)::

    MQTT ──┐                          ┌── Forwarder ── InfluxDB (v1 /write or v2 /api/v2/write)
           ├─ decode → line → SpoolService (group commit) ── SQLite WAL spool
    HTTP ──┘      ack after commit    └── (embedded mode: retention only; `edgegw tail`)

Start: the spool first, then downstream (committer, forwarder or retention, watchdog), then the
sources; ``READY=1`` only once all of them run. Stop (SIGTERM/SIGINT): ``STOPPING=1``, cancel
only the sources (each lets its in-flight messages commit and acknowledge first), then the
committer writes what is pending and returns, then the forwarder gets ``shutdown_grace_secs``
to flush before it is cancelled. Anything left stays in the spool for the next start.

Bugs are not caught: an exception in any task ends the TaskGroup and the process exits
non-zero, for systemd to restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable

from edge import sd_notify
from edge.config import Config, load_pseudonym_key
from edge.pseudonym import Pseudonymizer
from ingest.lineprotocol import LineEncoder
from ingest.spool import Spool, SpoolService

log = logging.getLogger(__name__)

RETENTION_CHECK_SECS = 60.0
READY_WAIT_SECS = 10.0


class Gateway:
    """One running gateway. Constructors do no I/O."""

    def __init__(self, config: Config, shutdown_grace_secs: float = 20.0) -> None:
        self.config = config
        self.shutdown_grace_secs = shutdown_grace_secs
        spool_cfg = config.spool
        self.spool = SpoolService(
            Spool(
                config.spool.resolved_path(config.gateway),
                max_bytes=int(spool_cfg.max_mb * 1024 * 1024),
                quarantine_max_rows=spool_cfg.quarantine_max_rows,
            ),
            commit_interval_secs=spool_cfg.commit_interval_ms / 1000,
            commit_max_messages=_commit_max(config),
        )
        self.encoder = LineEncoder()
        self.ready = asyncio.Event()
        self.http_port: int | None = None

    async def run(self, stop: asyncio.Event, notify: Callable[[str], object] = sd_notify.notify
                  ) -> None:
        """Run until ``stop`` is set, then shut down in order."""
        await self.spool.open()
        try:
            async with asyncio.TaskGroup() as tg:
                committer = tg.create_task(self.spool.run(), name="spool:committer")
                downstream = [self._start_sink(tg)]
                wd = sd_notify.watchdog_interval_secs()
                if wd:
                    downstream.append(tg.create_task(_watchdog(wd, notify), name="watchdog"))
                sources = self._start_sources(tg)
                await self._sources_ready()
                notify("READY=1")
                self.ready.set()
                log.info("gateway running: %d source(s), spool %s, %s", len(sources),
                         self.config.spool.resolved_path(self.config.gateway),
                         f"forwarding to {self.config.influxdb.url}" if self.config.influxdb
                         else "embedded mode (no InfluxDB configured)")
                await stop.wait()
                notify("STOPPING=1")
                log.info("stopping: sources first")
                for task in sources:
                    task.cancel()
                await asyncio.gather(*sources, return_exceptions=True)
                self.spool.close()
                await committer
                await self._drain(downstream)
        finally:
            await self.spool.shutdown()
        log.info("stopped")

    def _start_sink(self, tg: asyncio.TaskGroup) -> asyncio.Task[None]:
        if self.config.influxdb is None:
            return tg.create_task(self._retention(), name="spool:retention")
        return tg.create_task(self._forward(), name="sink:influx")

    async def _forward(self) -> None:
        from ingest.forwarder import Forwarder
        from ingest.writer import InfluxWriter

        assert self.config.influxdb is not None
        async with InfluxWriter(self.config.influxdb) as writer:
            self.forwarder = Forwarder(self.spool, writer, self.config.influxdb)
            await self.forwarder.run()

    async def _retention(self) -> None:
        hours = self.config.spool.retention_hours
        while True:
            cutoff = time.time_ns() - int(hours * 3600e9)
            dropped = await self.spool.call(self.spool.spool.expire, cutoff)
            if dropped:
                log.info("embedded mode: dropped %d points older than %.0f h", dropped, hours)
            await asyncio.sleep(RETENTION_CHECK_SECS)

    async def _drain(self, downstream: list[asyncio.Task[None]]) -> None:
        """Give the forwarder a grace period to empty the spool, then stop the rest."""
        if self.config.influxdb is not None:
            deadline = time.monotonic() + self.shutdown_grace_secs
            while time.monotonic() < deadline and not downstream[0].done():
                forwarder = getattr(self, "forwarder", None)
                if forwarder is not None and forwarder.failing:
                    log.info("InfluxDB unavailable: leaving the backlog in the spool")
                    break
                status = await self.spool.call(self.spool.spool.status)
                if status.points_queued == 0:
                    break
                await asyncio.sleep(0.05)
        for task in downstream:
            task.cancel()
        await asyncio.gather(*downstream, return_exceptions=True)

    async def _sources_ready(self) -> None:
        """Wait (bounded) until the MQTT subscription is acknowledged.

        A broker that is down at boot must not keep the gateway from starting (HTTP intake and
        forwarding of the backlog work without it), so after ``READY_WAIT_SECS`` we report
        ready anyway and the source keeps reconnecting.
        """
        http = getattr(self, "http", None)
        if http is not None:
            # Binding a local port either works at once or fails the task (a config problem).
            await http.listening.wait()
        mqtt = getattr(self, "mqtt", None)
        if mqtt is None:
            return
        try:
            async with asyncio.timeout(READY_WAIT_SECS):
                await mqtt.connected.wait()
        except TimeoutError:
            log.warning("MQTT broker not reachable yet; running without it, still retrying")

    def _start_sources(self, tg: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        cfg = self.config
        tasks = []
        if cfg.sources.mqtt is not None:
            from edge.sources.mqtt import MqttIntake

            self.mqtt = MqttIntake(cfg.sources.mqtt, cfg.gateway.site, self.spool, self.encoder)
            tasks.append(tg.create_task(self.mqtt.run(), name="source:mqtt"))
        if cfg.sources.http is not None:
            from edge.sources.http_push import HttpPushIntake

            self.http = HttpPushIntake(
                cfg.sources.http, cfg.gateway.site, self.spool,
                Pseudonymizer(load_pseudonym_key(cfg.gateway)), self.encoder,
            )
            tasks.append(tg.create_task(self.http.run(), name="source:http"))
        return tasks


def _commit_max(config: Config) -> int:
    """Commit early enough that the broker's window never runs dry.

    The broker sends at most ``receive_maximum`` unacknowledged messages; if a group commit
    waited for more than that it would sit out its whole interval with the window full.
    Committing at half the window keeps messages flowing while the commit runs.
    """
    limit = config.spool.commit_max_messages
    mqtt = config.sources.mqtt
    if mqtt is not None and mqtt.protocol == "5":
        limit = min(limit, max(1, mqtt.receive_maximum // 2))
    return limit


async def _watchdog(interval: float, notify: Callable[[str], object]) -> None:
    # Runs on the event loop: a hung loop stops the pings and systemd restarts us.
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap on the per-message path.

    Every message allocates a task, a coroutine and a few containers; with the default gen-0
    threshold (700) the collector ran ~every 700 allocations and took 16% of the CPU at 15k
    msg/s (py-spy, docs/benchmarks.md). Freezing what start-up allocated (modules, config)
    keeps it out of every later collection, and a larger gen-0 threshold runs collections
    less often; reference counting still frees almost everything at once.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed: it halves the event loop's cost per message at steady rates."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_until_signalled(config: Config) -> None:
    """Run the gateway in this process until SIGTERM or SIGINT."""
    import signal

    async def main() -> None:
        tune_gc()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Gateway(config).run(stop)

    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(
        loop_factory=loop_factory()
    ) as runner:
        runner.run(main())
