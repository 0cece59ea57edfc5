"""Checks of the sandbox's ledger (what Digital River did) against the store: nobody charged twice."""

from __future__ import annotations

from collections import Counter
from typing import Any

from engine.store import Store
from sandbox.server import Sandbox
from tests.db import fetch, fetchval


async def assert_charged_once(db: Store | str, sandbox: Sandbox, *, successful: int | None = None,
                              records: int | None = None) -> list[dict[str, Any]]:
    """Exactly one live Digital River order for each Successful (or Pending) installment record, the one the record
    names, and none for any other record (orders that failed after they were made, kept in the record's
    dr_failed_order_ids, took no money and must be dead in the sandbox too); no upstream id and no checkout with two orders, and no order besides; and the store
    agreeing: one installment order and one charged payment attempt per Successful record.

    `db` is a store or a dsn. `successful`: how many records must be Successful; `records`: how many there must be
    in all. Returns the records (subscription_process_data rows, by id) for the caller's own checks.
    """
    ledger = sandbox.ledger
    recs = [dict(r) for r in await fetch(db, "SELECT * FROM subscription_process_data ORDER BY id")]
    if records is not None:
        assert len(recs) == records, Counter(r["subscription_job_run_status"] for r in recs)
    assert ledger.duplicate_upstream_ids() == {}
    assert {c: ids for c, ids in ledger.orders_by_checkout.items() if len(ids) > 1} == {}
    failed_orders = 0
    for rec in recs:
        # An order that failed after it was made (its charge failed, it was blocked or cancelled) took no money:
        # the record keeps it in dr_failed_order_ids, and the sandbox must agree that it is dead.
        failed = set(rec.get("dr_failed_order_ids") or ())
        for order_id in failed:
            order = ledger.orders[order_id]
            charge = ((order.get("payment") or {}).get("charges") or [{}])[0].get("state")
            assert order["state"] in ("cancelled", "blocked") or charge == "failed", (rec["id"], order)
        failed_orders += len(failed)
        orders = [o["id"] for o in ledger.orders_for_upstream(rec["upstream_id"]) if o["id"] not in failed]
        status = rec["subscription_job_run_status"]
        if status in ("Successful", "Pending"):
            assert rec["dr_order_id"] is not None and orders == [rec["dr_order_id"]], rec
        else:
            assert orders == [], f"record {rec['id']} is {status} but Digital River made {orders} for it"
    charged = sum(r["subscription_job_run_status"] == "Successful" for r in recs)
    pending = sum(r["subscription_job_run_status"] == "Pending" for r in recs)
    if successful is not None:
        assert charged == successful, Counter(r["subscription_job_run_status"] for r in recs)
    assert len(ledger.orders) == charged + pending + failed_orders
    # The store keeps an orders row for every live order, and for a failed one that was first recorded Pending; an
    # order an attempt found already dead (by a lookup after a lost answer) was never recorded.
    stored = await fetchval(db, "SELECT count(*) FROM orders WHERE dr_order_source = 'Subscription—Installment'")
    assert charged + pending <= stored <= charged + pending + failed_orders, (stored, charged, pending, failed_orders)
    assert await fetchval(db, "SELECT count(*) FROM payment_attempts WHERE outcome = 'charged'") == charged
    return recs


def declines_by_subscription(sandbox: Sandbox) -> Counter[str]:
    """Declines Digital River answered, counted by the subscription the declined checkout charged."""
    counts: Counter[str] = Counter()
    for checkout_id in sandbox.ledger.declines:
        for item in sandbox.ledger.checkouts[checkout_id]["items"]:
            counts[item["subscriptionInfo"]["subscriptionId"]] += 1
    return counts
