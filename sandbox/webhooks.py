"""Digital River's webhooks as the sandbox sends them: every event POSTed as JSON to `webhook_url`, signed, late,
out of order, twice or never, and retried, so a receiver can be tested against all of that.

The signature is the form docs/sandbox.md and ../shared/CONTRACT.md ("Webhooks") describe, the one Digital
River's Salesforce Commerce Cloud cartridge checks: `DigitalRiver-Signature: t=<unix seconds>, <signature>`,
where the signature is base64(HMAC-SHA256(secret, "<unix seconds>." + raw body)). A delivery answered outside
2xx is retried "with a new signature and timestamp" (Digital River's guide, "Digital River signature"); the
retry schedule (0.2 s, 0.5 s, 1 s) is the sandbox's own, short for tests.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import time
from collections.abc import Coroutine
from typing import Any

import aiohttp

from sandbox.config import SandboxConfig
from sandbox.ledger import Ledger

SIGNATURE_HEADER = "DigitalRiver-Signature"
# Waits before the 2nd, 3rd and 4th attempt of a delivery answered non-2xx or not answered.
RETRY_DELAYS = (0.2, 0.5, 1.0)
# How long one attempt may take before it counts as not answered (status 0).
ATTEMPT_TIMEOUT_SECONDS = 10.0


def sign_webhook(secret: str, timestamp: int, body: bytes) -> str:
    """The `DigitalRiver-Signature` header value for `body` sent at `timestamp` (Unix seconds):
    `t=<timestamp>, <base64 HMAC-SHA256 keyed by secret of b"<timestamp>." + body>`."""
    digest = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256).digest()
    return f"t={timestamp}, {base64.b64encode(digest).decode('ascii')}"


def event_body(event: dict[str, Any]) -> bytes:
    """The bytes a delivery POSTs: `json.dumps` of the event as GET /events answers it."""
    return json.dumps(event).encode()


class WebhookSender:
    """Delivers events in background tasks over one `aiohttp.ClientSession`, open between `start()` and
    `close()`. Outside that window (or without a running loop) events are recorded but not delivered."""

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT_SECONDS))

    async def close(self) -> None:
        await self.cancel()
        session, self.session = self.session, None
        if session is not None:
            await session.close()

    async def cancel(self) -> None:
        """Cancel every delivery in flight (and wait until they stopped)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def cancel_soon(self) -> None:
        """`cancel` for synchronous callers (a reset): the tasks stop at their next await."""
        for task in list(self._tasks):
            task.cancel()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def wait_idle(self) -> None:
        """Wait until no delivery (or retry) is in flight."""
        await self._idle.wait()

    def schedule(self, event: dict[str, Any], config: SandboxConfig, rng: random.Random, ledger: Ledger) -> None:
        """Plan the deliveries of a new event under the current settings. The random draws (drop, duplicate,
        delays, in that order, each only when its setting is non-zero) happen here, in event order, so a
        seeded sandbox drops and duplicates the same events every run."""
        url, session = config.webhook_url, self.session
        if url is None or session is None or session.closed:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        if config.webhook_drop_rate and rng.random() < config.webhook_drop_rate:
            return
        copies = 2 if config.webhook_duplicate_rate and rng.random() < config.webhook_duplicate_rate else 1
        body = event_body(event)
        for _ in range(copies):
            delay = rng.uniform(0.0, config.webhook_delay_ms) / 1000 if config.webhook_delay_ms else 0.0
            self._spawn(self._deliver(session, url, config.webhook_secret, config.webhook_retry, event, body,
                                      delay, ledger))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine, name="sandbox-webhook")
        self._tasks.add(task)
        self._idle.clear()
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._tasks:
            self._idle.set()

    async def _deliver(self, session: aiohttp.ClientSession, url: str, secret: str | None, retry: bool,
                       event: dict[str, Any], body: bytes, delay: float, ledger: Ledger) -> None:
        if delay:
            await asyncio.sleep(delay)
        waits = (0.0, *RETRY_DELAYS) if retry else (0.0,)
        for attempt, wait in enumerate(waits, start=1):
            if wait:
                await asyncio.sleep(wait)
            if session.closed:
                return
            # A fresh timestamp and signature for each attempt, as Digital River signs each one.
            headers = {"Content-Type": "application/json"}
            if secret is not None:
                headers[SIGNATURE_HEADER] = sign_webhook(secret, int(time.time()), body)
            started_at, started = time.time(), time.perf_counter()
            try:
                # A redirect is a failure, as Digital River treats it (developers.digitalriver.com, Webhooks).
                async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError, OSError):
                status = 0
            ledger.webhook_deliveries.append({
                "eventId": event["id"], "type": event["type"], "attempt": attempt, "status": status,
                "durationMs": round((time.perf_counter() - started) * 1000, 3), "at": started_at, "url": url})
            if 200 <= status < 300:
                return
