"""What changes to a subscription between its installment record and its charge do (actors/recurring_payments.py).

An order Digital River already made is adopted whatever changed since (a card replaced or deactivated, the
subscription cancelled): a charged record is never failed. Without an order, a Cancelled or Suspended subscription
is not charged; a replaced card is the one charged, attached to the checkout already saved (never a second
checkout); a checkout Digital River does not know is looked at CHECKOUT_LOOKS times and then left to an operator,
whose `retry installment` makes a new checkout.

Crashes are real: `python run.py drain` with a failpoint SIGKILLs itself (tests/integration/test_payment_crashes.py);
the next drain runs in-process (tests/integration/engines.py) so the sandbox's ledger and the store can be read.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest

from actors.recurring_payments import CHECKOUT_LOOKS
from engine.store import Store
from sandbox.server import Sandbox
from tests.integration.engines import drain, run_job
from tests.integration.factories import due_subscription
from tests.support import engine_env, run_command, sandbox_env, sandbox_fixture

SPD = "subscription_process_data"
OLD_SOURCE = "src_card_ok"
NEW_SOURCE = "src_card_replaced_visa_4242"

sandbox = sandbox_fixture(seed=23)


async def killed_at(database_url: str, sandbox: Sandbox, step: str) -> None:
    """A real `drain` that SIGKILLs itself at `step` (its leases are left to run out: see `lease_ran_out`)."""
    code, _, err = await run_command(["drain"], sandbox_env(database_url, sandbox, DRJOBS_FAILPOINTS=step), timeout=90)
    assert code == -signal.SIGKILL, f"the failpoint {step} was never reached: {err}"


async def lease_ran_out(store: Store) -> None:
    await store.pool.execute(f"UPDATE {SPD} SET locked_until = now() - interval '1 second' "
                             "WHERE locked_until IS NOT NULL")


async def only_record(store: Store) -> dict[str, Any]:
    rows = await store.pool.fetch(f"SELECT * FROM {SPD} ORDER BY id")
    assert len(rows) == 1, rows
    return dict(rows[0])


async def replace_card(store: Store, subscription_id: int, source: str = NEW_SOURCE) -> tuple[int, int]:
    """The customer's card replaced: a new active stored payment is the subscription's, the old one deactivated.
    Returns (old, new) stored payment ids."""
    async with store.pool.acquire() as conn, conn.transaction():
        old, account = await conn.fetchrow(
            "SELECT s.stored_payment_id, s.account_id FROM subscriptions s WHERE s.id = $1", subscription_id)
        new = await conn.fetchval("INSERT INTO stored_payments (account_id, dr_source_id, is_active) "
                                  "VALUES ($1, $2, true) RETURNING id", account, source)
        await conn.execute("UPDATE stored_payments SET is_active = false WHERE id = $1", old)
        await conn.execute("UPDATE subscriptions SET stored_payment_id = $2 WHERE id = $1", subscription_id, new)
    return old, new


def checkouts_for(sandbox: Sandbox, upstream_id: str) -> list[dict[str, Any]]:
    return [c for c in sandbox.ledger.checkouts.values() if c.get("upstreamId") == upstream_id]


async def app_logs_for(store: Store, record_id: int) -> list[dict[str, Any]]:
    return [dict(r) for r in await store.pool.fetch(
        "SELECT logging_level, module_name, message FROM application_logs WHERE record_id = $1 ORDER BY id",
        str(record_id))]


async def charged_attempts(store: Store, record_id: int) -> int:
    return int(await store.pool.fetchval(
        "SELECT count(*) FROM payment_attempts WHERE process_data_id = $1 AND outcome = 'charged'", record_id))


# -- 1-3: an order already made is adopted, whatever changed since -----------------------------------------------


async def card_replaced(store: Store, subscription_id: int) -> None:
    await replace_card(store, subscription_id)


async def card_deactivated(store: Store, subscription_id: int) -> None:
    await store.pool.execute("UPDATE stored_payments SET is_active = false "
                             "WHERE id = (SELECT stored_payment_id FROM subscriptions WHERE id = $1)", subscription_id)


async def subscription_cancelled(store: Store, subscription_id: int) -> None:
    await store.pool.execute("UPDATE subscriptions SET status = 'Cancelled' WHERE id = $1", subscription_id)


@pytest.mark.parametrize("change", [card_replaced, card_deactivated, subscription_cancelled],
                         ids=["card_replaced", "card_deactivated", "subscription_cancelled"])
async def test_an_order_made_before_a_crash_is_adopted_whatever_changed_since(
        database_url: str, store: Store, sandbox: Sandbox, change: Any) -> None:
    subscription_id = await due_subscription(store, source=OLD_SOURCE)
    await killed_at(database_url, sandbox, "after_order_created")
    rec = await only_record(store)
    # The state the kill left: Digital River made the order, the store does not know it.
    [made] = sandbox.ledger.orders_for_upstream(rec["upstream_id"])
    assert made["checkoutId"] == rec["dr_checkout_id"]
    assert rec["dr_order_id"] is None and rec["subscription_job_run_status"] == "Open"

    await change(store, subscription_id)
    await lease_ran_out(store)
    assert await drain(store, sandbox) == 0

    rec = await only_record(store)
    assert rec["subscription_job_run_status"] == "Successful", (rec["last_error_code"], rec["last_error_message"])
    [order] = sandbox.ledger.orders_for_upstream(rec["upstream_id"])
    assert rec["dr_order_id"] == order["id"] == made["id"]
    assert len(sandbox.ledger.orders) == 1
    assert sandbox.ledger.duplicate_upstream_ids() == {}
    assert await store.pool.fetchval(f"SELECT count(*) FROM {SPD} WHERE subscription_job_run_status = 'Failed'") == 0
    assert await charged_attempts(store, rec["id"]) == 1
    # Adopted by the lookup before anything else: no second POST /orders, no source attached, no new checkout.
    assert sandbox.ledger.count_requests("POST", "/orders") == 1
    assert sandbox.ledger.count_requests("POST", "/checkouts/*") == 0
    assert sandbox.ledger.count_requests("POST", "/checkouts") == 1


# -- 4: a subscription stopped before any charge is not charged ---------------------------------------------------


@pytest.mark.parametrize(("status", "code"), [("Cancelled", "subscription_cancelled"),
                                              ("Suspended", "subscription_suspended")])
async def test_a_subscription_stopped_after_its_record_was_made_is_not_charged(
        store: Store, sandbox: Sandbox, status: str, code: str) -> None:
    subscription_id = await due_subscription(store)
    assert await run_job(store, sandbox, "subscription-installments") == 0
    rec = await only_record(store)
    assert rec["subscription_job_run_status"] == "Open" and rec["dr_checkout_id"] is None
    await store.pool.execute("UPDATE subscriptions SET status = $2 WHERE id = $1", subscription_id, status)

    assert await drain(store, sandbox) == 0

    rec = await only_record(store)
    assert rec["subscription_job_run_status"] == "Failed"
    assert rec["last_error_code"] == code
    assert status in rec["last_error_message"]
    assert rec["subscription_retry_count"] == 0
    assert rec["dr_checkout_id"] is None and rec["dr_order_id"] is None
    assert checkouts_for(sandbox, rec["upstream_id"]) == []
    assert sandbox.ledger.orders_for_upstream(rec["upstream_id"]) == []
    assert sandbox.ledger.count_requests("POST", "/checkouts") == 0
    assert sandbox.ledger.count_requests("POST", "/orders") == 0
    assert await store.pool.fetchval("SELECT count(*) FROM payment_attempts WHERE process_data_id = $1",
                                     rec["id"]) == 0
    logs = await app_logs_for(store, rec["id"])
    assert logs, "no application_logs row for the record that was not charged"
    assert any(status in log["message"] and log["module_name"] == "recurring-payments" for log in logs), logs


# -- 5: a card replaced before any checkout is the one charged -----------------------------------------------------


async def test_a_card_replaced_before_the_checkout_is_the_one_charged(store: Store, sandbox: Sandbox) -> None:
    subscription_id = await due_subscription(store, source=OLD_SOURCE)
    assert await run_job(store, sandbox, "subscription-installments") == 0
    rec = await only_record(store)
    old, new = await replace_card(store, subscription_id)
    # The record still names the card it was made with; the subscription names the new one.
    assert rec["stored_payment_id"] == old != new

    assert await drain(store, sandbox) == 0

    rec = await only_record(store)
    assert rec["subscription_job_run_status"] == "Successful", (rec["last_error_code"], rec["last_error_message"])
    [checkout] = checkouts_for(sandbox, rec["upstream_id"])
    assert checkout["sourceId"] == NEW_SOURCE
    assert checkout["id"] == rec["dr_checkout_id"]
    assert rec["dr_checkout_source_id"] == NEW_SOURCE
    [order] = sandbox.ledger.orders_for_upstream(rec["upstream_id"])
    assert rec["dr_order_id"] == order["id"]
    assert [s["id"] for s in order["payment"]["sources"]] == [NEW_SOURCE]
    assert sandbox.ledger.count_requests("POST", "/checkouts/*") == 0  # nothing to attach: it was sent with it


# -- 6: a card replaced after the checkout was saved is attached to that same checkout ----------------------------


async def test_a_card_replaced_after_the_checkout_was_saved_is_attached_to_the_same_checkout(
        database_url: str, store: Store, sandbox: Sandbox) -> None:
    subscription_id = await due_subscription(store, source=OLD_SOURCE)
    await killed_at(database_url, sandbox, "after_checkout_saved")
    rec = await only_record(store)
    saved = rec["dr_checkout_id"]
    assert saved is not None and rec["dr_checkout_source_id"] == OLD_SOURCE
    assert sandbox.ledger.checkouts[saved]["sourceId"] == OLD_SOURCE
    assert sandbox.ledger.orders == {}

    await replace_card(store, subscription_id)
    await lease_ran_out(store)
    assert await drain(store, sandbox) == 0

    rec = await only_record(store)
    assert rec["subscription_job_run_status"] == "Successful", (rec["last_error_code"], rec["last_error_message"])
    assert rec["dr_checkout_id"] == saved
    assert rec["dr_checkout_source_id"] == NEW_SOURCE
    # One checkout was ever submitted for this upstream id: the saved one, now charging the new card.
    assert [c["id"] for c in checkouts_for(sandbox, rec["upstream_id"])] == [saved]
    assert sandbox.ledger.count_requests("POST", "/checkouts") == 1
    assert sandbox.ledger.count_requests("POST", f"/checkouts/{saved}/sources/{NEW_SOURCE}", status=200) >= 1
    assert sandbox.ledger.checkouts[saved]["sourceId"] == NEW_SOURCE
    [order] = sandbox.ledger.orders_for_upstream(rec["upstream_id"])
    assert order["checkoutId"] == saved
    assert rec["dr_order_id"] == order["id"]
    assert [s["id"] for s in order["payment"]["sources"]] == [NEW_SOURCE]
    assert len(sandbox.ledger.orders) == 1
    assert sandbox.ledger.count_requests("POST", "/orders") == 1
    assert await charged_attempts(store, rec["id"]) == 1


# -- 7: a checkout Digital River does not know: looked at, then left to an operator, never a second checkout -----


async def test_a_checkout_digital_river_forgot_is_looked_at_then_failed_then_retried_by_an_operator(
        database_url: str, store: Store, sandbox: Sandbox) -> None:
    await due_subscription(store)
    await killed_at(database_url, sandbox, "after_checkout_saved")
    rec = await only_record(store)
    lost = rec["dr_checkout_id"]
    assert lost is not None and sandbox.ledger.orders == {}
    del sandbox.ledger.checkouts[lost]  # Digital River no longer knows it
    await lease_ran_out(store)

    for look in range(1, CHECKOUT_LOOKS + 1):
        await store.pool.execute(f"UPDATE {SPD} SET next_attempt_at = now() WHERE id = $1", rec["id"])
        assert await drain(store, sandbox) == 0
        now = await only_record(store)
        assert now["dr_checkout_id"] == lost
        assert now["dr_order_id"] is None
        assert now["subscription_retry_count"] == 0
        assert now["last_error_code"] == "checkout_unknown", (look, now["last_error_message"])
        if look < CHECKOUT_LOOKS:
            assert now["subscription_job_run_status"] == "Open", look
            assert now["checkout_looks"] == look
        else:
            assert now["subscription_job_run_status"] == "Failed"
        # Never a second checkout while an order might exist.
        assert sandbox.ledger.count_requests("POST", "/checkouts") == 1, look
        assert checkouts_for(sandbox, rec["upstream_id"]) == []
        assert sandbox.ledger.orders == {}
    assert sandbox.ledger.count_requests("POST", "/orders", status=404) == CHECKOUT_LOOKS
    assert await store.pool.fetchval("SELECT count(*) FROM payment_attempts") == 0
    logs = await app_logs_for(store, rec["id"])
    errors = [log for log in logs if log["logging_level"] == "ERROR"]
    assert len(errors) == 1, logs
    assert lost in errors[0]["message"] and "retry installment" in errors[0]["message"]

    # The operator checked Digital River and retries: the lost checkout is dropped, a new one charges it once.
    code, out, err = await run_command(["retry", "installment", str(rec["id"])], engine_env(database_url))
    assert code == 0, (out, err)
    retried = await only_record(store)
    assert retried["subscription_job_run_status"] == "Open"
    assert retried["dr_checkout_id"] is None and retried["checkout_looks"] == 0

    assert await drain(store, sandbox) == 0

    done = await only_record(store)
    assert done["subscription_job_run_status"] == "Successful", (done["last_error_code"], done["last_error_message"])
    assert done["dr_checkout_id"] not in (None, lost)
    [checkout] = checkouts_for(sandbox, rec["upstream_id"])
    assert checkout["id"] == done["dr_checkout_id"]
    [order] = sandbox.ledger.orders_for_upstream(rec["upstream_id"])
    assert order["checkoutId"] == done["dr_checkout_id"] and done["dr_order_id"] == order["id"]
    assert len(sandbox.ledger.orders) == 1
    assert sandbox.ledger.count_requests("POST", "/checkouts") == 2
    assert await charged_attempts(store, rec["id"]) == 1
