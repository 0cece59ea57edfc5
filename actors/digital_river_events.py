"""Digital River events: hear what Digital River settles after the fact, and apply it.

Each run (on its schedule, and at once when a webhook arrives) does three things (a run a webhook woke skips
the poll):

1. **Poll.** `GET /events` for every event created since where the last poll of this storefront reached (the
   cursor in `dr_event_cursors`, less a minute of overlap; the first poll reaches back a day), page by page, and
   store each once in `dr_events` (`source` poll). So a webhook that never came, or an engine that was down, is
   caught up within one run, and the job works with no webhook at all. A poll Digital River refuses is logged
   and the run goes on with what is stored.
2. **Apply** every `Pending` event, in the order Digital River created them, each in one transaction with what
   it changes: the event row is locked (`FOR UPDATE SKIP LOCKED`, so two processes never apply one event), its
   effects written, and its status set, or none of it. The effects are CONTRACT.md's table:

   - `order.accepted`: order state `accepted`, `ofi_received`, the fulfillments row made if the order has none;
     the installment record Pending on it `Successful`;
   - `order.complete`: state `complete`, `ocn_received`;
   - `order.charge.failed`: the Pending installment is a soft decline (Open, no charge for 24 hours, Failed past
     SUBSCRIPTION_RETRY_COUNT);
   - `order.blocked`: state `blocked`; the Pending installment is a hard decline (Failed);
   - `order.cancelled`: state `cancelled`; the Pending installment is a failed attempt, back to Open;
   - `order.charge.capture.failed`: the fulfillments row's `message` says so; an ERROR application log;
   - the other `order.*` state events (`order.fulfilled`, `order.pending_payment`, `order.review_opened`): the
     state, if it moves forward;
   - any other type, or an order the store does not know: `Ignored`.

   A state never moves back (`drjobs_order_state_rank`). A failed order goes to the record's
   `dr_failed_order_ids` and is never adopted by a later attempt, which makes a new checkout.
3. **Look** at installment records `Pending` with no event for an hour (`next_attempt_at` passed): one
   `GET /orders/{id}` each, whose state is applied as its event would be; still unconfirmed, it is looked at
   again an hour later.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import asyncpg

from engine.digital_river import AuthError, DigitalRiverError, Order, decline_is_soft, dr_message
from engine.jobs import FAILED, SUCCEEDED, Job, Outcome, Outcomes, Run
from engine.logs import error_text
from engine.settings import storefront_label
from engine.store import LeaseLost, Leases, sql
from engine.storefronts import Storefront
from engine.webhooks import event_row

# The order events the engine acts on; the poll asks for these only (Digital River allows fewer than 20 types).
ORDER_STATE_EVENTS = {
    "order.accepted": "accepted",
    "order.complete": "complete",
    "order.blocked": "blocked",
    "order.cancelled": "cancelled",
    "order.fulfilled": "fulfilled",
    "order.pending_payment": "pending_payment",
    "order.review_opened": "in_review",
}
HANDLED_TYPES = (*ORDER_STATE_EVENTS, "order.charge.failed", "order.charge.capture.failed")
FIRST_POLL_LOOKBACK = timedelta(days=1)
POLL_OVERLAP = timedelta(minutes=1)
PENDING_LOOK_AFTER = timedelta(hours=1)
APPLY_BATCH = 200
# Order states that mean the charge went through (a later dispute or return is about money already taken).
PAID_STATES = ("accepted", "fulfilled", "complete", "dispute", "returned")
# (level, message, record id) of an application_logs row.
AppLog = tuple[str, str, object]


def _failure_code(obj: dict[str, Any]) -> str | None:
    """The decline code of a failed charge: `failureCode` of the event's charge, or of the order's first charge."""
    charge: Any = obj
    if "failureCode" not in obj:
        payment = obj.get("payment")
        charges = payment.get("charges") if isinstance(payment, dict) else None
        charge = charges[0] if isinstance(charges, list) and charges else {}
    code = charge.get("failureCode") if isinstance(charge, dict) else None
    return code[:100] if isinstance(code, str) and code.isprintable() and code.strip() else None


def charge_state(obj: dict[str, Any]) -> str | None:
    payment = obj.get("payment")
    charges = payment.get("charges") if isinstance(payment, dict) else None
    if isinstance(charges, list) and charges and isinstance(charges[0], dict):
        state = charges[0].get("state")
        return state if isinstance(state, str) else None
    return None


class DigitalRiverEvents(Job):
    job_name = "digital-river-events"
    due_table = "dr_events"
    outcomes: ClassVar[Outcomes] = {
        "event_applied": ("info", SUCCEEDED),
        "event_ignored": ("info", SUCCEEDED),
        "event_failed": ("error", FAILED),
        "events_polled": ("info", None),
        "events_poll_failed": ("warning", None),
        "pending_installment_looked_at": ("info", SUCCEEDED),
        "pending_installment_look_failed": ("warning", None),
        "pending_installment_lease_lost": ("warning", None),
        "pending_installment_crashed": ("error", FAILED),
    }

    async def due_count(self) -> int:
        return int(await self.store.fetchval("count_pending_events")) + int(
            await self.store.fetchval("count_pending_records_due", self.ready_labels()))

    async def run_once(self, run: Run) -> None:
        # A run a webhook woke applies what is stored; the scheduled (and manual, drain) runs also poll, so a
        # storm of webhooks does not become a storm of GET /events. Each storefront with a key is polled with it,
        # all at once (one slow or refusing storefront does not hold up another's poll).
        if run.trigger != "message":
            async with asyncio.TaskGroup() as group:
                for storefront in self.storefronts:
                    group.create_task(self.poll(storefront), name=f"{self.job_name}:poll:{storefront.label}")
        await self.apply_all(run)
        await self.claim_by_storefront(lambda storefront: self.look_at_pending(run, storefront))

    # -- 1. poll -------------------------------------------------------------------------------------------------

    async def poll(self, storefront: Storefront) -> None:
        """GET /events with the storefront's key since where its last poll reached; each event stored with the
        storefront's label."""
        started = time.monotonic()
        label, client = storefront.label, storefront.client
        cursor = await self.store.fetchrow("event_cursor", label)
        since = (cursor["seen_until"] - POLL_OVERLAP) if cursor else datetime.now(UTC) - FIRST_POLL_LOOKBACK
        newest: tuple[datetime, str] | None = None
        listed = stored = 0
        complete = False
        after: str | None = None
        try:
            while await self.may_claim():
                page, more = await client.list_events(created_since=since, types=HANDLED_TYPES, starting_after=after)
                listed += len(page)
                if page:
                    rows = await self.store.fetch("store_events",
                                                  json.dumps([event_row(e, label) for e in page]), "poll")
                    stored += len(rows)
                    for e in page:
                        if e.created_time is not None and (newest is None or e.created_time > newest[0]):
                            newest = (e.created_time, e.id)
                if not more or not page or page[-1].id == after:
                    complete = True
                    break
                after = page[-1].id
        except AuthError:
            self.refuse(client)
            return
        except DigitalRiverError as exc:
            self.services.app_log.write("WARN", self.job_name, f"GET /events failed: {dr_message(exc)}",
                                        status=exc.status, response=exc.response, exc=exc)
            self.settle(None, Outcome("events_poll_failed", {"reason": dr_message(exc), "listed": listed,
                                                             "stored": stored}), started, storefront=label)
            return
        finally:
            self.services.metrics.dr_events_stored("poll", stored)
        # The cursor moves only after every page was read: pages come newest first, so a poll cut short (an
        # error, a pause, a stop) must not skip the older events it did not reach.
        if complete and newest is not None:
            await self.store.execute("save_event_cursor", label, *newest)
        self.settle(None, Outcome("events_polled", {"listed": listed, "stored": stored, "complete": complete,
                                                    "since": since.isoformat()}), started, storefront=label)

    # -- 2. apply ------------------------------------------------------------------------------------------------

    async def apply_all(self, run: Run) -> None:
        seen: set[int] = set()
        while await self.may_claim():
            ids = [r["id"] for r in await self.store.fetch("pending_event_ids", APPLY_BATCH)]
            fresh = [i for i in ids if i not in seen]
            if not fresh:
                return
            for event_id in fresh:
                seen.add(event_id)
                if self.stop_requested:
                    return
                await self.apply_one(run, event_id)

    async def apply_one(self, run: Run, row_id: int) -> None:
        started = time.monotonic()
        try:
            async with self.store.pool.acquire() as conn, conn.transaction():
                event = await conn.fetchrow(sql("lock_event"), row_id)
                if event is None:
                    return  # applied, or being applied, by another process
                run.claimed += 1
                status, message, app_log = await self.apply(conn, event["type"], event["dr_order_id"],
                                                            _payload(event["payload"]), event["event_id"],
                                                            event["storefront"])
                await conn.fetchval(sql("finish_event"), row_id, status, message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug or a database failure: the transaction rolled back and the event is still Pending.
            self.log.error("event_crashed", exc_info=exc, event_row=row_id)
            await self._fail_event(run, row_id, error_text(exc), started)
            return
        if app_log is not None:
            level, text, record_id = app_log
            self.services.app_log.write(level, self.job_name, text, record_id=record_id)
        self.services.metrics.dr_event_applied(event["type"], status)
        self.settle(run, Outcome("event_ignored" if status == "Ignored" else "event_applied",
                                 {"status": status, "reason": message}), started, event_id=event["event_id"],
                    type=event["type"], dr_order_id=event["dr_order_id"])

    async def _fail_event(self, run: Run, row_id: int, error: str, started: float) -> None:
        try:
            kind = await self.store.fetchval("finish_event", row_id, "Failed", f"could not be applied: {error}"[:2000])
        except Exception:  # the database is gone: the event stays Pending and is applied later
            return
        self.services.metrics.dr_event_applied(str(kind), "Failed")
        self.settle(run, Outcome("event_failed", {"reason": error}), started, event_row=row_id, type=kind)

    async def apply(self, conn: asyncpg.Connection, kind: str, order_id: str | None, obj: dict[str, Any],
                    event_id: str, storefront: str | None = None) -> tuple[str, str, AppLog | None]:
        """Apply one event inside the caller's transaction: (status, message, the application log to write once it
        is committed, or None). `storefront`: whose key or webhook secret it came with; an event about an order of
        another storefront is Ignored."""
        if kind not in HANDLED_TYPES:
            return "Ignored", f"{kind} is not an event the engine acts on", None
        if not order_id:
            return "Ignored", f"{kind} without an order id in data.object", None
        owner = await conn.fetchval(sql("order_storefront"), order_id)
        if owner is None:
            return "Ignored", f"order {order_id} is not one of this store's", None
        if storefront is not None and owner != storefront_label(storefront):
            # Heard with one storefront's key or webhook secret about another's order: never applied (a leaked
            # secret of one storefront must not move another's records).
            return "Ignored", (f"order {order_id} is storefront {owner}'s, but the event came for storefront "
                               f"{storefront_label(storefront)}"), None
        node, retry_limit = self.store.node, self.settings.subscription_retry_count
        if kind == "order.charge.capture.failed":
            message = f"Digital River could not capture the payment of order {order_id} ({kind}, {event_id})"
            await conn.fetch(sql("note_capture_failed"), order_id, message)
            return "Processed", message, ("ERROR", message, order_id)
        if kind == "order.charge.failed":
            # The charge state only: the order's own state moves with its own events (order.cancelled, …). The
            # charge's failureCode, when the event carries it, is read with Digital River's decline table: a hard
            # code fails the installment at once.
            await conn.fetchval(sql("advance_order_state"), order_id, None, "failed", False, False)
            code = _failure_code(obj)
            hard = code is not None and not decline_is_soft(code)
            reason = f"Digital River could not charge order {order_id} ({kind}" + (f", {code})" if code else ")")
            failed = await conn.fetchrow(sql("fail_pending_record"), order_id, hard, retry_limit,
                                         code or "charge_failed", reason, node)
            return "Processed", _record_note(kind, failed), _failure_log(failed, reason)
        state = ORDER_STATE_EVENTS[kind]
        await conn.fetchval(sql("advance_order_state"), order_id, state, charge_state(obj),
                            kind == "order.accepted", kind == "order.complete")
        if state in ("accepted", "fulfilled", "complete"):
            done = await conn.fetchval(sql("accept_pending_record"), order_id, node)
            note = f"installment record {done} paid" if done is not None else "no installment record was Pending"
            return "Processed", f"{kind}: state {state}; {note}", None
        if state in ("blocked", "cancelled"):
            hard = state == "blocked"
            code = "order_blocked" if hard else "order_cancelled"
            reason = f"Digital River {'blocked' if hard else 'cancelled'} order {order_id} ({kind})"
            failed = await conn.fetchrow(sql("fail_pending_record"), order_id, hard, retry_limit, code, reason,
                                         node)
            return "Processed", _record_note(kind, failed), _failure_log(failed, reason)
        return "Processed", f"{kind}: state {state}", None

    # -- 3. look at Pending installments ---------------------------------------------------------------------

    async def look_at_pending(self, run: Run, storefront: Storefront) -> None:
        """One storefront's Pending installments without news, each looked at with its key."""
        leases = self.leases("subscription_process_data")

        async def claim(free: int, remaining: int) -> tuple[int, list[tuple[str, Any]]] | None:
            rows = await leases.claim("claim_pending_records", min(free, remaining), storefront.label)
            if not rows:
                return None
            return len(rows), [(f"pending-{r['id']}", self._look(run, leases, r, storefront)) for r in rows]

        await self.claim_and_process(run, [leases], self.settings.recurring_payment_process_query_limit, claim,
                                     storefront=storefront)

    async def _look(self, run: Run, leases: Leases, row: asyncpg.Record, storefront: Storefront) -> None:
        started = time.monotonic()
        fields = {"record_id": row["id"], "dr_order_id": row["dr_order_id"], "storefront": storefront.label}
        outcome = await self.attempt(self._look_once(leases, row, storefront), fields=fields,
                                     lease_lost="pending_installment_lease_lost",
                                     crashed="pending_installment_crashed")
        leases.done([row["id"]])
        self.settle(run, outcome, started, **fields)

    async def _look_once(self, leases: Leases, row: asyncpg.Record, storefront: Storefront) -> Outcome:
        try:
            order = await storefront.client.get_order(row["dr_order_id"])
        except AuthError as exc:
            self.refuse(storefront.client)
            await leases.release([row["id"]])
            return Outcome("pending_installment_look_failed", {"reason": str(exc)})
        except DigitalRiverError as exc:
            await self._still_pending(leases, row, datetime.now(UTC) + timedelta(minutes=5))
            return Outcome("pending_installment_look_failed", {"reason": dr_message(exc)})
        kind = _event_for(order)
        if kind is None:
            await self._still_pending(leases, row, datetime.now(UTC) + PENDING_LOOK_AFTER)
            return Outcome("pending_installment_looked_at", {"state": order.state, "status": "Pending"})
        leases.check(row["id"])
        async with self.store.pool.acquire() as conn, conn.transaction():
            _, message, _ = await self.apply(conn, kind, order.id, order.raw, f"GET /orders/{order.id}",
                                             storefront.label)
        return Outcome("pending_installment_looked_at", {"state": order.state, "reason": message})

    async def _still_pending(self, leases: Leases, row: asyncpg.Record, until: datetime) -> None:
        if await self.store.fetchval("still_pending", row["id"], leases.token(row["id"]), until) is None:
            raise LeaseLost(f"record {row['id']} lease lost before its next look was written")


def _event_for(order: Order) -> str | None:
    """The event an order's state stands for, when it settles a Pending installment; None while unconfirmed."""
    if order.charge_state == "failed":
        return "order.charge.failed"
    if order.state in ("accepted", "fulfilled", "complete"):
        return f"order.{order.state}"
    if order.state in PAID_STATES:
        return "order.accepted"
    if order.state in ("blocked", "cancelled"):
        return f"order.{order.state}"
    return None  # pending_payment, in_review, or a state this code does not know: looked at again in an hour


def _failure_log(failed: asyncpg.Record | None, reason: str) -> AppLog | None:
    """The application log of an installment an event failed: WARN while it will be tried again, ERROR when it
    ended Failed (billing-rules.md: every failure writes one)."""
    if failed is None:
        return None
    level = "ERROR" if failed["status"] == "Failed" else "WARN"
    return level, f"installment {failed['status']} after its order failed: {reason}", failed["id"]


def _record_note(kind: str, failed: asyncpg.Record | None) -> str:
    if failed is None:
        return f"{kind}: no installment record was Pending on the order"
    return (f"{kind}: installment record {failed['id']} is {failed['status']} "
            f"(failed attempts: {failed['retry_count']})")


def _payload(value: Any) -> dict[str, Any]:
    payload = json.loads(value) if isinstance(value, str) else value
    data = payload.get("data") if isinstance(payload, dict) else None
    obj = data.get("object") if isinstance(data, dict) else None
    return obj if isinstance(obj, dict) else {}
