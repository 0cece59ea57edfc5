"""A 429 met by one engine process, shared with every other process on the database that uses the same key.

Digital River refuses every call with a key until the `Retry-After` of a 429 has passed (its example is 120 s),
so a second process sending meanwhile only walks into the same wall. When the client meets a 429 it calls
`offer(seconds)`; this actor writes the pause into `dr_rate_pauses` (the later of it and any pause already
known) and sends `NOTIFY drjobs_dr_pause`. Every engine LISTENs on one connection of its own and pauses its
client at once; it also reads the table when it starts and every few seconds, so a process started during a
pause, or one whose notification was lost to a reconnect, still waits it out. Pauses are matched by `key_id`
(the first 16 hex digits of the key's SHA-256), never by the key: each storefront's client (engine/storefronts.py)
is paused by the 429s met with its own key only, so a storefront Digital River throttles never holds up another.

Behind a transaction pooler (`DATABASE_POOLER=transaction`) LISTEN cannot work: it belongs to a server session,
and the pooler hands that session to other clients as soon as the statement ends. There the engine does not
LISTEN and reads the table every second instead (one indexed single-row read), so another process's pause
reaches it within about a second rather than at once. The NOTIFY is still sent, for engines connected directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from engine.actor import Actor
from engine.digital_river import DigitalRiverClient
from engine.logs import get_logger
from engine.store import Store

log = get_logger(component="rate_pauses")
CHANNEL = "drjobs_dr_pause"
# How often the table is read besides the notifications.
POLL_SECONDS = 5.0
# How often it is read without them (behind a transaction pooler, where LISTEN cannot work).
POLL_SECONDS_WITHOUT_LISTEN = 1.0


class RatePauses(Actor[tuple[str, float]]):
    """Publishes this process's 429 pauses and applies the ones other processes met, for each key."""

    inbox_size = 64

    def __init__(self, store: Store, clients: list[DigitalRiverClient], *, poll_seconds: float | None = None) -> None:
        super().__init__("rate-pauses")
        self.store = store
        self.clients = clients
        for client in self.clients:
            client.on_rate_limited = self._publisher(client.key_id)
        # LISTEN needs a connection that is one server session for its whole life: not through a pooler.
        self.listens = store.sessions
        if poll_seconds is None:
            poll_seconds = POLL_SECONDS if self.listens else POLL_SECONDS_WITHOUT_LISTEN
        self.poll_seconds = poll_seconds

    def _publisher(self, key_id: str) -> Callable[[float], None]:
        def publish(seconds: float) -> None:
            """The client met a 429 asking for `seconds`: share it (never blocks; a full inbox drops the repeat)."""
            self.offer((key_id, seconds))
        return publish

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(actor=self.name)
        stop = asyncio.create_task(self.stopping.wait(), name=f"{self.name}:stop-wait")
        try:
            if not self.listens:
                await self._loop(stop)
                return
            async with self.store.pool.acquire() as conn:
                await conn.add_listener(CHANNEL, self._notified)
                try:
                    await self._loop(stop)
                finally:
                    await conn.remove_listener(CHANNEL, self._notified)
        finally:
            stop.cancel()

    async def _loop(self, stop: asyncio.Task[Any]) -> None:
        """Read the table, then share each pause this process meets and read the table again between them."""
        await self._read()
        while not self.stopping.is_set():
            pause = await self._next(stop)
            if pause is not None:
                key_id, seconds = pause
                await self.store.fetch("share_rate_pause", key_id, float(seconds))
                log.warning("dr_rate_pause_shared", seconds=round(seconds, 3), storefronts=self._labels(key_id))
            elif not self.stopping.is_set():
                await self._read()

    async def _next(self, stop: asyncio.Task[Any]) -> tuple[str, float] | None:
        """The next pause to share, or None after POLL_SECONDS (or at shutdown)."""
        get = asyncio.create_task(self.inbox.get(), name=f"{self.name}:inbox")
        done, _ = await asyncio.wait({get, stop}, timeout=self.poll_seconds, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        try:
            return await get  # a pause that arrived while cancelling is not lost
        except asyncio.CancelledError:
            return None

    async def _read(self) -> None:
        for client in self.clients:
            left = await self.store.fetchval("rate_pause_left", client.key_id)
            if left is not None and left > 0:
                self._apply(client, float(left), source="table")

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        key_id, _, seconds = payload.partition(" ")
        try:
            left = float(seconds)
        except ValueError:
            return
        if left > 0:
            for client in self.clients:
                if client.key_id == key_id:
                    self._apply(client, left, source="notification")

    def _labels(self, key_id: str) -> list[str]:
        return [client.storefront for client in self.clients if client.key_id == key_id]

    def _apply(self, client: DigitalRiverClient, seconds: float, *, source: str) -> None:
        before = client.bucket.paused_until
        client.pause_for(seconds)
        if client.bucket.paused_until > before + 0.5:
            log.warning("dr_rate_paused_by_another_process", seconds=round(seconds, 3), source=source,
                        storefront=client.storefront)
