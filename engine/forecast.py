"""`drjobs forecast [--days N] [--json]`: the charges the schedules will make over the next N days. It only reads.

Per day and currency: how many installments will be charged and their amount before tax (quantity × unit price).
Day 0 is today (UTC) and also holds everything already due; the last day is day N-1. Two sources, read in one
`REPEATABLE READ READ ONLY` transaction, so an installment the job makes meanwhile is counted once, as a record
or as a schedule date, never both and never neither:

- Installment records made and not charged yet (`Open`): on the UTC date of their next attempt, day 0 when it has
  come. `Pending` records are not counted: Digital River already made their orders and is confirming the payment,
  so they are no charge still to make (their count is in the notes). Neither are the `Open` records of a
  `Suspended` or `Cancelled` subscription, which recurring-payments fails without a charge.
- Installments the subscription-installments job will make: Active subscriptions with installments remaining, from
  `installment_next_run_date` on, with the job's own functions (`due_installments`, `local_today`), so anchors,
  month ends, intervals and time zones follow exactly its rules. A date on or before today in the account's time
  zone (as the job decides "today") is due now: day 0, every missed installment counted, at most as many as
  remain. A later one is on its run date (the date in the account's calendar, as the record's
  `installment_run_date` will be). The job makes at most MAX_CATCH_UP of one subscription's installments per run
  and the rest in the following runs; the forecast keeps them all on day 0 and says how many subscriptions are
  that far behind.

Installments whose quantity, unit price or currency recurring-payments refuses fail without a charge: they are
counted in the notes, not in the rows, and so are subscriptions whose time zone or schedule the job cannot use
(it suspends them). The forecast assumes every charge goes through: declines and retries are not foreseen.

Cost: PostgreSQL groups the subscriptions by everything their dates and row depend on (the remaining count cut to
what the window can hold), and the groups stream through a server-side cursor, a batch at a time, so memory stays
flat with any number of subscriptions; the dates of each group are stepped once.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from actors.recurring_payments import MAX_CHARGE
from actors.subscription_installments import MAX_CATCH_UP, BadSubscription, due_installments, local_today
from engine.money import is_currency
from engine.store import Store, sql

DEFAULT_DAYS = 30
MAX_DAYS = 366
# Rows per fetch from the server-side cursors.
BATCH_ROWS = 2000


async def collect(store: Store, days: int = DEFAULT_DAYS, now: datetime | None = None) -> dict[str, Any]:
    """The forecast of the `days` days from today (UTC) as plain data (the `--json` output); `now` for tests."""
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be from 1 to {MAX_DAYS}, not {days}")
    now = now or datetime.now(UTC)
    book = _Book(now, days)
    async with store.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        async for row in _rows(conn, "forecast_installment_records", book.first,
                               datetime.combine(book.end, time(), UTC), MAX_CHARGE):
            book.add_records(row)
        async for row in _rows(conn, "forecast_schedule_groups", book.end, MAX_CHARGE):
            book.add_schedule(row)
    return book.data()


async def _rows(conn: asyncpg.Connection, name: str, *args: Any) -> AsyncIterator[asyncpg.Record]:
    """The rows of statement `name`, BATCH_ROWS at a time from a server-side cursor (inside a transaction)."""
    cursor = await conn.cursor(sql(name), *args)
    while rows := await cursor.fetch(BATCH_ROWS):
        for row in rows:
            yield row


@dataclass
class _Book:
    now: datetime
    days: int
    first: date = field(init=False)
    last: date = field(init=False)
    end: date = field(init=False)
    # (day, currency) → [installments, amount]
    cells: dict[tuple[int, str], list[Any]] = field(default_factory=dict)
    not_counted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("pending_installments", "installments_of_inactive_subscriptions", "installments_with_bad_data",
         "subscriptions_with_bad_time_zone", "subscriptions_with_bad_schedule"), 0))
    far_behind: int = 0
    _todays: dict[str | None, date] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.first = self.now.astimezone(UTC).date()
        self.last = self.first + timedelta(days=self.days - 1)
        self.end = self.last + timedelta(days=1)

    def _add(self, day: int, currency: str, installments: int, amount: Decimal) -> None:
        cell = self.cells.setdefault((min(max(day, 0), self.days - 1), currency), [0, Decimal(0)])
        cell[0] += installments
        cell[1] += amount

    def add_records(self, row: asyncpg.Record) -> None:
        kind = row["kind"]
        if kind == "pending":
            self.not_counted["pending_installments"] += row["installments"]
        elif kind == "inactive":
            self.not_counted["installments_of_inactive_subscriptions"] += row["installments"]
        elif row["amount_valid"] and is_currency(row["currency"]):
            self._add(row["day"], row["currency"], row["installments"], row["amount"])
        else:
            self.not_counted["installments_with_bad_data"] += row["installments"]

    def _today(self, time_zone: str | None) -> date:
        """Today in `time_zone` as subscription-installments decides it; BadSubscription for a zone it rejects."""
        today = self._todays.get(time_zone)
        if today is None:
            today = self._todays[time_zone] = local_today(time_zone, self.now)  # only valid zones are kept
        return today

    def add_schedule(self, group: asyncpg.Record) -> None:
        """The installments one group of like subscriptions will make by the last day."""
        subscriptions = group["subscriptions"]
        if group["unusable"]:
            self.not_counted["subscriptions_with_bad_schedule"] += subscriptions
            return
        try:
            today = self._today(group["time_zone"])
        except BadSubscription:
            self.not_counted["subscriptions_with_bad_time_zone"] += subscriptions
            return
        # Every date on or before today in the account's zone is due now, even past the last day (a one-day
        # forecast when the account's today is already tomorrow in UTC).
        until = max(self.last, today)
        try:
            made, _ = due_installments(group, until, limit=group["installment_count_remaining"])
        except (ValueError, OverflowError):  # past the year 9999: the job suspends it
            self.not_counted["subscriptions_with_bad_schedule"] += subscriptions
            return
        if not (group["amount_valid"] and is_currency(group["currency"])):
            self.not_counted["installments_with_bad_data"] += len(made) * subscriptions
            return
        if sum(1 for installment in made if installment.run_date <= today) > MAX_CATCH_UP:
            self.far_behind += subscriptions
        for installment in made:
            day = 0 if installment.run_date <= today else (installment.run_date - self.first).days
            self._add(day, group["currency"], subscriptions, group["amount"])

    def data(self) -> dict[str, Any]:
        rows = [{"date": (self.first + timedelta(days=day)).isoformat(), "currency": currency,
                 "installments": cell[0], "amount": _money(cell[1])}
                for (day, currency), cell in sorted(self.cells.items())]
        totals: dict[str, list[Any]] = {}
        for (_, currency), cell in self.cells.items():
            total = totals.setdefault(currency, [0, Decimal(0)])
            total[0] += cell[0]
            total[1] += cell[1]
        return {
            "now": self.now.astimezone(UTC).isoformat(),
            "days": self.days,
            "from": self.first.isoformat(),
            "to": self.last.isoformat(),
            "rows": rows,
            "totals": [{"currency": currency, "installments": total[0], "amount": _money(total[1])}
                       for currency, total in sorted(totals.items())],
            "not_counted": dict(self.not_counted),
            "subscriptions_behind_more_than_one_run": self.far_behind,
            "notes": self._notes(),
        }

    def _notes(self) -> list[str]:
        n = self.not_counted
        notes = [
            "Amounts are before tax: quantity × unit price (an installment record's cart item, else its "
            "subscription's).",
            f"Day 0 ({self.first}, today in UTC) also holds everything already due: each installment whose run date "
            "is on or before today in its account's time zone (every missed one, at most as many as remain), and "
            "each Open installment record whose next attempt has come.",
            "A future installment is on its run date, in its account's time zone; an Open record waiting for a later "
            "attempt is on the UTC date of that attempt.",
            f"Pending installments are not counted ({n['pending_installments']} now): Digital River already has "
            "their orders and is confirming the payment.",
            "Declines and retries are not foreseen: the forecast assumes every charge goes through.",
        ]
        if n["installments_of_inactive_subscriptions"]:
            notes.append("Not counted, Open installments of Suspended or Cancelled subscriptions (recurring-payments "
                         f"fails them without a charge): {n['installments_of_inactive_subscriptions']}.")
        if n["installments_with_bad_data"]:
            notes.append("Not counted, installments whose quantity, unit price or currency recurring-payments refuses "
                         f"(they fail without a charge): {n['installments_with_bad_data']}.")
        if n["subscriptions_with_bad_time_zone"]:
            notes.append("Not counted, subscriptions whose account's time_zone is not an IANA time zone "
                         f"(subscription-installments suspends them): {n['subscriptions_with_bad_time_zone']}.")
        if n["subscriptions_with_bad_schedule"]:
            notes.append("Not counted, subscriptions with a date before the year 1 or after 9999, which "
                         f"subscription-installments cannot schedule: {n['subscriptions_with_bad_schedule']}.")
        if self.far_behind:
            notes.append(f"Subscriptions more than {MAX_CATCH_UP} installments behind: {self.far_behind}. "
                         f"subscription-installments makes at most {MAX_CATCH_UP} of one subscription's installments "
                         "per run and the rest in its next runs; all are on day 0 here.")
        return notes


def _money(amount: Decimal) -> str:
    return f"{amount:.2f}"


def render_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2)


def render_text(data: dict[str, Any]) -> str:
    """The human form of `collect`'s data."""
    lines = [f"drjobs forecast: {data['days']} days, {data['from']} to {data['to']} (day 0 is today in UTC), "
             f"at {data['now'][:19]}Z", ""]
    if data["rows"]:
        lines.append(f"  {'date':<12}{'currency':<10}{'installments':>12}  {'amount':>20}")
        for row in data["rows"]:
            lines.append(f"  {row['date']:<12}{row['currency']:<10}{row['installments']:>12}  "
                         f"{Decimal(row['amount']):>20,.2f}")
        lines += ["", "TOTALS"]
        for total in data["totals"]:
            lines.append(f"  {'':<12}{total['currency']:<10}{total['installments']:>12}  "
                         f"{Decimal(total['amount']):>20,.2f}")
    else:
        lines.append(f"  no installments to charge in these {data['days']} days")
    lines += ["", "NOTES"]
    for note in data["notes"]:
        lines += textwrap.wrap(note, 100, initial_indent="  - ", subsequent_indent="    ")
    return "\n".join(lines)
