"""DR Recurring Payment Processor: charge each installment record exactly once.

Takes `Open`, unprocessed records whose `next_attempt_at` has come, ordered by installment run date: at most
RECURRING_PAYMENT_PROCESS_QUERY_LIMIT per run, RECURRING_PAYMENT_BATCH_SIZE per claim, and
RECURRING_PAYMENTS_CONCURRENCY in flight. Only the lowest open installment of a subscription can be claimed, so
two installments of one subscription are never charged at once. For each record (docs/billing-rules.md):

1. An order already on the record: only the local writes are finished.
2. The record's data is checked before any call; bad data fails it with a message naming the field.
3. Digital River's limits on declined merchant-initiated charges: a subscription declined in the last 24 hours,
   or four times in 30 days, waits (no attempt is made or counted).
4. A checkout already on the record means an earlier attempt may have created an order: look it up by
   checkout id, then by upstream id, before anything else. Found: adopt it. Not found: submit that same checkout
   again (with the subscription's current source attached, if the card was replaced). Digital River answering
   404 for it while no order is found is looked at again CHECKOUT_LOOKS times, then the record is Failed
   `checkout_unknown` for an operator: never a second checkout while an order might exist.
5. Otherwise create the checkout (upstreamId = the record's) and commit its id before submitting the order.
6. `POST /orders`: 201 → the order, its items, the cart closed and the record `Successful`, in one
   transaction. 409 decline, 400, timeouts and outages go where the table in docs/billing-rules.md says.

The data is checked (step 2), the subscription must still be `Active` and Digital River's decline limits must
allow a charge (step 3) only once step 4 has shown that no order exists: whatever changed since, a record that
was already charged is adopted, never failed.

Fencing: every write carries the claim's lease token, and every call that can make an order is preceded by a
check that the lease is still this claim's and unexpired (saving the checkout, or `fence_checkout`). A worker
that outlived its lease changes nothing and stops; at most one checkout is ever saved per attempt.

A 401/403 stops the run from claiming more: the key is refused, and nothing is counted against any record.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar

import asyncpg
import orjson

from engine.batch import BatchWriter
from engine.digital_river import (
    RETRY_AFTER_CAP_SECONDS,
    AuthError,
    BadRequestError,
    DeclinedError,
    DigitalRiverClient,
    DigitalRiverError,
    NotFoundError,
    Order,
    TransientError,
    dr_message,
)
from engine.failpoints import failpoint
from engine.jobs import FAILED, SUCCEEDED, BadData, Job, Outcome, Outcomes, Run, Services, backoff
from engine.metrics import first_due_payment
from engine.money import cents, is_currency
from engine.store import LeaseLost, Leases
from engine.storefronts import Storefront

DECLINE_PAUSE = timedelta(hours=24)
DECLINE_WINDOW = timedelta(days=30)
DECLINES_PER_WINDOW = 4
# Looks (each a POST /orders answered 404 and both lookups empty, 1, 2, 4 … minutes apart) before a record whose
# checkout Digital River does not know is Failed `checkout_unknown` for an operator.
CHECKOUT_LOOKS = 5
# How long a write waits, in all, for a row another session holds locked before the worker gives up on it.
BUSY_WAIT_SECONDS = 0.5
# Subscription statuses whose installments are not charged any more (Completed only means none are left to make).
NOT_CHARGED = {"Cancelled": "subscription_cancelled", "Suspended": "subscription_suspended"}
# Totals are numeric(18,2): a charge this large could not be stored with its tax.
MAX_CHARGE = Decimal("1e15")

class OutcomeUnknown(Exception):
    """Whether Digital River made an order for this record cannot be told now."""


def validate(rec: asyncpg.Record) -> None:
    """Raise BadData naming the first field that keeps this record from being charged."""
    if rec["payment_found"] is None:
        raise BadData("subscriptions.stored_payment_id is empty: a subscription is charged to the stored_payments "
                      "row it names, which must be active and carry the Digital River source id")
    if not rec["payment_active"]:
        raise BadData(f"stored_payments.is_active is false for stored payment {rec['stored_payment_id']}, the one "
                      "subscriptions.stored_payment_id names: only an active stored payment is charged")
    if not (rec["dr_source_id"] or "").strip():
        raise BadData(f"stored_payments.dr_source_id is empty for stored payment {rec['stored_payment_id']}: it must "
                      "be the Digital River source id (src_…) to charge")
    if rec["account_id"] is None:
        raise BadData("subscriptions.account_id is empty: a subscription needs the accounts row of the customer, "
                      "with the Digital River customer id in accounts.dr_customer_id")
    if not (rec["dr_customer_id"] or "").strip():
        raise BadData(f"accounts.dr_customer_id is empty for account {rec['account_id']}: it must be the Digital "
                      "River customer id (cus_…) the installment is charged to")
    if rec["product_found"] is None:
        raise BadData("subscriptions.product_id is empty: a subscription needs the products row of what it "
                      "charges for")
    if not (rec["dr_sku_id"] or "").strip():
        # Without a SKU the item carries productDetails, which Digital River requires to have skuGroupId,
        # countryOfOrigin and name (GitBook product-management/using-product-details.md).
        for column, value in (("products.sku_group_id", rec["sku_group_id"]), ("products.name", rec["product_name"]),
                              ("products.country_of_origin", rec["country_of_origin"])):
            if not (value or "").strip():
                raise BadData(f"products.dr_sku_id is empty, and {column} is empty too: a product without a Digital "
                              "River SKU is sent as productDetails, which needs skuGroupId, name and countryOfOrigin")
        if not re.fullmatch(r"[A-Z]{2}", rec["country_of_origin"].strip()):
            raise BadData(f"products.country_of_origin {rec['country_of_origin']!r} is not an ISO 3166 alpha-2 "
                          "country code")
    # Quantity, price, currency and billing agreement are the subscription's as copied into the installment's cart
    # when the record was made (installments.sql): the messages name the subscription's columns, which the outside
    # system wrote, and say which installment carries the value.
    made = f"installment {rec['installment_number']} was made with"
    if rec["quantity"] is None or rec["quantity"] <= 0:
        raise BadData(f"subscriptions.quantity must be 1 or more, but {made} {_shown(rec['quantity'])}")
    if rec["unit_price"] is None or rec["unit_price"] <= 0:
        raise BadData(f"subscriptions.unit_price must be more than 0, but {made} {_shown(rec['unit_price'])}")
    if rec["unit_price"] * rec["quantity"] >= MAX_CHARGE:
        raise BadData(f"subscriptions.unit_price × quantity must stay below {MAX_CHARGE:,.0f} for the order total "
                      f"with tax to fit numeric(18,2), but {made} {rec['unit_price']} × {rec['quantity']}")
    if not is_currency(rec["currency"]):
        raise BadData(f"subscriptions.currency must be an ISO 4217 code such as USD or EUR, but {made} "
                      f"{_shown(rec['currency'])}")
    if not (rec["billing_agreement_id"] or "").strip():
        raise BadData("subscriptions.dr_billing_agreement_id is empty, and so is the dr_billing_agreement_id of the "
                      "order item in subscriptions.parent_order_item_id: installment "
                      f"{rec['installment_number']} has no Digital River billing agreement to be charged against")


def _shown(value: object) -> str:
    """A bad value as a message shows it: NULL for none, text quoted (so blanks show), numbers as they are."""
    if value is None:
        return "NULL"
    return repr(value) if isinstance(value, str) else str(value)


def _address(value: str | None, column: str, *, billing: bool = False) -> dict[str, Any] | None:
    """A ship-to or bill-to as Digital River takes it: a JSON object whose `address`, if any, is an object. A
    bill-to must have one: Digital River's Billing requires `address` (its Shipping does not;
    DigitalRiver/digital-river-php docs/Model/Billing.md and Shipping.md)."""
    if not value:
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        raise BadData(f"{column} is not valid JSON") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("address", {}), dict):
        raise BadData(f"{column} must be a JSON object with an object `address`, got {value[:80]!r}")
    if billing and not parsed.get("address"):
        raise BadData(f"{column} has no `address`: Digital River requires billTo.address, got {value[:80]!r}")
    return parsed


def checkout_body(rec: asyncpg.Record) -> dict[str, Any]:
    """The `POST /checkouts` body for one installment (docs/digital-river.md)."""
    item: dict[str, Any] = {
        "price": float(rec["unit_price"]),
        "quantity": rec["quantity"],
        "subscriptionInfo": {
            "autoRenewal": True,
            "billingAgreementId": rec["billing_agreement_id"],
            "subscriptionId": str(rec["subscription_id"]),
        },
        "metadata": {"installmentNumber": rec["installment_number"]},
    }
    if rec["dr_sku_id"]:
        item["skuId"] = rec["dr_sku_id"]
    else:
        # productDetails as Digital River takes it: our product id, the SKU group (which carries the tax code and
        # ECCN: those are SKU fields, not product-details fields), name and country of origin.
        item["productDetails"] = {"id": rec["sku"] or str(rec["product_id"]), "skuGroupId": rec["sku_group_id"].strip(),
                                  "name": rec["product_name"], "countryOfOrigin": rec["country_of_origin"].strip()}
    body: dict[str, Any] = {
        "currency": rec["currency"].strip().upper(),
        "customerId": rec["dr_customer_id"],
        "sourceId": rec["dr_source_id"],
        "chargeType": "merchant_initiated",
        "upstreamId": rec["upstream_id"],
        "items": [item],
        "metadata": {"subscriptionProcessDataId": str(rec["id"])},
    }
    if rec["email"]:
        body["email"] = rec["email"]
    ship_to = _address(rec["ship_to"], "orders.ship_to of the subscription's parent order")
    bill_to = (_address(rec["order_bill_to"], "orders.bill_to of the subscription's parent order", billing=True)
               or _address(rec["account_bill_to"], "accounts.bill_to", billing=True))
    if ship_to:
        body["shipTo"] = ship_to
    if bill_to:
        body["billTo"] = bill_to
    return body


def charged_row(rec: asyncpg.Record, order: Order) -> dict[str, Any]:
    """One element of `finish_charged`'s input: the order Digital River made for this record."""
    unit_price = rec["unit_price"] or Decimal(0)
    return {
        "record_id": rec["id"], "dr_order_id": order.id, "dr_checkout_id": order.checkout_id or rec["dr_checkout_id"],
        "state": order.state, "fraud_state": order.fraud_state, "charge_state": order.charge_state,
        "currency": order.currency.upper(), "subtotal": str(order.subtotal),
        "total_tax": str(order.total_tax), "total_amount": str(order.total_amount),
        "items": [{
            "dr_item_id": item.id, "quantity": item.quantity,
            "unit_price": str(unit_price if item.quantity == 0 else cents(item.amount / item.quantity)),
            "tax_amount": str(item.tax_amount), "state": item.state,
            "billing_agreement_id": item.billing_agreement_id,
        } for item in order.items],
    }


# The claim order's beginning (asyncpg sends date.min as -infinity), and the windows of it a claim and drain's
# check read (payments.sql, `payment_claim_window`).
CLAIM_START: tuple[date, int] = (date.min, 0)
CLAIM_WINDOW = 1000
CLAIM_WINDOW_MIN = 64
HAS_DUE_WINDOW = 5000


def claim_window(size: int) -> int:
    """The rows a claim of `size` records reads first: four per record wanted, at least CLAIM_WINDOW_MIN, at most
    CLAIM_WINDOW (a window can hold records not due yet, or waiting behind an earlier installment)."""
    return max(CLAIM_WINDOW_MIN, min(CLAIM_WINDOW, size * 4))


def order_failure(order: Order) -> tuple[str, str, bool] | None:
    """(code, message, hard) when Digital River's order failed after it was made: blocked (a hard decline),
    cancelled or its charge failed (a soft one, billing-rules.md); None for a live order."""
    if order.state == "blocked":
        return "order_blocked", f"Digital River blocked order {order.id} (fraud review or a denied party)", True
    if order.charge_state == "failed":
        return "charge_failed", f"Digital River could not charge order {order.id} (its charge failed)", False
    if order.state == "cancelled":
        return "order_cancelled", f"Digital River cancelled order {order.id} before it was paid", False
    return None


def decline_limit(rec: asyncpg.Record) -> tuple[datetime, str] | None:
    """When Digital River's limits on declined merchant-initiated charges let this subscription be charged
    again (None: now), whatever the settings say."""
    now = datetime.now(UTC)
    waits = []
    if rec["last_decline_at"] is not None and rec["last_decline_at"] + DECLINE_PAUSE > now:
        waits.append((rec["last_decline_at"] + DECLINE_PAUSE, "declined in the last 24 hours"))
    if (rec["declines_30d"] or 0) >= DECLINES_PER_WINDOW:
        waits.append((rec["oldest_decline_30d"] + DECLINE_WINDOW, "declined 4 times in 30 days"))
    if not waits:
        return None
    until, why = max(waits)
    return until, f"subscription {rec['subscription_id']} {why}; next attempt at {until.isoformat()}"


class RecurringPayments(Job):
    job_name = "recurring-payments"
    due_table = "subscription_process_data"
    outcomes: ClassVar[Outcomes] = {
        "installment_charged": ("info", SUCCEEDED),
        "installment_adopted": ("info", SUCCEEDED),
        "installment_pending": ("info", None),
        "installment_deferred": ("info", None),
        "installment_declined": ("warning", FAILED),
        "installment_failed": ("error", FAILED),
        "installment_outage": ("warning", None),
        "installment_unknown": ("warning", None),
        "installment_key_refused": ("error", None),
        "installment_lease_lost": ("warning", None),
        "installment_not_charged": ("warning", FAILED),
        "installment_checkout_unknown": ("error", FAILED),
        "installment_settled_elsewhere": ("warning", None),
        "installment_settlement_conflict": ("error", None),
        "installment_crashed": ("error", FAILED),
    }

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        # Records in flight share their writes: one statement commits many checkouts, one many charges.
        self.checkouts: BatchWriter[tuple[int, int, str, str], asyncpg.Record] = BatchWriter(self._save_checkouts,
                                                                                          name="checkouts")
        self.charges: BatchWriter[dict[str, Any], asyncpg.Record] = BatchWriter(self._finish_charges,
                                                                                name="charges")

    async def _save_checkouts(self, items: Sequence[tuple[int, int, str, str]]) -> list[asyncpg.Record]:
        rows = await self.store.fetch("save_checkouts", [i[0] for i in items], [i[1] for i in items],
                                      [i[2] for i in items], [i[3] for i in items], float(self.settings.lease_seconds))
        results = {r["id"]: r for r in rows}
        return [results[i[0]] for i in items]

    async def _finish_charges(self, items: Sequence[dict[str, Any]]) -> list[asyncpg.Record]:
        rows = await self.store.fetch("finish_charged", self.store.node, orjson.dumps(list(items)).decode())
        results = {r["id"]: r for r in rows}
        return [results[item["record_id"]] for item in items]

    async def due_count(self) -> int:
        return int(await self.store.fetchval("count_due_payment_records"))

    async def has_due(self) -> bool:
        """Whether any record of a storefront with a key and no long 429 pause is due: each one's claim order walked
        a window at a time, never a count of the backlog (a storefront waiting for a key, or out a pause, has nothing
        due for drain)."""
        labels = self.ready_labels()
        return bool(labels) and await first_due_payment(self.store, HAS_DUE_WINDOW, labels) is not None

    async def run_once(self, run: Run) -> None:
        """Each storefront with a key claims and charges its own records at once (`claim_by_storefront`), each
        within RECURRING_PAYMENT_PROCESS_QUERY_LIMIT and RECURRING_PAYMENTS_CONCURRENCY, as the Salesforce app's job
        runs per storefront. Storefronts whose records wait for a key are named once per run."""
        labels = [row["label"] for row in await self.store.fetch("payment_storefronts")]
        keyed = {storefront.label for storefront in self.storefronts}
        waiting = [label for label in labels if label not in keyed]
        if waiting:
            self.log.warning("storefronts_waiting_for_key", storefronts=waiting,
                             detail="their installment records are not charged until DR_API_KEY_<STORE> is set")

        async def each(storefront: Storefront) -> None:
            if storefront.label in labels:
                await self._charge_storefront(run, storefront)

        await self.claim_by_storefront(each)

    async def _charge_storefront(self, run: Run, storefront: Storefront) -> None:
        leases = self.leases("subscription_process_data")
        # Where the run is in this storefront's claim order (installment date, id). A claim reads a window of
        # CLAIM_WINDOW open records from there (issue 14: its cost follows what it takes, not the backlog) and the
        # cursor moves to the last row it took, or past a window with nothing due. At the end of the order a new pass
        # starts from the beginning (an installment whose earlier one finished since, a record given back), once per
        # pass that took something; a pass that takes nothing ends the claiming.
        cursor = CLAIM_START
        took_in_pass = False
        label = storefront.label

        async def claim(free: int, remaining: int) -> tuple[int, list[tuple[str, Any]]] | None:
            nonlocal cursor, took_in_pass
            size = min(self.settings.recurring_payment_batch_size, free, remaining)
            # The window read follows what the claim takes (a claim of 10 reads 64 rows, not 1,000: issue 17's
            # benchmark found the fixed window a third of PostgreSQL's CPU), and doubles, up to CLAIM_WINDOW, over
            # stretches with nothing due.
            width = claim_window(size)
            while True:
                rows = await leases.claim("claim_payment_records", size, *cursor, width, label)
                if rows:
                    cursor = max((r["claim_date"], r["id"]) for r in rows)
                    took_in_pass = True
                    break
                window = await self.store.fetchrow("payment_claim_window_end", *cursor, width, label)
                if window is not None:
                    cursor = (window["claim_date"], window["id"])
                    width = min(CLAIM_WINDOW, width * 2)
                    continue
                if not took_in_pass:
                    cursor = CLAIM_START  # called again once a record in flight finishes: look from the start
                    return None
                cursor, took_in_pass = CLAIM_START, False
            failpoint("after_claim")
            details = await self.store.fetch("payment_record_details", [r["id"] for r in rows])
            return len(rows), [(f"record-{rec['id']}", self._process(run, leases, rec, storefront.client))
                               for rec in details]

        # The next installment of a subscription in flight becomes claimable when it finishes: wait for it.
        await self.claim_and_process(run, [leases], self.settings.recurring_payment_process_query_limit, claim,
                                     wait_when_empty=True, storefront=storefront)

    async def _process(self, run: Run, leases: Leases, rec: asyncpg.Record, client: DigitalRiverClient) -> None:
        started = time.monotonic()
        fields: dict[str, Any] = {"record_id": rec["id"], "subscription_id": rec["subscription_id"],
                                  "installment_number": rec["installment_number"], "storefront": client.storefront}
        charge = Charge(self, leases, rec, client)
        # A bug, or an answer the store refuses: the record is put back with the outage backoff (checkout kept, so
        # nothing is charged twice). If even that fails, its lease lapses and it comes back.
        outcome = await self.attempt(
            charge.run(), fields=fields, lease_lost="installment_lease_lost", crashed="installment_crashed",
            on_crash=lambda error: charge.postpone("installment_crashed", "crashed", error, outage=True))
        leases.done([rec["id"]])
        self.settle(run, outcome, started, **fields)


class Charge:
    """The exactly-once protocol for one claimed record, every write fenced by the claim's lease token."""

    def __init__(self, job: RecurringPayments, leases: Leases, rec: asyncpg.Record, client: DigitalRiverClient) -> None:
        self.job = job
        # The client of the record's storefront: every call for this record is made with its key.
        self.dr = client
        self.leases = leases
        self.rec = rec
        self.id: int = rec["id"]
        self.token = leases.token(self.id)
        self.store = job.store
        self.settings = job.settings
        self.app_log = job.services.app_log

    async def run(self) -> Outcome:
        """The protocol for one record; returns how it ended."""
        rec, dr = self.rec, self.dr
        try:
            if rec["dr_order_id"]:
                return await self.settle_order(await dr.get_order(rec["dr_order_id"]), adopted=True)
            checkout_id = rec["dr_checkout_id"]
            if checkout_id:
                # Whatever the data looks like now, first find out whether an earlier attempt already charged.
                order = await self.find_order(checkout_id)
                if order is not None:
                    return await self.settle_order(order, adopted=True)
            code = NOT_CHARGED.get(rec["subscription_status"])
            if code is not None:
                return await self.fail_uncounted(
                    "installment_not_charged", code,
                    f"subscription {rec['subscription_id']} is {rec['subscription_status']}: installment "
                    f"{rec['installment_number']} is not charged", level="WARN")
            try:
                validate(rec)
                body = checkout_body(rec)
            except BadData as exc:
                return await self.failed(f"invalid:{exc.field}", str(exc), hard=True)
            limit = decline_limit(rec)
            if limit is not None:
                until, why = limit
                return await self.postpone("installment_deferred", "decline_limit", why, until=until)
            if checkout_id:
                await self.fence(checkout_id)
                if rec["dr_checkout_source_id"] != rec["dr_source_id"]:
                    # The card was replaced since this checkout was made: the current one is charged.
                    try:
                        await dr.attach_source(checkout_id, rec["dr_source_id"])
                    except NotFoundError:
                        return await self.checkout_gone(checkout_id)
                    if await self.store.fetchval("save_checkout_source", self.id, self.token, checkout_id,
                                                 rec["dr_source_id"]) is None:
                        raise LeaseLost(f"record {self.id} lease lost while its checkout's source was replaced")
            else:
                self.leases.check(self.id)
                checkout = await dr.create_checkout(body)
                if checkout.payment_session_state not in (None, "requires_confirmation"):
                    return await self.failed(
                        "payment_session_state",
                        f"checkout {checkout.id} payment session is {checkout.payment_session_state}, "
                        "not requires_confirmation", hard=True)
                failpoint("after_checkout_created")
                await self.save_checkout(checkout.id)
                checkout_id = checkout.id
                failpoint("after_checkout_saved")
            return await self.submit(checkout_id)
        except AuthError as exc:
            self.job.refuse(self.dr)
            await self.leases.release([self.id])
            return Outcome("installment_key_refused", {"error": str(exc)})
        except OutcomeUnknown as exc:
            # An order may exist: keep the checkout, so the next attempt looks again before anything else.
            return await self.postpone("installment_unknown", "outcome_unknown", str(exc), outage=True)
        except TransientError as exc:
            if exc.rate_limited:
                return await self.rate_limited(exc)
            return await self.postpone("installment_outage", "dr_unavailable", str(exc), outage=True)
        except BadRequestError as exc:
            return await self.failed(exc.code or "bad_request", dr_message(exc), hard=True, error=exc)
        except NotFoundError as exc:
            # An order id on the record that Digital River does not know: an operator has to look.
            return await self.postpone("installment_unknown", "order_not_found", str(exc), outage=True)
        except DigitalRiverError as exc:
            return await self.failed(exc.code or "dr_error", dr_message(exc), hard=True, error=exc)

    async def write(self, writer: BatchWriter[Any, asyncpg.Record], item: Any, *, fenced: bool = False
                    ) -> asyncpg.Record:
        """Submit `item` to one of the job's batch writers; its answer has a `result`. A row another session holds
        locked answers `busy` (the batch skips it rather than wait): try again a little later, for at most half a
        lease, and when `fenced` not once the heartbeat has found the lease gone."""
        result = await writer.submit(item)
        waited = 0.0
        while result["result"] == "busy" and waited < self.settings.lease_seconds / 2:
            await asyncio.sleep(BUSY_WAIT_SECONDS)
            waited += BUSY_WAIT_SECONDS
            if fenced:
                self.leases.check(self.id)
            result = await writer.submit(item)
        return result

    # -- the fence before a call that can make an order ---------------------------------------------------------

    async def save_checkout(self, checkout_id: str) -> None:
        """Commit the new checkout on the record (compare-and-set: only if it still has none, under this claim's
        unexpired lease), or raise LeaseLost: then no order may be submitted, and the checkout stays an orphan
        that charges nobody. A row locked by another session is waited for a little, never for long."""
        result = (await self.write(self.job.checkouts, (self.id, self.token, checkout_id, self.rec["dr_source_id"]),
                                   fenced=True))["result"]
        if result != "saved":
            raise LeaseLost(f"record {self.id}: checkout {checkout_id} not saved ({result}); no order submitted")

    async def fence(self, checkout_id: str) -> None:
        """Before an existing checkout is used again: the lease is still this claim's, unexpired, and the record
        still carries that checkout (pushed out by a full lease for the call); else LeaseLost."""
        self.leases.check(self.id)
        if await self.store.fetchval("fence_checkout", self.id, self.token, checkout_id,
                                     float(self.settings.lease_seconds)) is None:
            raise LeaseLost(f"record {self.id} lease lost before checkout {checkout_id} was submitted")

    # -- POST /orders and finding what it did -------------------------------------------------------------------

    async def submit(self, checkout_id: str) -> Outcome:
        """POST /orders for a committed checkout, and every way it can end."""
        self.leases.check(self.id)
        try:
            order = await self.dr.create_order(checkout_id)
        except DeclinedError as exc:
            message = dr_message(exc)
            if not exc.classified:
                message = (f"{message} (decline code {exc.code!r} is not in Digital River's table for merchant-"
                           "initiated charges: treated as soft, within the once-a-day and four-in-30-days limits)")
            return await self.failed(exc.code or "declined", message, hard=not exc.soft, decline=True, error=exc,
                                     checkout_id=checkout_id)
        except NotFoundError:
            # The checkout already became an order (an earlier attempt's answer was lost), or Digital River no
            # longer knows it: find out which.
            return await self.checkout_gone(checkout_id)
        except TransientError as exc:
            if exc.rate_limited:
                # Refused before anything was done (Digital River's rate limit, or not sent at all during its
                # pause): no order exists, and every call with this key is refused until Retry-After has passed, a
                # lookup too. Try again after it; the checkout is kept, so that attempt still looks first.
                return await self.rate_limited(exc)
            # The order may or may not exist: look before doing anything else.
            try:
                found = await self.find_order(checkout_id)
            except OutcomeUnknown as lookup:
                return await self.postpone("installment_unknown", "outcome_unknown", f"{exc}; {lookup}",
                                           outage=True)
            if found is None:
                return await self.postpone("installment_outage", "dr_unavailable", str(exc), outage=True)
            return await self.settle_order(found, adopted=True)
        except BadRequestError as exc:
            return await self.failed(exc.code or "bad_request", dr_message(exc), hard=True, error=exc)
        failpoint("after_order_created")
        return await self.settle_order(order, adopted=False)

    async def checkout_gone(self, checkout_id: str) -> Outcome:
        """Digital River answered 404 for the record's checkout: adopt its order if one is found, else look again
        later, and after CHECKOUT_LOOKS looks fail the record for an operator (never a second checkout)."""
        found = await self.find_order(checkout_id)
        if found is not None:
            return await self.settle_order(found, adopted=True)
        looks = self.rec["checkout_looks"] + 1
        if looks >= CHECKOUT_LOOKS:
            message = (f"Digital River does not know checkout {checkout_id} (POST /orders answered 404) and no "
                       f"order carries it or upstream id {self.rec['upstream_id']}, after {looks} looks; an "
                       "operator must check Digital River, then `retry installment` (a new checkout is made)")
            return await self.fail_uncounted("installment_checkout_unknown", "checkout_unknown", message,
                                             level="ERROR")
        return await self.postpone(
            "installment_unknown", "checkout_unknown",
            f"Digital River does not know checkout {checkout_id} and no order was found yet (look {looks} of "
            f"{CHECKOUT_LOOKS})", outage=True, looks=1)

    async def find_order(self, checkout_id: str) -> Order | None:
        """This record's order at Digital River, by checkout id and then by upstream id; None if there is none.

        Only an order carrying this checkout or this record's upstream id is adopted, whatever else a lookup
        lists. A lookup Digital River refuses (anything but a refused key) leaves the outcome unknown.
        """
        dr, upstream_id = self.dr, self.rec["upstream_id"]
        # An order that failed after it was made (order.charge.failed, order.blocked, order.cancelled) stays in
        # the record's history and is never adopted: a later attempt's lookups by upstream id still list it.
        failed = set(self.rec["dr_failed_order_ids"] or ())
        try:
            orders = await dr.list_orders(checkout_id=checkout_id)
            mine = [o for o in orders if (o.checkout_id == checkout_id or o.upstream_id == upstream_id)
                    and o.id not in failed]
            if not mine:
                orders = await dr.list_orders(upstream_ids=[upstream_id])
                mine = [o for o in orders if o.upstream_id == upstream_id and o.id not in failed]
        except AuthError:
            raise
        except DigitalRiverError as exc:
            raise OutcomeUnknown(f"looking for the order of checkout {checkout_id} failed: {exc}") from None
        return mine[0] if mine else None

    # -- writing how it ended -----------------------------------------------------------------------------------

    async def settle_order(self, order: Order, *, adopted: bool) -> Outcome:
        """This record's order, as Digital River answered it: charged (or Pending), unless it already failed."""
        failure = order_failure(order)
        if failure is None:
            return await self.charged(order, adopted=adopted)
        code, message, hard = failure
        return await self.failed(code, message, hard=hard, decline=True, failed_order=order.id,
                                 checkout_id=order.checkout_id)

    async def charged(self, order: Order, *, adopted: bool) -> Outcome:
        result = await self.write(self.job.charges, charged_row(self.rec, order) | {"token": self.token})
        failpoint("after_order_saved")
        fields = {"dr_order_id": order.id, "order_state": order.state, "amount": f"{order.total_amount:.2f}",
                  "tax": f"{order.total_tax:.2f}", "currency": order.currency}
        if result["result"] == "written":
            if result["status"] == "Pending":
                return Outcome("installment_pending", fields | {"order_id": result["order_id"], "status": "Pending"})
            return Outcome("installment_adopted" if adopted else "installment_charged",
                           fields | {"order_id": result["order_id"]})
        if result["result"] == "settled":
            settled = result["settled_dr_order_id"]
            if settled == order.id:
                return Outcome("installment_settled_elsewhere", fields | {"reason": "another worker wrote it first"})
            # Two Digital River orders for one record: the alarm. Nothing here may hide it.
            message = (f"record {self.id} was already settled with Digital River order {settled}; this worker holds "
                       f"order {order.id} for it as well: a customer may have been charged twice")
            self.job.settlement_conflict(self.id, message)
            return Outcome("installment_settlement_conflict", fields | {"settled_dr_order_id": settled,
                                                                        "reason": message, "app_logged": True})
        raise LeaseLost(f"record {self.id} lease lost before its order {order.id} was written "
                        f"({result['result']}); the claim that holds it adopts that order", dr_order_id=order.id)

    async def failed(self, code: str, message: str, *, hard: bool, decline: bool = False,
                     error: DigitalRiverError | None = None, checkout_id: str | None = None,
                     failed_order: str | None = None) -> Outcome:
        """A counted attempt without an order: Failed when hard or past SUBSCRIPTION_RETRY_COUNT, else Open."""
        rec = self.rec
        attempts = rec["subscription_retry_count"] + 1
        exhausted = attempts > self.settings.subscription_retry_count
        status = "Failed" if hard or exhausted else "Open"
        next_attempt = datetime.now(UTC) + (DECLINE_PAUSE if decline else timedelta(0))
        if failed_order is not None:
            outcome_kind = "hard_decline" if hard else "soft_decline"
        else:
            outcome_kind = ("soft_decline" if error is not None and getattr(error, "soft", False)
                            else "hard_decline") if decline else "bad_data"
        kept = await self.store.fetchval(
            "finish_failed_attempt", self.id, self.token, status, next_attempt, code, message[:2000],
            outcome_kind, decline, "Declined" if decline else None,
            rec["unit_price"] * rec["quantity"] if rec["unit_price"] and rec["quantity"] else None,
            (rec["currency"] or "").strip().upper()[:3] or None, self.job.store.node, failed_order)
        if kept is None:
            if decline:
                # The decline happened whoever holds the record now: Digital River's limits must count it.
                await self.store.fetchval("record_decline_without_lease", self.id, checkout_id,
                                          outcome_kind, code, message[:2000], self.job.store.node)
            raise LeaseLost(f"record {self.id} lease lost before its failure ({code}) was written")
        self.app_log.write(
            "ERROR" if status == "Failed" else "WARN", self.job.job_name, f"installment {outcome_kind}: {message}",
            record_id=self.id, status=error.status if error else None,
            request={"checkoutId": checkout_id or rec["dr_checkout_id"], "upstreamId": rec["upstream_id"]},
            response=error.response if error else None)
        return Outcome("installment_declined" if decline and status == "Open" else "installment_failed", {
            "status": status, "code": code, "reason": message, "retry_count": attempts, "app_logged": True})

    async def fail_uncounted(self, event: str, code: str, message: str, *, level: str) -> Outcome:
        """Failed without a counted attempt: no charge was tried (the subscription stopped, the checkout is lost)."""
        if await self.store.fetchval("fail_record_uncounted", self.id, self.token, code, message[:2000]) is None:
            raise LeaseLost(f"record {self.id} lease lost before its failure ({code}) was written")
        self.app_log.write(level, self.job.job_name, f"installment not charged: {message}", record_id=self.id,
                           request={"checkoutId": self.rec["dr_checkout_id"], "upstreamId": self.rec["upstream_id"]})
        return Outcome(event, {"status": "Failed", "code": code, "reason": message, "app_logged": True})

    async def rate_limited(self, exc: TransientError) -> Outcome:
        """A call refused for Digital River's rate limit (a 429, or not sent during the key's pause): nothing was
        done, so the record waits out the Retry-After, not counted as an attempt."""
        # Without a Retry-After the record waits the longest a 429 can ask for: nothing says when the key is free.
        return await self.postpone("installment_outage", "rate_limited", str(exc), outage=True,
                                   until=datetime.now(UTC) + exc.rate_wait(absent=RETRY_AFTER_CAP_SECONDS))

    async def postpone(self, event: str, code: str, message: str, *, outage: bool = False,
                       until: datetime | None = None, looks: int = 0) -> Outcome:
        """No attempt counted: an outage or unknown outcome (the checkout is kept, so the next attempt looks
        for its order first; backoff 1, 2, 4 … minutes) or a decline limit (until the limit allows)."""
        if until is None:
            until = datetime.now(UTC) + backoff(self.rec["outage_count"] + 1)
        kept = await self.store.fetchval("postpone_record", self.id, self.token, until, code, message[:2000],
                                         1 if outage else 0, looks)
        if kept is None:
            raise LeaseLost(f"record {self.id} lease lost before it was postponed ({code})")
        if outage:
            self.app_log.write("WARN", self.job.job_name, f"{event}: {message}", record_id=self.id)
        return Outcome(event, {"code": code, "reason": message, "next_attempt_at": until.isoformat(),
                               "app_logged": outage})
