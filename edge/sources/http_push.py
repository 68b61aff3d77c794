"""HTTP push intake for plate cameras and access controllers.

Many such devices can only POST a JSON event to a configured URL. This source accepts them on a
local endpoint authenticated with a bearer token (``Authorization: Bearer <token>``, or an
``X-Auth-Token`` header for devices that cannot set ``Authorization``) and answers 2xx only
after the event is committed to the spool, so a device that retries on failure never loses an
event. Plates and card numbers are turned into keyed pseudonyms inside the decoder: the raw
value never reaches the spool, the logs or InfluxDB.

Answers: 200 stored; 400 payload rejected (counted, with the reason); 401 bad token;
404 unknown path; 413 too large; 503 spool not writable (with ``Retry-After``: the device
should retry).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sqlite3
import time

from aiohttp import web

from edge.burstlog import BurstLog
from edge.config import HttpPushSource
from edge.decoders import DecodeError, Route, decode_access_event, decode_plate_event
from edge.model import Priority
from edge.pseudonym import Pseudonymizer
from ingest.lineprotocol import LineEncoder, LineProtocolError
from ingest.spool import SpoolError, SpoolService

log = logging.getLogger(__name__)

_DECODERS = {"plate": decode_plate_event, "access": decode_access_event}
COMMIT_TIMEOUT_SECS = 5.0


class HttpPushIntake:
    """An aiohttp server whose handlers spool events before answering."""

    def __init__(
        self,
        config: HttpPushSource,
        default_site: str,
        spool: SpoolService,
        pseudonymize: Pseudonymizer,
        encoder: LineEncoder | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.pseudonymize = pseudonymize
        self.encoder = encoder or LineEncoder()
        self._token = config.token().encode()
        self._burst = BurstLog(log)
        self._routes = {
            e.path: (
                Route(measurement="event", site=e.site or default_site, zone=e.zone,
                      device=e.device, kind=e.decoder, field_map={}, timestamp_field=None,
                      timestamp_unit="ms"),
                e.decoder,
            )
            for e in config.endpoints
        }
        self.port: int | None = None
        self.listening = asyncio.Event()

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        supplied = header[7:] if header.startswith("Bearer ") else request.headers.get(
            "X-Auth-Token", "")
        return hmac.compare_digest(supplied.encode(), self._token)

    async def handle(self, request: web.Request) -> web.Response:
        # Authenticate first, so that unauthenticated clients cannot probe for paths.
        if not self._authorized(request):
            self._burst.warning("http_auth", "http push %s: bad or missing token from %s",
                                request.path[:200], request.remote)
            return web.json_response({"error": "unauthorized"}, status=401)
        found = self._routes.get(request.path)
        if found is None:
            return web.json_response({"error": "unknown path"}, status=404)
        route, decoder_name = found
        payload = await request.read()
        try:
            # The body limit is max_body_bytes (413 above it), not the decoder's 64 KiB default.
            event = _DECODERS[decoder_name](route, payload, time.time_ns(), self.pseudonymize,
                                            max_bytes=self.config.max_body_bytes)
            line = self.encoder.encode(event)
        except (DecodeError, LineProtocolError) as exc:
            reason = exc.reason if isinstance(exc, DecodeError) else "bad_value"
            self._burst.warning(f"http:{reason}", "http push %s: rejected (%s): %s",
                                request.path, reason, exc)
            ok = await self._commit(self.spool.reject, reason)
            if not ok:
                return _unavailable()
            return web.json_response({"error": reason, "detail": str(exc)}, status=400)
        if not await self._commit(self.spool.submit, Priority.EVENT, [line]):
            return _unavailable()
        return web.json_response({"status": "stored"})

    async def _commit(self, submit: object, *args: object) -> bool:
        try:
            async with asyncio.timeout(COMMIT_TIMEOUT_SECS):
                # Shielded: the future is shared by the whole group commit (MQTT PUBACKs
                # wait on it too); the timeout must not cancel it for everyone.
                await asyncio.shield(submit(*args))  # type: ignore[operator]
            return True
        except (TimeoutError, SpoolError, sqlite3.Error) as exc:
            self._burst.warning("http:spool", "http push: spool not writable: %s", exc)
            return False

    async def run(self) -> None:
        """Serve until cancelled."""
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_post("/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.config.host, self.config.port)
            await site.start()
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1] if sockets else self.config.port
            log.info("http push listening on %s:%s", self.config.host, self.port)
            self.listening.set()
            await asyncio.Future()
        finally:
            await runner.cleanup()


def _unavailable() -> web.Response:
    return web.json_response({"error": "spool not writable, retry later"}, status=503,
                             headers={"Retry-After": "5"})
