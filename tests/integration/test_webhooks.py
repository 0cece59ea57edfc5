"""Digital River's webhooks (engine/webhooks.py) against a real PostgreSQL: what is stored, what is refused, and
that a refused delivery leaves nothing behind. CONTRACT.md "Webhooks" is the specification."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from engine.metrics import Metrics
from engine.store import Store
from engine.webhooks import MAX_BODY_BYTES, PATH, WebhookServer, sign
from tests.db import open_store

SECRET = "whsec_drjobs_Canary_0123456789"


def event(event_id: str = "evt_1", kind: str = "order.accepted", order_id: str = "ord_1",
          created: str = "2026-12-01T10:00:00.000Z") -> dict[str, Any]:
    return {"id": event_id, "type": kind, "createdTime": created, "liveMode": False,
            "data": {"object": {"id": order_id, "state": kind.split(".")[-1]}}}


def signed(body: bytes, *, secret: str = SECRET, at: float | None = None, prefix: str = "t=") -> dict[str, str]:
    timestamp = int(time.time() if at is None else at)
    return {"DigitalRiver-Signature": f"{prefix}{timestamp}, {sign(secret, timestamp, body)}",
            "Content-Type": "application/json"}


class Listener:
    def __init__(self, store: Store, *, secret: str | None = SECRET, tolerance: float = 300) -> None:
        self.woken = 0
        self.metrics = Metrics()
        self.server = WebhookServer("127.0.0.1", 0, store, self.metrics, secret=secret, tolerance=tolerance,
                                    wake=self._wake)

    def _wake(self) -> None:
        self.woken += 1

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}{PATH}"


@pytest.fixture
async def listener(store: Store) -> AsyncIterator[Listener]:
    listening = Listener(store)
    await listening.server.start()
    yield listening
    await listening.server.stop()


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as answer:
        return answer.status, await answer.json(content_type=None)


async def stored(store: Store) -> list[dict[str, Any]]:
    return [dict(r) for r in await store.pool.fetch("SELECT * FROM dr_events ORDER BY id")]


async def test_a_signed_event_is_stored_once_and_wakes_the_events_job(listener: Listener, store: Store) -> None:
    body = json.dumps(event()).encode()
    status, answer = await post(listener.url, body, signed(body))
    assert (status, answer) == (200, {"received": "evt_1"})
    [row] = await stored(store)
    assert (row["event_id"], row["type"], row["dr_order_id"], row["source"], row["status"], row["storefront"]) == (
        "evt_1", "order.accepted", "ord_1", "webhook", "Pending", "DefaultStore")
    assert json.loads(row["payload"]) == event()
    assert row["dr_created_at"].isoformat() == "2026-12-01T10:00:00+00:00"
    assert listener.woken == 1


async def test_a_duplicate_delivery_is_one_row_and_answered_200(listener: Listener, store: Store) -> None:
    body = json.dumps(event()).encode()
    first = await post(listener.url, body, signed(body))
    # Digital River signs a retry afresh: another timestamp, the same event.
    again = await post(listener.url, body, signed(body, at=time.time() - 5, prefix=""))
    assert first[0] == again[0] == 200
    assert len(await stored(store)) == 1
    assert listener.woken == 1  # nothing new the second time


@pytest.mark.parametrize(("case", "reason"), [
    ("missing", "signature_missing"),
    ("no_timestamp", "signature_malformed"),
    ("three_parts", "signature_malformed"),
    ("not_base64", "signature_malformed"),
    ("wrong_secret", "signature_wrong"),
    ("other_body", "signature_wrong"),
    ("stale", "stale"),
    ("future", "stale"),
])
async def test_a_delivery_not_signed_as_digital_river_signs_is_refused_401_and_not_stored(
        listener: Listener, store: Store, case: str, reason: str) -> None:
    body = json.dumps(event()).encode()
    now = int(time.time())
    headers = {"Content-Type": "application/json"}
    good = sign(SECRET, now, body)
    if case == "no_timestamp":
        headers["DigitalRiver-Signature"] = good
    elif case == "three_parts":
        headers["DigitalRiver-Signature"] = f"t={now}, {good}, {good}"
    elif case == "not_base64":
        headers["DigitalRiver-Signature"] = f"t={now}, ***"
    elif case == "wrong_secret":
        headers = signed(body, secret="whsec_someone_else")
    elif case == "other_body":
        headers = signed(json.dumps(event("evt_2")).encode())
    elif case == "stale":  # a replay of a delivery signed 301 seconds ago
        headers = signed(body, at=now - 301)
    elif case == "future":
        headers = signed(body, at=now + 301)
    status, answer = await post(listener.url, body, headers)
    assert (status, answer["error"]) == (401, reason)
    assert await stored(store) == []
    assert listener.woken == 0
    assert f'drjobs_webhook_refusals_total{{reason="{reason}"}} 1.0' in listener.metrics.render().decode()


@pytest.mark.parametrize("body", [b"{not json", b"[]", json.dumps({"type": "order.accepted"}).encode(),
                                  json.dumps({"id": "evt_1"}).encode(), json.dumps({"id": {"x": 1}, "type": "x"}).encode()])
async def test_a_body_that_is_not_an_event_is_refused_400(listener: Listener, store: Store, body: bytes) -> None:
    status, answer = await post(listener.url, body, signed(body))
    assert (status, answer["error"]) == (400, "bad_body")
    assert await stored(store) == []


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_over_1_mib_is_refused_413(listener: Listener, store: Store, chunked: bool) -> None:
    body = json.dumps(event() | {"pad": "x" * MAX_BODY_BYTES}).encode()
    headers = signed(body)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 65536):
            yield body[start:start + 65536]

    async with aiohttp.ClientSession() as http, http.post(
            listener.url, data=chunks() if chunked else io.BytesIO(body), headers=headers) as answer:
        status = answer.status
    assert status == 413
    assert await stored(store) == []


async def test_without_a_secret_every_delivery_is_refused(store: Store) -> None:
    listening = Listener(store, secret=None)
    await listening.server.start()
    try:
        body = json.dumps(event()).encode()
        status, answer = await post(listening.url, body, signed(body))
    finally:
        await listening.server.stop()
    assert (status, answer["error"]) == (401, "no_secret")
    assert await stored(store) == []


async def test_the_secret_never_reaches_an_answer_or_a_log_line(listener: Listener, store: Store,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    body = json.dumps(event()).encode()
    for headers in (signed(body), signed(body, secret="whsec_other"), signed(body, at=time.time() - 999)):
        _, answer = await post(listener.url, body, headers)
        assert SECRET not in json.dumps(answer)
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert SECRET not in json.dumps([str(v) for r in await stored(store) for v in r.values()])


async def test_one_event_delivered_to_two_processes_at_once_is_stored_once(database_url: str) -> None:
    async with open_store(database_url, "engine-a") as a, open_store(database_url, "engine-b") as b:
        listeners = [Listener(a), Listener(b)]
        for listening in listeners:
            await listening.server.start()
        try:
            body = json.dumps(event("evt_race")).encode()
            answers = await asyncio.gather(*(post(listening.url, body, signed(body)) for listening in listeners
                                             for _ in range(5)))
        finally:
            for listening in listeners:
                await listening.server.stop()
        assert {status for status, _ in answers} == {200}
        assert await a.pool.fetchval("SELECT count(*) FROM dr_events WHERE event_id = 'evt_race'") == 1
        assert sum(listening.woken for listening in listeners) == 1


async def test_a_database_that_cannot_store_the_event_answers_503(listener: Listener, store: Store) -> None:
    # The table is locked: the insert waits, and the answer must still come in time for Digital River to retry.
    body = json.dumps(event("evt_locked")).encode()
    async with store.pool.acquire() as conn, conn.transaction():
        await conn.execute("LOCK TABLE dr_events IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        status, answer = await post(listener.url, body, signed(body))
        waited = time.monotonic() - started
    assert (status, answer["error"]) == (503, "store_failed")
    assert waited < 3.0
    assert await stored(store) == []
