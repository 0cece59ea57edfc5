"""digital-river-events: every row of CONTRACT.md's effects table, applied once and in order, against a real
PostgreSQL and the sandbox. The installment records are made Pending the way the engine makes them: a drain
whose POST /orders answers `pending_payment` (sandbox source `src_pending_payment`)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

from engine.store import Store
from sandbox.server import Sandbox
from tests.db import open_store
from tests.integration.engines import drain, run_job
from tests.integration.factories import due_subscription
from tests.support import sandbox_fixture

EVENTS = "digital-river-events"
sandbox = sandbox_fixture()
_ids = count(1)


async def pending_record(store: Store, sandbox: Sandbox, source: str = "src_pending_payment") -> dict[str, Any]:
    sub = await due_subscription(store, source=source)
    assert await drain(store, sandbox) == 0
    return await record_of(store, sub)


async def record_of(store: Store, sub: int) -> dict[str, Any]:
    return dict(await store.pool.fetchrow("SELECT * FROM subscription_process_data WHERE subscription_id = $1", sub))


async def deliver(store: Store, sandbox: Sandbox, kind: str, order_id: str, *, at: datetime | None = None,
                  **changes: Any) -> str:
    """Store one event as a webhook would, with the order as the sandbox holds it (`changes` applied)."""
    order = dict(sandbox.ledger.orders.get(order_id) or {"id": order_id}) | changes
    event_id = f"evt_test_{next(_ids)}"
    created = (at or datetime.now(UTC)).isoformat()
    row = {"event_id": event_id, "type": kind, "storefront": "DefaultStore", "dr_order_id": order_id,
           "dr_created_at": created,
           "payload": {"id": event_id, "type": kind, "createdTime": created, "data": {"object": order}}}
    await store.fetch("store_events", json.dumps([row]), "webhook")
    return event_id


async def event_status(store: Store, event_id: str) -> tuple[str, str]:
    row = await store.pool.fetchrow("SELECT status, message FROM dr_events WHERE event_id = $1", event_id)
    return row["status"], row["message"]


async def attempts(store: Store, record_id: int) -> list[tuple[str, str | None]]:
    rows = await store.pool.fetch("SELECT outcome, dr_order_id FROM payment_attempts WHERE process_data_id = $1 "
                                  "ORDER BY id", record_id)
    return [(r["outcome"], r["dr_order_id"]) for r in rows]


async def order_row(store: Store, dr_order_id: str) -> dict[str, Any]:
    return dict(await store.pool.fetchrow("SELECT * FROM orders WHERE dr_order_id = $1", dr_order_id))


async def test_an_unconfirmed_order_leaves_the_installment_pending_not_due_and_not_paid(store: Store,
                                                                                       sandbox: Sandbox) -> None:
    rec = await pending_record(store, sandbox)
    assert (rec["subscription_job_run_status"], rec["is_recurring_payment_processed"]) == ("Pending", False)
    assert rec["dr_order_id"] and rec["order_id"]
    assert rec["next_attempt_at"] > datetime.now(UTC) + timedelta(minutes=59)  # looked at after an hour
    assert (await order_row(store, rec["dr_order_id"]))["dr_order_state"] == "pending_payment"
    assert await attempts(store, rec["id"]) == []  # not charged yet
    cart = await store.pool.fetchrow("SELECT status, dr_payment_state FROM carts WHERE id = $1", rec["cart_id"])
    assert (cart["status"], cart["dr_payment_state"]) == ("Closed", None)  # its order exists; paid, not yet
    assert await store.fetchval("count_due_payment_records") == 0
    assert len(sandbox.ledger.orders_for_upstream(rec["upstream_id"])) == 1


async def test_order_accepted_pays_the_installment_and_opens_the_order_for_fulfillment(store: Store,
                                                                                      sandbox: Sandbox) -> None:
    rec = await pending_record(store, sandbox)
    event_id = await deliver(store, sandbox, "order.accepted", rec["dr_order_id"], state="accepted")
    assert await run_job(store, sandbox, EVENTS) == 0
    now = await record_of(store, rec["subscription_id"])
    assert (now["subscription_job_run_status"], now["is_recurring_payment_processed"]) == ("Successful", True)
    assert await attempts(store, rec["id"]) == [("charged", rec["dr_order_id"])]
    cart = await store.pool.fetchrow("SELECT status, dr_payment_state FROM carts WHERE id = $1", rec["cart_id"])
    assert (cart["status"], cart["dr_payment_state"]) == ("Closed", "Successful")
    order = await order_row(store, rec["dr_order_id"])
    assert order["dr_order_state"] == "accepted"
    ful = await store.pool.fetchrow("SELECT * FROM fulfillments WHERE order_id = $1", order["id"])
    assert (ful["dr_order_state"], ful["ofi_received"], ful["dr_order_id"]) == ("accepted", True, rec["dr_order_id"])
    status, message = await event_status(store, event_id)
    assert status == "Processed" and f"installment record {rec['id']} paid" in message


async def test_order_charge_failed_is_a_soft_decline_and_the_failed_order_is_never_adopted(
        store: Store, sandbox: Sandbox) -> None:
    rec = await pending_record(store, sandbox)
    failed_order = rec["dr_order_id"]
    await deliver(store, sandbox, "order.charge.failed", failed_order)
    assert await run_job(store, sandbox, EVENTS) == 0
    now = await record_of(store, rec["subscription_id"])
    assert (now["subscription_job_run_status"], now["subscription_retry_count"]) == ("Open", 1)
    assert now["next_attempt_at"] > datetime.now(UTC) + timedelta(hours=23)  # once a day
    assert (now["dr_order_id"], now["order_id"], now["dr_checkout_id"]) == (None, None, None)
    assert now["dr_failed_order_ids"] == [failed_order]
    assert now["last_error_code"] == "charge_failed"
    assert await attempts(store, rec["id"]) == [("soft_decline", failed_order)]
    cart = await store.pool.fetchrow("SELECT * FROM carts WHERE id = $1", rec["cart_id"])
    assert (cart["status"], cart["dr_payment_state"], cart["dr_order_id"]) == ("Open-DR", "Declined", None)
    order = await order_row(store, failed_order)  # kept, as history
    # Its charge failed; its own state moves only with its own events (order.cancelled, …).
    assert (order["dr_order_state"], order["dr_charge_state"]) == ("pending_payment", "failed")
    logs = await store.pool.fetch("SELECT logging_level, message, record_id FROM application_logs "
                                  "WHERE module_name = $1", EVENTS)
    assert [(r["logging_level"], r["record_id"]) for r in logs] == [("WARN", str(rec["id"]))]
    assert "could not charge" in logs[0]["message"]

    # A day later the next attempt makes a new checkout; Digital River refuses the order (500, no order made),
    # and the lookup by upstream id lists only the failed order: it must not be adopted.
    await store.pool.execute("UPDATE payment_attempts SET created_at = now() - interval '25 hours'")
    await store.pool.execute("UPDATE subscription_process_data SET next_attempt_at = now() WHERE id = $1", rec["id"])
    await store.pool.execute("UPDATE stored_payments SET dr_source_id = 'src_card_ok'")
    sandbox.configure(error_rate=1.0, fault_endpoints=["POST /orders"])
    assert await drain(store, sandbox) == 0
    now = await record_of(store, rec["subscription_id"])
    assert now["subscription_job_run_status"] == "Open" and now["dr_order_id"] is None
    assert now["dr_checkout_id"] not in (None, rec["dr_checkout_id"])  # the new checkout, kept for its lookup

    # Then it goes through: a new order, the only live one for this installment.
    sandbox.configure(error_rate=0.0)
    await store.pool.execute("UPDATE subscription_process_data SET next_attempt_at = now() WHERE id = $1", rec["id"])
    assert await drain(store, sandbox) == 0
    now = await record_of(store, rec["subscription_id"])
    assert now["subscription_job_run_status"] == "Successful" and now["dr_order_id"] != failed_order
    orders = sandbox.ledger.orders_for_upstream(rec["upstream_id"])
    assert {o["id"] for o in orders} == {failed_order, now["dr_order_id"]}
    assert await attempts(store, rec["id"]) == [("soft_decline", failed_order), ("charged", now["dr_order_id"])]


async def test_order_blocked_is_a_hard_decline(store: Store, sandbox: Sandbox) -> None:
    rec = await pending_record(store, sandbox, source="src_in_review")
    await deliver(store, sandbox, "order.blocked", rec["dr_order_id"], state="blocked")
    assert await run_job(store, sandbox, EVENTS) == 0
    now = await record_of(store, rec["subscription_id"])
    assert (now["subscription_job_run_status"], now["last_error_code"]) == ("Failed", "order_blocked")
    assert await store.pool.fetchval("SELECT logging_level FROM application_logs WHERE module_name = $1 "
                                     "AND record_id = $2", EVENTS, str(rec["id"])) == "ERROR"
    assert await attempts(store, rec["id"]) == [("hard_decline", rec["dr_order_id"])]
    assert (await order_row(store, rec["dr_order_id"]))["dr_order_state"] == "blocked"


async def test_order_cancelled_sends_the_installment_back_to_open_as_a_failed_attempt(store: Store,
                                                                                     sandbox: Sandbox) -> None:
    rec = await pending_record(store, sandbox)
    await deliver(store, sandbox, "order.cancelled", rec["dr_order_id"], state="cancelled")
    assert await run_job(store, sandbox, EVENTS) == 0
    now = await record_of(store, rec["subscription_id"])
    assert (now["subscription_job_run_status"], now["subscription_retry_count"], now["last_error_code"]) == (
        "Open", 1, "order_cancelled")
    assert (await order_row(store, rec["dr_order_id"]))["dr_order_state"] == "cancelled"


async def test_order_complete_sets_ocn_and_a_late_accepted_never_moves_the_state_back(store: Store,
                                                                                    sandbox: Sandbox) -> None:
    rec = await pending_record(store, sandbox)
    order_id = rec["dr_order_id"]
    now = datetime.now(UTC)
    # Created in this order by Digital River, delivered the other way round.
    complete = await deliver(store, sandbox, "order.complete", order_id, at=now, state="complete")
    accepted = await deliver(store, sandbox, "order.accepted", order_id, at=now - timedelta(seconds=5),
                             state="accepted")
    assert await run_job(store, sandbox, EVENTS) == 0
    order = await order_row(store, order_id)
    assert order["dr_order_state"] == "complete"
    ful = await store.pool.fetchrow("SELECT * FROM fulfillments WHERE order_id = $1", order["id"])
    assert (ful["dr_order_state"], ful["ofi_received"], ful["ocn_received"]) == ("complete", True, True)
    assert (await record_of(store, rec["subscription_id"]))["subscription_job_run_status"] == "Successful"
    applied = await store.pool.fetch("SELECT event_id FROM dr_events WHERE event_id = ANY($1) "
                                     "ORDER BY processed_at, id", [complete, accepted])
    assert [r["event_id"] for r in applied] == [accepted, complete]  # Digital River's order, not arrival's
    # And one more accepted, delivered late: nothing moves back.
    await deliver(store, sandbox, "order.accepted", order_id, state="accepted")
    assert await run_job(store, sandbox, EVENTS) == 0
    assert (await order_row(store, order_id))["dr_order_state"] == "complete"
    assert await attempts(store, rec["id"]) == [("charged", order_id)]


async def test_a_failed_capture_is_written_on_the_fulfillment_and_logged(store: Store, sandbox: Sandbox) -> None:
    rec = await pending_record(store, sandbox)
    await deliver(store, sandbox, "order.accepted", rec["dr_order_id"], state="accepted")
    event_id = await deliver(store, sandbox, "order.charge.capture.failed", rec["dr_order_id"])
    assert await run_job(store, sandbox, EVENTS) == 0
    ful = await store.pool.fetchrow("SELECT message FROM fulfillments WHERE dr_order_id = $1", rec["dr_order_id"])
    assert "could not capture" in ful["message"] and event_id in ful["message"]
    logs = await store.pool.fetch("SELECT logging_level, message FROM application_logs WHERE module_name = $1",
                                  EVENTS)
    assert any(r["logging_level"] == "ERROR" and "could not capture" in r["message"] for r in logs)


async def test_other_types_and_unknown_orders_are_stored_and_ignored(store: Store, sandbox: Sandbox) -> None:
    rec = await pending_record(store, sandbox)
    other = await deliver(store, sandbox, "refund.complete", rec["dr_order_id"])
    stranger = await deliver(store, sandbox, "order.accepted", "ord_not_ours", state="accepted")
    assert await run_job(store, sandbox, EVENTS) == 0
    assert (await event_status(store, other))[0] == "Ignored"
    status, message = await event_status(store, stranger)
    assert status == "Ignored" and "ord_not_ours" in message
    assert (await record_of(store, rec["subscription_id"]))["subscription_job_run_status"] == "Pending"


async def test_two_processes_applying_the_same_events_apply_each_once(database_url: str, store: Store,
                                                                     sandbox: Sandbox) -> None:
    records = [await pending_record(store, sandbox) for _ in range(12)]
    for rec in records:
        await deliver(store, sandbox, "order.accepted", rec["dr_order_id"], state="accepted")
        await deliver(store, sandbox, "order.complete", rec["dr_order_id"], state="complete")
    async with open_store(database_url, "engine-a") as a, open_store(database_url, "engine-b") as b:
        codes = await asyncio.gather(run_job(a, sandbox, EVENTS), run_job(b, sandbox, EVENTS))
    assert codes == [0, 0]
    assert await store.pool.fetchval("SELECT count(*) FROM dr_events WHERE status = 'Pending'") == 0
    charged = await store.pool.fetchval("SELECT count(*) FROM payment_attempts WHERE outcome = 'charged'")
    assert charged == len(records)
    runs = await store.pool.fetch("SELECT claimed FROM job_runs WHERE job = $1", EVENTS)
    # Each event (ours and those the poll found) applied by exactly one of the two processes.
    assert sum(r["claimed"] for r in runs) == await store.pool.fetchval("SELECT count(*) FROM dr_events")


async def test_a_pending_installment_without_events_for_an_hour_is_looked_up_by_its_order(
        store: Store, sandbox: Sandbox) -> None:
    rec = await pending_record(store, sandbox)
    # Digital River accepted it, but no event was ever heard (no webhook, nothing to poll).
    sandbox.ledger.orders[rec["dr_order_id"]]["state"] = "accepted"
    assert await store.fetchval("count_pending_records_due", ["DefaultStore"]) == 0
    assert await run_job(store, sandbox, EVENTS) == 0
    assert (await record_of(store, rec["subscription_id"]))["subscription_job_run_status"] == "Pending"
    assert sandbox.ledger.count_requests("GET", f"/orders/{rec['dr_order_id']}") == 0  # not before the hour

    await store.pool.execute("UPDATE subscription_process_data SET next_attempt_at = now() WHERE id = $1", rec["id"])
    assert await drain(store, sandbox) == 0  # a look that is due is work for drain
    now = await record_of(store, rec["subscription_id"])
    assert now["subscription_job_run_status"] == "Successful"
    assert sandbox.ledger.count_requests("GET", f"/orders/{rec['dr_order_id']}") == 1


async def test_a_pending_installment_still_unconfirmed_is_looked_at_again_an_hour_later(store: Store,
                                                                                       sandbox: Sandbox) -> None:
    rec = await pending_record(store, sandbox)
    await store.pool.execute("UPDATE subscription_process_data SET next_attempt_at = now() WHERE id = $1", rec["id"])
    assert await run_job(store, sandbox, EVENTS) == 0
    now = await record_of(store, rec["subscription_id"])
    assert now["subscription_job_run_status"] == "Pending" and now["locked_by"] is None
    assert now["next_attempt_at"] > datetime.now(UTC) + timedelta(minutes=59)


async def test_a_charge_failed_event_about_the_charge_names_its_order_and_a_hard_code_fails_at_once(
        store: Store, sandbox: Sandbox) -> None:
    # data.object may be the charge (Charge in Digital River's SDK: id, orderId, state, failureCode).
    rec = await pending_record(store, sandbox)
    event_id = "evt_charge_object"
    payload = {"id": event_id, "type": "order.charge.failed", "createdTime": datetime.now(UTC).isoformat(),
               "data": {"object": {"id": "chg_1", "orderId": rec["dr_order_id"], "state": "failed",
                                   "failureCode": "fraud_block"}}}
    from engine.digital_river import parse_event
    from engine.webhooks import event_row
    await store.fetch("store_events", json.dumps([event_row(parse_event(payload), "DefaultStore")]), "webhook")
    assert await run_job(store, sandbox, EVENTS) == 0
    now = await record_of(store, rec["subscription_id"])
    assert (now["subscription_job_run_status"], now["last_error_code"]) == ("Failed", "fraud_block")
    assert await attempts(store, rec["id"]) == [("hard_decline", rec["dr_order_id"])]
    assert (await event_status(store, event_id))[0] == "Processed"
