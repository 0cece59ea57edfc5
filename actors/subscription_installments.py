"""CC Subscription Installment Processor: turn due subscriptions into installment records.

Takes subscriptions that are `Active`, have installments remaining, and whose `installment_next_run_date` is on
or before today in the account's time zone: oldest first, at most CC_SUBSCRIPTIONS_BATCH_QUERY_LIMIT per run,
CC_SUBSCRIPTION_PROCESSOR_BATCH_SIZE per claim and transaction. For each due installment, in one transaction
(a savepoint per subscription, so one bad row does not undo its neighbours):

- an `Open-DR` cart and its cart item for the subscribed product (quantity, price, billing agreement);
- a `subscription_process_data` record, `Open`, with a fresh `upstream_id`;
- `installment_count + 1`, `installment_count_remaining - 1`, the next run date, `Completed` when none remain.

Next dates are counted from the anchor date, never from the last clamped date, so the 31st stays the 31st where
a month has one. A subscription several periods behind gets one record per missed installment, oldest first
(at most MAX_CATCH_UP per subscription per transaction; the rest follows in the next batch). The unique
(`subscription_id`, `installment_number`) makes a second record for one installment impossible even when two
engines run the job at once. After each commit the recurring-payments actor of this process is told to run.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg

from engine.jobs import Job, Run, RunRequest
from engine.logs import error_text, get_logger
from engine.store import sql

log = get_logger(component="subscription_installments")
MAX_CATCH_UP = 100


def add_months(anchor: date, months: int) -> date:
    """`anchor` moved by whole months, its day clamped to the target month's length (Jan 31 + 1 → Feb 28/29)."""
    index = anchor.year * 12 + (anchor.month - 1) + months
    year, month = divmod(index, 12)
    return date(year, month + 1, min(anchor.day, calendar.monthrange(year, month + 1)[1]))


def installment_date(anchor: date, frequency: str, interval: int, periods: int) -> date:
    """The date `periods` intervals after the anchor."""
    if frequency == "Daily":
        return anchor + timedelta(days=periods * interval)
    if frequency == "Weekly":
        return anchor + timedelta(weeks=periods * interval)
    if frequency == "Monthly":
        return add_months(anchor, periods * interval)
    if frequency == "Yearly":
        return add_months(anchor, 12 * periods * interval)
    raise ValueError(f"installment_frequency {frequency!r} is not Daily, Weekly, Monthly or Yearly")


def next_installment_date(anchor: date, frequency: str, interval: int, after: date) -> date:
    """The first date on the anchor's schedule strictly after `after`."""
    if frequency in ("Daily", "Weekly"):
        step = interval * (1 if frequency == "Daily" else 7)
        periods = max(0, (after - anchor).days // step)
    else:
        step_months = interval * (1 if frequency == "Monthly" else 12)
        periods = max(0, ((after.year - anchor.year) * 12 + after.month - anchor.month) // step_months - 1)
    while (candidate := installment_date(anchor, frequency, interval, periods)) <= after:
        periods += 1
    return candidate


@dataclass(frozen=True)
class Installment:
    number: int
    run_date: date


def due_installments(sub: asyncpg.Record, today: date, limit: int = MAX_CATCH_UP) -> tuple[list[Installment], date]:
    """The installments of `sub` due by `today`, oldest first, and the next run date after them."""
    anchor = sub["installment_anchor_date"] or sub["installment_next_run_date"]
    frequency, interval = sub["installment_frequency"], sub["installment_interval"]
    run_date = sub["installment_next_run_date"]
    number = sub["installment_count"]
    remaining = sub["installment_count_remaining"]
    made: list[Installment] = []
    while run_date <= today and remaining > 0 and len(made) < limit:
        number += 1
        remaining -= 1
        made.append(Installment(number, run_date))
        run_date = next_installment_date(anchor, frequency, interval, run_date)
    return made, run_date


class BadSubscription(ValueError):
    """A subscription the job cannot schedule; the message names the field."""


@dataclass(frozen=True)
class Plan:
    """What one subscription gets in this batch: its due installments and its next run date."""

    subscription_id: int
    installments: list[Installment]
    next_run_date: date | None


def plan_installments(sub: asyncpg.Record, now: datetime) -> Plan:
    """The due installments of a claimed subscription; BadSubscription names what keeps it from being planned."""
    today = local_today(sub["time_zone"], now)
    try:
        made, next_run = due_installments(sub, today)
    except (ValueError, OverflowError):
        raise BadSubscription(
            f"subscriptions.installment_interval {sub['installment_interval']} "
            f"({sub['installment_frequency']}) from installment_anchor_date {sub['installment_anchor_date']} puts "
            "the next installment past the year 9999") from None
    remaining = sub["installment_count_remaining"] - len(made)
    return Plan(sub["id"], made, next_run if remaining else None)


def local_today(time_zone: str | None, now: datetime) -> date:
    try:
        return now.astimezone(ZoneInfo(time_zone or "UTC")).date()
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a directory ("Europe") or an overlong name
        raise BadSubscription(f"accounts.time_zone {time_zone!r} is not an IANA time zone") from None


class SubscriptionInstallments(Job):
    job_name = "subscription-installments"
    due_table = "subscriptions"

    async def run_once(self, run: Run) -> None:
        limit = self.settings.cc_subscriptions_batch_query_limit
        batch = self.settings.cc_subscription_processor_batch_size
        zones = await self.known_time_zones()
        taken = 0
        # Where this run is in the due order (run date, id): each batch goes on from there. A subscription still
        # due after its batch (far behind) is kept out of the rest of the run and waits for the next one.
        cursor: list[Any] = [date.min, 0]
        behind: list[int] = []
        while taken < limit and await self.may_claim():
            size = min(batch, limit - taken)
            made, seen = await self._batch(run, size, zones, cursor, behind)
            taken += seen
            if made:
                self._wake_payments()
            if seen < size:
                break

    async def known_time_zones(self) -> list[str]:
        """The accounts' time zones that both PostgreSQL and Python know; due dates use UTC for any other
        (and the subscription is then suspended with a message naming the bad zone)."""
        valid = []
        for row in await self.store.fetch("account_time_zones"):
            try:
                ZoneInfo(row["time_zone"])
            except (ZoneInfoNotFoundError, ValueError, OSError):
                continue
            valid.append(row["time_zone"])
        return valid

    async def _batch(self, run: Run, size: int, zones: list[str], cursor: list[Any],
                     behind: list[int]) -> tuple[int, int]:
        """Claim up to `size` due subscriptions after the run's `cursor` (moved past them) and make their
        installments in one transaction; those still due after it go on `behind`."""
        now = datetime.now(UTC)
        async with self.store.pool.acquire() as conn, conn.transaction():
            subs = await conn.fetch(sql("claim_due_subscriptions"), size, zones, *cursor, behind, self._labels())
            if subs:
                cursor[:] = max((sub["installment_next_run_date"], sub["id"]) for sub in subs)
            run.claimed += len(subs)
            plans: list[Plan] = []
            for sub in subs:
                try:
                    plans.append(plan_installments(sub, now))
                except BadSubscription as exc:
                    await self._suspend(conn, run, sub["id"], str(exc))
            zones_of = {sub["id"]: sub["time_zone"] for sub in subs}
            behind.extend(p.subscription_id for p in plans if p.next_run_date is not None
                          and p.next_run_date <= local_today(zones_of[p.subscription_id], now))
            try:
                async with conn.transaction():
                    made = await self._write(conn, plans)
                run.succeeded += len(plans)
            except asyncpg.PostgresError as exc:
                # One subscription's rows broke the batch statement: write them one by one to find it.
                log.warning("installment_batch_retried_one_by_one", error=error_text(exc))
                made = await self._write_one_by_one(conn, run, plans)
        if made:
            log.info("installments_created", count=made, subscriptions=len(plans))
        return made, len(subs)

    async def _write(self, conn: asyncpg.Connection, plans: list[Plan]) -> int:
        """The carts, cart items and records of every planned installment, and the subscriptions advanced."""
        installments = [(p.subscription_id, i) for p in plans for i in p.installments]
        if installments:
            rows = await conn.fetch(sql("insert_installments"), [s for s, _ in installments],
                                    [i.number for _, i in installments], [i.run_date for _, i in installments])
            for row in rows:
                log.debug("installment_created", subscription_id=row["subscription_id"], record_id=row["id"],
                          installment_number=row["installment_number"])
        await conn.execute(sql("advance_subscriptions"), [p.subscription_id for p in plans],
                           [len(p.installments) for p in plans], [p.next_run_date for p in plans])
        return len(installments)

    async def _write_one_by_one(self, conn: asyncpg.Connection, run: Run, plans: list[Plan]) -> int:
        made = 0
        for plan in plans:
            try:
                async with conn.transaction():
                    made += await self._write(conn, [plan])
                run.succeeded += 1
            except asyncpg.UniqueViolationError:
                # A record for this installment number exists already (written outside the engine): the counts
                # disagree with the records, which an operator has to settle.
                first, last = plan.installments[0].number, plan.installments[-1].number
                due = (f"installment {first} comes next, but subscription_process_data already has it" if first == last
                       else f"installments {first} to {last} come next, but subscription_process_data already has "
                            "one of them")
                await self._suspend(conn, run, plan.subscription_id,
                                    f"subscriptions.installment_count is {first - 1}, so {due}: installment_count "
                                    "must be the number of installments already made (0 for a new subscription)")
            except asyncpg.PostgresError as exc:
                run.failed += 1
                error = error_text(exc)
                log.error("subscription_installment_failed", subscription_id=plan.subscription_id, error=error)
                await conn.execute(sql("note_subscription_error"), plan.subscription_id, error)
        return made

    async def _suspend(self, conn: asyncpg.Connection, run: Run, subscription_id: int, reason: str) -> None:
        run.failed += 1
        await conn.execute(sql("suspend_subscription"), subscription_id, reason)
        log.error("subscription_suspended", subscription_id=subscription_id, reason=reason)

    def _wake_payments(self) -> None:
        if not self.services.autonomous:
            return
        payments = self.services.jobs.get("recurring-payments")
        if payments is not None and not payments.offer(RunRequest(datetime.now(UTC), "message")):
            log.info("payments_already_busy")

    def _labels(self) -> list[str]:
        """The storefronts whose subscriptions this job makes installments of: those with a key (the others wait,
        untouched, as the Salesforce job runs only for its storefront)."""
        return [storefront.label for storefront in self.storefronts]

    async def due_count(self) -> int:
        return int(await self.store.fetchval("count_due_subscriptions", await self.known_time_zones(),
                                             self._labels()))

    async def has_due(self) -> bool:
        return bool(await self.store.fetchval("any_due_subscription", await self.known_time_zones(), self._labels()))

