"""The installment pipeline against the local Digital River sandbox and a real PostgreSQL.

subscription-installments makes the records, recurring-payments charges them; every row of the failure table
of docs/billing-rules.md is driven here through the sandbox's scripted behaviours.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from engine.store import Store
from sandbox.server import Sandbox
from tests.integration.engines import drain, engine_on, run_job
from tests.integration.factories import due_subscription
from tests.support import TEST_KEY, sandbox_fixture

sandbox = sandbox_fixture(seed=7)


async def records(store: Store, subscription_id: int | None = None) -> list[dict[str, Any]]:
    rows = await store.pool.fetch(
        "SELECT * FROM subscription_process_data WHERE $1::bigint IS NULL OR subscription_id = $1 "
        "ORDER BY subscription_id, installment_number", subscription_id)
    return [dict(r) for r in rows]


async def test_one_installment_goes_from_subscription_to_digital_river_order(store: Store, sandbox: Sandbox) -> None:
    sub = await due_subscription(store, unit_price="25.00", remaining=3)
    assert await drain(store, sandbox) == 0

    [rec] = await records(store, sub)
    assert rec["subscription_job_run_status"] == "Successful" and rec["is_recurring_payment_processed"]
    assert rec["locked_by"] is None and rec["subscription_retry_count"] == 0
    [dr_order] = sandbox.ledger.orders_for_upstream(rec["upstream_id"])
    assert rec["dr_order_id"] == dr_order["id"] and rec["dr_checkout_id"] == dr_order["checkoutId"]
    checkout = sandbox.ledger.checkouts[rec["dr_checkout_id"]]
    assert checkout["chargeType"] == "merchant_initiated" and checkout["customerId"] == "cus_acme"
    assert checkout["sourceId"] == "src_card_ok" and checkout["upstreamId"] == rec["upstream_id"]
    [item] = checkout["items"]
    assert item["skuId"] == "sku_widget" and item["quantity"] == 1 and item["price"] == 25
    assert item["subscriptionInfo"]["subscriptionId"] == str(sub)
    assert item["subscriptionInfo"]["billingAgreementId"].startswith("ba_")

    order = await store.pool.fetchrow("SELECT * FROM orders WHERE id = $1", rec["order_id"])
    assert order["dr_order_source"] == "Subscription—Installment"
    assert order["dr_order_id"] == dr_order["id"] and order["dr_order_state"] == "accepted"
    assert order["parent_order_id"] == rec["parent_order_id"]
    assert str(order["total_amount"]) == "27.06" and str(order["total_tax"]) == "2.06"  # US 8.25 % tax
    [line] = await store.pool.fetch("SELECT * FROM order_items WHERE order_id = $1", order["id"])
    assert line["dr_order_item_id"] == dr_order["items"][0]["id"] and str(line["tax_amount"]) == "2.06"
    cart = await store.pool.fetchrow("SELECT * FROM carts WHERE id = $1", rec["cart_id"])
    assert (cart["status"], cart["dr_payment_state"], cart["dr_order_id"]) == ("Closed", "Successful", dr_order["id"])
    s = await store.pool.fetchrow("SELECT * FROM subscriptions WHERE id = $1", sub)
    assert (s["installment_count"], s["installment_count_remaining"], s["status"]) == (1, 2, "Active")
    assert s["installment_next_run_date"] > date.today()


async def test_last_installment_completes_the_subscription(store: Store, sandbox: Sandbox) -> None:
    sub = await due_subscription(store, remaining=1)
    assert await drain(store, sandbox) == 0
    s = await store.pool.fetchrow("SELECT status, installment_count_remaining FROM subscriptions WHERE id = $1", sub)
    assert (s["status"], s["installment_count_remaining"]) == ("Completed", 0)


async def test_many_subscriptions_are_each_charged_exactly_once(store: Store, sandbox: Sandbox) -> None:
    subs = [await due_subscription(store, months_behind=i % 3) for i in range(40)]
    assert await drain(store, sandbox, RECURRING_PAYMENT_BATCH_SIZE="7",
                       CC_SUBSCRIPTION_PROCESSOR_BATCH_SIZE="9") == 0
    recs = await records(store)
    assert len(recs) == sum(i % 3 + 1 for i in range(len(subs)))
    assert all(r["subscription_job_run_status"] == "Successful" for r in recs)
    assert sandbox.ledger.duplicate_upstream_ids() == {}
    assert len(sandbox.ledger.orders) == len(recs)
    assert {r["dr_order_id"] for r in recs} == set(sandbox.ledger.orders)


async def test_catch_up_charges_missed_installments_oldest_first(store: Store, sandbox: Sandbox) -> None:
    sub = await due_subscription(store, months_behind=4, remaining=12)
    assert await drain(store, sandbox) == 0
    recs = await records(store, sub)
    assert [r["installment_number"] for r in recs] == [1, 2, 3, 4, 5]
    assert [r["installment_run_date"] for r in recs] == sorted(r["installment_run_date"] for r in recs)
    # Created oldest first, ids included (the contract), for many subscriptions in one statement too.
    assert [r["id"] for r in recs] == sorted(r["id"] for r in recs)
    others = [await due_subscription(store, months_behind=3, remaining=12) for _ in range(20)]
    assert await drain(store, sandbox) == 0
    for other in others:
        numbers = [r["installment_number"] for r in sorted(await records(store, other), key=lambda r: r["id"])]
        assert numbers == [1, 2, 3, 4]
    order_seq = list(sandbox.ledger.orders)  # creation order
    assert [order_seq.index(r["dr_order_id"]) for r in recs] == sorted(order_seq.index(r["dr_order_id"]) for r in recs)


async def test_month_end_anchor_dates_follow_the_anchor(store: Store, sandbox: Sandbox) -> None:
    today = date.today()
    # Anchored on a 31st, three installments behind: dates are Jan 31-style clamps, never drift to the 28th.
    sub = await due_subscription(store, installment_anchor_date=date(2025, 12, 31),
                                 installment_next_run_date=date(2026, 1, 31), installment_count=1, remaining=5)
    async with engine_on(store, sandbox) as engine:
        assert await engine.run_job("subscription-installments") == 0
    recs = await records(store, sub)
    expected = [date(2026, 1, 31), date(2026, 2, 28), date(2026, 3, 31), date(2026, 4, 30), date(2026, 5, 31)]
    assert [r["installment_run_date"] for r in recs] == [d for d in expected if d <= today][:5]
    assert [r["installment_number"] for r in recs] == list(range(2, 2 + len(recs)))


async def test_due_date_is_today_in_the_account_time_zone(store: Store, sandbox: Sandbox) -> None:
    zone = "Pacific/Kiritimati"  # UTC+14
    local_today = datetime.now(ZoneInfo(zone)).date()
    due = await due_subscription(store, time_zone=zone, installment_next_run_date=local_today)
    not_yet = await due_subscription(store, time_zone=zone, installment_next_run_date=local_today + timedelta(days=1))
    behind_zone = "Pacific/Pago_Pago"  # UTC-11
    not_yet_there = await due_subscription(store, time_zone=behind_zone,
                                           installment_next_run_date=datetime.now(ZoneInfo(behind_zone)).date()
                                           + timedelta(days=1))
    async with engine_on(store, sandbox) as engine:
        assert await engine.run_job("subscription-installments") == 0
    assert len(await records(store, due)) == 1
    assert await records(store, not_yet) == [] and await records(store, not_yet_there) == []


async def test_unknown_time_zone_suspends_the_subscription_and_spares_the_rest(store: Store,
                                                                             sandbox: Sandbox) -> None:
    bad = await due_subscription(store, time_zone="Mars/Olympus_Mons")
    good = await due_subscription(store)
    async with engine_on(store, sandbox) as engine:
        assert await engine.run_job("subscription-installments") == 0
    s = await store.pool.fetchrow("SELECT status, last_error_message FROM subscriptions WHERE id = $1", bad)
    assert s["status"] == "Suspended" and "accounts.time_zone 'Mars/Olympus_Mons'" in s["last_error_message"]
    assert len(await records(store, good)) == 1


async def test_soft_decline_waits_a_day_and_burns_the_checkout(store: Store, sandbox: Sandbox) -> None:
    sub = await due_subscription(store, source="src_soft_decline_insufficient_funds")
    before = datetime.now(UTC)
    assert await drain(store, sandbox) == 0
    [rec] = await records(store, sub)
    assert rec["subscription_job_run_status"] == "Open" and not rec["is_recurring_payment_processed"]
    assert rec["subscription_retry_count"] == 1
    assert rec["next_attempt_at"] >= before + timedelta(hours=24)
    assert rec["dr_checkout_id"] is None and rec["last_error_code"] == "insufficient_funds"
    assert "insufficient_funds" in rec["last_error_message"]
    cart = await store.pool.fetchrow("SELECT * FROM carts WHERE id = $1", rec["cart_id"])
    assert cart["dr_payment_state"] == "Declined" and cart["status"] == "Open-DR"
    assert len(sandbox.ledger.orders) == 0 and len(sandbox.ledger.declines) == 1
    attempt = await store.pool.fetchrow("SELECT outcome, code FROM payment_attempts")
    assert dict(attempt) == {"outcome": "soft_decline", "code": "insufficient_funds"}
    log_row = await store.pool.fetchrow("SELECT * FROM application_logs WHERE record_id = $1", str(rec["id"]))
    assert log_row is not None and log_row["response"] is not None


async def test_soft_decline_past_the_retry_count_fails_the_record(store: Store, sandbox: Sandbox) -> None:
    sub = await due_subscription(store, source="src_soft_decline_do_not_honor")
    async with engine_on(store, sandbox) as engine:
        await engine.run_job("subscription-installments")
    await store.pool.execute("UPDATE subscription_process_data SET subscription_retry_count = 3")
    assert await drain(store, sandbox, SUBSCRIPTION_RETRY_COUNT="3") == 0
    [rec] = await records(store, sub)
    assert rec["subscription_job_run_status"] == "Failed" and rec["subscription_retry_count"] == 4


async def test_hard_decline_fails_at_once(store: Store, sandbox: Sandbox) -> None:
    sub = await due_subscription(store, source="src_hard_decline_stop_recurring")
    assert await drain(store, sandbox) == 0
    [rec] = await records(store, sub)
    assert rec["subscription_job_run_status"] == "Failed" and rec["subscription_retry_count"] == 1
    assert rec["last_error_code"] == "stop_recurring"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"payment_active": False}, "stored_payments.is_active"),
    ({"source": ""}, "stored_payments.dr_source_id"),
    ({"account": {"dr_customer_id": None}}, "accounts.dr_customer_id"),
    ({"product": {"dr_sku_id": None, "tax_code": None}}, "products.dr_sku_id"),
    ({"quantity": 0}, "subscriptions.quantity"),
    ({"unit_price": "0"}, "subscriptions.unit_price"),
    ({"currency": "XYZ"}, "subscriptions.currency"),
    ({"dr_billing_agreement_id": None, "parent_order_item_id": None}, "subscriptions.dr_billing_agreement_id"),
])
async def test_bad_data_fails_the_record_naming_the_field_and_spares_its_neighbours(
        store: Store, sandbox: Sandbox, kwargs: dict[str, Any], field: str) -> None:
    bad = await due_subscription(store, **kwargs)
    good = await due_subscription(store)
    assert await drain(store, sandbox) == 0
    [rec] = await records(store, bad)
    assert rec["subscription_job_run_status"] == "Failed" and rec["subscription_retry_count"] == 1
    assert field in rec["last_error_message"]
    assert rec["dr_checkout_id"] is None  # never sent to Digital River
    assert [r["subscription_job_run_status"] for r in await records(store, good)] == ["Successful"]
    assert sandbox.ledger.count_requests("POST", "/checkouts") == 1


async def test_digital_river_400_fails_the_record_with_its_message(store: Store, sandbox: Sandbox) -> None:
    sub = await due_subscription(store, product={"dr_sku_id": "sku_invalid_gone"})
    assert await drain(store, sandbox) == 0
    [rec] = await records(store, sub)
    assert rec["subscription_job_run_status"] == "Failed"
    assert "400" in rec["last_error_message"] and "skuId" in rec["last_error_message"]


async def test_outage_keeps_the_record_open_and_backs_off_without_counting(store: Store, sandbox: Sandbox) -> None:
    sub = await due_subscription(store)
    async with engine_on(store, sandbox) as engine:
        await engine.run_job("subscription-installments")
    sandbox.configure(error_rate=1.0)
    before = datetime.now(UTC)
    assert await run_job(store, sandbox, "recurring-payments") == 0
    [rec] = await records(store, sub)
    assert rec["subscription_job_run_status"] == "Open" and rec["subscription_retry_count"] == 0
    assert rec["outage_count"] == 1 and rec["last_error_code"] == "dr_unavailable"
    assert before + timedelta(seconds=50) < rec["next_attempt_at"] < before + timedelta(minutes=3)
    # Outages in a row back off further: 2 minutes after the second.
    await store.pool.execute("UPDATE subscription_process_data SET next_attempt_at = now()")
    before = datetime.now(UTC)
    assert await run_job(store, sandbox, "recurring-payments") == 0
    [rec] = await records(store, sub)
    assert rec["outage_count"] == 2 and rec["next_attempt_at"] > before + timedelta(seconds=110)
    sandbox.configure(error_rate=0.0)
    await store.pool.execute("UPDATE subscription_process_data SET next_attempt_at = now()")
    assert await drain(store, sandbox) == 0
    [rec] = await records(store, sub)
    assert rec["subscription_job_run_status"] == "Successful" and rec["outage_count"] == 0


async def test_unknown_outcome_is_reconciled_into_the_one_order(store: Store, sandbox: Sandbox) -> None:
    subs = [await due_subscription(store) for _ in range(6)]
    sandbox.configure(drop_after_order_rate=1.0, fault_endpoints=["POST /orders"])
    assert await drain(store, sandbox) == 0
    recs = await records(store)
    assert len(recs) == len(subs)
    assert all(r["subscription_job_run_status"] == "Successful" for r in recs)
    assert len(sandbox.ledger.dropped_orders) == len(subs)  # every answer was lost…
    assert len(sandbox.ledger.orders) == len(subs)  # …and every order adopted, none made twice
    assert sandbox.ledger.duplicate_upstream_ids() == {}


async def test_checkout_kept_after_a_failed_submit_is_resubmitted_not_replaced(store: Store,
                                                                             sandbox: Sandbox) -> None:
    sub = await due_subscription(store)
    async with engine_on(store, sandbox) as engine:
        await engine.run_job("subscription-installments")
    sandbox.configure(error_rate=1.0, fault_endpoints=["POST /orders"])
    assert await run_job(store, sandbox, "recurring-payments") == 0
    [rec] = await records(store, sub)
    assert rec["dr_checkout_id"] and rec["subscription_job_run_status"] == "Open"
    sandbox.configure(error_rate=0.0)
    await store.pool.execute("UPDATE subscription_process_data SET next_attempt_at = now()")
    assert await drain(store, sandbox) == 0
    [after] = await records(store, sub)
    assert after["subscription_job_run_status"] == "Successful"
    assert after["dr_checkout_id"] == rec["dr_checkout_id"]
    assert sandbox.ledger.count_requests("POST", "/checkouts") == 1


async def test_refused_key_stops_the_run_and_leaves_records_untouched(store: Store, sandbox: Sandbox) -> None:
    sub = await due_subscription(store)
    async with engine_on(store, sandbox) as engine:
        await engine.run_job("subscription-installments")
    sandbox.configure(api_key="sk_test_the_only_good_key")
    assert await run_job(store, sandbox, "recurring-payments") == 1
    [rec] = await records(store, sub)
    assert rec["subscription_job_run_status"] == "Open" and rec["subscription_retry_count"] == 0
    assert rec["locked_by"] is None and rec["outage_count"] == 0
    run = await store.pool.fetchrow("SELECT status, error FROM job_runs WHERE job = 'recurring-payments'")
    assert run["status"] == "failed" and "refused the API key" in run["error"]
    assert TEST_KEY not in json.dumps([dict(r) for r in await store.pool.fetch("SELECT * FROM application_logs")],
                                      default=str)


async def test_a_decline_holds_the_subscription_back_for_a_day(store: Store, sandbox: Sandbox) -> None:
    sub = await due_subscription(store, months_behind=1, source="src_card_ok")
    async with engine_on(store, sandbox) as engine:
        await engine.run_job("subscription-installments")
    first, _ = await records(store, sub)
    # The first installment was declined two hours ago and has since failed; the second may not go out today.
    await store.pool.execute(
        "UPDATE subscription_process_data SET subscription_job_run_status = 'Failed' WHERE id = $1", first["id"])
    await store.pool.execute(
        "INSERT INTO payment_attempts (process_data_id, subscription_id, outcome, code, created_at) "
        "VALUES ($1, $2, 'hard_decline', 'declined', now() - interval '2 hours')", first["id"], sub)
    assert await run_job(store, sandbox, "recurring-payments") == 0
    [_, rec] = await records(store, sub)
    assert rec["subscription_job_run_status"] == "Open" and rec["subscription_retry_count"] == 0
    assert rec["last_error_code"] == "decline_limit"
    wait = rec["next_attempt_at"] - datetime.now(UTC)
    assert timedelta(hours=21) < wait < timedelta(hours=22, minutes=1)
    assert sandbox.ledger.count_requests() == 0


async def test_four_declines_in_thirty_days_hold_the_subscription_back(store: Store, sandbox: Sandbox) -> None:
    sub = await due_subscription(store)
    async with engine_on(store, sandbox) as engine:
        await engine.run_job("subscription-installments")
    [rec] = await records(store, sub)
    for days in (26, 20, 10, 3):
        await store.pool.execute(
            "INSERT INTO payment_attempts (process_data_id, subscription_id, outcome, created_at) "
            "VALUES ($1, $2, 'soft_decline', now() - make_interval(days => $3))", rec["id"], sub, days)
    assert await run_job(store, sandbox, "recurring-payments", SUBSCRIPTION_RETRY_COUNT="50") == 0
    [rec] = await records(store, sub)
    assert rec["last_error_code"] == "decline_limit" and rec["subscription_retry_count"] == 0
    wait = rec["next_attempt_at"] - datetime.now(UTC)
    assert timedelta(days=3, hours=23) < wait < timedelta(days=4, hours=1)  # the 26-day-old one ages out
    assert sandbox.ledger.count_requests() == 0


async def test_client_budget_under_the_limit_draws_no_429s(store: Store, sandbox: Sandbox) -> None:
    for _ in range(20):
        await due_subscription(store)
    sandbox.configure(rate_limit=40, retry_after_seconds=1)
    assert await drain(store, sandbox, DR_MAX_REQUESTS_PER_SECOND="30") == 0
    assert sandbox.ledger.count_requests(status=429) == 0
    assert len(sandbox.ledger.orders) == 20


async def test_429s_postpone_without_counting_and_each_record_is_charged_once(store: Store,
                                                                             sandbox: Sandbox) -> None:
    for _ in range(30):
        await due_subscription(store)
    sandbox.configure(rate_limit=40, retry_after_seconds=0.5)
    for _ in range(10):
        assert await drain(store, sandbox, RECURRING_PAYMENTS_CONCURRENCY="32") == 0
        recs = await records(store)
        if all(r["subscription_job_run_status"] == "Successful" for r in recs):
            break
        assert all(r["subscription_retry_count"] == 0 for r in recs)  # a 429 is not an attempt
        await store.pool.execute("UPDATE subscription_process_data SET next_attempt_at = now()")
    assert sandbox.ledger.count_requests(status=429) > 0
    assert all(r["subscription_job_run_status"] == "Successful" for r in recs)
    assert len(sandbox.ledger.orders) == len(recs) == 30
    assert sandbox.ledger.duplicate_upstream_ids() == {}


async def test_query_limit_bounds_one_run(store: Store, sandbox: Sandbox) -> None:
    for _ in range(5):
        await due_subscription(store)
    async with engine_on(store, sandbox, CC_SUBSCRIPTIONS_BATCH_QUERY_LIMIT="3",
                         RECURRING_PAYMENT_PROCESS_QUERY_LIMIT="2") as engine:
        await engine.run_job("subscription-installments")
        assert len(await records(store)) == 3
        await engine.run_job("recurring-payments")
    assert len([r for r in await records(store) if r["subscription_job_run_status"] == "Successful"]) == 2


async def test_drain_ends_while_later_installments_wait_behind_a_declined_one(store: Store,
                                                                            sandbox: Sandbox) -> None:
    sub = await due_subscription(store, months_behind=2, source="src_soft_decline_insufficient_funds")
    assert await drain(store, sandbox) == 0  # returns: nothing is due until the declined one's day has passed
    first, *later = await records(store, sub)
    assert first["subscription_job_run_status"] == "Open" and first["subscription_retry_count"] == 1
    assert [r["subscription_retry_count"] for r in later] == [0, 0]
    assert sandbox.ledger.count_requests("POST", "/orders") == 1
