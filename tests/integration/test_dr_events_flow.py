"""The event side end to end: a `serve` process with the sandbox's webhooks pointed at it settles a book of pending,
failing and blocked payments without polling any order; a lost webhook is found by `GET /events`; a storm of
deliveries while installments are charged loses nothing and answers each in time."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from engine.metrics import Metrics
from engine.store import Store
from engine.webhooks import PATH, WebhookServer, sign
from sandbox.server import Sandbox
from tests.integration.engines import drain, run_job
from tests.integration.factories import due_subscription
from tests.support import EngineProcess, sandbox_fixture, serving_env

EVENTS = "digital-river-events"
SECRET = "whsec_flow_Canary_0123456789"
sandbox = sandbox_fixture(settle_after_seconds=1.0)


async def statuses(store: Store) -> dict[int, tuple[str, int]]:
    rows = await store.pool.fetch("SELECT subscription_id, subscription_job_run_status, subscription_retry_count "
                                  "FROM subscription_process_data")
    return {r["subscription_id"]: (r["subscription_job_run_status"], r["subscription_retry_count"]) for r in rows}


async def test_served_with_webhooks_a_book_of_pending_payments_settles_without_polling_orders(
        database_url: str, store: Store, sandbox: Sandbox) -> None:
    book = {source: await due_subscription(store, source=source)
            for source in ("src_settle_accept", "src_settle_fail", "src_settle_block", "src_card_ok")}
    env = serving_env(database_url, sandbox, DR_WEBHOOK_SECRET=SECRET, DIGITAL_RIVER_EVENTS_SCHEDULE="off")
    async with EngineProcess(["serve"], env) as engine:
        [listening] = await engine.wait_for("webhooks_listening")
        sandbox.configure(webhook_url=f"http://127.0.0.1:{listening['port']}{PATH}", webhook_secret=SECRET)
        wanted = {book["src_settle_accept"]: ("Successful", 0), book["src_settle_fail"]: ("Open", 1),
                  book["src_settle_block"]: ("Failed", 1), book["src_card_ok"]: ("Successful", 0)}
        deadline = time.monotonic() + 45
        while await statuses(store) != wanted and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        engine.signal(signal.SIGTERM)
        assert await engine.wait() == 0, engine.stderr
    assert await statuses(store) == wanted
    # Settled by what Digital River said, never by asking about each order.
    assert sandbox.ledger.count_requests("GET", "/orders/*") == 0
    assert sandbox.ledger.count_requests("GET", "/events") == 0
    assert engine.find("webhook_refused") == []
    failed = await store.pool.fetchrow("SELECT * FROM subscription_process_data WHERE subscription_id = $1",
                                       book["src_settle_fail"])
    assert failed["next_attempt_at"] > datetime.now(UTC) + timedelta(hours=23) and failed["dr_order_id"] is None
    assert len(failed["dr_failed_order_ids"]) == 1
    events = await store.pool.fetch("SELECT type, status, source FROM dr_events")
    assert {r["source"] for r in events} == {"webhook"}
    assert {r["status"] for r in events} <= {"Processed", "Ignored"}


async def test_a_lost_webhook_is_found_by_the_next_poll(store: Store, sandbox: Sandbox) -> None:
    sub = await due_subscription(store, source="src_settle_accept")
    assert await drain(store, sandbox) == 0
    rec = await store.pool.fetchrow("SELECT * FROM subscription_process_data WHERE subscription_id = $1", sub)
    assert rec["subscription_job_run_status"] == "Pending"
    # Every delivery is lost (nobody even listens), and the order is accepted meanwhile.
    sandbox.configure(webhook_url="http://127.0.0.1:9/nobody", webhook_secret=SECRET, webhook_drop_rate=1.0)
    deadline = time.monotonic() + 10
    while sandbox.ledger.orders[rec["dr_order_id"]]["state"] != "accepted" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert await run_job(store, sandbox, EVENTS) == 0
    rec = await store.pool.fetchrow("SELECT * FROM subscription_process_data WHERE subscription_id = $1", sub)
    assert rec["subscription_job_run_status"] == "Successful"
    found = await store.pool.fetch("SELECT type, source, status FROM dr_events WHERE dr_order_id = $1 ORDER BY id",
                                   rec["dr_order_id"])
    assert ("order.accepted", "poll", "Processed") in [tuple(r) for r in found]
    assert sandbox.ledger.count_requests("GET", f"/orders/{rec['dr_order_id']}") == 0
    # The cursor is kept: the next run asks only from where this one reached, and applies nothing twice.
    cursor = await store.pool.fetchrow("SELECT * FROM dr_event_cursors WHERE storefront = 'DefaultStore'")
    assert cursor is not None and cursor["seen_until"] > datetime.now(UTC) - timedelta(minutes=1)
    assert await run_job(store, sandbox, EVENTS) == 0
    assert await store.pool.fetchval("SELECT count(*) FROM payment_attempts WHERE outcome = 'charged'") == 1


async def test_a_storm_of_deliveries_while_installments_are_charged_is_stored_whole_and_answered_in_time(
        store: Store, sandbox: Sandbox) -> None:
    listener = WebhookServer("127.0.0.1", 0, store, Metrics(), secret=SECRET, tolerance=300, wake=lambda: None)
    await listener.start()
    url = f"http://127.0.0.1:{listener.port}{PATH}"
    for _ in range(100):
        await due_subscription(store)
    count, answers = 10_000, []

    async def deliver(http: aiohttp.ClientSession, gate: asyncio.Semaphore, n: int) -> None:
        event: dict[str, Any] = {"id": f"evt_storm_{n}", "type": "order.accepted",
                                 "createdTime": datetime.now(UTC).isoformat(), "data": {"object": {"id": f"o{n}"}}}
        body = json.dumps(event).encode()
        now = int(time.time())
        async with gate:
            # Digital River waits 3 seconds for an answer: a slower one is a failed delivery here.
            async with http.post(url, data=body, headers={"DigitalRiver-Signature": f"t={now}, "
                                                          f"{sign(SECRET, now, body)}"},
                                 timeout=aiohttp.ClientTimeout(total=3)) as answer:
                answers.append(answer.status)

    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
            gate = asyncio.Semaphore(64)
            storm = asyncio.gather(*(deliver(http, gate, n) for n in range(count)))
            charged, _ = await asyncio.gather(drain(store, sandbox), storm)
    finally:
        await listener.stop()
    assert charged == 0
    assert answers == [200] * count
    assert await store.pool.fetchval("SELECT count(*) FROM dr_events WHERE source = 'webhook'") == count
    assert await store.pool.fetchval("SELECT count(*) FROM subscription_process_data "
                                     "WHERE subscription_job_run_status = 'Successful'") == 100
