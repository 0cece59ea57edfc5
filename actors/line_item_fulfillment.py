"""Digital River line-item fulfillment: report fulfilled and cancelled lines, one POST /fulfillments per order.

Digital River says an order was accepted with `order.accepted` (digital-river-events sets `dr_order_state` and
`ofi_received`). Only for an order whose due lines have waited on acceptance (`pending_payment`, `in_review`, or no
state known) for an hour without news does a run ask Digital River (`GET /orders/{id}`, at most once an hour per
order) and store the answer on `fulfillments.dr_order_state`; the lines keep waiting, and no attempt is counted.

It then takes `line_item_fulfillments` in `Open` or `Pending` whose `next_attempt_at` has come and whose order
Digital River accepted (`dr_order_state = 'accepted'`, or `ofi_received`): at most FULFILLMENT_QUERY_LIMIT lines
per run and LINE_ITEM_FULFILLMENT_CONCURRENCY orders in flight. Whole orders are claimed: the order's
`fulfillments` row is leased first (the lock order-fulfillment takes too), then its due lines, and an order
whose lines do not fit in what is left of the run's limit waits for the next run (only an order with more due
lines than the whole limit is split, over several runs). All the lines of an order go in one
`POST /fulfillments` (`quantity` = fulfill_quantity, `cancelQuantity` = cancel_quantity, `itemId` = the line's
Digital River item id, else its order item's); lines with different tracking details go in one request per
tracking, one after the other. Success: each line `Completed` with the `ful_…` id.

Lines that cannot be sent (quantities that are negative, both zero or more than the order item's quantity; no
Digital River item id; an order item of another order; an order without a Digital River id) are `Failed` with a
message naming the field, and the order's other lines still go. Every other outcome is as in
order-fulfillment (engine/fulfillment.py): already done → `Completed`, 409 `quantity_too_large` / 400 →
`Failed`, transient → `Pending` with backoff until FULFILLMENT_RETRY_LIMIT, 401/403 → the run stops.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import asyncpg

from engine.digital_river import AuthError, DigitalRiverClient, DigitalRiverError, dr_message
from engine.fulfillment import Sent, request_metadata, send_fulfillment, throttled_wait
from engine.jobs import FAILED, SUCCEEDED, Job, Outcome, Outcomes, Run, backoff
from engine.logs import error_text
from engine.store import LeaseLost, Leases
from engine.storefronts import Storefront

# An order whose lines wait for its acceptance is asked about (GET /orders/{id}) only after this long without
# news: `order.accepted` (digital-river-events) normally says it first.
ORDER_STATE_LOOK_AFTER_SECONDS = 3600.0
TRACKING = (("tracking_company", "trackingCompany"), ("tracking_number", "trackingNumber"),
            ("tracking_url", "trackingUrl"))


@dataclass
class Verdict:
    """How one line ends: what is written for it, what goes to application_logs, and its log line."""

    event: str
    status: str = ""
    retry_add: int = 0
    message: str | None = None
    fulfillment_id: str | None = None
    next_attempt_at: datetime | None = None
    app_level: str | None = None  # ERROR or WARN: a failure for application_logs
    error: DigitalRiverError | None = None
    request: Any = None
    fields: dict[str, Any] = field(default_factory=dict)


def line_problem(line: asyncpg.Record) -> str | None:
    """Why this line can never be sent, naming the field; None when it can."""
    if not line["dr_order_id"]:
        return "fulfillments.dr_order_id is empty and so is orders.dr_order_id: no Digital River order to fulfil"
    if line["dr_order_state"] == "blocked":
        return (f"fulfillments.dr_order_state is blocked: Digital River blocked order {line['dr_order_id']} (its "
                "payment was refused), so nothing of it can be fulfilled")
    if line["order_item_id"] is not None and line["item_found"] is None:
        return f"line_item_fulfillments.order_item_id {line['order_item_id']} does not exist"
    if line["item_found"] is not None and line["item_order_id"] != line["order_id"]:
        return (f"line_item_fulfillments.order_item_id {line['order_item_id']} belongs to order "
                f"{line['item_order_id']}, not to this fulfillment's order {line['order_id']}")
    if not line["dr_item_id"]:
        if line["order_item_id"] is None:
            return ("line_item_fulfillments.dr_order_item_id is empty and so is order_item_id: a line needs the "
                    "Digital River item id, or the order item whose order_items.dr_order_item_id carries it")
        return (f"line_item_fulfillments.dr_order_item_id is empty and so is order_items.dr_order_item_id of order "
                f"item {line['order_item_id']}: Digital River needs the item id to fulfil the line")
    fulfil, cancel = line["fulfill_quantity"], line["cancel_quantity"]
    if fulfil is None or fulfil < 0:
        return f"line_item_fulfillments.fulfill_quantity must be zero or more, got {fulfil}"
    if cancel is None or cancel < 0:
        return f"line_item_fulfillments.cancel_quantity must be zero or more, got {cancel}"
    if fulfil == 0 and cancel == 0:
        return "line_item_fulfillments.fulfill_quantity and cancel_quantity are both 0: nothing to report"
    if line["item_quantity"] is not None and fulfil + cancel > line["item_quantity"]:
        return (f"line_item_fulfillments.fulfill_quantity + cancel_quantity ({fulfil} + {cancel}) exceed "
                f"order_items.quantity ({line['item_quantity']}) of order item {line['order_item_id']}")
    return None


def line_entry(line: asyncpg.Record) -> dict[str, Any]:
    """The line as one item of a POST /fulfillments body."""
    entry: dict[str, Any] = {"itemId": line["dr_item_id"]}
    if line["fulfill_quantity"]:
        entry["quantity"] = line["fulfill_quantity"]
    if line["cancel_quantity"]:
        entry["cancelQuantity"] = line["cancel_quantity"]
    return entry


def tracking(line: asyncpg.Record) -> dict[str, str]:
    """The line's tracking details as POST /fulfillments fields (only those it has)."""
    return {key: line[column] for column, key in TRACKING if line[column]}


class LineItemFulfillment(Job):
    job_name = "line-item-fulfillment"
    due_table = "line_item_fulfillments"
    # The metadata that marks a fulfillment as this job's (with the line ids; engine/fulfillment.py).
    tag: ClassVar[dict[str, str]] = {"drjobsJob": "line-item-fulfillment"}
    # One outcome per line (and per order state asked of Digital River).
    outcomes: ClassVar[Outcomes] = {
        "line_item_sent": ("info", SUCCEEDED),
        "line_item_already_done": ("info", SUCCEEDED),
        "line_item_found_sent": ("info", SUCCEEDED),
        "line_item_failed": ("error", FAILED),
        "line_item_retrying": ("warning", FAILED),
        "line_item_key_refused": ("error", None),
        "line_item_lease_lost": ("warning", None),
        "line_item_crashed": ("error", FAILED),
        "order_state_refreshed": ("info", None),
        "order_state_refresh_failed": ("warning", None),
    }

    async def due_count(self) -> int:
        return int(await self.store.fetchval("count_due_line_items", self.ready_labels()))

    async def run_once(self, run: Run) -> None:
        await self._refresh_states()
        await self.claim_by_storefront(lambda storefront: self._send_storefront(run, storefront))

    async def _send_storefront(self, run: Run, storefront: Storefront) -> None:
        """The lines of one storefront's orders, sent with its key (its own slots and FULFILLMENT_QUERY_LIMIT)."""
        orders = self.leases("fulfillments")
        lines = self.leases("line_item_fulfillments")
        limit = self.settings.fulfillment_query_limit

        async def claim(free: int, remaining: int) -> tuple[int, list[tuple[str, Any]]] | None:
            # An order is claimed first (its lease is the order's lock), then its due lines. Until the run has
            # taken anything, an order with more lines than the whole limit may be taken (and split).
            claimed = [r["id"] for r in await orders.claim("claim_line_item_orders", free, remaining,
                                                           remaining == limit, storefront.label)]
            if not claimed:
                return None
            rows = await lines.claim("claim_order_lines", remaining, claimed)
            unfinished = {r["id"] for r in rows if r["unfinished"]}
            with_lines = {r["fulfillment_id"] for r in rows}
            await orders.release([i for i in claimed if i not in with_lines])
            by_order: dict[int, list[asyncpg.Record]] = {}
            for line in await self.store.fetch("line_item_details", [r["id"] for r in rows]) if rows else []:
                by_order.setdefault(line["fulfillment_id"], []).append(line)
            return len(rows), [(f"order-{fulfillment_id}",
                                self._process(run, orders, lines, fulfillment_id, group, unfinished,
                                              storefront.client))
                               for fulfillment_id, group in by_order.items()]

        await self.claim_and_process(run, [orders, lines], limit, claim, storefront=storefront)

    # -- orders waiting for acceptance ------------------------------------------------------------------------

    async def _refresh_states(self) -> None:
        """Ask Digital River once for the state of each order whose due lines wait on acceptance."""
        rows = await self.store.fetch("orders_awaiting_acceptance", self.settings.fulfillment_query_limit,
                                      ORDER_STATE_LOOK_AFTER_SECONDS, [s.label for s in self.storefronts])
        if not rows:
            return
        slots = asyncio.Semaphore(self.concurrency)
        async with asyncio.TaskGroup() as group:
            for row in rows:
                group.create_task(self._refresh(row, slots), name=f"order-state:{row['id']}")

    async def _refresh(self, row: asyncpg.Record, slots: asyncio.Semaphore) -> None:
        client = self.client_for(row["storefront"])
        async with slots:
            if client is None or client.storefront in self.refused or self.stop_requested:
                return
            started = time.monotonic()
            fields = {"fulfillment_id": row["id"], "dr_order_id": row["dr_order_id"],
                      "previous_state": row["dr_order_state"]}
            try:
                order = await client.get_order(row["dr_order_id"])
            except AuthError:
                self.refuse(client)
                return
            except DigitalRiverError as exc:
                message = dr_message(exc)
                self.services.app_log.write("WARN", self.job_name, f"order state refresh failed: {message}",
                                            record_id=row["id"], status=exc.status, response=exc.response, exc=exc)
                self.settle(None, Outcome("order_state_refresh_failed", {"reason": message, "app_logged": True}),
                            started, **fields)
                return
            await self.store.execute("save_order_state", row["id"], order.state)
            self.settle(None, Outcome("order_state_refreshed", {"state": order.state}), started, **fields)

    # -- one order's lines ------------------------------------------------------------------------------------

    async def _process(self, run: Run, orders: Leases, lines: Leases, fulfillment_id: int,
                       order_lines: list[asyncpg.Record], unfinished: set[int], client: DigitalRiverClient) -> None:
        started = time.monotonic()
        ids = [line["id"] for line in order_lines]
        verdicts: dict[int, Verdict]
        try:
            verdicts = await self._fulfil(order_lines, orders, lines, fulfillment_id, unfinished, client)
            written = await self._write(orders, lines, fulfillment_id, verdicts)
        except asyncio.CancelledError:
            # Cancelled (a hard stop) perhaps after Digital River took the request: the leases are not given
            # back but left to lapse, so the next claim finds their tokens and looks before sending again.
            lines.done(ids)
            orders.done([fulfillment_id])
            raise
        except LeaseLost as exc:
            verdicts = {i: Verdict("line_item_lease_lost", fields={"error": str(exc)}) for i in ids}
            written = set(ids)
        except AuthError as exc:
            self.refuse(client)
            await lines.release(ids)
            await orders.release([fulfillment_id])
            verdicts = {i: Verdict("line_item_key_refused", fields={"error": str(exc)}) for i in ids}
            written = set(ids)
        except Exception as exc:  # a bug or a database failure: the leases lapse and the lines come back
            self.log.error("line_items_crashed", exc_info=exc, fulfillment_id=fulfillment_id, record_ids=ids)
            error = error_text(exc)
            verdicts = {i: Verdict("line_item_crashed", fields={"error": error}) for i in ids}
            written = set(ids)
        lines.done(ids)
        orders.done([fulfillment_id])
        for line in order_lines:
            verdict = verdicts[line["id"]]
            if line["id"] not in written:
                verdict = Verdict("line_item_lease_lost", fields={
                    "error": f"line {line['id']} lease lost before its outcome ({verdict.status}) was written"})
            elif verdict.app_level is not None:
                self.services.app_log.write(
                    verdict.app_level, self.job_name, f"line item not fulfilled: {verdict.message}",
                    record_id=line["id"], status=verdict.error.status if verdict.error else None,
                    request=verdict.request, response=verdict.error.response if verdict.error else None,
                    exc=verdict.error)
            self.settle(run, Outcome(verdict.event, verdict.fields), started, record_id=line["id"],
                        fulfillment_id=fulfillment_id, dr_order_id=line["dr_order_id"], dr_item_id=line["dr_item_id"],
                        fulfill_quantity=line["fulfill_quantity"], cancel_quantity=line["cancel_quantity"],
                        app_logged=verdict.app_level is not None and line["id"] in written)

    async def _fulfil(self, order_lines: Sequence[asyncpg.Record], orders: Leases, lines: Leases,
                      fulfillment_id: int, unfinished: set[int], client: DigitalRiverClient) -> dict[int, Verdict]:
        """Check every line, send the good ones (one request per tracking), and decide how each ends. Before each
        send the order's lease (its lock) is fenced: still this claim's, unexpired, pushed out for the call.
        A group with a line that may have been sent already (an earlier claim of it never wrote an outcome, or
        it is being retried) is first looked for among the order's fulfillments (engine/fulfillment.py)."""
        verdicts: dict[int, Verdict] = {}
        groups: dict[tuple[tuple[str, str], ...], list[asyncpg.Record]] = {}
        for line in order_lines:
            problem = line_problem(line)
            if problem is not None:
                verdicts[line["id"]] = Verdict("line_item_failed", "Failed", 0, problem, app_level="ERROR",
                                               fields={"status": "Failed", "reason": problem})
            else:
                groups.setdefault(tuple(sorted(tracking(line).items())), []).append(line)
        for key, group in groups.items():
            dr_order_id = group[0]["dr_order_id"]
            entries = [(line["id"], line_entry(line)) for line in group]
            for line in group:
                lines.check(line["id"])
            await orders.touch(fulfillment_id)
            look_first = any(line["id"] in unfinished or line["retry_count"] > 0 for line in group)
            results = await send_fulfillment(client, dr_order_id, entries, dict(key), tag=self.tag,
                                             look_first=look_first)
            request = {"orderId": dr_order_id, "items": [entry for _, entry in entries], **dict(key),
                       "metadata": request_metadata(self.tag, [line_id for line_id, _ in entries])}
            for line in group:
                verdicts[line["id"]] = self._verdict(line, results[line["id"]], request)
        return verdicts

    def _verdict(self, line: asyncpg.Record, sent: Sent, request: dict[str, Any]) -> Verdict:
        if sent.found:
            return Verdict("line_item_found_sent", "Completed", message=sent.message,
                           fulfillment_id=sent.fulfillment_id,
                           fields={"dr_fulfillment_id": sent.fulfillment_id, "reason": sent.message})
        if sent.kind == "sent":
            return Verdict("line_item_sent", "Completed", fulfillment_id=sent.fulfillment_id,
                           fields={"dr_fulfillment_id": sent.fulfillment_id})
        if sent.kind == "done":
            return Verdict("line_item_already_done", "Completed", message=sent.message,
                           fields={"reason": sent.message})
        message = sent.message or "failed"
        if sent.kind == "throttled":
            # Refused for the key's rate limit before anything was done: not counted, sent after Retry-After.
            later = datetime.now(UTC) + throttled_wait(sent)
            return Verdict("line_item_retrying", "Pending", 0, message, next_attempt_at=later,
                           fields={"status": "Pending", "reason": message, "retry_count": line["retry_count"],
                                   "next_attempt_at": later.isoformat()})
        attempts = line["retry_count"] + 1
        if sent.kind == "failed":
            return Verdict("line_item_failed", "Failed", 1, message, app_level="ERROR", error=sent.error,
                           request=request, fields={"status": "Failed", "reason": message, "retry_count": attempts})
        limit = self.settings.fulfillment_retry_limit
        if attempts > limit:
            message = f"{message} (failed {attempts} times; FULFILLMENT_RETRY_LIMIT is {limit})"
            return Verdict("line_item_failed", "Failed", 1, message, app_level="ERROR", error=sent.error,
                           request=request, fields={"status": "Failed", "reason": message, "retry_count": attempts})
        next_attempt = datetime.now(UTC) + backoff(attempts)
        return Verdict("line_item_retrying", "Pending", 1, message, next_attempt_at=next_attempt, app_level="WARN",
                       error=sent.error, request=request,
                       fields={"status": "Pending", "reason": message, "retry_count": attempts,
                               "next_attempt_at": next_attempt.isoformat()})

    async def _write(self, orders: Leases, lines: Leases, fulfillment_id: int,
                     verdicts: dict[int, Verdict]) -> set[int]:
        """Every line's outcome and the order's lease, in one statement, under the claims' lease tokens; the ids
        this node still held. A line someone else settled with another fulfillment is an alarm."""
        ids = list(verdicts)
        values = [verdicts[i] for i in ids]
        # Shielded: once Digital River has answered, a shutdown must not lose what it said.
        rows = await asyncio.shield(self.store.fetch(
            "finish_line_items", fulfillment_id, orders.token(fulfillment_id), ids, [lines.token(i) for i in ids],
            [v.status for v in values], [v.retry_add for v in values],
            [v.message[:2000] if v.message is not None else None for v in values],
            [v.fulfillment_id for v in values], [v.next_attempt_at for v in values]))
        written = {r["id"] for r in rows}
        refused = [i for i in ids if i not in written and verdicts[i].fulfillment_id is not None]
        for now in await self.store.fetch("line_items_settled_by", refused) if refused else []:
            mine = verdicts[now["id"]].fulfillment_id
            if now["status"] in ("Completed", "Failed") and now["dr_fulfillment_id"] not in (None, mine):
                conflict = (f"line {now['id']} was already settled with Digital River fulfillment "
                            f"{now['dr_fulfillment_id']}; this worker's call made {mine} as well")
                self.settlement_conflict(now["id"], conflict)
                self.log.error("line_item_settlement_conflict", record_id=now["id"], fulfillment_id=fulfillment_id,
                               dr_fulfillment_id=mine, settled_dr_fulfillment_id=now["dr_fulfillment_id"],
                               reason=conflict)
        return written
