"""Digital River order fulfillment: cancel every line still open on a cancelled Digital River order.

Takes `fulfillments` in `Open` or `Pending` whose order state is `cancelled` and whose `next_attempt_at` has
come: at most FULFILLMENT_QUERY_LIMIT per run, ORDER_FULFILLMENT_CONCURRENCY in flight. For each, one
`POST /fulfillments` carries a `cancelQuantity` for every item of the order: its quantity less what the order's
`Completed` line-item fulfillments already fulfilled or cancelled. An order with nothing left is `Completed`
without a call. Success: `Completed` with the `ful_…` id in `dr_fulfillment_id`.

Outcomes, shared with line-item-fulfillment (`send_fulfillment`, `retry_delay`):
- 201 → `Completed`. 409 `item_fulfilled` / `item_cancelled` / `order_complete` / `order_cancelled` → also
  `Completed`: it was already done, and `message` says so.
- 409 `quantity_too_large`, 400 and 404 → `Failed` with Digital River's message.
- Transient failures (after the client's own retries), and conflicts nobody listed → `Pending`,
  `retry_count + 1`, `next_attempt_at` 1, 2, 4 … minutes later (at most an hour), `Failed` once `retry_count`
  exceeds FULFILLMENT_RETRY_LIMIT.
- 401/403 → the run stops claiming, the records go back untouched, and the run is recorded failed.
- A record that cannot be sent (no Digital River order id, an item to cancel without a Digital River item id, an
  order without items) is `Failed` with a message naming the field, and nothing is sent.

Digital River answers one error per request even when several items are wrong, and applies nothing. An error
that names an item (`items[2].itemId`) settles that item alone; the rest is sent again at once, by the same task,
so one order never has two calls in flight. The fulfillments row's lease is that order's lock for both jobs.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg

from engine.digital_river import (
    AuthError,
    BadRequestError,
    ConflictError,
    DigitalRiverClient,
    DigitalRiverError,
    NotFoundError,
)
from engine.failpoints import failpoint
from engine.jobs import Job, Run
from engine.logs import get_logger
from engine.store import LeaseLost, Leases

log = get_logger(component="order_fulfillment")

K = TypeVar("K", bound=Hashable)

# 409 codes that mean the change was already made: treated as success.
DONE_CODES = frozenset({"item_fulfilled", "item_cancelled", "order_complete", "order_cancelled"})
# 409 codes that no repeat can fix.
HARD_CONFLICT_CODES = frozenset({"quantity_too_large"})
RETRY_BACKOFF_MAX = timedelta(hours=1)
_ITEM_PARAMETER = re.compile(r"^items\[(\d+)\]")

# One structured line per record outcome; the level for each is chosen here and nowhere else.
OUTCOME_LEVEL = {
    "order_cancel_sent": "info",
    "order_cancel_already_done": "info",
    "order_cancel_nothing_left": "info",
    "order_cancel_failed": "error",
    "order_cancel_retrying": "warning",
    "order_cancel_key_refused": "error",
    "order_cancel_lease_lost": "warning",
    "order_cancel_crashed": "error",
}


# ---------------------------------------------------------------------------------------------------------------
# Shared with line_item_fulfillment: one POST /fulfillments and what each answer means for what it carried.


@dataclass
class Sent:
    """How one entry of a POST /fulfillments ended: `sent`, `done` (already done), `failed` or `retry`."""

    kind: str
    message: str | None = None
    fulfillment_id: str | None = None
    error: DigitalRiverError | None = None


def retry_delay(retry_count: int) -> timedelta:
    """1, 2, 4 … minutes after the 1st, 2nd, 3rd … failed send, at most an hour."""
    return min(RETRY_BACKOFF_MAX, timedelta(minutes=2 ** min(max(retry_count - 1, 0), 10)))


def dr_message(exc: DigitalRiverError) -> str:
    """Digital River's words for a failed call, with the status, code and parameter."""
    where = f" (parameter {exc.parameter})" if exc.parameter else ""
    status = f" {exc.status}" if exc.status else ""
    return f"Digital River{status} {exc.code or exc.type or 'error'}{where}: {exc.message}"


def classify(exc: DigitalRiverError) -> str:
    """`done`, `failed` or `retry` for an error of POST /fulfillments (AuthError is the caller's to handle)."""
    if isinstance(exc, ConflictError):
        if exc.code in DONE_CODES:
            return "done"
        return "failed" if exc.code in HARD_CONFLICT_CODES else "retry"
    if isinstance(exc, (BadRequestError, NotFoundError)):
        return "failed"
    return "retry"  # TransientError and anything new


def item_index(exc: DigitalRiverError) -> int | None:
    """The index of the item an error names (`items[2].quantity` → 2), if it names one."""
    match = _ITEM_PARAMETER.match(exc.parameter or "")
    return int(match.group(1)) if match else None


async def send_fulfillment(dr: DigitalRiverClient, order_id: str, entries: Sequence[tuple[K, dict[str, Any]]],
                           extra: Mapping[str, Any] | None = None) -> dict[K, Sent]:
    """POST /fulfillments for `entries` (key, item) of one order; how each ended, by key.

    An error naming one item settles that item and the others are sent again without it; any other answer
    settles every entry still unsent. AuthError is raised with nothing settled.
    """
    results: dict[K, Sent] = {}
    pending = list(entries)
    while pending:
        body = {"orderId": order_id, "items": [item for _, item in pending], **(extra or {})}
        try:
            fulfillment = await dr.create_fulfillment(body)
        except AuthError:
            raise
        except DigitalRiverError as exc:
            kind = classify(exc)
            message = dr_message(exc)
            if kind == "done":
                message = f"already done: {message}"
            index = item_index(exc)
            if kind != "retry" and index is not None and index < len(pending) and len(pending) > 1:
                key, _ = pending.pop(index)
                results[key] = Sent(kind, message, error=exc)
                continue
            for key, _ in pending:
                results[key] = Sent(kind, message, error=exc)
            return results
        failpoint("after_fulfillment_sent")
        for key, _ in pending:
            results[key] = Sent("sent", fulfillment_id=fulfillment.id)
        return results
    return results


# ---------------------------------------------------------------------------------------------------------------
# The job


class BadData(ValueError):
    """The record cannot be sent to Digital River; the message names the field."""


@dataclass
class Outcome:
    event: str
    fields: dict[str, Any] = field(default_factory=dict)


def cancel_items(rec: asyncpg.Record, items: Sequence[asyncpg.Record]) -> list[tuple[int, dict[str, Any]]]:
    """(order item id, `{itemId, cancelQuantity}`) for every item with something left; BadData names a field."""
    if not rec["dr_order_id"]:
        raise BadData("fulfillments.dr_order_id is empty and so is orders.dr_order_id: no Digital River order "
                      "to cancel")
    if not items:
        raise BadData(f"order_items: order {rec['order_id']} has no items, so nothing is known to cancel")
    entries = []
    for item in items:
        left = item["quantity"] - item["done_quantity"]
        if left <= 0:
            continue
        if not item["dr_item_id"]:
            raise BadData(f"order_items.dr_order_item_id is empty for order item {item['order_item_id']}, which "
                          f"has {left} left to cancel")
        entries.append((item["order_item_id"], {"itemId": item["dr_item_id"], "cancelQuantity": left}))
    return entries


class OrderFulfillment(Job):
    job_name = "order-fulfillment"

    async def due_count(self) -> int:
        return int(await self.store.fetchval("count_due_cancelled_orders"))

    async def run_once(self, run: Run) -> None:
        leases = self.leases("fulfillments")

        async def claim(free: int, remaining: int) -> tuple[int, list[tuple[str, Any]]] | None:
            rows = await leases.claim("claim_cancelled_orders", min(free, remaining))
            if not rows:
                return None
            ids = [r["id"] for r in rows]
            items: dict[int, list[asyncpg.Record]] = {i: [] for i in ids}
            for item in await self.store.fetch("cancel_order_items", ids):
                items[item["fulfillment_id"]].append(item)
            return len(rows), [(f"order-{rec['id']}", self._process(run, leases, rec, items[rec["id"]]))
                               for rec in await self.store.fetch("cancel_order_details", ids)]

        await self.claim_and_process(run, [leases], self.settings.fulfillment_query_limit, claim)

    async def _process(self, run: Run, leases: Leases, rec: asyncpg.Record, items: list[asyncpg.Record]) -> None:
        started = time.monotonic()
        fields: dict[str, Any] = {"record_id": rec["id"], "order_id": rec["order_id"],
                                  "dr_order_id": rec["dr_order_id"]}
        try:
            outcome = await self._cancel(leases, rec, items, leases.token(rec["id"]))
        except asyncio.CancelledError:
            raise
        except LeaseLost as exc:
            outcome = Outcome("order_cancel_lease_lost", {"error": str(exc)})
        except Exception as exc:  # a bug or a database failure: the lease lapses and the record comes back
            outcome = Outcome("order_cancel_crashed", {"error": f"{type(exc).__name__}: {exc}"})
            log.error("order_cancel_crashed", exc_info=exc, **fields)
        leases.done([rec["id"]])
        if outcome.event in ("order_cancel_sent", "order_cancel_already_done", "order_cancel_nothing_left"):
            run.succeeded += 1
        elif outcome.event in ("order_cancel_failed", "order_cancel_retrying", "order_cancel_crashed"):
            run.failed += 1
        self.record_outcome(outcome.event)
        getattr(log, OUTCOME_LEVEL[outcome.event])(
            outcome.event, duration_ms=round((time.monotonic() - started) * 1000), **fields, **outcome.fields)

    async def _cancel(self, leases: Leases, rec: asyncpg.Record, items: list[asyncpg.Record], token: int) -> Outcome:
        """One cancellation: check, send, and write how it ended (every write under the claim's lease token)."""
        try:
            entries = cancel_items(rec, items)
        except BadData as exc:
            return await self._failed(rec, token, str(exc), sent=False)
        if not entries:
            await self._write(rec, token, "Completed", 0, "nothing left to cancel: every item is already fulfilled "
                              "or cancelled", None, None)
            return Outcome("order_cancel_nothing_left")
        # Fence: the lease is still this claim's and unexpired, and lasts a full lease for the call.
        await leases.touch(rec["id"])
        try:
            results = await send_fulfillment(self.dr, rec["dr_order_id"], entries)
        except AuthError as exc:
            self.key_refused = True
            await leases.release([rec["id"]])
            return Outcome("order_cancel_key_refused", {"error": str(exc)})
        request = {"orderId": rec["dr_order_id"], "items": [item for _, item in entries]}
        by_kind: dict[str, list[Sent]] = {}
        for result in results.values():
            by_kind.setdefault(result.kind, []).append(result)
        if "failed" in by_kind:
            first = by_kind["failed"][0]
            return await self._failed(rec, token, first.message or "failed", sent=True, error=first.error,
                                      request=request)
        if "retry" in by_kind:
            first = by_kind["retry"][0]
            return await self._retry(rec, token, first.message or "failed", first.error, request)
        fulfillment_id = next((r.fulfillment_id for r in by_kind.get("sent", ())), None)
        done = by_kind.get("done", [])
        message = done[0].message if done else None
        await self._write(rec, token, "Completed", 0, message, fulfillment_id, None)
        if fulfillment_id is None:
            return Outcome("order_cancel_already_done", {"reason": message})
        return Outcome("order_cancel_sent", {"dr_fulfillment_id": fulfillment_id, "items": len(entries),
                                             "already_done": len(done)})

    async def _write(self, rec: asyncpg.Record, token: int, status: str, retry_add: int, message: str | None,
                     fulfillment_id: str | None, next_attempt: datetime | None) -> None:
        # Shielded: once Digital River has answered, a shutdown must not lose what it said.
        kept = await asyncio.shield(self.store.fetchval(
            "finish_fulfillment", rec["id"], token, status, retry_add,
            None if message is None else message[:2000], fulfillment_id, next_attempt))
        if kept is not None:
            return
        now = await self.store.fetchrow("fulfillment_settled_by", rec["id"])
        if now is not None and now["status"] in ("Completed", "Failed") and fulfillment_id is not None \
                and now["dr_fulfillment_id"] not in (None, fulfillment_id):
            # Settled by another worker with another fulfillment: the order was sent twice. An alarm, not a no-op.
            self.services.metrics.settlement_conflict(self.job_name)
            conflict = (f"fulfillments row {rec['id']} was already settled with Digital River fulfillment "
                        f"{now['dr_fulfillment_id']}; this worker's call made {fulfillment_id} as well")
            log.error("order_cancel_settlement_conflict", record_id=rec["id"], dr_fulfillment_id=fulfillment_id,
                      settled_dr_fulfillment_id=now["dr_fulfillment_id"], reason=conflict)
            self.services.app_log.write("ERROR", self.job_name, conflict, record_id=rec["id"])
        raise LeaseLost(f"fulfillments row {rec['id']} lease lost before its outcome ({status}) was written")

    async def _failed(self, rec: asyncpg.Record, token: int, message: str, *, sent: bool,
                      error: DigitalRiverError | None = None, request: Any = None) -> Outcome:
        await self._write(rec, token, "Failed", 1 if sent else 0, message, None, None)
        self.services.app_log.write(
            "ERROR", self.job_name, f"order cancellation failed: {message}", record_id=rec["id"],
            status=error.status if error else None, request=request, response=error.response if error else None,
            exc=error)
        return Outcome("order_cancel_failed", {"status": "Failed", "reason": message,
                                               "retry_count": rec["retry_count"] + (1 if sent else 0),
                                               "app_logged": True})

    async def _retry(self, rec: asyncpg.Record, token: int, message: str, error: DigitalRiverError | None,
                     request: Any) -> Outcome:
        attempts = rec["retry_count"] + 1
        exhausted = attempts > self.settings.fulfillment_retry_limit
        status = "Failed" if exhausted else "Pending"
        next_attempt = datetime.now(UTC) + retry_delay(attempts)
        if exhausted:
            message = f"{message} (failed {attempts} times; FULFILLMENT_RETRY_LIMIT is " \
                      f"{self.settings.fulfillment_retry_limit})"
        await self._write(rec, token, status, 1, message, None, None if exhausted else next_attempt)
        self.services.app_log.write(
            "ERROR" if exhausted else "WARN", self.job_name, f"order cancellation not sent: {message}",
            record_id=rec["id"], status=error.status if error else None, request=request,
            response=error.response if error else None, exc=error)
        fields: dict[str, Any] = {"status": status, "reason": message, "retry_count": attempts, "app_logged": True}
        if exhausted:
            return Outcome("order_cancel_failed", fields)
        return Outcome("order_cancel_retrying", fields | {"next_attempt_at": next_attempt.isoformat()})

