"""MQTT intake: subscribe, decode, spool, and only then acknowledge.

Promise (P0 in ../shared/reliability.md): a PUBLISH is acknowledged (PUBACK) only after its
points, or the count of its rejection, are committed to the spool. Until then the broker keeps
it in our persistent session (``clean_start=False`` plus a session expiry) and redelivers it
after a crash or reconnect. Duplicates are harmless: every point carries an explicit timestamp.

Client choice (numbers in docs/benchmarks.md): gmqtt, because it lets the PUBACK wait for an
async callback (``optimistic_acknowledgement=False``) at ~22 µs of CPU per message, where
paho-mqtt 2.2 costs ~37 µs per message just to receive (it reads each packet header with
separate one-byte ``recv`` calls) and aiomqtt has no manual ack.

Flow control: MQTT v5 ``Receive Maximum`` bounds how many unacknowledged messages the broker
sends us; that is also the bound on what this process holds in memory. When the spool cannot
commit (disk full, I/O error) messages are held, not acknowledged, and retried: the broker stops
sending once the window is full and resumes when commits work again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import ssl
import time
from collections.abc import Callable
from typing import Any

from gmqtt import Client
from gmqtt.mqtt.constants import MQTTv50, MQTTv311
from gmqtt.mqtt.handler import MQTTConnectError

from edge.burstlog import BurstLog
from edge.config import MqttSource as MqttConfig
from edge.config import MqttTopic
from edge.decoders import DecodeError, Decoder, Route, make_decoder
from edge.model import Priority
from ingest.lineprotocol import LineEncoder, LineProtocolError
from ingest.spool import SpoolError, SpoolService

log = logging.getLogger(__name__)

_ROUTE_CACHE_MAX = 50_000


class MqttIntake:
    """Turns MQTT messages into spooled lines. Owns its connection; reconnects by itself."""

    def __init__(
        self,
        config: MqttConfig,
        default_site: str,
        spool: SpoolService,
        encoder: LineEncoder | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.config = config
        self.default_site = default_site
        self.spool = spool
        self.encoder = encoder or LineEncoder()
        self.clock = clock
        self._decoders: list[tuple[MqttTopic, Decoder]] = [
            (t, make_decoder(t.decoder, config.max_payload_bytes, config.max_json_depth))
            for t in config.topics
        ]
        self._routes: dict[str, tuple[Route, Decoder] | None] = {}
        self._burst = BurstLog(log)
        self._attempt = 0
        self._inflight = 0
        self._stopping = False
        self._unsubscribed = 0
        self.connected = asyncio.Event()
        """Set while connected and subscribed."""

    # -- routing ---------------------------------------------------------------------------

    def route(self, topic: str) -> tuple[Route, Decoder] | None:
        """The route and decoder for a topic (cached: topics repeat)."""
        try:
            return self._routes[topic]
        except KeyError:
            pass
        found: tuple[Route, Decoder] | None = None
        for entry, decoder in self._decoders:
            values = entry.match(topic)
            if values is None:
                continue
            found = (
                Route(
                    measurement=entry.measurement,
                    site=values.get("site") or entry.site or self.default_site,
                    zone=values.get("zone") or entry.zone,
                    device=values.get("device") or topic,
                    kind=values.get("kind") or entry.kind,
                    field_map=entry.field_map,
                    timestamp_field=entry.timestamp_field,
                    timestamp_unit=entry.timestamp_unit,
                ),
                decoder,
            )
            break
        if len(self._routes) >= _ROUTE_CACHE_MAX:
            self._routes.clear()
        self._routes[topic] = found
        return found

    # -- the hot path ----------------------------------------------------------------------

    async def on_message(
        self, client: Any, topic: str, payload: bytes, qos: int, properties: Any
    ) -> int:
        """gmqtt calls this per PUBLISH and sends the PUBACK when it returns."""
        self._inflight += 1
        try:
            return await self._handle(topic, payload)
        finally:
            self._inflight -= 1

    async def _handle(self, topic: str, payload: bytes) -> int:
        spool = self.spool
        found = self.route(topic)
        reason = None
        lines: list[bytes] = []
        if found is None:
            reason = "unknown_topic"
            self._burst.warning(reason, "message on unexpected topic %r rejected", topic[:200])
        else:
            route, decoder = found
            try:
                encode = self.encoder.encode
                lines = [encode(r) for r in decoder(route, payload, self.clock())]
            except DecodeError as exc:
                reason = exc.reason
                self._burst.warning(reason, "%s: rejected payload: %s", topic[:200], exc)
            except LineProtocolError as exc:
                reason = "bad_value"
                self._burst.warning(reason, "%s: rejected payload: %s: %s", topic[:200], reason,
                                    exc)
        delay = 0.05
        while True:
            fut = spool.reject(reason) if reason else spool.submit(Priority.TELEMETRY, lines)
            try:
                await fut
                return 0
            except (SpoolError, sqlite3.Error):
                # Not committed: hold the message unacknowledged and try again.
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- connection ------------------------------------------------------------------------

    def _client(self) -> Client:
        cfg = self.config
        props: dict[str, Any] = {}
        if cfg.protocol == "5":
            props = {
                "session_expiry_interval": cfg.session_expiry_secs,
                "receive_maximum": cfg.receive_maximum,
            }
        client = Client(
            cfg.client_id,
            clean_session=False,
            optimistic_acknowledgement=False,
            **props,
        )
        if cfg.username:
            client.set_auth_credentials(cfg.username, cfg.password())
        client.on_message = self.on_message
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.set_config({"reconnect_retries": -1, "reconnect_delay": cfg.reconnect_initial_secs})
        self._gmqtt = client
        return client

    def _ssl(self) -> ssl.SSLContext | bool:
        tls = self.config.tls
        if tls is None:
            return False
        ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
        if tls.cert_file is not None:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
        return ctx

    def _on_connect(self, client: Client, flags: int, rc: int, properties: Any) -> None:
        if self._attempt:
            log.warning("mqtt %s:%d: connected again", self.config.host, self.config.port)
        self._attempt = 0
        # Subscribing again is harmless with a persistent session and needed without one.
        self._unsubscribed = len(self._decoders)
        for entry, _ in self._decoders:
            client.subscribe(entry.subscription, qos=1)

    def _on_subscribe(self, client: Client, mid: int, qos: Any, properties: Any) -> None:
        self._unsubscribed -= 1
        if self._unsubscribed <= 0:
            self.connected.set()

    def _on_disconnect(self, client: Client, packet: Any, exc: BaseException | None = None) -> None:
        self.connected.clear()
        if self._stopping:
            return
        if self._attempt == 0:
            log.warning("mqtt %s:%d: connection lost, reconnecting", self.config.host,
                        self.config.port)
        self._attempt += 1
        client.reconnect_delay = self._backoff()

    def _backoff(self) -> float:
        cfg = self.config
        ceiling = min(cfg.reconnect_max_secs,
                      cfg.reconnect_initial_secs * 2.0 ** min(self._attempt, 20))
        return max(0.05, ceiling * random.random())

    async def run(self) -> None:
        """Connect (retrying with jittered backoff) and serve until cancelled."""
        cfg = self.config
        version = MQTTv50 if cfg.protocol == "5" else MQTTv311
        client = self._client()
        while True:
            try:
                await client.connect(cfg.host, cfg.port, ssl=self._ssl(),
                                     keepalive=cfg.keepalive_secs, version=version)
                break
            except ssl.SSLError as exc:
                log.error("mqtt %s:%d: TLS failed (%s); not falling back to plain text",
                          cfg.host, cfg.port, exc)
            except OSError as exc:
                if self._attempt == 0:
                    log.warning("mqtt %s:%d: cannot connect (%s), retrying", cfg.host, cfg.port,
                                exc)
            except MQTTConnectError as exc:
                log.error("mqtt %s:%d: broker refused the connection: %s", cfg.host, cfg.port,
                          exc)
            self._attempt += 1
            await asyncio.sleep(self._backoff())
        try:
            await asyncio.Future()  # serve until cancelled
        finally:
            await asyncio.shield(self._disconnect(client))

    async def _disconnect(self, client: Client) -> None:
        # Let messages already received reach the spool and get their PUBACK first; whatever
        # is still unacknowledged after that the broker redelivers on our next start.
        try:
            async with asyncio.timeout(2):
                while self._inflight:  # noqa: ASYNC110 (a counter, not worth an Event per message)
                    await asyncio.sleep(0.01)
                self._stopping = True
                await client.disconnect()
        except (TimeoutError, OSError) as exc:
            log.debug("mqtt disconnect: %s", exc)
