"""MQTT intake: subscribe, decode, spool, and only then acknowledge.

Promise (P0 in ../shared/reliability.md): a PUBLISH is acknowledged (PUBACK) only after its
points, or the count of its rejection, are committed to the spool. Until then the broker keeps
it in our persistent session (``clean_start=False`` plus a session expiry) and redelivers it
after a crash or reconnect. Duplicates are harmless: every point carries an explicit timestamp.

Client choice (numbers in docs/benchmarks.md): gmqtt on asyncio. paho-mqtt 2.2 costs ~37 µs of
CPU per message just to receive (it reads each packet header with one-byte ``recv`` calls) and
aiomqtt has no manual ack. gmqtt's own deferred acknowledgement (an async callback per message)
costs a task per message, so :meth:`MqttIntake.on_qos1` takes over its QoS 1 handling: messages
are decoded synchronously as they are parsed, and one done-callback per group commit sends the
PUBACKs of the whole batch, which :func:`coalesce_writes` joins into one ``send()``.

Flow control: MQTT v5 ``Receive Maximum`` bounds how many unacknowledged messages the broker
sends us; that is also the bound on what this process holds in memory. When the spool cannot
commit (disk full, I/O error) messages are held, not acknowledged, and retried: the broker stops
sending once the window is full and resumes when commits work again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
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
from ingest.spool import SpoolService

log = logging.getLogger(__name__)

_ROUTE_CACHE_MAX = 50_000
_DISCONNECT = 0xE0
RETRY_INITIAL_SECS = 0.05


def coalesce_writes() -> None:
    """Send the PUBACKs released by one group commit in one ``send()``, not one each.

    A commit completes hundreds of message futures in one event-loop iteration; gmqtt writes
    each PUBACK to the socket at once, which cost ~7% of the CPU in ``send`` at 15k msg/s
    (py-spy, docs/benchmarks.md). This buffers gmqtt's writes until the end of the current
    loop iteration and joins them. Order is kept (every write goes through here) and a
    DISCONNECT flushes at once, so nothing is left behind when the socket closes. gmqtt is
    pinned, so the one method replaced here cannot move under us.
    """
    from gmqtt.mqtt import protocol

    cls = protocol.MQTTProtocol
    if getattr(cls, "_edge_coalescing", False):
        return
    write = protocol.BaseMQTTProtocol.write_data

    def flush(self: Any) -> None:
        buf = self.__dict__.pop("_edge_wbuf", None)
        if buf:
            write(self, b"".join(buf))

    def write_data(self: Any, data: bytes) -> None:
        buf = self.__dict__.get("_edge_wbuf")
        if buf is None:
            buf = self._edge_wbuf = []
            asyncio.get_running_loop().call_soon(flush, self)
        buf.append(data)
        if data[:1] == bytes((_DISCONNECT,)):
            flush(self)

    cls.write_data = write_data
    cls._edge_coalescing = True


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
        # (mid, rejection reason, lines, session) per message, by the commit it waits for.
        self._held: dict[asyncio.Future[None], list[tuple[int | None, str | None,
                                                           list[bytes], int]]] = {}
        self._session = 0  # bumped when the broker did not keep our session: mids are void
        self._retry_secs = RETRY_INITIAL_SECS
        self._stopping = False
        self._unsubscribed = 0
        self._subscribe_failed = False
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
            try:
                route = Route(
                    measurement=entry.measurement,
                    site=values.get("site") or entry.site or self.default_site,
                    zone=values.get("zone") or entry.zone,
                    device=values.get("device") or topic,
                    kind=values.get("kind") or entry.kind,
                    field_map=entry.field_map,
                    timestamp_field=entry.timestamp_field,
                    timestamp_unit=entry.timestamp_unit,
                )
            except DecodeError:
                break  # a topic level unusable as a tag (control characters, too long)
            found = (route, decoder)
            break
        if len(self._routes) >= _ROUTE_CACHE_MAX:
            self._routes.clear()
        self._routes[topic] = found
        return found

    # -- the hot path ----------------------------------------------------------------------

    def _decode(self, topic: str, payload: bytes) -> tuple[str | None, list[bytes]]:
        """(rejection reason, lines): exactly one of the two is set."""
        found = self.route(topic)
        if found is None:
            self._burst.warning("unknown_topic", "message on unexpected topic %r rejected",
                                topic[:200])
            return "unknown_topic", []
        route, decoder = found
        try:
            encode = self.encoder.encode
            return None, [encode(r) for r in decoder(route, payload, self.clock())]
        except DecodeError as exc:
            self._burst.warning(exc.reason, "%s: rejected payload: %s", topic[:200], exc)
            return exc.reason, []
        except LineProtocolError as exc:
            self._burst.warning("bad_value", "%s: rejected payload: %s", topic[:200], exc)
            return "bad_value", []

    def on_qos1(self, mid: int, payload: bytes, topic: str, properties: Any) -> None:
        """Takes over gmqtt's QoS 1 handling: spool now, PUBACK when the commit completes.

        gmqtt's own way (an async callback per message, PUBACK when it returns) costs a task
        per message; here one done-callback per group commit acknowledges its whole batch.
        """
        try:
            reason, lines = self._decode(topic, payload)
            self._enqueue(mid, reason, lines)
        except Exception:
            # A bug of ours: gmqtt would swallow it into its own (silenced) log. Say it here;
            # the message stays unacknowledged, so the broker redelivers it after a restart.
            log.exception("mqtt: bug while handling a message on %r", topic[:200])
            raise

    def on_message(self, client: Any, topic: str, payload: bytes, qos: int, properties: Any
                   ) -> int:
        """QoS 0 messages (nothing to acknowledge): spooled all the same."""
        reason, lines = self._decode(topic, payload)
        self._enqueue(None, reason, lines)
        return 0

    def _enqueue(self, mid: int | None, reason: str | None, lines: list[bytes],
                 session: int | None = None) -> None:
        spool = self.spool
        fut = spool.reject(reason) if reason else spool.submit(Priority.TELEMETRY, lines)
        held = self._held.get(fut)
        if held is None:
            held = self._held[fut] = []
            fut.add_done_callback(self._committed)
        held.append((mid, reason, lines, self._session if session is None else session))
        self._inflight += 1

    def _committed(self, fut: asyncio.Future[None]) -> None:
        held = self._held.pop(fut)
        self._inflight -= len(held)
        if fut.cancelled() or fut.exception() is not None:
            # Not committed (disk full, I/O error): hold the messages unacknowledged and
            # submit them again; the broker stops sending when its window is full.
            asyncio.get_running_loop().call_later(self._retry_secs, self._resubmit, held)
            self._retry_secs = min(self._retry_secs * 2, 5.0)
            return
        self._retry_secs = RETRY_INITIAL_SECS
        send = self._gmqtt._package_handler._send_puback
        for mid, _, _, session in held:
            # A mid from a session the broker dropped may name a different, new message now.
            if mid is not None and session == self._session:
                send(mid)

    def _resubmit(self, held: list[tuple[int | None, str | None, list[bytes], int]]) -> None:
        for mid, reason, lines, session in held:
            self._enqueue(mid, reason, lines, session)

    # -- connection ------------------------------------------------------------------------

    def _client(self) -> Client:
        cfg = self.config
        props: dict[str, Any] = {}
        if cfg.protocol == "5":
            props = {
                "session_expiry_interval": cfg.session_expiry_secs,
                "receive_maximum": cfg.receive_maximum,
            }
        coalesce_writes()
        client = Client(
            cfg.client_id,
            clean_session=False,
            **props,
        )
        if cfg.username:
            client.set_auth_credentials(cfg.username, cfg.password())
        client.on_message = self.on_message
        # Our QoS 1 path replaces gmqtt's (see on_qos1); gmqtt is pinned in pyproject.toml.
        client._package_handler._handle_qos_1_publish_packet = self.on_qos1
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
        # Subscribing again is harmless with a persistent session and needed without one
        # (a broker restarted without persistence forgets it).
        if not flags:  # session not present: the broker forgot the mids we still hold
            self._session += 1
        # gmqtt appends to client.subscriptions on every subscribe() and frees a SUBSCRIBE's
        # id only on its SUBACK: without this, reconnects grow the list and leak ids until
        # subscribe() raises OverflowError. We never publish, so every id in use is stale here.
        client.subscriptions.clear()
        client._package_handler.id_generator._used_ids.clear()
        self._unsubscribed = len(self._decoders)
        self._subscribe_failed = False
        for entry, _ in self._decoders:
            client.subscribe(entry.subscription, qos=1)
        if self._attempt:
            log.warning("mqtt %s:%d: connected again", self.config.host, self.config.port)
        self._attempt = 0

    def _on_subscribe(self, client: Client, mid: int, qos: Any, properties: Any) -> None:
        self._unsubscribed -= 1
        granted = list(qos) if isinstance(qos, tuple | list) else [qos]
        if any(not isinstance(code, int) or code != 1 for code in granted):
            # Refused (>= 0x80, e.g. an ACL) or downgraded to QoS 0, where nothing is
            # acknowledged or redelivered: the promise of no loss would not hold.
            log.error("mqtt %s:%d: subscription %d not granted at QoS 1 (broker answered %s);"
                      " check the broker's ACL for this client", self.config.host,
                      self.config.port, mid, granted)
            self._subscribe_failed = True
        if self._unsubscribed <= 0 and not self._subscribe_failed:
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
        said = ""  # log each distinct connect problem once, not once per retry
        while True:
            try:
                await client.connect(cfg.host, cfg.port, ssl=self._ssl(),
                                     keepalive=cfg.keepalive_secs, version=version)
                break
            except ssl.SSLError as exc:
                problem = f"TLS failed ({exc}); not falling back to plain text"
            except OSError as exc:
                problem = f"cannot connect ({exc}), retrying"
            except MQTTConnectError as exc:
                problem = f"broker refused the connection: {exc}"
            if problem != said:
                log.error("mqtt %s:%d: %s", cfg.host, cfg.port, problem)
                said = problem
            # After some refusals gmqtt schedules a reconnect of its own; retiring the client
            # cancels that, so only this loop retries (never two connections, one client id).
            self._stopping = True
            with contextlib.suppress(TimeoutError, OSError):
                async with asyncio.timeout(1):
                    await client.disconnect()
            self._stopping = False
            client = self._client()
            self._attempt += 1
            await asyncio.sleep(self._backoff())
        try:
            await asyncio.Future()  # serve until cancelled
        finally:
            await asyncio.shield(self._disconnect(client))

    async def _disconnect(self, client: Client) -> None:
        # Let messages already received reach the spool and get their PUBACK first; whatever
        # is still unacknowledged after that the broker redelivers on our next start.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                while self._inflight:  # noqa: ASYNC110 (a counter, not worth an Event per message)
                    await asyncio.sleep(0.01)
        self._stopping = True
        try:
            async with asyncio.timeout(2):
                await client.disconnect()
        except (TimeoutError, OSError) as exc:
            log.debug("mqtt disconnect: %s", exc)
