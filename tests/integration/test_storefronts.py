"""Storefronts (CONTRACT.md "Storefronts", "Webhooks", `DR_API_KEY_<STORE>`) against real PostgreSQL and real
sandboxes: each storefront is charged with its own key at its own Digital River, a 429, a refused key or a
missing key at one never slows or stops another, each storefront's webhooks are checked with its own secret, and
no storefront's key or secret reaches a log line, an HTTP answer or a table.

Each storefront has a sandbox of its own that accepts exactly that storefront's key and answers 401 to any
other, so a request sent with the wrong storefront's key cannot go unnoticed.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from datetime import date
from typing import Any

import aiohttp
import pytest

from engine.app import Engine
from engine.store import Store
from engine.webhooks import PATH, sign
from sandbox.config import SandboxConfig
from sandbox.server import Sandbox
from tests.integration.engines import drain, engine_on, run_job
from tests.integration.factories import due_subscription, process_records
from tests.integration.test_fulfillment import dr_order, fulfillment_row, lines_of, seed
from tests.support import EngineProcess, engine_env

EU = "EU Store"  # as the outside system writes it in subscriptions.storefront
EU_LABEL = "EU_STORE"  # as its settings spell it (DR_API_KEY_EU_STORE)
DEFAULT = "DefaultStore"
DEFAULT_KEY = "sk_test_storefronts_default_0123456789"
EU_KEY = "sk_test_storefronts_eu_9876543210"
DEFAULT_SECRET = "whsec_storefronts_default_0123456789"
EU_SECRET = "whsec_storefronts_eu_9876543210"
# Far below any pause the tests impose (600 s), far above what each needs (a few seconds).
BOUND_SECONDS = 30


@pytest.fixture
async def sandboxes() -> AsyncIterator[tuple[Sandbox, Sandbox]]:
    """DefaultStore's Digital River and EU Store's, each accepting only its own storefront's key."""
    async with Sandbox(SandboxConfig(api_key=DEFAULT_KEY, seed=1)) as default, \
            Sandbox(SandboxConfig(api_key=EU_KEY, seed=2)) as eu:
        yield default, eu


def storefront_env(eu: Sandbox, **env: str) -> dict[str, str]:
    """EU Store's settings, for `engine_on` (DefaultStore's are its key and sandbox)."""
    return {"DR_API_KEY_EU_STORE": EU_KEY, "DR_API_URL_EU_STORE": eu.url,
            "DR_MAX_REQUESTS_PER_SECOND_EU_STORE": "1000"} | env


def two_storefronts(store: Store, default: Sandbox, eu: Sandbox, **env: str) -> AbstractAsyncContextManager[Engine]:
    return engine_on(store, default, key=DEFAULT_KEY, **storefront_env(eu, **env))


async def drain_both(store: Store, default: Sandbox, eu: Sandbox, **env: str) -> int:
    async with asyncio.timeout(BOUND_SECONDS):
        return await drain(store, default, key=DEFAULT_KEY, **storefront_env(eu, **env))


async def records(store: Store) -> dict[int, dict[str, Any]]:
    """Every installment record, by subscription id (each subscription here has one), with its subscription's
    storefront and its order's."""
    rows = await store.pool.fetch(
        "SELECT p.*, s.storefront AS subscription_storefront, o.storefront AS order_storefront, "
        "       c.storefront AS cart_storefront "
        "FROM subscription_process_data p JOIN subscriptions s ON s.id = p.subscription_id "
        "LEFT JOIN orders o ON o.id = p.order_id LEFT JOIN carts c ON c.id = p.cart_id")
    found = {r["subscription_id"]: dict(r) for r in rows}
    assert len(found) == len(rows), "one record per subscription expected"
    return found


def orders_at(sandbox: Sandbox, upstream_id: str) -> list[dict[str, Any]]:
    return sandbox.ledger.orders_for_upstream(upstream_id)


def checkouts_at(sandbox: Sandbox, upstream_id: str) -> list[dict[str, Any]]:
    return [c for c in sandbox.ledger.checkouts.values() if c.get("upstreamId") == upstream_id]


async def subscriptions(store: Store, count: int, storefront: str) -> list[int]:
    return [await due_subscription(store, storefront=storefront) for _ in range(count)]


# -- 1. each storefront at its own Digital River ------------------------------------------------------------------


async def test_each_storefront_is_charged_with_its_own_key_at_its_own_digital_river(
        store: Store, sandboxes: tuple[Sandbox, Sandbox]) -> None:
    default, eu = sandboxes
    home = await subscriptions(store, 2, DEFAULT)
    abroad = await subscriptions(store, 2, EU)

    assert await drain_both(store, default, eu) == 0

    recs = await records(store)
    assert set(recs) == set(home + abroad)
    for sub, rec in recs.items():
        mine, other = (default, eu) if sub in home else (eu, default)
        name = DEFAULT if sub in home else EU
        assert rec["subscription_job_run_status"] == "Successful", rec
        # The record, its cart and the installment order it made all carry the subscription's storefront.
        assert (rec["storefront"], rec["cart_storefront"], rec["order_storefront"]) == (name, name, name)
        # Charged once, at its own storefront's Digital River, and never sent to the other's.
        [order] = orders_at(mine, rec["upstream_id"])
        assert order["id"] == rec["dr_order_id"]
        assert orders_at(other, rec["upstream_id"]) == [] and checkouts_at(other, rec["upstream_id"]) == []
    assert len(default.ledger.orders) == len(eu.ledger.orders) == 2
    # Neither sandbox ever saw the other storefront's key: no request was refused.
    for sandbox in (default, eu):
        assert sandbox.ledger.count_requests(status=401) == 0
        assert sandbox.ledger.count_requests("POST", "/orders") == 2


async def test_each_storefronts_fulfillments_are_sent_with_its_own_key(
        store: Store, sandboxes: tuple[Sandbox, Sandbox]) -> None:
    default, eu = sandboxes
    sent: dict[str, tuple[Sandbox, int, int]] = {}  # Digital River order id → (its sandbox, fulfillment, line)
    for sandbox, storefront in ((default, DEFAULT), (eu, EU)):
        shipped = dr_order(sandbox, 2)
        ful, [line] = await seed(store, shipped, [{"item": 0, "fulfill_quantity": 2}])
        cancelled = dr_order(sandbox, 1)
        cancel_ful, _ = await seed(store, cancelled, [], dr_order_state="cancelled")
        await store.pool.execute("UPDATE orders SET storefront = $2 WHERE dr_order_id = ANY($1)",
                                 [shipped["id"], cancelled["id"]], storefront)
        sent[shipped["id"]] = (sandbox, ful, line)
        sent[cancelled["id"]] = (sandbox, cancel_ful, 0)

    assert await drain_both(store, default, eu) == 0

    for dr_order_id, (sandbox, ful, line) in sent.items():
        other = eu if sandbox is default else default
        assert len(sandbox.ledger.fulfillments_for_order(dr_order_id)) == 1, dr_order_id
        assert other.ledger.fulfillments_for_order(dr_order_id) == []
        if line:  # line-item-fulfillment's: the line is done
            assert [(r["id"], r["efn_status"]) for r in await lines_of(store, ful)] == [(line, "Completed")]
        else:  # order-fulfillment's cancellation: the order's fulfillment row is done
            assert (await fulfillment_row(store, ful))["efn_status"] == "Completed"
    for sandbox in (default, eu):
        assert sandbox.ledger.count_requests("POST", "/fulfillments") == 2
        assert sandbox.ledger.count_requests(status=401) == 0


# -- 2. a 429 at one storefront ------------------------------------------------------------------------------------


async def test_a_storefront_paused_by_a_long_429_does_not_hold_up_the_other_nor_the_drain(
        store: Store, sandboxes: tuple[Sandbox, Sandbox]) -> None:
    default, eu = sandboxes
    home = await subscriptions(store, 3, DEFAULT)
    abroad = await subscriptions(store, 3, EU)
    # EU Store's Digital River refuses every call for ten minutes. One record in flight per storefront, so EU
    # Store meets the 429 with its first record while the others are still waiting to be claimed.
    eu.block(600)

    assert await drain_both(store, default, eu, RECURRING_PAYMENTS_CONCURRENCY="1") == 0

    recs = await records(store)
    for sub in home:
        assert recs[sub]["subscription_job_run_status"] == "Successful", recs[sub]
        assert len(orders_at(default, recs[sub]["upstream_id"])) == 1
    for sub in abroad:
        rec = recs[sub]
        # Left for a later run: not failed, no attempt counted, nothing charged.
        assert (rec["subscription_job_run_status"], rec["subscription_retry_count"]) == ("Open", 0), rec
        assert not rec["is_recurring_payment_processed"]
        assert rec["dr_order_id"] is None and rec["order_id"] is None
        assert rec["locked_by"] is None
    # The record that met the 429 waits out its Retry-After, named for what it was (not an outage).
    met = [recs[sub] for sub in abroad if recs[sub]["last_error_code"] is not None]
    assert [rec["last_error_code"] for rec in met] == ["rate_limited"], met
    assert await store.pool.fetchval("SELECT $1::timestamptz > now() + interval '5 minutes'",
                                     met[0]["next_attempt_at"])
    assert eu.ledger.count_requests(status=429) >= 1
    assert eu.ledger.orders == {} and eu.ledger.checkouts == {}
    assert len(default.ledger.orders) == 3
    assert default.ledger.count_requests(status=429) == 0


async def test_a_storefront_paused_by_a_long_429_does_not_hold_up_the_others_fulfillments_nor_the_drain(
        store: Store, sandboxes: tuple[Sandbox, Sandbox]) -> None:
    default, eu = sandboxes
    lines: dict[str, list[int]] = {DEFAULT: [], EU: []}
    for sandbox, storefront in ((default, DEFAULT), (default, DEFAULT), (eu, EU), (eu, EU), (eu, EU)):
        order = dr_order(sandbox, 2)
        ful, _ = await seed(store, order, [{"item": 0, "fulfill_quantity": 2}])
        await store.pool.execute("UPDATE orders SET storefront = $2 WHERE dr_order_id = $1", order["id"], storefront)
        lines[storefront].append(ful)
    eu.block(600)

    assert await drain_both(store, default, eu, LINE_ITEM_FULFILLMENT_CONCURRENCY="1") == 0

    for ful in lines[DEFAULT]:
        assert [r["efn_status"] for r in await lines_of(store, ful)] == ["Completed"]
    throttled = 0
    for ful in lines[EU]:
        [line] = await lines_of(store, ful)
        assert line["efn_status"] in ("Open", "Pending") and line["locked_by"] is None, line
        # A 429 (or a call not sent during the key's pause) is not a failed send: never counted toward
        # FULFILLMENT_RETRY_LIMIT, and the line waits out the Retry-After.
        assert line["retry_count"] == 0, line
        if line["efn_status"] == "Pending":
            throttled += 1
            assert await store.pool.fetchval("SELECT $1::timestamptz > now() + interval '5 minutes'",
                                             line["next_attempt_at"]), line
    assert throttled >= 1
    assert eu.ledger.fulfillments == {} and eu.ledger.count_requests(status=429) >= 1
    assert len(default.ledger.fulfillments) == 2


# -- 3. a refused key at one storefront ----------------------------------------------------------------------------


async def test_a_storefront_whose_key_is_refused_stops_alone_and_the_run_fails_naming_it(
        store: Store, sandboxes: tuple[Sandbox, Sandbox]) -> None:
    default, eu = sandboxes
    home = await subscriptions(store, 3, DEFAULT)
    abroad = await subscriptions(store, 2, EU)
    eu.configure(api_key="sk_test_someone_elses_key_0000")  # EU Store's key is refused: 401

    # drain ends with 1, as `run JOB` does for a run that failed.
    assert await drain_both(store, default, eu) == 1

    recs = await records(store)
    for sub in home:
        assert recs[sub]["subscription_job_run_status"] == "Successful", recs[sub]
        assert len(orders_at(default, recs[sub]["upstream_id"])) == 1
    for sub in abroad:
        rec = recs[sub]
        # Not an attempt of the record's: uncounted, given back, due again once the key is fixed.
        assert (rec["subscription_job_run_status"], rec["subscription_retry_count"]) == ("Open", 0), rec
        assert rec["dr_order_id"] is None and rec["dr_checkout_id"] is None
        assert rec["locked_by"] is None
    assert eu.ledger.count_requests(status=401) >= 1 and eu.ledger.orders == {}
    assert default.ledger.count_requests(status=401) == 0
    runs = [dict(r) for r in await store.pool.fetch(
        "SELECT status, error, claimed, succeeded, failed FROM job_runs WHERE job = 'recurring-payments'")]
    [failed] = [r for r in runs if r["status"] == "failed"]
    assert EU_LABEL in failed["error"] and DEFAULT not in failed["error"], failed
    assert "refused" in failed["error"]
    # The other storefront's records were charged in that same run, and the refused ones not counted as failed.
    assert (failed["succeeded"], failed["failed"]) == (3, 0), failed


# -- 4. a storefront with no key -----------------------------------------------------------------------------------


async def test_records_of_a_storefront_without_a_key_are_left_untouched(
        store: Store, sandboxes: tuple[Sandbox, Sandbox]) -> None:
    default, eu = sandboxes
    home = await subscriptions(store, 2, DEFAULT)
    abroad = await subscriptions(store, 1, EU)
    # Nowhere's subscriptions are due, and each already has an Open installment record (made before its key was
    # taken away, or written by the outside system).
    nowhere = await subscriptions(store, 2, "Nowhere")
    for sub in nowhere:
        await process_records(store, sub, 1, storefront="Nowhere", installment_run_date=date.today())
    before_subs = await subscription_rows(store, nowhere)
    before = await records(store)
    async with Sandbox(SandboxConfig(seed=3)) as third:
        # Nowhere has a URL (where any sk_test_ key would be accepted) but no DR_API_KEY_NOWHERE.
        assert await drain_both(store, default, eu, DR_API_URL_NOWHERE=third.url) == 0
        assert len(third.ledger.requests) == 0

    recs = await records(store)
    for sub in home + abroad:
        assert recs[sub]["subscription_job_run_status"] == "Successful", recs[sub]
    assert len(default.ledger.orders) == 2 and len(eu.ledger.orders) == 1
    # Nothing of Nowhere's changed: no installment made, no record claimed, sent, leased or counted.
    assert await subscription_rows(store, nowhere) == before_subs
    for sub in nowhere:
        rec = recs[sub]
        assert rec == before[sub], "a record of a storefront without a key was changed"
        assert (rec["subscription_job_run_status"], rec["subscription_retry_count"]) == ("Open", 0)
        assert rec["dr_checkout_id"] is None and rec["locked_by"] is None and rec["locked_until"] is None
        for sandbox in (default, eu):
            assert checkouts_at(sandbox, rec["upstream_id"]) == [] and orders_at(sandbox, rec["upstream_id"]) == []


async def subscription_rows(store: Store, ids: list[int]) -> list[dict[str, Any]]:
    return [dict(r) for r in await store.pool.fetch("SELECT * FROM subscriptions WHERE id = ANY($1) ORDER BY id",
                                                    ids)]


# -- 5. webhooks per storefront ------------------------------------------------------------------------------------


def event(event_id: str, order_id: str, kind: str = "order.accepted") -> dict[str, Any]:
    return {"id": event_id, "type": kind, "createdTime": "2026-12-01T10:00:00.000Z", "liveMode": False,
            "data": {"object": {"id": order_id, "state": kind.split(".")[-1]}}}


async def post_signed(port: int, path: str, body: bytes, secret: str) -> tuple[int, dict[str, Any]]:
    timestamp = int(time.time())
    headers = {"DigitalRiver-Signature": f"t={timestamp}, {sign(secret, timestamp, body)}",
               "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http, \
            http.post(f"http://127.0.0.1:{port}{path}", data=body, headers=headers) as answer:
        return answer.status, await answer.json(content_type=None)


async def test_each_storefronts_webhooks_are_checked_with_its_own_secret_and_apply_only_to_its_orders(
        store: Store, sandboxes: tuple[Sandbox, Sandbox]) -> None:
    default, eu = sandboxes
    other_secret = "whsec_storefronts_keyless_555555"
    for dr_order_id, storefront in (("ord_home", DEFAULT), ("ord_eu", EU)):
        await store.pool.execute("INSERT INTO orders (dr_order_id, currency, storefront, dr_order_state) "
                                 "VALUES ($1, 'USD', $2, 'pending_payment')", dr_order_id, storefront)
    env = {"DR_WEBHOOK_SECRET": DEFAULT_SECRET, "DR_WEBHOOK_SECRET_EU_STORE": EU_SECRET, "WEBHOOK_PORT": "0",
           # A storefront with a webhook secret but no key: this process serves no path for it.
           "DR_WEBHOOK_SECRET_KEYLESS": other_secret}
    async with two_storefronts(store, default, eu, **env) as engine:
        server = engine._webhooks()
        assert server is not None
        await server.start()
        try:
            port = server.port
            eu_path = f"{PATH}/{EU_LABEL}"
            # EU Store's event about EU Store's order, signed with EU Store's secret.
            mine = json.dumps(event("evt_eu_1", "ord_eu")).encode()
            assert await post_signed(port, eu_path, mine, EU_SECRET) == (200, {"received": "evt_eu_1"})
            # The same path as the storefront's name is written, percent-encoded: the same storefront.
            spelled = json.dumps(event("evt_eu_2", "ord_eu", "order.complete")).encode()
            assert (await post_signed(port, f"{PATH}/EU%20Store", spelled, EU_SECRET))[0] == 200
            # Another storefront's secret does not open EU Store's door, nor EU Store's DefaultStore's.
            wrong = json.dumps(event("evt_eu_3", "ord_eu")).encode()
            status, answer = await post_signed(port, eu_path, wrong, DEFAULT_SECRET)
            assert (status, answer["error"]) == (401, "signature_wrong")
            status, answer = await post_signed(port, PATH, wrong, EU_SECRET)
            assert (status, answer["error"]) == (401, "signature_wrong")
            # A storefront this process has no key for: 404, with its own secret or with any other.
            for path, secret in ((f"{PATH}/KEYLESS", other_secret), (f"{PATH}/NOWHERE", EU_SECRET)):
                status, answer = await post_signed(port, path, wrong, secret)
                assert (status, answer["error"]) == (404, "unknown_storefront"), path
            # EU Store's secret, an event about DefaultStore's order: stored as EU Store's, never applied.
            crossed = json.dumps(event("evt_cross", "ord_home")).encode()
            assert (await post_signed(port, eu_path, crossed, EU_SECRET))[0] == 200
        finally:
            await server.stop()

    stored = {r["event_id"]: dict(r) for r in await store.pool.fetch("SELECT * FROM dr_events")}
    assert set(stored) == {"evt_eu_1", "evt_eu_2", "evt_cross"}  # nothing refused was stored
    assert {r["storefront"] for r in stored.values()} == {EU_LABEL}

    async with asyncio.timeout(BOUND_SECONDS):
        assert await run_job(store, default, "digital-river-events", key=DEFAULT_KEY, **storefront_env(eu)) == 0
    stored = {r["event_id"]: dict(r) for r in await store.pool.fetch("SELECT * FROM dr_events")}
    assert (stored["evt_eu_1"]["status"], stored["evt_eu_2"]["status"]) == ("Processed", "Processed")
    cross = stored["evt_cross"]
    assert cross["status"] == "Ignored", cross
    assert "ord_home" in cross["message"] and f"storefront {DEFAULT}'s" in cross["message"], cross["message"]
    assert f"came for storefront {EU_LABEL}" in cross["message"], cross["message"]
    orders = {r["dr_order_id"]: dict(r) for r in await store.pool.fetch("SELECT * FROM orders")}
    # EU Store's own events moved its order; the crossed one left DefaultStore's order and fulfillments alone.
    assert orders["ord_eu"]["dr_order_state"] == "complete"
    assert orders["ord_home"]["dr_order_state"] == "pending_payment"
    assert orders["ord_home"]["updated_at"] == orders["ord_home"]["created_at"]
    fulfilled = {r["dr_order_id"] for r in await store.pool.fetch("SELECT dr_order_id FROM fulfillments")}
    assert fulfilled == {"ord_eu"}


# -- 6. no key and no secret anywhere ------------------------------------------------------------------------------

CANARY_DEFAULT_KEY = "sk_test_CANARY_default_1a2b3c4d5e6f7a8b"
CANARY_EU_KEY = "sk_test_CANARY_eu_9c8d7e6f5a4b3c2d"
CANARY_EU_SECRET = "whsec_CANARY_eu_webhook_0f1e2d3c4b5a"
CANARIES = (CANARY_DEFAULT_KEY, CANARY_EU_KEY, CANARY_EU_SECRET, CANARY_DEFAULT_KEY[8:], CANARY_EU_KEY[8:],
            CANARY_EU_SECRET[6:], "CANARY")


async def test_no_storefronts_key_or_secret_reaches_logs_http_answers_or_tables(database_url: str,
                                                                               store: Store) -> None:
    """A `serve` process with two storefronts' keys and EU Store's webhook secret charges at both, then EU Store's
    key is refused and its webhooks are posted, well and badly signed: none of the three secrets is printed,
    answered on /metrics, /readyz or /healthz, or stored; /readyz stays ready naming the refused storefront."""
    for _ in range(2):
        await due_subscription(store)
        await due_subscription(store, storefront=EU)
    async with Sandbox(SandboxConfig(api_key=CANARY_DEFAULT_KEY, seed=4)) as default, \
            Sandbox(SandboxConfig(api_key=CANARY_EU_KEY, seed=5)) as eu:
        env = engine_env(database_url, DR_API_KEY=CANARY_DEFAULT_KEY, DR_API_URL=default.url,
                         DR_API_KEY_EU_STORE=CANARY_EU_KEY, DR_API_URL_EU_STORE=eu.url,
                         DR_WEBHOOK_SECRET_EU_STORE=CANARY_EU_SECRET, DR_MAX_REQUESTS_PER_SECOND="1000",
                         DR_MAX_REQUESTS_PER_SECOND_EU_STORE="1000", APP_LOG_LEVEL="DEBUG", LOG_LEVEL="debug",
                         SUBSCRIPTION_INSTALLMENTS_SCHEDULE="every 1s", RECURRING_PAYMENTS_SCHEDULE="every 1s")
        bodies: list[tuple[str, str]] = []
        async with EngineProcess(["serve"], env) as engine:
            [listening] = await engine.wait_for("http_listening")
            [hooks] = await engine.wait_for("webhooks_listening")
            await engine.wait_for("installment_charged", count=4, timeout=BOUND_SECONDS)
            assert len(default.ledger.orders) == len(eu.ledger.orders) == 2
            # EU Store's key is refused from now on, with a new EU installment due.
            eu.configure(api_key="sk_test_someone_elses_key_0000")
            await due_subscription(store, storefront=EU)
            await engine.wait_for("installment_key_refused", timeout=BOUND_SECONDS)
            # EU Store's webhooks, one signed with its secret and one not.
            body = json.dumps(event("evt_canary", "ord_unknown")).encode()
            assert (await post_signed(hooks["port"], f"{PATH}/{EU_LABEL}", body, CANARY_EU_SECRET))[0] == 200
            assert (await post_signed(hooks["port"], f"{PATH}/{EU_LABEL}", body, "whsec_wrong_one_1234"))[0] == 401
            async with aiohttp.ClientSession() as session:
                for path in ("/metrics", "/readyz", "/healthz"):
                    async with session.get(f"http://127.0.0.1:{listening['port']}{path}") as response:
                        bodies.append((path, await response.text()))
                        if path == "/readyz":
                            ready_status, ready = response.status, json.loads(bodies[-1][1])
            engine.signal(signal.SIGTERM)
            assert await engine.wait() == 0, engine.stderr
        assert eu.ledger.count_requests(status=401) >= 1

    # Ready: DefaultStore is served still; EU Store is named as refused.
    assert ready_status == 200, ready
    assert ready["checks"]["digital_river_key"]["refused"] == [EU_LABEL], ready
    assert any(e["event"] == "dr_request" for e in engine.events)  # debug logging was on
    assert engine.find("webhook_refused")  # the badly signed delivery was logged

    seen = [(f"stdout {line}", line) for line in engine.other_lines] + [("stderr", engine.stderr)]
    seen += [(f"log {e.get('event')}", json.dumps(e)) for e in engine.events] + bodies
    tables = ("application_logs", "job_runs", "engine_nodes", "dr_events")
    for table in tables:
        seen += [(table, r["row"]) for r in await store.pool.fetch(f"SELECT t::text AS row FROM {table} t")]
    assert {what for what, _ in seen} >= set(tables), "a table had no row: nothing was checked there"
    for what, text in seen:
        for mark in CANARIES:
            assert mark not in text, f"{what}: {mark} in {text[:300]}"
        assert "bearer" not in text.lower(), f"{what}: {text[:300]}"
