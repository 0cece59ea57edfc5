"""Checks of the sandbox's ledger (what Digital River did) against the store: nobody charged twice."""

from __future__ import annotations

from collections import Counter
from typing import Any

from engine.store import Store
from sandbox.server import Sandbox
from tests.db import fetch, fetchval


async def assert_charged_once(db: Store | str, sandbox: Sandbox, *, successful: int | None = None,
                              records: int | None = None) -> list[dict[str, Any]]:
    """Exactly one Digital River order for each Successful installment record, the one the record names, and none
    for any other record; no upstream id and no checkout with two orders, and no order besides; and the store
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
    for rec in recs:
        orders = [o["id"] for o in ledger.orders_for_upstream(rec["upstream_id"])]
        status = rec["subscription_job_run_status"]
        if status == "Successful":
            assert rec["dr_order_id"] is not None and orders == [rec["dr_order_id"]], rec
        else:
            assert orders == [], f"record {rec['id']} is {status} but Digital River made {orders} for it"
    charged = sum(r["subscription_job_run_status"] == "Successful" for r in recs)
    if successful is not None:
        assert charged == successful, Counter(r["subscription_job_run_status"] for r in recs)
    assert len(ledger.orders) == charged
    assert await fetchval(db, "SELECT count(*) FROM orders WHERE dr_order_source = 'Subscription—Installment'") \
        == charged
    assert await fetchval(db, "SELECT count(*) FROM payment_attempts WHERE outcome = 'charged'") == charged
    return recs


def declines_by_subscription(sandbox: Sandbox) -> Counter[str]:
    """Declines Digital River answered, counted by the subscription the declined checkout charged."""
    counts: Counter[str] = Counter()
    for checkout_id in sandbox.ledger.declines:
        for item in sandbox.ledger.checkouts[checkout_id]["items"]:
            counts[item["subscriptionInfo"]["subscriptionId"]] += 1
    return counts
