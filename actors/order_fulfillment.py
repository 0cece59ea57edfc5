"""Digital River order fulfillment: cancel every line still open on a cancelled Digital River order.

Takes `fulfillments` in `Open` or `Pending` whose order state is `cancelled` and whose `next_attempt_at` has
come: at most FULFILLMENT_QUERY_LIMIT per run, ORDER_FULFILLMENT_CONCURRENCY in flight. For each, one
`POST /fulfillments` carries a `cancelQuantity` for every item of the order: its quantity less what the order's
`Completed` line-item fulfillments already fulfilled or cancelled. An order with nothing left is `Completed`
without a call. Success: `Completed` with the `ful_…` id in `dr_fulfillment_id`.

Outcomes, as engine/fulfillment.py reads Digital River's answers (shared with line-item-fulfillment):
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
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

import asyncpg

from engine.digital_river import AuthError, DigitalRiverClient, DigitalRiverError
from engine.fulfillment import Sent, request_metadata, send_fulfillment, throttled_wait
from engine.jobs import FAILED, SUCCEEDED, BadData, Job, Outcome, Outcomes, Run, backoff
from engine.store import LeaseLost, Leases
from engine.storefronts import Storefront


def cancel_items(rec: asyncpg.Record, items: Sequence[asyncpg.Record]) -> list[tuple[int, dict[str, Any]]]:
    """(order item id, `{itemId, cancelQuantity}`) for every item with something left; BadData names a field."""
    if not rec["dr_order_id"]:
        raise BadData("fulfillments.dr_order_id is empty and so is orders.dr_order_id: no Digital River order "
                      "to cancel")
    if not items:
        raise BadData(f"order_items has no rows for order {rec['order_id']}: the cancellation sends each item's "
                      "quantity with its order_items.dr_order_item_id, so the order's items must be written first")
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
    due_table = "fulfillments"
    outcomes: ClassVar[Outcomes] = {
        "order_cancel_sent": ("info", SUCCEEDED),
        "order_cancel_already_done": ("info", SUCCEEDED),
        "order_cancel_nothing_left": ("info", SUCCEEDED),
        "order_cancel_failed": ("error", FAILED),
        "order_cancel_retrying": ("warning", FAILED),
        "order_cancel_key_refused": ("error", None),
        "order_cancel_lease_lost": ("warning", None),
        "order_cancel_crashed": ("error", FAILED),
    }

    async def due_count(self) -> int:
        return int(await self.store.fetchval("count_due_cancelled_orders", self.ready_labels()))

    async def run_once(self, run: Run) -> None:
        await self.claim_by_storefront(lambda storefront: self._cancel_storefront(run, storefront))

    async def _cancel_storefront(self, run: Run, storefront: Storefront) -> None:
        """One storefront's cancelled orders, sent with its key (its own slots and FULFILLMENT_QUERY_LIMIT)."""
        leases = self.leases("fulfillments")

        async def claim(free: int, remaining: int) -> tuple[int, list[tuple[str, Any]]] | None:
            rows = await leases.claim("claim_cancelled_orders", min(free, remaining), storefront.label)
            if not rows:
                return None
            ids = [r["id"] for r in rows]
            items: dict[int, list[asyncpg.Record]] = {i: [] for i in ids}
            for item in await self.store.fetch("cancel_order_items", ids):
                items[item["fulfillment_id"]].append(item)
            unfinished = {r["id"] for r in rows if r["unfinished"]}
            return len(rows), [(f"order-{rec['id']}",
                                self._process(run, leases, rec, items[rec["id"]], rec["id"] in unfinished,
                                              storefront.client))
                               for rec in await self.store.fetch("cancel_order_details", ids)]

        await self.claim_and_process(run, [leases], self.settings.fulfillment_query_limit, claim,
                                     storefront=storefront)

    async def _process(self, run: Run, leases: Leases, rec: asyncpg.Record, items: list[asyncpg.Record],
                       unfinished: bool, client: DigitalRiverClient) -> None:
        started = time.monotonic()
        fields: dict[str, Any] = {"record_id": rec["id"], "order_id": rec["order_id"],
                                  "dr_order_id": rec["dr_order_id"]}
        # A crash (a bug or a database failure) leaves the lease to lapse: the record comes back.
        try:
            outcome = await self.attempt(self._cancel(leases, rec, items, leases.token(rec["id"]), unfinished, client),
                                         fields=fields,
                                         lease_lost="order_cancel_lease_lost", crashed="order_cancel_crashed")
        except asyncio.CancelledError:
            # Cancelled (a hard stop) perhaps after Digital River took the request: the lease is not given back
            # but left to lapse, so the next claim finds its token and looks before sending again.
            leases.done([rec["id"]])
            raise
        leases.done([rec["id"]])
        self.settle(run, outcome, started, **fields)

    async def _cancel(self, leases: Leases, rec: asyncpg.Record, items: list[asyncpg.Record], token: int,
                      unfinished: bool, client: DigitalRiverClient) -> Outcome:
        """One cancellation: check, send, and write how it ended (every write under the claim's lease token).
        When an earlier claim never wrote its outcome, or this is a retry, the order's fulfillments are looked
        at first, so a cancellation Digital River already took is not sent again (engine/fulfillment.py)."""
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
        # Marks the fulfillment as this record's (with the order item ids, engine/fulfillment.py).
        tag = {"drjobsJob": self.job_name, "drjobsRecord": str(rec["id"])}
        try:
            results = await send_fulfillment(client, rec["dr_order_id"], entries, tag=tag,
                                             look_first=unfinished or rec["retry_count"] > 0)
        except AuthError as exc:
            self.refuse(client)
            await leases.release([rec["id"]])
            return Outcome("order_cancel_key_refused", {"error": str(exc)})
        request = {"orderId": rec["dr_order_id"], "items": [item for _, item in entries],
                   "metadata": request_metadata(tag, [key for key, _ in entries])}
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
        if "throttled" in by_kind:
            # Refused for the key's rate limit before anything was done: not counted, sent after Retry-After.
            first = by_kind["throttled"][0]
            later = datetime.now(UTC) + throttled_wait(first)
            await self._write(rec, token, "Pending", 0, first.message, None, later)
            return Outcome("order_cancel_retrying", {"status": "Pending", "reason": first.message,
                                                     "retry_count": rec["retry_count"],
                                                     "next_attempt_at": later.isoformat()})
        fulfillment_id = next((r.fulfillment_id for r in by_kind.get("sent", ())), None)
        done = by_kind.get("done", [])
        found = [r for r in by_kind.get("sent", ()) if r.found]
        message = found[0].message if found else done[0].message if done else None
        await self._write(rec, token, "Completed", 0, message, fulfillment_id, None)
        if fulfillment_id is None:
            return Outcome("order_cancel_already_done", {"reason": message})
        return Outcome("order_cancel_sent", {"dr_fulfillment_id": fulfillment_id, "items": len(entries),
                                             "already_done": len(done), "found_sent": len(found)})

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
            conflict = (f"fulfillments row {rec['id']} was already settled with Digital River fulfillment "
                        f"{now['dr_fulfillment_id']}; this worker's call made {fulfillment_id} as well")
            self.settlement_conflict(rec["id"], conflict)
            self.log.error("order_cancel_settlement_conflict", record_id=rec["id"], dr_fulfillment_id=fulfillment_id,
                           settled_dr_fulfillment_id=now["dr_fulfillment_id"], reason=conflict)
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
        next_attempt = datetime.now(UTC) + backoff(attempts)
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

