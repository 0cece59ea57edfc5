"""`forecast`: the charges the schedules will make, per day and currency, against books computed by hand.

The function (`engine.forecast.collect`) runs with a fixed clock; the command (a subprocess) runs on the real one.
Every book below is read at NOW, Friday 2026-02-20 10:00 UTC: 00:00 on Saturday the 21st at Pacific/Kiritimati
(UTC+14), 23:00 on Thursday the 19th at Pacific/Niue (UTC-11)."""

from __future__ import annotations

import json
import random
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from actors.subscription_installments import add_months, due_installments, local_today
from engine import forecast
from engine.store import Store
from tests.db import admin, drop_database, fetchval, with_database
from tests.integration import test_pgbouncer
from tests.integration.engines import run_job
from tests.integration.factories import process_records, subscription
from tests.integration.test_cli import _snapshot
from tests.support import engine_env, run_command

NOW = datetime(2026, 2, 20, 10, 0, tzinfo=UTC)
# PgBouncer in transaction mode and a store through it, as test_pgbouncer.py runs them (skipped without pgbouncer).
bouncer, bounced_url, pooled = test_pgbouncer.bouncer, test_pgbouncer.bounced_url, test_pgbouncer.pooled
D = date.fromisoformat


async def sub(store: Store, time_zone: str = "UTC", **columns: object) -> int:
    """An Active subscription (factories.subscription: monthly, USD, 1 × 10.00) whose account is in `time_zone`."""
    sub_id = await subscription(store, **columns)
    await store.pool.execute("UPDATE accounts SET time_zone = $2 WHERE id = (SELECT account_id FROM subscriptions "
                             "WHERE id = $1)", sub_id, time_zone)
    return sub_id


def schedule(frequency: str, anchor: str, next_run: str | None = None, **columns: object) -> dict[str, object]:
    return {"installment_frequency": frequency, "installment_anchor_date": D(anchor),
            "installment_next_run_date": D(next_run or anchor)} | columns


async def record(store: Store, subscription_id: int, number: int, *, cart: tuple[str, int, str] | None = None,
                 **columns: object) -> int:
    """An installment record of `subscription_id`, with a cart and cart item (currency, quantity, unit price)."""
    values: dict[str, object] = {}
    if cart is not None:
        currency, quantity, price = cart
        cart_id = await store.pool.fetchval("INSERT INTO carts (subscription_id, currency) VALUES ($1, $2) "
                                            "RETURNING id", subscription_id, currency)
        item_id = await store.pool.fetchval("INSERT INTO cart_items (cart_id, quantity, unit_price) VALUES "
                                            "($1, $2, $3::numeric) RETURNING id", cart_id, quantity, price)
        values = {"cart_id": cart_id, "cart_item_id": item_id}
    [record_id] = await process_records(store, subscription_id, 1, installment_number=number, **(values | columns))
    return record_id


def rows(data: dict[str, Any]) -> list[tuple[str, str, int, str]]:
    return [(r["date"], r["currency"], r["installments"], r["amount"]) for r in data["rows"]]


def totals(data: dict[str, Any]) -> list[tuple[str, int, str]]:
    return [(t["currency"], t["installments"], t["amount"]) for t in data["totals"]]


async def test_month_ends_weeks_years_intervals_and_remaining_counts(store: Store) -> None:
    # Anchored on Jan 31, the January installment made: Feb 28, Mar 31, Apr 30 (May 31 is after May 20).
    await sub(store, **schedule("Monthly", "2026-01-31", "2026-02-28"), installment_count=1, quantity=2,
              unit_price=Decimal("15.00"))
    # Weekly from Monday Feb 16, three left: Feb 23, Mar 2, Mar 9 and no more.
    await sub(store, **schedule("Weekly", "2026-02-16", "2026-02-23"), installment_count_remaining=3,
              unit_price=Decimal("5.00"), currency="EUR")
    # Yearly from Feb 29 2024: Feb 28 2026, then Feb 28 2027 (outside).
    await sub(store, **schedule("Yearly", "2024-02-29", "2026-02-28"), quantity=3, unit_price=Decimal("100.00"))
    # Every 10 days from Feb 1, four left from Feb 21: Feb 21, Mar 3, Mar 13, Mar 23.
    await sub(store, **schedule("Daily", "2026-02-01", "2026-02-21"), installment_interval=10,
              installment_count_remaining=4, unit_price=Decimal("1.50"), currency="GBP")
    # An operator moved the next run to Mar 5, off the Jan 31 schedule: Mar 5, then the schedule's Mar 31, Apr 30.
    await sub(store, **schedule("Monthly", "2026-01-31", "2026-03-05"), unit_price=Decimal("8.00"), currency="cad")

    data = await forecast.collect(store, 90, now=NOW)

    assert (data["days"], data["from"], data["to"]) == (90, "2026-02-20", "2026-05-20")
    assert rows(data) == [
        ("2026-02-21", "GBP", 1, "1.50"),
        ("2026-02-23", "EUR", 1, "5.00"),
        ("2026-02-28", "USD", 2, "330.00"),
        ("2026-03-02", "EUR", 1, "5.00"),
        ("2026-03-03", "GBP", 1, "1.50"),
        ("2026-03-05", "CAD", 1, "8.00"),
        ("2026-03-09", "EUR", 1, "5.00"),
        ("2026-03-13", "GBP", 1, "1.50"),
        ("2026-03-23", "GBP", 1, "1.50"),
        ("2026-03-31", "CAD", 1, "8.00"),
        ("2026-03-31", "USD", 1, "30.00"),
        ("2026-04-30", "CAD", 1, "8.00"),
        ("2026-04-30", "USD", 1, "30.00"),
    ]
    assert totals(data) == [("CAD", 3, "24.00"), ("EUR", 3, "15.00"), ("GBP", 4, "6.00"), ("USD", 4, "390.00")]


async def test_overdue_installments_are_each_counted_on_day_0(store: Store) -> None:
    # Four months behind (Nov 15, Dec 15, Jan 15, Feb 15), then Mar 15.
    await sub(store, **schedule("Monthly", "2025-10-15", "2025-11-15"), installment_count=1,
              unit_price=Decimal("20.00"), currency="EUR")
    # Behind since Dec 1 but only two left: Dec 1 and Jan 1, nothing more.
    await sub(store, **schedule("Monthly", "2025-12-01"), installment_count_remaining=2, unit_price=Decimal("7.00"))
    # Due today, then weekly.
    await sub(store, **schedule("Weekly", "2026-02-20"), installment_count_remaining=52, unit_price=Decimal("3.00"))
    # Daily since Oct 1: 143 days behind, more than one run of the job makes (MAX_CATCH_UP), then one a day.
    await sub(store, **schedule("Daily", "2025-10-01"), installment_count_remaining=1000, unit_price=Decimal("1.00"),
              currency="GBP")

    data = await forecast.collect(store, 30, now=NOW)

    daily = [((D("2026-02-21") + timedelta(days=i)).isoformat(), "GBP", 1, "1.00") for i in range(29)]
    others = [("2026-02-27", "USD", 1, "3.00"), ("2026-03-06", "USD", 1, "3.00"), ("2026-03-13", "USD", 1, "3.00"),
              ("2026-03-15", "EUR", 1, "20.00"), ("2026-03-20", "USD", 1, "3.00")]
    assert rows(data) == [("2026-02-20", "EUR", 4, "80.00"), ("2026-02-20", "GBP", 143, "143.00"),
                          ("2026-02-20", "USD", 3, "17.00"), *sorted(daily + others)]
    assert data["to"] == "2026-03-21" and daily[-1][0] == "2026-03-21"
    assert totals(data) == [("EUR", 5, "100.00"), ("GBP", 172, "172.00"), ("USD", 7, "29.00")]
    assert data["subscriptions_behind_more_than_one_run"] == 1
    assert any("more than 100 installments behind" in note for note in data["notes"])


async def test_only_active_subscriptions_with_installments_left_are_forecast(store: Store) -> None:
    await sub(store, **schedule("Monthly", "2026-01-25", "2026-02-25"), installment_count=1)
    for status, remaining in (("Suspended", 5), ("Cancelled", 5), ("Completed", 0), ("Active", 0)):
        await sub(store, **schedule("Monthly", "2026-01-25", "2026-02-25"), status=status,
                  installment_count_remaining=remaining, unit_price=Decimal("999.00"))

    data = await forecast.collect(store, 30, now=NOW)

    assert rows(data) == [("2026-02-25", "USD", 1, "10.00")]


async def test_made_installments_count_once_on_their_next_attempt_and_pending_ones_not_at_all(store: Store) -> None:
    # Installment 1 (Feb 20) is made and Open, due now; its cart says 1 × 30.00 (the price changed since). The
    # subscription's next installment is Mar 20 at 2 × 12.50: the record is not counted again as a schedule date.
    made = await sub(store, **schedule("Monthly", "2026-01-20", "2026-03-20"), installment_count=1, quantity=2,
                     unit_price=Decimal("12.50"))
    await record(store, made, 1, cart=("USD", 1, "30.00"), next_attempt_at=NOW - timedelta(hours=1))
    # Waiting out a decline until Monday 09:00 UTC (no cart: the subscription's 9.00 EUR); a later one after the
    # window; a Pending one, a Failed one and a Successful one.
    waiting = await sub(store, **schedule("Monthly", "2026-01-01", "2026-06-01"), unit_price=Decimal("9.00"),
                        currency="EUR")
    await record(store, waiting, 1, next_attempt_at=datetime(2026, 2, 23, 9, 0, tzinfo=UTC))
    await record(store, waiting, 2, next_attempt_at=datetime(2026, 3, 22, 0, 0, tzinfo=UTC))
    await record(store, waiting, 3, subscription_job_run_status="Pending", dr_order_id="ord_pending",
                 next_attempt_at=NOW - timedelta(days=1))
    await record(store, waiting, 4, subscription_job_run_status="Failed", next_attempt_at=NOW)
    await record(store, waiting, 5, subscription_job_run_status="Successful", is_recurring_payment_processed=True,
                 dr_order_id="ord_paid", next_attempt_at=NOW)
    # An Open record of a Cancelled subscription is failed without a charge; a Completed one's is still charged.
    cancelled = await sub(store, **schedule("Monthly", "2026-01-01"), status="Cancelled", unit_price=Decimal("50.00"))
    await record(store, cancelled, 1, next_attempt_at=NOW)
    completed = await sub(store, **schedule("Monthly", "2026-01-01"), status="Completed",
                          installment_count_remaining=0, unit_price=Decimal("4.00"))
    await record(store, completed, 1, next_attempt_at=NOW - timedelta(days=3))

    data = await forecast.collect(store, 30, now=NOW)

    assert rows(data) == [("2026-02-20", "USD", 2, "34.00"), ("2026-02-23", "EUR", 1, "9.00"),
                          ("2026-03-20", "USD", 1, "25.00")]
    assert data["not_counted"]["pending_installments"] == 1
    assert data["not_counted"]["installments_of_inactive_subscriptions"] == 1
    assert any(note.startswith("Pending installments are not counted (1 now)") for note in data["notes"])


async def test_far_time_zones_decide_today_as_the_installment_job_does(store: Store) -> None:
    # Feb 21 is today at Kiritimati: due now, day 0. The same schedule in UTC is due tomorrow.
    await sub(store, "Pacific/Kiritimati", **schedule("Monthly", "2026-01-21", "2026-02-21"),
              unit_price=Decimal("10.00"))
    await sub(store, "UTC", **schedule("Monthly", "2026-01-21", "2026-02-21"), unit_price=Decimal("1.00"))
    # At Niue it is still Feb 19: the Feb 19 installment is due (day 0), the next one on Feb 26.
    await sub(store, "Pacific/Niue", **schedule("Weekly", "2026-02-12", "2026-02-19"), installment_count_remaining=2,
              unit_price=Decimal("100.00"), currency="EUR")
    assert local_today("Pacific/Kiritimati", NOW) == D("2026-02-21")
    assert local_today("Pacific/Niue", NOW) == D("2026-02-19")

    data = await forecast.collect(store, 30, now=NOW)
    assert rows(data) == [("2026-02-20", "EUR", 1, "100.00"), ("2026-02-20", "USD", 1, "10.00"),
                          ("2026-02-21", "USD", 1, "1.00"), ("2026-02-26", "EUR", 1, "100.00"),
                          ("2026-03-21", "USD", 2, "11.00")]
    # One day: Kiritimati's Feb 21 is due now, so it is in; UTC's Feb 21 is tomorrow.
    data = await forecast.collect(store, 1, now=NOW)
    assert rows(data) == [("2026-02-20", "EUR", 1, "100.00"), ("2026-02-20", "USD", 1, "10.00")]


async def test_bad_time_zones_and_bad_amounts_are_left_out_and_said(store: Store) -> None:
    await sub(store, "Mars/Olympus_Mons", **schedule("Monthly", "2026-01-25", "2026-02-25"))
    await sub(store, **schedule("Monthly", "2026-01-25", "2026-02-25"), quantity=0)
    await sub(store, **schedule("Monthly", "2026-01-25", "2026-02-25"), currency="XXX")
    await sub(store, **schedule("Monthly", "2026-01-25", "2026-02-25"), unit_price=None)
    good = await sub(store, **schedule("Monthly", "2026-01-25", "2026-02-25"), installment_count=2,
                     unit_price=Decimal("2.00"))
    # Its two made installments: carts with a currency that is no ISO 4217 code, and with a quantity of 0.
    await record(store, good, 1, cart=("ZZZ", 1, "5.00"), next_attempt_at=NOW)
    await record(store, good, 2, cart=("USD", 0, "5.00"), next_attempt_at=NOW)

    data = await forecast.collect(store, 30, now=NOW)

    assert rows(data) == [("2026-02-25", "USD", 1, "2.00")]
    assert data["not_counted"]["subscriptions_with_bad_time_zone"] == 1
    assert data["not_counted"]["installments_with_bad_data"] == 5
    notes = data["notes"]
    assert any(note.endswith("not an IANA time zone (subscription-installments suspends them): 1.") for note in notes)
    assert any(note.endswith("currency recurring-payments refuses (they fail without a charge): 5.") for note in notes)
    assert "not an IANA time zone" in forecast.render_text(data)


async def test_grouped_subscriptions_give_what_each_alone_would(store: Store) -> None:
    """A random book: the forecast (subscriptions grouped and cut in SQL) equals stepping each subscription alone
    with the installment job's functions."""
    rng = random.Random(20260220)
    zones = ["UTC", "Pacific/Kiritimati", "Pacific/Niue", "Asia/Kolkata", "America/Santiago"]
    async with store.pool.acquire() as conn:
        account_ids = [await conn.fetchval("INSERT INTO accounts (time_zone) VALUES ($1) RETURNING id", zone)
                       for zone in zones]
        for _ in range(400):
            frequency = rng.choice(["Daily", "Weekly", "Monthly", "Monthly", "Yearly"])
            interval = rng.choice([1, 1, 2, 3])
            anchor = D("2025-01-01") + timedelta(days=rng.randrange(0, 500))
            step = rng.randrange(0, 6)
            first = {"Daily": anchor + timedelta(days=step * interval), "Weekly": anchor + timedelta(weeks=step * interval),
                     "Monthly": add_months(anchor, step * interval), "Yearly": add_months(anchor, 12 * step * interval)}
            await conn.execute(
                "INSERT INTO subscriptions (account_id, quantity, unit_price, currency, installment_frequency, "
                "installment_interval, installment_anchor_date, installment_next_run_date, "
                "installment_count_remaining) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                rng.choice(account_ids), rng.randrange(1, 4), Decimal(rng.randrange(100, 5000)) / 100,
                rng.choice(["USD", "EUR"]), frequency, interval, rng.choice([anchor, None]), first[frequency],
                rng.choice([1, 2, 3, 5, 40, 1000]))
        subs = await conn.fetch("SELECT s.*, a.time_zone FROM subscriptions s JOIN accounts a ON a.id = s.account_id")

    for days in (1, 45):
        expected: dict[tuple[str, str], list[Any]] = {}
        last = NOW.date() + timedelta(days=days - 1)
        for s in subs:
            today = local_today(s["time_zone"], NOW)
            made, _ = due_installments(s, max(last, today), limit=s["installment_count_remaining"])
            for installment in made:
                day = NOW.date() if installment.run_date <= today else installment.run_date
                cell = expected.setdefault((day.isoformat(), s["currency"]), [0, Decimal(0)])
                cell[0] += 1
                cell[1] += s["quantity"] * s["unit_price"]
        data = await forecast.collect(store, days, now=NOW)
        assert rows(data) == [(d, c, n, f"{a:.2f}") for (d, c), (n, a) in sorted(expected.items())]


async def test_the_forecast_is_the_same_before_and_after_the_installment_job_makes_the_records(store: Store) -> None:
    """Running subscription-installments turns due schedule dates into Open records: the forecast must not change
    (each installment counted once, from one source or the other), a subscription far behind included."""
    today = datetime.now(UTC).date()
    books = [("Monthly", 1, add_months(today, -3), 12, "UTC"), ("Weekly", 2, today - timedelta(weeks=6), 3, "UTC"),
             ("Daily", 1, today - timedelta(days=150), 400, "UTC"), ("Yearly", 1, add_months(today, -24), 5, "UTC"),
             ("Monthly", 1, today + timedelta(days=1), 6, "Pacific/Kiritimati"),
             ("Monthly", 1, today, 6, "Pacific/Niue"), ("Weekly", 1, today - timedelta(days=3), 4, "Asia/Kolkata"),
             ("Monthly", 1, today + timedelta(days=5), 6, "UTC")]
    for i, (frequency, interval, anchor, remaining, zone) in enumerate(books):
        await sub(store, zone, **schedule(frequency, anchor.isoformat()), installment_interval=interval,
                  installment_count_remaining=remaining, quantity=i + 1, unit_price=Decimal(f"{i + 1}.25"),
                  currency="EUR" if i % 2 else "USD")
    now = datetime.now(UTC)
    before = await forecast.collect(store, 30, now=now)

    assert await run_job(store, "http://127.0.0.1:9", "subscription-installments") == 0

    made = await fetchval(store, "SELECT count(*) FROM subscription_process_data")
    assert made > 100  # the daily subscription alone has 100 made in this run and the rest still scheduled
    after = await forecast.collect(store, 30, now=now)
    assert (rows(after), totals(after)) == (rows(before), totals(before))


async def test_the_forecast_reads_the_same_through_a_transaction_pooler(store: Store, pooled: Store) -> None:
    """Through PgBouncer in transaction mode (no named statements): the read-only transaction and its server-side
    cursors, a batch at a time (more groups than one batch), give what a direct connection gives."""
    async with store.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO subscriptions (quantity, unit_price, currency, installment_frequency, "
            "installment_anchor_date, installment_next_run_date, installment_count_remaining) "
            "SELECT 1, 1 + g % 7, 'USD', 'Monthly', $1::date + g % 3000, $1::date + g % 3000, 3 "
            "FROM generate_series(1, 2 * $2::int) g", D("2018-01-01"), forecast.BATCH_ROWS)
    direct = await forecast.collect(store, 30, now=NOW)
    assert totals(direct)[0][1] > 2 * forecast.BATCH_ROWS
    assert await forecast.collect(pooled, 30, now=NOW) == direct


# The command, as a subprocess on the real clock.

async def test_forecast_command_prints_the_book_as_text_and_json(store: Store, database_url: str) -> None:
    today = datetime.now(UTC).date()
    await sub(store, **schedule("Monthly", add_months(today, -2).isoformat()), installment_count_remaining=3,
              quantity=3, unit_price=Decimal("9.99"))
    await sub(store, **schedule("Yearly", (today + timedelta(days=10)).isoformat()), installment_count_remaining=1,
              unit_price=Decimal("1234.50"), currency="EUR")
    pending = await sub(store, **schedule("Monthly", (today + timedelta(days=100)).isoformat()))
    await record(store, pending, 1, subscription_job_run_status="Pending", dr_order_id="ord_1")

    code, out, err = await run_command(["forecast", "--json", "--days", "12"], engine_env(database_url))
    assert code == 0, err
    data = json.loads(out)
    assert (data["days"], data["from"]) == (12, today.isoformat())
    assert rows(data) == [(today.isoformat(), "USD", 3, "89.91"),
                          ((today + timedelta(days=10)).isoformat(), "EUR", 1, "1234.50")]
    assert totals(data) == [("EUR", 1, "1234.50"), ("USD", 3, "89.91")]
    assert data["not_counted"]["pending_installments"] == 1

    code, out, err = await run_command(["forecast"], engine_env(database_url))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"drjobs forecast: 30 days, {today} to {today + timedelta(days=29)}")
    assert any(line.split() == [today.isoformat(), "USD", "3", "89.91"] for line in lines), out
    assert any(line.split() == ["EUR", "1", "1,234.50"] for line in lines[lines.index("TOTALS"):]), out
    assert "Pending installments are not counted (1 now)" in out


async def test_forecast_refuses_a_bad_days_value_in_one_line(tmp_path: Any) -> None:
    env = engine_env(None, DATA_DIR=str(tmp_path))
    for args in (["--days", "0"], ["--days=367"], ["--days", "x"], ["--days"]):
        code, out, err = await run_command(["forecast", *args], env)
        assert code == 2 and out == "", (args, out, err)
        assert err.count("\n") == 1 and "--days" in err and "1 to 366" in err, err
    code, out, _ = await run_command(["forecast", "--help"], env)
    assert code == 0 and "--days N" in out and "1 to 366" in out and "Only reads" in out
    assert not (tmp_path / "pg").exists()


async def test_forecast_reads_only(store: Store, database_url: str, pg_server_dsn: str) -> None:
    """It changes nothing on a database with the schema, and on one without says so in one line, creating nothing."""
    made = await sub(store, **schedule("Monthly", "2026-01-01"))
    await record(store, made, 1)
    before = await _snapshot(store)
    code, _, err = await run_command(["forecast", "--json"], engine_env(database_url))
    assert code == 0, err
    assert await _snapshot(store) == before
    assert await fetchval(store, "SELECT count(*) FROM engine_nodes") == 0

    await admin(pg_server_dsn, 'DROP DATABASE IF EXISTS "drjobs_forecast_empty" WITH (FORCE)',
                'CREATE DATABASE "drjobs_forecast_empty"')
    dsn = with_database(pg_server_dsn, "drjobs_forecast_empty")
    try:
        for args in (["forecast"], ["forecast", "--json", "--days", "7"]):
            code, out, err = await run_command(args, engine_env(dsn))
            assert code == 2 and out == "" and err.count("\n") == 1 and "no drjobs schema" in err, err
        assert await fetchval(dsn, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
    finally:
        await drop_database(pg_server_dsn, "drjobs_forecast_empty")


async def test_dates_python_cannot_hold_are_counted_as_bad_schedules_not_a_crash(store: Store) -> None:
    await sub(store, **schedule("Monthly", "2026-01-25", "2026-02-25"), unit_price=Decimal("2.00"))
    for anchor, next_run in (("0044-03-15 BC", "0044-03-15 BC"), ("-infinity", "-infinity"),
                             ("20000-01-01", "2026-02-25"), ("9999-12-31", "2026-02-25")):
        sub_id = await sub(store)
        await store.pool.execute("UPDATE subscriptions SET installment_anchor_date = $2::text::date, "
                                 "installment_next_run_date = $3::text::date WHERE id = $1", sub_id, anchor, next_run)
    made = await sub(store, **schedule("Monthly", "2026-01-01", "2026-03-01"))
    record_id = await record(store, made, 1)
    await store.pool.execute("UPDATE subscription_process_data SET next_attempt_at = '-infinity' WHERE id = $1",
                             record_id)

    data = await forecast.collect(store, 30, now=NOW)

    # The first three cannot be decoded; the one anchored on Dec 31, 9999 is due Feb 25 (its next run date), and
    # its next date would be the anchor itself. The record waiting since -infinity is due now.
    assert rows(data) == [("2026-02-20", "USD", 1, "10.00"), ("2026-02-25", "USD", 2, "12.00"),
                          ("2026-03-01", "USD", 1, "10.00")]
    assert data["not_counted"]["subscriptions_with_bad_schedule"] == 3
