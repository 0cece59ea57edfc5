"""Digital River's webhooks: `POST /webhooks/digital-river` on WEBHOOK_HOST:WEBHOOK_PORT, under `serve`.

A listener of its own, apart from `/metrics`, so it can be exposed to Digital River alone. `/webhooks/digital-river`
is DefaultStore's; `/webhooks/digital-river/<STORE>` another storefront's, STORE its name or label (`EU Store`,
`EU%20Store` and `EU_STORE` are one storefront: `storefront_label`), each checked with that storefront's own
secret (DR_WEBHOOK_SECRET_<STORE>) and stored with its label. A storefront this process has no key for: 404. Each
delivery:

1. A body over 1 MiB is refused (413) before it is read whole: by its Content-Length, else while reading.
2. The `DigitalRiver-Signature` header, `<timestamp>, <signature>` (a `t=` before the Unix seconds allowed), is
   checked: the signature must be the base64 HMAC-SHA256, keyed by the storefront's secret, of the timestamp, a `.`
   and the raw body (CONTRACT.md "Webhooks"; the form Digital River's Salesforce Commerce Cloud cartridge,
   `drHooksHelper.js`, checks), compared in constant time; the timestamp must be within
   WEBHOOK_TOLERANCE_SECONDS of now (Digital River signs every delivery and retry afresh, so an older one is a
   replay). Missing, malformed, wrong or stale: 401. No secret configured: every delivery 401.
3. The body must be a JSON event with `id` and `type`: else 400.
4. The event is stored once (`dr_events`, `ON CONFLICT (event_id) DO NOTHING`: a repeat is a 200 too), within
   STORE_TIMEOUT_SECONDS so Digital River hears back within its 3 seconds whatever the backlog; a store that
   fails or is slow answers 503 and Digital River delivers again later.
5. 200, then the digital-river-events job of this process is woken to apply it.

Nothing refused is stored. The secret never reaches a log line, a table or an answer: the log lines name only
the reason and the event id.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from engine.digital_river import Event, MalformedResponseError, parse_event
from engine.http import serve_app
from engine.logs import error_text, get_logger
from engine.metrics import Metrics
from engine.settings import DEFAULT_STOREFRONT, storefront_label
from engine.store import Store

log = get_logger(component="webhooks")

PATH = "/webhooks/digital-river"
MAX_BODY_BYTES = 1024 * 1024
STORE_TIMEOUT_SECONDS = 2.0
_TIMESTAMP = re.compile(r"(?:t=)?([0-9]{1,12})")


class Refused(Exception):
    """A delivery refused: `status` answered, `reason` counted and logged."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def event_order_id(kind: str, obj: dict[str, Any]) -> str | None:
    """The Digital River order an `order.*` event is about: its `data.object` is the order (`id`), or for the
    `order.charge.*` events possibly the charge, which names its order in `orderId` (Charge in
    DigitalRiver/digital-river-php)."""
    if not kind.startswith("order."):
        return None
    for key in ("orderId", "id") if kind.startswith("order.charge.") else ("id",):
        value = obj.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def event_row(event: Event, storefront: str) -> dict[str, Any]:
    """A `dr_events` row, as `store_events` takes it, for one event (a webhook's, or one of GET /events)."""
    order_id = event_order_id(event.type, event.object or {})
    return {"event_id": event.id, "type": event.type, "storefront": storefront, "dr_order_id": order_id,
            "payload": event.raw, "dr_created_at": (event.created_time or datetime.now(UTC)).isoformat()}


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature Digital River sends for `body` at `timestamp` (base64 HMAC-SHA256 of `<ts>.<body>`)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def verify(header: str | None, body: bytes, secret: str | None, tolerance: float, now: float) -> None:
    """Raise `Refused` unless `header` signs `body` with `secret` at a time within `tolerance` seconds of `now`."""
    if not secret:
        raise Refused(401, "no_secret", "no webhook secret is set for this storefront (DR_WEBHOOK_SECRET, or "
                                        "DR_WEBHOOK_SECRET_<STORE>): every webhook is refused")
    if not header:
        raise Refused(401, "signature_missing", "no DigitalRiver-Signature header")
    parts = [part.strip() for part in header.split(",")]
    match = _TIMESTAMP.fullmatch(parts[0]) if len(parts) == 2 else None
    if match is None or not parts[1]:
        raise Refused(401, "signature_malformed", "DigitalRiver-Signature is not '<timestamp>, <signature>'")
    timestamp = int(match.group(1))
    try:
        given = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise Refused(401, "signature_malformed", "the signature is not base64") from None
    expected = base64.b64decode(sign(secret, timestamp, body))
    if not hmac.compare_digest(given, expected):
        raise Refused(401, "signature_wrong", "the signature does not match the body")
    if abs(now - timestamp) > tolerance:
        raise Refused(401, "stale", f"signed {int(now - timestamp)} s ago, more than WEBHOOK_TOLERANCE_SECONDS "
                                    f"({tolerance:g})")


class WebhookServer:
    """The listener. `wake()` is called after each stored event (the events job's inbox, on this process)."""

    def __init__(self, host: str, port: int, store: Store, metrics: Metrics, *, secret: str | None,
                 tolerance: float, wake: Callable[[], Any], storefront: str = DEFAULT_STOREFRONT,
                 clock: Callable[[], float] = time.time, secrets: dict[str, str | None] | None = None) -> None:
        """`secret` is `storefront`'s (DefaultStore's); `secrets` adds other storefronts' (label → secret, None when
        a storefront with a key has no secret: its deliveries are refused)."""
        self.host = host
        self.requested_port = port
        self.store = store
        self.metrics = metrics
        self._secrets: dict[str, str | None] = {storefront_label(storefront): secret}
        for label, other in (secrets or {}).items():
            self._secrets[storefront_label(label)] = other
        self.tolerance = tolerance
        self.wake = wake
        self.storefront = storefront_label(storefront)
        self.clock = clock
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int:
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the webhook listener is not started")
        return int(self._runner.addresses[0][1])

    async def start(self) -> None:
        """Bind and serve; raises OSError when the address is taken."""
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post(PATH, self._receive)
        app.router.add_post(PATH + "/{storefront}", self._receive)
        self._runner = await serve_app(app, self.host, self.requested_port)
        for label, secret in self._secrets.items():
            if not secret:
                variable = "DR_WEBHOOK_SECRET" + ("" if label == DEFAULT_STOREFRONT else f"_{label}")
                log.warning("webhook_secret_missing", storefront=label,
                            detail=f"{variable} is not set: every webhook of this storefront is refused")
        log.info("webhooks_listening", host=self.host, port=self.port,
                 paths=[self.path(label) for label in self._secrets])

    @staticmethod
    def path(label: str) -> str:
        """Where Digital River delivers the events of the storefront `label`."""
        return PATH if label == DEFAULT_STOREFRONT else f"{PATH}/{label}"

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _receive(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        named = request.match_info.get("storefront")
        label = self.storefront if named is None else storefront_label(named)
        try:
            if label not in self._secrets:
                raise Refused(404, "unknown_storefront", f"no storefront {label} here: this engine has no "
                                                         f"DR_API_KEY_{label}")
            event_id, new = await self._accept(request, label)
        except Refused as exc:
            self.metrics.webhook_refused(exc.reason)
            log.warning("webhook_refused", reason=exc.reason, detail=str(exc), status=exc.status, storefront=label)
            return web.json_response({"error": exc.reason, "message": str(exc)}, status=exc.status)
        log.info("webhook_received", event_id=event_id, new=new, storefront=label,
                 ms=round((time.monotonic() - started) * 1000, 1))
        if new:
            self.metrics.dr_events_stored("webhook", 1)
            self.wake()
        return web.json_response({"received": event_id})

    async def _accept(self, request: web.Request, label: str) -> tuple[str, bool]:
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise Refused(413, "too_large", f"body of {request.content_length} bytes is over 1 MiB")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Refused(413, "too_large", "body over 1 MiB") from None
        verify(request.headers.get("DigitalRiver-Signature"), body, self._secrets[label], self.tolerance, self.clock())
        try:
            event = parse_event(json.loads(body))
        except (ValueError, MalformedResponseError) as exc:
            raise Refused(400, "bad_body", f"not a JSON event with id and type: {error_text(exc)}"[:300]) from None
        try:
            rows = await asyncio.wait_for(self.store.fetch("store_events", json.dumps([event_row(event, label)]),
                                                           "webhook"),
                                          STORE_TIMEOUT_SECONDS)
        except Exception as exc:  # the database is slow or gone (or refused it): Digital River delivers again
            raise Refused(503, "store_failed", f"the event could not be stored: {error_text(exc)}"[:300]) from None
        return event.id, bool(rows)
