"""Fencing at the store: lease tokens, the heartbeat's rules, and every write that names the claim's token.

A worker that outlived its lease (stalled, paused, cut off) while another claim took its row must change nothing;
the heartbeat must neither wait on a row another session has locked nor revive a lease that ran out; a node never
claims again a row it still has in flight (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from actors.recurring_payments import CLAIM_START, CLAIM_WINDOW
from engine.store import LeaseLost, Leases, Store
from tests.db import open_store, rows_locked_elsewhere
from tests.integration.factories import fulfillment_order, process_records, subscription

SPD = "subscription_process_data"
LEASE = 60.0

# The claim window and cursor arguments of a whole-backlog claim (a run's first).
PAYMENT_WINDOW = (*CLAIM_START, CLAIM_WINDOW, "DefaultStore")


@pytest.fixture
async def other_store(database_url: str) -> AsyncIterator[Store]:
    """A second engine process ("node B"), on its own pool."""
    async with open_store(database_url, "other-node", max_size=2) as s:
        yield s


async def records(store: Store, count: int) -> list[int]:
    """`count` due records, each the only installment of its own subscription (so all are claimable at once)."""
    return [(await process_records(store, await subscription(store), 1))[0] for _ in range(count)]


async def expire(store: Store, ids: list[int], table: str = SPD) -> None:
    """The lease on these rows ran out (their node stalled past it)."""
    await store.pool.execute(f"UPDATE {table} SET locked_until = now() - interval '1 second' WHERE id = ANY($1)",
                             ids)


async def row(store: Store, row_id: int, table: str = SPD) -> dict[str, Any]:
    found = await store.pool.fetchrow(f"SELECT * FROM {table} WHERE id = $1", row_id)
    assert found is not None
    return dict(found)


async def taken_over(store: Store, other_store: Store, count: int = 1) -> tuple[Leases, Leases, list[int]]:
    """Node A claimed `count` records, stalled past the lease, and node B claimed them again."""
    ids = await records(store, count)
    a = Leases(store, SPD, int(LEASE))
    assert sorted(r["id"] for r in await a.claim("claim_payment_records", count, *PAYMENT_WINDOW)) == ids
    await expire(store, ids)
    b = Leases(other_store, SPD, int(LEASE))
    assert sorted(r["id"] for r in await b.claim("claim_payment_records", count, *PAYMENT_WINDOW)) == ids
    for i in ids:
        assert a.token(i) != b.token(i)
    return a, b, ids


def charged(record_id: int, token: int, dr_order_id: str, checkout: str = "chk_1") -> str:
    """finish_charged's $2 for one record charged with order `dr_order_id`."""
    return json.dumps([{
        "record_id": record_id, "token": token, "dr_order_id": dr_order_id, "dr_checkout_id": checkout,
        "state": "accepted", "currency": "USD", "subtotal": "10.00", "total_tax": "0.80", "total_amount": "10.80",
        "items": [{"dr_item_id": f"item_{dr_order_id}", "quantity": 1, "unit_price": "10.00", "tax_amount": "0.80",
                   "state": "created", "billing_agreement_id": "ba_1"}],
    }])


async def save_checkouts(store: Store, ids: list[int], tokens: list[int], checkouts: list[str]) -> dict[int, str]:
    rows = await store.fetch("save_checkouts", ids, tokens, checkouts, ["src_ok"] * len(ids), LEASE)
    return {r["id"]: r["result"] for r in rows}


def later() -> datetime:
    return datetime.now(UTC) + timedelta(hours=1)


# The three single-record writes that end an attempt: their arguments after record id and token, and the code
# each leaves on the record.
ENDING_CODES = {"postpone_record": "dr_outage", "finish_failed_attempt": "card_declined",
                "fail_record_uncounted": "subscription_inactive"}


def ending_args(name: str) -> tuple[Any, ...]:
    if name == "postpone_record":
        # $3 next attempt, $4 code, $5 message, $6 added to the outage count, $7 added to the looks
        return (later(), "dr_outage", "Digital River unavailable", 1, 0)
    if name == "finish_failed_attempt":
        # $3 status, $4 next attempt, $5 code, $6 message, $7 outcome, $8 clear the checkout, $9 cart payment
        # state, $10 amount, $11 currency, $12 node, $13 the order that failed
        return ("Open", later(), "card_declined", "declined", "soft_decline", True, "Declined", 10, "USD", "node",
                None)
    # fail_record_uncounted: $3 code, $4 message
    return ("subscription_inactive", "the subscription is Cancelled")


# --- claiming -----------------------------------------------------------------------------------------------------

async def test_a_node_never_reclaims_a_row_it_still_has_in_flight(store: Store, other_store: Store) -> None:
    [row_id] = await records(store, 1)
    mine = Leases(store, SPD, 30)
    [claimed] = await mine.claim("claim_payment_records", 10, *PAYMENT_WINDOW)
    assert claimed["id"] == row_id and claimed["lease_token"] is not None
    first_token = mine.token(row_id)

    await expire(store, [row_id])  # this node's lease ran out under its worker, still in flight here
    assert await mine.claim("claim_payment_records", 10, *PAYMENT_WINDOW) == []
    assert mine.token(row_id) == first_token
    assert (await row(store, row_id))["lease_token"] == first_token

    theirs = Leases(other_store, SPD, 30)
    [taken] = await theirs.claim("claim_payment_records", 10, *PAYMENT_WINDOW)
    assert taken["id"] == row_id and taken["locked_by"] == "other-node"
    assert taken["lease_token"] != first_token


# --- the heartbeat ----------------------------------------------------------------------------------------------

async def test_the_heartbeat_does_not_wait_on_a_row_locked_by_another_session(database_url: str,
                                                                             store: Store) -> None:
    locked_id, free_id = await records(store, 2)
    leases = Leases(store, SPD, 30)
    assert len(await leases.claim("claim_payment_records", 2, *PAYMENT_WINDOW)) == 2
    leases.lease_seconds = 600  # so a renewal shows
    # The locked row's lease runs out in a few seconds (committed before the other session locks it).
    await store.pool.execute("UPDATE subscription_process_data SET locked_until = clock_timestamp() + "
                             "interval '3 seconds' WHERE id = $1", locked_id)
    free_before = (await row(store, free_id))["locked_until"]

    async with rows_locked_elsewhere(database_url, SPD, locked_id):
        await asyncio.wait_for(leases.extend(), 5)
        free_after = (await row(store, free_id))["locked_until"]
        assert (free_after - free_before).total_seconds() > 500
        assert leases.lost == set()  # locked elsewhere but its lease has not run out: still ours
        leases.check(locked_id)

        # Still locked by the other session, and now its lease has run out: the next beat reports it lost.
        while await store.pool.fetchval("SELECT locked_until > clock_timestamp() FROM subscription_process_data "
                                        "WHERE id = $1", locked_id):
            await asyncio.sleep(0.1)
        await asyncio.wait_for(leases.extend(), 5)
        assert leases.lost == {locked_id}
        with pytest.raises(LeaseLost):
            leases.check(locked_id)
        leases.check(free_id)
    still = await store.pool.fetchval("SELECT locked_until < clock_timestamp() FROM subscription_process_data "
                                      "WHERE id = $1", locked_id)
    assert still is True


async def test_the_heartbeat_never_revives_an_expired_lease(store: Store) -> None:
    [row_id] = await records(store, 1)
    leases = Leases(store, SPD, 600)
    await leases.claim("claim_payment_records", 1, *PAYMENT_WINDOW)
    await expire(store, [row_id])  # nobody else has claimed it (yet)

    await leases.extend()
    assert leases.lost == {row_id}
    with pytest.raises(LeaseLost):
        leases.check(row_id)
    assert await store.pool.fetchval(
        "SELECT locked_until < clock_timestamp() FROM subscription_process_data WHERE id = $1", row_id) is True
    # A lost row is not extended again either, and touch refuses it.
    await leases.extend()
    assert await store.pool.fetchval(
        "SELECT locked_until < clock_timestamp() FROM subscription_process_data WHERE id = $1", row_id) is True
    with pytest.raises(LeaseLost):
        await leases.touch(row_id)


async def test_touch_refuses_an_expired_lease_even_before_the_heartbeat_noticed(store: Store) -> None:
    [row_id] = await records(store, 1)
    leases = Leases(store, SPD, 600)
    await leases.claim("claim_payment_records", 1, *PAYMENT_WINDOW)
    await leases.touch(row_id)  # held: pushed out
    await expire(store, [row_id])
    with pytest.raises(LeaseLost):
        await leases.touch(row_id)
    assert leases.lost == {row_id}
    assert await store.pool.fetchval(
        "SELECT locked_until < clock_timestamp() FROM subscription_process_data WHERE id = $1", row_id) is True


# --- stale tokens ---------------------------------------------------------------------------------------------

async def test_a_stale_token_cannot_save_a_checkout_or_settle_a_charge(store: Store, other_store: Store) -> None:
    a, b, [rec] = await taken_over(store, other_store)

    # A's checkout, while B has not saved one yet: refused, nothing written.
    assert await save_checkouts(store, [rec], [a.token(rec)], ["chk_A"]) == {rec: "lease_lost"}
    assert (await row(store, rec))["dr_checkout_id"] is None
    # B's goes in; A's next attempt still changes nothing.
    assert await save_checkouts(other_store, [rec], [b.token(rec)], ["chk_B"]) == {rec: "saved"}
    assert await save_checkouts(store, [rec], [a.token(rec)], ["chk_A"]) == {rec: "lease_lost"}
    assert (await row(store, rec))["dr_checkout_id"] == "chk_B"

    # A's charge is refused: the record stays Open and no order is written.
    before = await row(store, rec)
    [refused] = await store.fetch("finish_charged", store.node, charged(rec, a.token(rec), "ord_A", "chk_A"))
    assert refused["result"] == "lease_lost" and refused["order_id"] is None
    assert await row(store, rec) == before
    assert before["subscription_job_run_status"] == "Open" and not before["is_recurring_payment_processed"]
    assert await store.pool.fetchval("SELECT count(*) FROM orders WHERE dr_order_id = 'ord_A'") == 0
    assert await store.pool.fetchval("SELECT count(*) FROM payment_attempts") == 0

    # B's charge settles it.
    [written] = await other_store.fetch("finish_charged", other_store.node, charged(rec, b.token(rec), "ord_B",
                                                                                     "chk_B"))
    assert written["result"] == "written" and written["order_id"] is not None
    after = await row(store, rec)
    assert after["subscription_job_run_status"] == "Successful" and after["dr_order_id"] == "ord_B"
    assert after["order_id"] == written["order_id"] and after["lease_token"] is None


@pytest.mark.parametrize("statement", sorted(ENDING_CODES))
async def test_a_stale_token_cannot_end_an_attempt(store: Store, other_store: Store, statement: str) -> None:
    a, b, [rec] = await taken_over(store, other_store)
    before = await row(store, rec)

    assert await store.fetchval(statement, rec, a.token(rec), *ending_args(statement)) is None
    assert await row(store, rec) == before
    assert await store.pool.fetchval("SELECT count(*) FROM payment_attempts") == 0

    assert await other_store.fetchval(statement, rec, b.token(rec), *ending_args(statement)) is not None
    after = await row(store, rec)
    assert after["lease_token"] is None and after["locked_by"] is None
    assert after["last_error_code"] == ENDING_CODES[statement]


async def test_a_second_checkout_is_refused_even_under_a_valid_token(store: Store) -> None:
    [rec] = await records(store, 1)
    leases = Leases(store, SPD, int(LEASE))
    await leases.claim("claim_payment_records", 1, *PAYMENT_WINDOW)
    assert await save_checkouts(store, [rec], [leases.token(rec)], ["chk_first"]) == {rec: "saved"}
    assert await save_checkouts(store, [rec], [leases.token(rec)], ["chk_second"]) == {rec: "checkout_taken"}
    assert (await row(store, rec))["dr_checkout_id"] == "chk_first"


async def test_a_checkout_is_not_saved_under_a_lease_that_ran_out(store: Store) -> None:
    [rec] = await records(store, 1)
    leases = Leases(store, SPD, int(LEASE))
    await leases.claim("claim_payment_records", 1, *PAYMENT_WINDOW)
    await expire(store, [rec])  # nobody has claimed it again yet, but it may be claimed at any moment
    assert await save_checkouts(store, [rec], [leases.token(rec)], ["chk_late"]) == {rec: "lease_lost"}
    assert (await row(store, rec))["dr_checkout_id"] is None


async def test_fence_checkout_needs_the_token_an_unexpired_lease_and_the_same_checkout(store: Store,
                                                                                    other_store: Store) -> None:
    a, b, [rec] = await taken_over(store, other_store)
    assert await save_checkouts(other_store, [rec], [b.token(rec)], ["chk_B"]) == {rec: "saved"}

    # $1 record, $2 token, $3 checkout, $4 lease seconds
    assert await store.fetchval("fence_checkout", rec, a.token(rec), "chk_B", LEASE) is None  # stale token
    assert await other_store.fetchval("fence_checkout", rec, b.token(rec), "chk_other", LEASE) is None
    assert await other_store.fetchval("fence_checkout", rec, b.token(rec), "chk_B", LEASE) == rec
    await expire(store, [rec])
    assert await other_store.fetchval("fence_checkout", rec, b.token(rec), "chk_B", LEASE) is None
    assert await store.pool.fetchval(
        "SELECT locked_until < clock_timestamp() FROM subscription_process_data WHERE id = $1", rec) is True


async def test_save_checkouts_skips_a_row_locked_by_another_session(database_url: str, store: Store) -> None:
    locked_id, free_id = await records(store, 2)
    leases = Leases(store, SPD, int(LEASE))
    await leases.claim("claim_payment_records", 2, *PAYMENT_WINDOW)
    async with rows_locked_elsewhere(database_url, SPD, locked_id):
        results = await asyncio.wait_for(
            save_checkouts(store, [locked_id, free_id], [leases.token(locked_id), leases.token(free_id)],
                           ["chk_locked", "chk_free"]), 5)
    assert results == {locked_id: "busy", free_id: "saved"}
    assert (await row(store, locked_id))["dr_checkout_id"] is None
    assert (await row(store, free_id))["dr_checkout_id"] == "chk_free"


async def test_finish_charged_on_a_processed_record_reports_the_order_it_was_settled_with(store: Store) -> None:
    first, second = await records(store, 2)
    leases = Leases(store, SPD, int(LEASE))
    await leases.claim("claim_payment_records", 2, *PAYMENT_WINDOW)

    # Written once, then the same charge again (a retried batch): settled, not written twice.
    [written] = await store.fetch("finish_charged", store.node, charged(first, leases.token(first), "ord_1"))
    assert written["result"] == "written"
    [again] = await store.fetch("finish_charged", store.node, charged(first, leases.token(first), "ord_1"))
    assert again["result"] == "settled" and again["settled_dr_order_id"] == "ord_1"
    assert await store.pool.fetchval("SELECT count(*) FROM payment_attempts WHERE process_data_id = $1", first) == 1

    # Settled by someone else while this claim's token is still on the record: never settled a second time.
    await store.pool.execute(
        "UPDATE subscription_process_data SET subscription_job_run_status = 'Successful', "
        "is_recurring_payment_processed = true, dr_order_id = 'ord_elsewhere' WHERE id = $1", second)
    [other] = await store.fetch("finish_charged", store.node, charged(second, leases.token(second), "ord_2"))
    assert other["result"] == "settled" and other["settled_dr_order_id"] == "ord_elsewhere"
    assert other["order_id"] is None
    assert (await row(store, second))["dr_order_id"] == "ord_elsewhere"
    assert await store.pool.fetchval("SELECT count(*) FROM orders WHERE dr_order_id = 'ord_2'") == 0


# --- giving rows back, operator retry --------------------------------------------------------------------------

async def test_release_only_gives_back_rows_still_under_the_claims_token(store: Store, other_store: Store) -> None:
    a, b, [taken] = await taken_over(store, other_store)
    [kept] = await records(store, 1)
    assert [r["id"] for r in await a.claim("claim_payment_records", 1, *PAYMENT_WINDOW)] == [kept]

    await a.release()
    assert a.in_flight == {}
    now_taken = await row(store, taken)
    assert now_taken["locked_by"] == "other-node" and now_taken["lease_token"] == b.token(taken)
    assert now_taken["locked_until"] is not None
    now_kept = await row(store, kept)
    assert now_kept["locked_by"] is None and now_kept["locked_until"] is None and now_kept["lease_token"] is None


async def test_retry_clears_the_lease_token_and_an_unknown_checkout(store: Store) -> None:
    unknown, declined = await records(store, 2)
    late = Leases(store, SPD, int(LEASE))
    await late.claim("claim_payment_records", 2, *PAYMENT_WINDOW)
    # Both records ended Failed while the late worker's token stayed on them, and its lease ran out.
    await store.pool.execute(
        "UPDATE subscription_process_data SET subscription_job_run_status = 'Failed', dr_checkout_id = 'chk_' || id, "
        "dr_checkout_source_id = 'src_ok', last_error_code = CASE WHEN id = $1 THEN 'checkout_unknown' "
        "ELSE 'card_declined' END, locked_until = now() - interval '1 second' WHERE id = ANY($2)",
        unknown, [unknown, declined])

    for rec in (unknown, declined):
        result = await store.fetchrow("retry_process_data", rec)
        assert result is not None and result["retried"] is True
        after = await row(store, rec)
        assert after["subscription_job_run_status"] == "Open"
        assert after["lease_token"] is None and after["locked_by"] is None and after["locked_until"] is None
    assert (await row(store, unknown))["dr_checkout_id"] is None
    assert (await row(store, unknown))["dr_checkout_source_id"] is None
    assert (await row(store, declined))["dr_checkout_id"] == f"chk_{declined}"
    assert (await row(store, declined))["dr_checkout_source_id"] == "src_ok"

    # The late worker wakes up: none of its writes land.
    before = await row(store, unknown)
    assert await store.fetchval("postpone_record", unknown, late.token(unknown), *ending_args("postpone_record")) \
        is None
    assert await store.fetchval("fail_record_uncounted", unknown, late.token(unknown),
                                *ending_args("fail_record_uncounted")) is None
    assert await save_checkouts(store, [unknown], [late.token(unknown)], ["chk_late"]) == {unknown: "lease_lost"}
    [charge] = await store.fetch("finish_charged", store.node, charged(unknown, late.token(unknown), "ord_late"))
    assert charge["result"] == "lease_lost"
    assert await row(store, unknown) == before


# --- fulfillments ---------------------------------------------------------------------------------------------

async def test_finish_fulfillment_with_a_stale_token_changes_nothing(store: Store, other_store: Store) -> None:
    _, _, ful, _ = await fulfillment_order(store, dr_order_id="ord_c", order_state="cancelled",
                                           items=[{"quantity": 1, "dr_order_item_id": "item_c"}],
                                           dr_order_state="cancelled")
    a = Leases(store, "fulfillments", int(LEASE))
    assert [r["id"] for r in await a.claim("claim_cancelled_orders", 10, "DefaultStore")] == [ful]
    await expire(store, [ful], "fulfillments")
    b = Leases(other_store, "fulfillments", int(LEASE))
    assert [r["id"] for r in await b.claim("claim_cancelled_orders", 10, "DefaultStore")] == [ful]
    assert a.token(ful) != b.token(ful)

    before = await row(store, ful, "fulfillments")
    assert await store.fetchval("finish_fulfillment", ful, a.token(ful), "Completed", 0, "cancelled", "ful_A",
                                None) is None
    assert await row(store, ful, "fulfillments") == before

    assert await other_store.fetchval("finish_fulfillment", ful, b.token(ful), "Completed", 0, "cancelled", "ful_B",
                                      None) == ful
    after = await row(store, ful, "fulfillments")
    assert after["efn_status"] == "Completed" and after["dr_fulfillment_id"] == "ful_B"
    assert after["lease_token"] is None and after["locked_by"] is None


async def test_finish_line_items_writes_only_lines_whose_token_matches(store: Store, other_store: Store) -> None:
    _, _, ful, [kept, taken] = await fulfillment_order(
        store, dr_order_id="ord_l", order_state="accepted",
        items=[{"quantity": 1, "dr_order_item_id": "item_l1"}, {"quantity": 1, "dr_order_item_id": "item_l2"}],
        lines=[{"item": 0, "fulfill_quantity": 1}, {"item": 1, "fulfill_quantity": 1}])
    orders = Leases(store, "fulfillments", int(LEASE))
    lines = Leases(store, "line_item_fulfillments", int(LEASE))
    assert [r["id"] for r in await orders.claim("claim_line_item_orders", 10, 100, True, "DefaultStore")] == [ful]
    assert sorted(r["id"] for r in await lines.claim("claim_order_lines", 100, [ful])) == [kept, taken]

    # This node stalls: the order's lease and one line's run out, and node B claims them.
    await expire(store, [ful], "fulfillments")
    await expire(store, [taken], "line_item_fulfillments")
    b_orders = Leases(other_store, "fulfillments", int(LEASE))
    b_lines = Leases(other_store, "line_item_fulfillments", int(LEASE))
    assert [r["id"] for r in await b_orders.claim("claim_line_item_orders", 10, 100, True, "DefaultStore")] == [ful]
    assert [r["id"] for r in await b_lines.claim("claim_order_lines", 100, [ful])] == [taken]

    taken_before = await row(store, taken, "line_item_fulfillments")
    rows = await store.fetch("finish_line_items", ful, orders.token(ful), [kept, taken],
                             [lines.token(kept), lines.token(taken)], ["Completed", "Completed"], [0, 0],
                             [None, None], ["ful_A", "ful_A"], [None, None])
    assert [r["id"] for r in rows] == [kept]
    done = await row(store, kept, "line_item_fulfillments")
    assert done["efn_status"] == "Completed" and done["dr_fulfillment_id"] == "ful_A" and done["lease_token"] is None
    assert await row(store, taken, "line_item_fulfillments") == taken_before
    order = await row(store, ful, "fulfillments")  # A's stale order token does not release B's lease
    assert order["locked_by"] == "other-node" and order["lease_token"] == b_orders.token(ful)
