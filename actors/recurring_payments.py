"""DR Recurring Payment Processor: charge each installment record exactly once.

Takes `Open`, unprocessed records whose `next_attempt_at` has come, ordered by installment run date: at most
RECURRING_PAYMENT_PROCESS_QUERY_LIMIT per run, RECURRING_PAYMENT_BATCH_SIZE per claim, and
RECURRING_PAYMENTS_CONCURRENCY in flight. Only the lowest open installment of a subscription can be claimed, so
two installments of one subscription are never charged at once. For each record (billing-rules.md):

1. An order already on the record: only the local writes are finished.
2. The record's data is checked before any call; bad data fails it with a message naming the field.
3. Digital River's limits on declined merchant-initiated charges: a subscription declined in the last 24 hours,
   or four times in 30 days, waits (no attempt is made or counted).
4. A checkout already on the record means an earlier attempt may have created an order: look it up by
   checkout id, then by upstream id. Found: adopt it. Not found: submit that same checkout again.
5. Otherwise create the checkout (upstreamId = the record's) and commit its id before submitting the order.
6. `POST /orders`: 201 → the order, its items, the cart closed and the record `Successful`, in one
   transaction. 409 decline, 400, timeouts and outages go where the table in billing-rules.md says.

A 401/403 stops the run from claiming more: the key is refused, and nothing is counted against any record.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from engine.batch import BatchWriter
from engine.digital_river import (
    AuthError,
    BadRequestError,
    DeclinedError,
    DigitalRiverError,
    NotFoundError,
    Order,
    TransientError,
)
from engine.failpoints import failpoint
from engine.jobs import Job, Run, Services
from engine.logs import get_logger, redact_text
from engine.money import is_currency
from engine.store import LeaseLost, Leases

log = get_logger(component="recurring_payments")

DECLINE_PAUSE = timedelta(hours=24)
DECLINE_WINDOW = timedelta(days=30)
DECLINES_PER_WINDOW = 4
OUTAGE_BACKOFF_MAX = timedelta(hours=1)
CENT = Decimal("0.01")
# Totals are numeric(18,2): a charge this large could not be stored with its tax.
MAX_CHARGE = Decimal("1e15")

# One structured line per record outcome; the level for each is chosen here and nowhere else.
OUTCOME_LEVEL = {
    "installment_charged": "info",
    "installment_adopted": "info",
    "installment_deferred": "info",
    "installment_declined": "warning",
    "installment_failed": "error",
    "installment_outage": "warning",
    "installment_unknown": "warning",
    "installment_key_refused": "error",
    "installment_lease_lost": "warning",
    "installment_crashed": "error",
}


class OutcomeUnknown(Exception):
    """Whether Digital River made an order for this record cannot be told now."""


class BadData(ValueError):
    """The record cannot be sent to Digital River; `field` (also its error code) names what is wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.field = message.split(" ", 1)[0].rstrip(":")


@dataclass
class Outcome:
    event: str
    fields: dict[str, Any]


def outage_delay(outages: int) -> timedelta:
    """1, 2, 4 … minutes after consecutive outages, at most an hour."""
    return min(OUTAGE_BACKOFF_MAX, timedelta(minutes=2 ** min(outages, 10)))


def validate(rec: asyncpg.Record) -> None:
    """Raise BadData naming the first field that keeps this record from being charged."""
    if rec["payment_found"] is None:
        raise BadData("stored_payment_id: the subscription has no stored payment")
    if not rec["payment_active"]:
        raise BadData(f"stored_payments.is_active is false for stored payment {rec['stored_payment_id']}")
    if not (rec["dr_source_id"] or "").strip():
        raise BadData("stored_payments.dr_source_id is empty")
    if rec["account_id"] is None:
        raise BadData("account_id: the record and its subscription have no account")
    if not (rec["dr_customer_id"] or "").strip():
        raise BadData("accounts.dr_customer_id is empty")
    if rec["product_found"] is None:
        raise BadData("product_id: the record and its subscription have no product")
    if not (rec["dr_sku_id"] or "").strip() and not ((rec["product_name"] or "").strip() and rec["tax_code"]):
        raise BadData("products.dr_sku_id is empty and products.name/tax_code do not give product details")
    if rec["quantity"] is None or rec["quantity"] <= 0:
        raise BadData(f"cart_items.quantity must be positive, got {rec['quantity']}")
    if rec["unit_price"] is None or rec["unit_price"] <= 0:
        raise BadData(f"cart_items.unit_price must be positive, got {rec['unit_price']}")
    if rec["unit_price"] * rec["quantity"] >= MAX_CHARGE:
        raise BadData(f"cart_items.unit_price {rec['unit_price']} × quantity {rec['quantity']} is more than an "
                      f"order total can hold with tax (below {MAX_CHARGE:,.0f})")
    if not is_currency(rec["currency"]):
        raise BadData(f"carts.currency {rec['currency']!r} is not a known ISO 4217 currency")
    if not (rec["billing_agreement_id"] or "").strip():
        raise BadData("cart_items.dr_billing_agreement_id is empty: no billing agreement to charge against")


def _address(value: str | None, column: str) -> dict[str, Any] | None:
    """A ship-to or bill-to as Digital River takes it: a JSON object whose `address`, if any, is an object."""
    if not value:
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        raise BadData(f"{column} is not valid JSON") from None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("address", {}), dict):
        raise BadData(f"{column} must be a JSON object with an object `address`, got {value[:80]!r}")
    return parsed


def checkout_body(rec: asyncpg.Record) -> dict[str, Any]:
    """The `POST /checkouts` body for one installment (digital-river.md)."""
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
        details: dict[str, Any] = {"name": rec["product_name"], "taxCode": rec["tax_code"]}
        if rec["country_of_origin"]:
            details["countryOfOrigin"] = rec["country_of_origin"]
        if rec["eccn"]:
            details["eccn"] = rec["eccn"]
        item["productDetails"] = details
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
    ship_to = _address(rec["ship_to"], "orders.ship_to")
    bill_to = _address(rec["order_bill_to"], "orders.bill_to") or _address(rec["account_bill_to"], "accounts.bill_to")
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
        "state": order.state, "currency": order.currency.upper(), "subtotal": str(order.subtotal),
        "total_tax": str(order.total_tax), "total_amount": str(order.total_amount),
        "items": [{
            "dr_item_id": item.id, "quantity": item.quantity,
            "unit_price": str(unit_price if item.quantity == 0 else (item.amount / item.quantity).quantize(CENT)),
            "tax_amount": str(item.tax_amount), "state": item.state,
            "billing_agreement_id": item.billing_agreement_id,
        } for item in order.items],
    }


class RecurringPayments(Job):
    job_name = "recurring-payments"

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        # Records in flight share their writes: one statement commits many checkouts, one many charges.
        self.checkouts: BatchWriter[tuple[int, str], bool] = BatchWriter(self._save_checkouts, name="checkouts")
        self.charges: BatchWriter[dict[str, Any], int | None] = BatchWriter(self._finish_charges, name="charges")

    async def _save_checkouts(self, items: Sequence[tuple[int, str]]) -> list[bool]:
        kept = {r["id"] for r in await self.store.fetch(
            "save_checkouts", self.store.node, [record for record, _ in items], [checkout for _, checkout in items])}
        return [record in kept for record, _ in items]

    async def _finish_charges(self, items: Sequence[dict[str, Any]]) -> list[int | None]:
        rows = await self.store.fetch("finish_charged", self.store.node, json.dumps(list(items)))
        order_ids = {r["id"]: r["order_id"] for r in rows}
        return [order_ids.get(item["record_id"]) for item in items]

    async def due_count(self) -> int:
        return int(await self.store.fetchval("count_due_payment_records"))

    async def run_once(self, run: Run) -> None:
        leases = self.leases("subscription_process_data")

        async def claim(free: int, remaining: int) -> tuple[int, list[tuple[str, Any]]] | None:
            rows = await leases.claim("claim_payment_records",
                                      min(self.settings.recurring_payment_batch_size, free, remaining))
            if not rows:
                return None
            failpoint("after_claim")
            details = await self.store.fetch("payment_record_details", [r["id"] for r in rows])
            return len(rows), [(f"record-{rec['id']}", self._process(run, leases, rec)) for rec in details]

        # The next installment of a subscription in flight becomes claimable when it finishes: wait for it.
        await self.claim_and_process(run, [leases], self.settings.recurring_payment_process_query_limit, claim,
                                     wait_when_empty=True)

    async def _process(self, run: Run, leases: Leases, rec: asyncpg.Record) -> None:
        started = time.monotonic()
        fields: dict[str, Any] = {"record_id": rec["id"], "subscription_id": rec["subscription_id"],
                                  "installment_number": rec["installment_number"]}
        try:
            outcome = await self._charge(leases, rec)
        except asyncio.CancelledError:
            raise
        except LeaseLost as exc:
            outcome = Outcome("installment_lease_lost", {"error": str(exc)})
        except Exception as exc:
            # A bug, or an answer the store refuses: put the record back with the outage backoff (checkout
            # kept, so nothing is charged twice). If even that fails, its lease lapses and it comes back.
            error = redact_text(f"{type(exc).__name__}: {exc}")[:2000]
            log.error("installment_crashed", exc_info=exc, **fields)
            try:
                outcome = await self._postpone(rec, "installment_crashed", "crashed", error, outage=True)
            except Exception:
                outcome = Outcome("installment_crashed", {"error": error})
        leases.done([rec["id"]])
        if outcome.event in ("installment_charged", "installment_adopted"):
            run.succeeded += 1
        elif outcome.event in ("installment_failed", "installment_declined", "installment_crashed"):
            run.failed += 1
        self.record_outcome(outcome.event)
        getattr(log, OUTCOME_LEVEL[outcome.event])(
            outcome.event, duration_ms=round((time.monotonic() - started) * 1000), **fields, **outcome.fields)

    async def _charge(self, leases: Leases, rec: asyncpg.Record) -> Outcome:
        """The exactly-once protocol for one record; returns how it ended."""
        dr = self.dr
        try:
            if rec["dr_order_id"]:
                return await self._charged(rec, await dr.get_order(rec["dr_order_id"]), adopted=True)
            try:
                validate(rec)
                body = checkout_body(rec)
            except BadData as exc:
                return await self._failed(rec, f"invalid:{exc.field}", str(exc), hard=True)
            limit = self._decline_limit(rec)
            if limit is not None:
                until, why = limit
                return await self._postpone(rec, "installment_deferred", "decline_limit", why, until=until)
            checkout_id = rec["dr_checkout_id"]
            if checkout_id:
                order = await self._find_order(rec, checkout_id)
                if order is not None:
                    return await self._charged(rec, order, adopted=True)
            else:
                checkout = await dr.create_checkout(body)
                if checkout.payment_session_state not in (None, "requires_confirmation"):
                    return await self._failed(
                        rec, "payment_session_state",
                        f"checkout {checkout.id} payment session is {checkout.payment_session_state}, "
                        "not requires_confirmation", hard=True)
                failpoint("after_checkout_created")
                if not await self.checkouts.submit((rec["id"], checkout.id)):
                    raise LeaseLost(f"record {rec['id']} lease lost before its order was submitted")
                checkout_id = checkout.id
                failpoint("after_checkout_saved")
            return await self._submit(rec, checkout_id)
        except AuthError as exc:
            self.key_refused = True
            await leases.release([rec["id"]])
            return Outcome("installment_key_refused", {"error": str(exc)})
        except OutcomeUnknown as exc:
            # An order may exist: keep the checkout, so the next attempt looks again before anything else.
            return await self._postpone(rec, "installment_unknown", "outcome_unknown", str(exc), outage=True)
        except TransientError as exc:
            return await self._postpone(rec, "installment_outage", "dr_unavailable", str(exc), outage=True)
        except BadRequestError as exc:
            return await self._failed(rec, exc.code or "bad_request", _dr_message(exc), hard=True, error=exc)
        except NotFoundError as exc:
            # An order id on the record that Digital River does not know: an operator has to look.
            return await self._postpone(rec, "installment_unknown", "order_not_found", str(exc), outage=True)
        except DigitalRiverError as exc:
            return await self._failed(rec, exc.code or "dr_error", _dr_message(exc), hard=True, error=exc)

    async def _submit(self, rec: asyncpg.Record, checkout_id: str) -> Outcome:
        """POST /orders for a committed checkout, and every way it can end."""
        try:
            order = await self.dr.create_order(checkout_id)
        except DeclinedError as exc:
            return await self._failed(rec, exc.code or "declined", _dr_message(exc), hard=not exc.soft,
                                      decline=True, error=exc)
        except NotFoundError:
            # The checkout already became an order (an earlier attempt's answer was lost): find it.
            found = await self._find_order(rec, checkout_id)
            if found is None:
                return await self._postpone(rec, "installment_unknown", "checkout_consumed",
                                            f"checkout {checkout_id} was consumed but no order was found yet",
                                            outage=True)
            return await self._charged(rec, found, adopted=True)
        except TransientError as exc:
            # The order may or may not exist: look before doing anything else.
            try:
                found = await self._find_order(rec, checkout_id)
            except OutcomeUnknown as lookup:
                return await self._postpone(rec, "installment_unknown", "outcome_unknown",
                                            f"{exc}; {lookup}", outage=True)
            if found is None:
                return await self._postpone(rec, "installment_outage", "dr_unavailable", str(exc), outage=True)
            return await self._charged(rec, found, adopted=True)
        except BadRequestError as exc:
            return await self._failed(rec, exc.code or "bad_request", _dr_message(exc), hard=True, error=exc)
        failpoint("after_order_created")
        return await self._charged(rec, order, adopted=False)

    async def _find_order(self, rec: asyncpg.Record, checkout_id: str) -> Order | None:
        """This record's order at Digital River, by checkout id and then by upstream id; None if there is none.

        Only an order carrying this checkout or this record's upstream id is adopted, whatever else a lookup
        lists. A lookup Digital River refuses (anything but a refused key) leaves the outcome unknown.
        """
        upstream_id = rec["upstream_id"]
        try:
            orders = await self.dr.list_orders(checkout_id=checkout_id)
            mine = [o for o in orders if o.checkout_id == checkout_id or o.upstream_id == upstream_id]
            if not mine:
                orders = await self.dr.list_orders(upstream_ids=[upstream_id])
                mine = [o for o in orders if o.upstream_id == upstream_id]
        except AuthError:
            raise
        except DigitalRiverError as exc:
            raise OutcomeUnknown(f"looking for the order of checkout {checkout_id} failed: {exc}") from None
        return mine[0] if mine else None

    def _decline_limit(self, rec: asyncpg.Record) -> tuple[datetime, str] | None:
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

    async def _charged(self, rec: asyncpg.Record, order: Order, *, adopted: bool) -> Outcome:
        order_id = await self.charges.submit(charged_row(rec, order))
        failpoint("after_order_saved")
        return Outcome("installment_adopted" if adopted else "installment_charged", {
            "dr_order_id": order.id, "order_id": order_id, "order_state": order.state,
            "amount": f"{order.total_amount:.2f}", "tax": f"{order.total_tax:.2f}", "currency": order.currency})

    async def _failed(self, rec: asyncpg.Record, code: str, message: str, *, hard: bool, decline: bool = False,
                      error: DigitalRiverError | None = None) -> Outcome:
        """A counted attempt without an order: Failed when hard or past SUBSCRIPTION_RETRY_COUNT, else Open."""
        attempts = rec["subscription_retry_count"] + 1
        exhausted = attempts > self.settings.subscription_retry_count
        status = "Failed" if hard or exhausted else "Open"
        next_attempt = datetime.now(UTC) + (DECLINE_PAUSE if decline else timedelta(0))
        outcome_kind = ("soft_decline" if error is not None and getattr(error, "soft", False) else "hard_decline") \
            if decline else "bad_data"
        kept = await self.store.fetchval(
            "finish_failed_attempt", rec["id"], self.store.node, status, next_attempt, code, message[:2000],
            outcome_kind, decline, "Declined" if decline else None,
            rec["unit_price"] * rec["quantity"] if rec["unit_price"] and rec["quantity"] else None,
            (rec["currency"] or "").strip().upper()[:3] or None)
        if kept is None:
            raise LeaseLost(f"record {rec['id']} lease lost before its failure was written")
        self.services.app_log.write(
            "ERROR" if status == "Failed" else "WARN", self.job_name, f"installment {outcome_kind}: {message}",
            record_id=rec["id"], status=error.status if error else None,
            request={"checkoutId": rec["dr_checkout_id"], "upstreamId": rec["upstream_id"]},
            response=error.response if error else None)
        return Outcome("installment_declined" if decline and status == "Open" else "installment_failed", {
            "status": status, "code": code, "reason": message, "retry_count": attempts, "app_logged": True})

    async def _postpone(self, rec: asyncpg.Record, event: str, code: str, message: str, *, outage: bool = False,
                        until: datetime | None = None) -> Outcome:
        """No attempt counted: an outage or unknown outcome (the checkout is kept, so the next attempt looks
        for its order first; backoff 1, 2, 4 … minutes) or a decline limit (until the limit allows)."""
        if until is None:
            until = datetime.now(UTC) + outage_delay(rec["outage_count"])
        kept = await self.store.fetchval(
            "postpone_record", rec["id"], self.store.node, until, code, message[:2000], 1 if outage else 0)
        if kept is None:
            raise LeaseLost(f"record {rec['id']} lease lost before it was postponed")
        if outage:
            self.services.app_log.write("WARN", self.job_name, f"{event}: {message}", record_id=rec["id"])
        return Outcome(event, {"code": code, "reason": message, "next_attempt_at": until.isoformat(),
                               "app_logged": outage})


def _dr_message(exc: DigitalRiverError) -> str:
    where = f" (parameter {exc.parameter})" if exc.parameter else ""
    status = f" {exc.status}" if exc.status else ""
    return f"Digital River{status} {exc.code or exc.type or 'error'}{where}: {exc.message}"
