"""The bad data corpus: rows an outside system may write, each beside a good subscription, through the
in-process engine against the local sandbox.

Every kind of bad row ends in its own way, and the good subscription beside it is charged exactly once in the
same drain:
- a record that cannot be charged is `Failed` at once, its message naming the field, never sent to Digital
  River when our own checks can tell (docs/billing-rules.md, "bad data"), or refused by Digital River's 400 naming
  its parameter when only Digital River can tell;
- a subscription that cannot be scheduled is `Suspended`, its message naming the field;
- a row the schema refuses never gets in (a CHECK, a type, NOT NULL);
- text that is odd but valid (SQL, control characters, very long strings) travels as data: charged, no harm;
- dates far off are handled: far future is not due, far past catches up oldest first, a subscription 10,000
  installments behind is made a bounded batch per run without holding the others back.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import asyncpg
import pytest

from actors.subscription_installments import MAX_CATCH_UP
from engine.store import Store
from sandbox.server import Sandbox
from tests.integration.engines import drain, engine_on
from tests.integration.factories import due_subscription
from tests.integration.test_pipeline import records
from tests.support import sandbox_fixture

# A drain that does not finish within this is a fault of its own (a run crashing again and again), not a wait.
DRAIN_SECONDS = 20


sandbox = sandbox_fixture(seed=7)


@dataclass(frozen=True)
class Bad:
    """One kind of bad row: `due_subscription` overrides, then statements run with $1 = the subscription id."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    sql: tuple[str, ...] = ()
    # Text the failure message must contain: the field, as we name it or as Digital River's parameter.
    field: str = ""
    # Whether only Digital River can tell (its 400 names the parameter) or our own checks refuse it first.
    sent: bool = False


# Tables outside systems write (docs/integration.md), and those only the engine writes.
INPUT_TABLES = {"accounts", "products", "stored_payments", "orders", "order_items", "subscriptions"}
ENGINE_TABLES = ("carts.", "cart_items", "subscription_process_data")

PARENT_ORDER = "UPDATE orders SET {} WHERE id = (SELECT parent_order_id FROM subscriptions WHERE id = $1)"
ACCOUNT = "UPDATE accounts SET {} WHERE id = (SELECT account_id FROM subscriptions WHERE id = $1)"

FAILED_RECORDS = {
    "payment_inactive": Bad({"payment_active": False}, field="stored_payments.is_active"),
    "source_id_null": Bad({"source": None}, field="stored_payments.dr_source_id"),
    "source_id_blank": Bad({"source": " \t "}, field="stored_payments.dr_source_id"),
    "no_stored_payment": Bad({"stored_payment_id": None}, field="subscriptions.stored_payment_id"),
    "customer_id_null": Bad({"account": {"dr_customer_id": None}}, field="accounts.dr_customer_id"),
    "customer_id_blank": Bad({"account": {"dr_customer_id": "   "}}, field="accounts.dr_customer_id"),
    "no_account": Bad({"account_id": None}, field="subscriptions.account_id"),
    "no_product": Bad({"product_id": None}, field="subscriptions.product_id"),
    "sku_null_without_tax_code": Bad({"product": {"dr_sku_id": None, "tax_code": None}}, field="products.dr_sku_id"),
    "sku_null_without_name": Bad({"product": {"dr_sku_id": None, "name": None}}, field="products.dr_sku_id"),
    # Digital River requires skuGroupId and countryOfOrigin in productDetails (using-product-details.md).
    "sku_null_without_sku_group": Bad({"product": {"dr_sku_id": None, "country_of_origin": "US"}},
                                      field="products.sku_group_id"),
    "sku_null_without_country": Bad({"product": {"dr_sku_id": None, "sku_group_id": "widgets"}},
                                    field="products.country_of_origin"),
    "sku_null_with_a_bad_country": Bad({"product": {"dr_sku_id": None, "sku_group_id": "widgets",
                                                    "country_of_origin": "u1"}}, field="products.country_of_origin"),
    "sku_blank_without_details": Bad({"product": {"dr_sku_id": "", "name": " ", "tax_code": None}},
                                     field="products.dr_sku_id"),
    "quantity_zero": Bad({"quantity": 0}, field="subscriptions.quantity"),
    "price_zero": Bad({"unit_price": "0"}, field="subscriptions.unit_price"),
    "price_negative": Bad({"unit_price": "-12.50"}, field="subscriptions.unit_price"),
    "price_null": Bad({"unit_price": None}, field="subscriptions.unit_price"),
    "currency_unknown": Bad({"currency": "XYZ"}, field="subscriptions.currency"),
    "currency_null": Bad({"currency": None}, field="subscriptions.currency"),
    "currency_symbols": Bad({"currency": "U$D"}, field="subscriptions.currency"),
    "currency_blank": Bad({"currency": "   "}, field="subscriptions.currency"),
    "billing_agreement_null": Bad({"dr_billing_agreement_id": None, "parent_order_item_id": None},
                                  field="subscriptions.dr_billing_agreement_id"),
    "billing_agreement_blank": Bad({"dr_billing_agreement_id": "  ", "parent_order_item_id": None},
                                   field="subscriptions.dr_billing_agreement_id"),
    # Only Digital River can tell these: its 400 names the parameter, and the record fails with it.
    "customer_id_unknown_and_very_long": Bad({"account": {"dr_customer_id": "cus_invalid_" + "x" * 100_000}},
                                             field="customerId", sent=True),
    "sku_unknown": Bad({"product": {"dr_sku_id": "sku_invalid_retired"}}, field="skuId", sent=True),
    "bill_to_not_an_object": Bad(sql=(ACCOUNT.format("bill_to = '\"Main Street 1, Springfield\"'"),),
                                 field="accounts.bill_to"),
    # Digital River's Billing requires an address (digital-river-php docs/Model/Billing.md).
    "bill_to_without_an_address": Bad(sql=(ACCOUNT.format("bill_to = '{\"name\": \"Acme\"}'"),),
                                      field="accounts.bill_to"),
    "ship_to_country_not_iso": Bad(sql=(PARENT_ORDER.format(
        "ship_to = '{\"address\": {\"country\": \"Germany\", \"line1\": \"Unter den Linden 1\"}}'"),),
        field="shipTo.address.country", sent=True),
    "ship_to_address_a_list": Bad(sql=(PARENT_ORDER.format("ship_to = '{\"address\": [\"Main St\", 1]}'"),),
                                  field="orders.ship_to"),
}


async def drained(store: Store, sandbox: Sandbox, *, within: float = DRAIN_SECONDS, **env: str) -> int:
    """`drain`'s exit code; fails the test if it does not return (it must, whatever the rows)."""
    return await asyncio.wait_for(drain(store, sandbox, **env), timeout=within)


async def make(store: Store, bad: Bad) -> int:
    sub = await due_subscription(store, **bad.kwargs)
    for statement in bad.sql:
        await store.pool.execute(statement, sub)
    return sub


async def assert_charged_once(store: Store, sandbox: Sandbox, sub: int) -> None:
    """The good subscription beside the bad row: one record, Successful, one Digital River order."""
    [rec] = await records(store, sub)
    assert rec["subscription_job_run_status"] == "Successful", rec["last_error_message"]
    assert len(sandbox.ledger.orders_for_upstream(rec["upstream_id"])) == 1
    assert await store.pool.fetchval("SELECT count(*) FROM orders WHERE id = $1", rec["order_id"]) == 1


def assert_one_readable_line(message: str | None) -> None:
    assert message and "\n" not in message and message.isprintable() and len(message) <= 2000, repr(message)


@pytest.mark.parametrize("bad", list(FAILED_RECORDS.values()), ids=list(FAILED_RECORDS))
async def test_bad_record_fails_naming_the_field_and_its_neighbour_is_charged(store: Store, sandbox: Sandbox,
                                                                            bad: Bad) -> None:
    bad_sub = await make(store, bad)
    good_sub = await due_subscription(store)
    assert await drained(store, sandbox) == 0
    [rec] = await records(store, bad_sub)
    assert rec["subscription_job_run_status"] == "Failed" and not rec["is_recurring_payment_processed"]
    assert rec["subscription_retry_count"] == 1 and rec["locked_by"] is None
    assert bad.field in rec["last_error_message"], rec["last_error_message"]
    assert_one_readable_line(rec["last_error_message"])
    # The message names what the outside system wrote, never a table the engine derived from it (issue 15).
    assert not any(t in rec["last_error_message"] for t in ENGINE_TABLES), rec["last_error_message"]
    if not bad.sent:
        assert rec["last_error_code"].removeprefix("invalid:").split(".")[0] in INPUT_TABLES, rec["last_error_code"]
    assert rec["dr_order_id"] is None and sandbox.ledger.orders_for_upstream(rec["upstream_id"]) == []
    sent = [c for c in sandbox.ledger.checkouts.values() if c.get("upstreamId") == rec["upstream_id"]]
    if bad.sent:
        assert "400" in rec["last_error_message"]
    else:  # never sent: nothing reached Digital River for this record, not even a checkout
        assert sent == [] and rec["dr_checkout_id"] is None
    attempt = await store.pool.fetchrow("SELECT outcome, code FROM payment_attempts WHERE process_data_id = $1",
                                        rec["id"])
    assert attempt["outcome"] == "bad_data"
    await assert_charged_once(store, sandbox, good_sub)


SUSPENDED_SUBSCRIPTIONS = {
    "time_zone_unknown": ({"time_zone": "Mars/Olympus_Mons"}, "accounts.time_zone"),
    "time_zone_path": ({"time_zone": "../../../../etc/passwd"}, "accounts.time_zone"),
    "time_zone_sql": ({"time_zone": "UTC'; DROP TABLE accounts; --"}, "accounts.time_zone"),
    "time_zone_control_characters": ({"time_zone": "Europe/Berlin\n\x07"}, "accounts.time_zone"),
    "time_zone_empty_name_part": ({"time_zone": "Europe/"}, "accounts.time_zone"),
}


@pytest.mark.parametrize(("kwargs", "field_name"), list(SUSPENDED_SUBSCRIPTIONS.values()),
                         ids=list(SUSPENDED_SUBSCRIPTIONS))
async def test_unschedulable_subscription_is_suspended_naming_the_field_and_its_neighbour_is_charged(
        store: Store, sandbox: Sandbox, kwargs: dict[str, Any], field_name: str) -> None:
    bad_sub = await due_subscription(store, **kwargs)
    good_sub = await due_subscription(store)
    assert await drained(store, sandbox) == 0
    s = await store.pool.fetchrow("SELECT * FROM subscriptions WHERE id = $1", bad_sub)
    assert s["status"] == "Suspended" and field_name in s["last_error_message"]
    assert_one_readable_line(s["last_error_message"][:2000])
    assert s["installment_count"] == 0 and await records(store, bad_sub) == []
    await assert_charged_once(store, sandbox, good_sub)


@pytest.mark.parametrize("time_zone", ["Europe", "America/Argentina", "Europe/" + "B" * 300],
                         ids=["a_region", "a_subregion", "too_long_for_a_file_name"])
async def test_time_zone_the_zone_database_cannot_open_suspends_only_its_subscription(
        store: Store, sandbox: Sandbox, time_zone: str) -> None:
    bad_sub = await due_subscription(store, time_zone=time_zone)
    good_sub = await due_subscription(store)
    assert await drained(store, sandbox, within=3) == 0
    s = await store.pool.fetchrow("SELECT * FROM subscriptions WHERE id = $1", bad_sub)
    assert s["status"] == "Suspended" and "accounts.time_zone" in s["last_error_message"]
    await assert_charged_once(store, sandbox, good_sub)


async def test_installment_already_recorded_by_another_system_suspends_the_subscription(
        store: Store, sandbox: Sandbox) -> None:
    """The counts say installment 1 is next, but a record for installment 1 exists: an operator must settle it."""
    bad_sub = await due_subscription(store)
    await store.pool.execute(
        "INSERT INTO subscription_process_data (subscription_id, installment_number, subscription_job_run_status) "
        "VALUES ($1, 1, 'Failed')", bad_sub)
    good_sub = await due_subscription(store)
    assert await drained(store, sandbox) == 0
    s = await store.pool.fetchrow("SELECT * FROM subscriptions WHERE id = $1", bad_sub)
    assert s["status"] == "Suspended" and "installment 1" in s["last_error_message"]
    assert s["last_error_message"].startswith("subscriptions.installment_count is 0"), s["last_error_message"]
    await assert_charged_once(store, sandbox, good_sub)


REFUSED_AT_INSERT = {
    "quantity_negative": ({"quantity": -1}, asyncpg.CheckViolationError, "quantity"),
    "remaining_negative": ({"remaining": -5}, asyncpg.CheckViolationError, "installment_count_remaining"),
    "count_negative": ({"installment_count": -1}, asyncpg.CheckViolationError, "installment_count"),
    "interval_zero": ({"installment_interval": 0}, asyncpg.CheckViolationError, "installment_interval"),
    "frequency_unknown": ({"installment_frequency": "Hourly"}, asyncpg.CheckViolationError,
                          "installment_frequency"),
    "status_unknown": ({"status": "Paused"}, asyncpg.CheckViolationError, "status"),
    "currency_too_long": ({"currency": "DOLLARS"}, asyncpg.StringDataRightTruncationError, "character(3)"),
    "customer_id_with_nul": ({"account": {"dr_customer_id": "cus_\x00evil"}}, asyncpg.PostgresError, "0x00"),
    "bill_to_broken_json": ({"account": {"bill_to": '{"address": {"country": "US"'}},
                            asyncpg.InvalidTextRepresentationError, "json"),
    "time_zone_null": ({"account": {"time_zone": None}}, asyncpg.NotNullViolationError, "time_zone"),
    "price_beyond_numeric_18_2": ({"unit_price": "100000000000000000.00"}, asyncpg.NumericValueOutOfRangeError,
                                  "numeric"),
}


@pytest.mark.parametrize(("kwargs", "error", "named"), list(REFUSED_AT_INSERT.values()), ids=list(REFUSED_AT_INSERT))
async def test_row_the_schema_refuses_never_gets_in_and_the_rest_is_charged(
        store: Store, sandbox: Sandbox, kwargs: dict[str, Any], error: type[Exception], named: str) -> None:
    with pytest.raises(error) as refused:
        await due_subscription(store, **kwargs)
    assert named in str(refused.value) or named == getattr(refused.value, "column_name", None) or \
        named in (getattr(refused.value, "constraint_name", None) or ""), str(refused.value)
    assert await store.pool.fetchval("SELECT count(*) FROM subscriptions") == 0
    good_sub = await due_subscription(store)
    assert await drained(store, sandbox) == 0
    await assert_charged_once(store, sandbox, good_sub)


ODD_BUT_VALID_TEXT = {
    "sql_in_customer_id": {"account": {"dr_customer_id": "cus_'); DROP TABLE subscriptions; --"}},
    "sql_in_email": {"account": {"email": "x@example.com'; DELETE FROM orders WHERE '1'='1"}},
    "control_characters_in_name_and_email": {"account": {"name": "\x1b[31mAcme\x07\r\n", "email": "a\tb@example.com"}},
    "right_to_left_and_emoji": {"account": {"dr_customer_id": "cus_\u202eevil🚀", "name": "שלום"}},
    "very_long_email": {"account": {"email": "a" * 10_000 + "@example.com"}},
    "sku_less_product_with_control_characters": {"product": {"dr_sku_id": None, "name": "Widget\n\t'); --",
                                                             "sku_group_id": "widgets", "country_of_origin": "US"}},
}


@pytest.mark.parametrize("kwargs", list(ODD_BUT_VALID_TEXT.values()), ids=list(ODD_BUT_VALID_TEXT))
async def test_odd_text_travels_as_data_and_is_charged_once(store: Store, sandbox: Sandbox,
                                                             kwargs: dict[str, Any]) -> None:
    """SQL, control characters, other scripts and long strings are data: bound as parameters, sent verbatim to
    Digital River (which judges its own ids), and no table is touched by them."""
    odd_sub = await due_subscription(store, **kwargs)
    good_sub = await due_subscription(store)
    assert await drained(store, sandbox) == 0
    await assert_charged_once(store, sandbox, odd_sub)
    await assert_charged_once(store, sandbox, good_sub)
    [rec] = await records(store, odd_sub)
    checkout = sandbox.ledger.checkouts[rec["dr_checkout_id"]]
    account = kwargs.get("account", {})
    for key, sent_as in (("dr_customer_id", "customerId"), ("email", "email")):
        if key in account:
            assert checkout[sent_as] == account[key]
    if "product" in kwargs:
        assert checkout["items"][0]["productDetails"]["name"] == kwargs["product"]["name"]
    for table in ("subscriptions", "orders", "accounts"):
        assert await store.pool.fetchval(f"SELECT count(*) FROM {table}") > 0


# -- dates ----------------------------------------------------------------------------------------------------------


async def test_next_run_date_in_the_far_future_is_not_due_and_left_alone(store: Store, sandbox: Sandbox) -> None:
    later = await due_subscription(store, installment_anchor_date=date(9999, 12, 31),
                                   installment_next_run_date=date(9999, 12, 31))
    good_sub = await due_subscription(store)
    assert await drained(store, sandbox) == 0
    s = await store.pool.fetchrow("SELECT * FROM subscriptions WHERE id = $1", later)
    assert (s["status"], s["installment_count"], s["last_error_message"]) == ("Active", 0, None)
    assert await records(store, later) == []
    await assert_charged_once(store, sandbox, good_sub)


async def test_next_run_date_in_the_far_past_catches_up_oldest_first_and_completes(store: Store,
                                                                                 sandbox: Sandbox) -> None:
    old = await due_subscription(store, installment_anchor_date=date(1, 1, 31),
                                 installment_next_run_date=date(1, 1, 31), remaining=3)
    good_sub = await due_subscription(store)
    assert await drained(store, sandbox) == 0
    recs = await records(store, old)
    assert [r["installment_run_date"] for r in recs] == [date(1, 1, 31), date(1, 2, 28), date(1, 3, 31)]
    assert all(r["subscription_job_run_status"] == "Successful" for r in recs)
    s = await store.pool.fetchrow("SELECT * FROM subscriptions WHERE id = $1", old)
    assert (s["status"], s["installment_count"], s["installment_count_remaining"]) == ("Completed", 3, 0)
    await assert_charged_once(store, sandbox, good_sub)


async def test_subscription_without_next_run_date_is_never_due(store: Store, sandbox: Sandbox) -> None:
    """Due means a next run date on or before today (docs/contract.md); without one a subscription is not due."""
    undated = await due_subscription(store, installment_next_run_date=None, installment_anchor_date=None)
    good_sub = await due_subscription(store)
    assert await drained(store, sandbox) == 0
    assert await records(store, undated) == []
    await assert_charged_once(store, sandbox, good_sub)


async def test_subscription_without_anchor_date_counts_from_its_next_run_date(store: Store, sandbox: Sandbox) -> None:
    today = date.today()
    sub = await due_subscription(store, installment_anchor_date=None, installment_next_run_date=today)
    assert await drained(store, sandbox) == 0
    await assert_charged_once(store, sandbox, sub)
    s = await store.pool.fetchrow("SELECT * FROM subscriptions WHERE id = $1", sub)
    assert today < s["installment_next_run_date"] <= today + timedelta(days=31)


@pytest.mark.parametrize("kwargs", [
    {"installment_frequency": "Yearly", "installment_interval": 10_000},
    {"installment_frequency": "Daily", "installment_interval": 3_000_000},
    {"installment_frequency": "Monthly", "installment_interval": 1_000_000},
], ids=["yearly_every_10000_years", "daily_every_3000000_days", "monthly_every_1000000_months"])
async def test_next_date_beyond_the_calendar_suspends_the_subscription_and_spares_the_rest(
        store: Store, sandbox: Sandbox, kwargs: dict[str, Any]) -> None:
    bad_sub = await due_subscription(store, **kwargs)
    good_sub = await due_subscription(store)
    assert await drained(store, sandbox, within=3) == 0
    s = await store.pool.fetchrow("SELECT * FROM subscriptions WHERE id = $1", bad_sub)
    assert s["status"] in ("Suspended", "Completed") and "installment_interval" in (s["last_error_message"] or "")
    await assert_charged_once(store, sandbox, good_sub)


async def test_ten_thousand_missed_installments_are_made_a_bounded_batch_per_run_beside_the_others(
        store: Store, sandbox: Sandbox) -> None:
    today = date.today()
    behind = await due_subscription(store, installment_frequency="Daily", installment_anchor_date=today - timedelta(
        days=9_999), installment_next_run_date=today - timedelta(days=9_999), remaining=10_000)
    good_sub = await due_subscription(store)
    async with engine_on(store, sandbox, RECURRING_PAYMENT_PROCESS_QUERY_LIMIT="20") as engine:
        assert await engine.run_job("subscription-installments") == 0
        made = len(await records(store, behind))
        assert made == MAX_CATCH_UP  # one run makes a bounded batch of the 10,000…
        assert len(await records(store, good_sub)) == 1  # …and the subscription beside it gets its installment
        assert await engine.run_job("recurring-payments") == 0
        await assert_charged_once(store, sandbox, good_sub)
        charged = [r for r in await records(store, behind) if r["subscription_job_run_status"] == "Successful"]
        assert 0 < len(charged) < 20  # the payments run is bounded by its query limit too
        assert await engine.run_job("subscription-installments") == 0
        assert len(await records(store, behind)) == 2 * MAX_CATCH_UP  # the rest follows on later runs
    s = await store.pool.fetchrow("SELECT * FROM subscriptions WHERE id = $1", behind)
    assert (s["installment_count"], s["installment_count_remaining"]) == (2 * MAX_CATCH_UP, 10_000 - 2 * MAX_CATCH_UP)
    assert s["installment_next_run_date"] == today - timedelta(days=9_999 - 2 * MAX_CATCH_UP)
    recs = await records(store, behind)
    assert [r["installment_number"] for r in recs] == list(range(1, 2 * MAX_CATCH_UP + 1))
    assert [r["installment_run_date"] for r in recs] == sorted(r["installment_run_date"] for r in recs)


async def test_a_subscription_far_behind_does_not_starve_the_others_with_small_batches(
        store: Store, sandbox: Sandbox) -> None:
    today = date.today()
    behind = await due_subscription(store, installment_frequency="Daily", installment_anchor_date=today - timedelta(
        days=9_999), installment_next_run_date=today - timedelta(days=9_999), remaining=10_000)
    good_sub = await due_subscription(store)
    async with engine_on(store, sandbox, CC_SUBSCRIPTION_PROCESSOR_BATCH_SIZE="1",
                         CC_SUBSCRIPTIONS_BATCH_QUERY_LIMIT="3") as engine:
        assert await engine.run_job("subscription-installments") == 0
    assert len(await records(store, good_sub)) == 1
    assert 0 < len(await records(store, behind)) <= 2 * MAX_CATCH_UP


# -- bad rows Digital River should never see --------------------------------------------------------------------


@pytest.mark.parametrize("statement", [
    ACCOUNT.format("bill_to = '\"Main Street 1, Springfield\"'"),
    ACCOUNT.format("bill_to = '[1, 2, 3]'"),
    PARENT_ORDER.format("ship_to = '{\"address\": [\"Main St\", 1]}'"),
], ids=["bill_to_a_string", "bill_to_a_list", "ship_to_address_a_list"])
async def test_malformed_address_fails_before_anything_is_sent(store: Store, sandbox: Sandbox,
                                                               statement: str) -> None:
    bad_sub = await make(store, Bad(sql=(statement,)))
    assert await drained(store, sandbox) == 0
    [rec] = await records(store, bad_sub)
    assert rec["subscription_job_run_status"] == "Failed"
    assert "bill_to" in rec["last_error_message"] or "ship_to" in rec["last_error_message"]
    assert sandbox.ledger.count_requests("POST", "/checkouts") == 0


async def test_amount_too_large_to_store_fails_before_anything_is_sent(store: Store, sandbox: Sandbox) -> None:
    # Fits the subscription's numeric(18,2); with 8.25 % US tax the total does not.
    bad_sub = await due_subscription(store, unit_price="9500000000000000.00")
    good_sub = await due_subscription(store)
    assert await drained(store, sandbox) == 0
    [rec] = await records(store, bad_sub)
    assert rec["subscription_job_run_status"] == "Failed" and "unit_price" in rec["last_error_message"]
    assert [c for c in sandbox.ledger.checkouts.values() if c.get("upstreamId") == rec["upstream_id"]] == []
    await assert_charged_once(store, sandbox, good_sub)
