"""The claim of recurring-payments reads about the rows it takes, whatever the backlog and whatever the planner's
statistics say (issue 14). Not a timing: the plan's own row counts (`EXPLAIN (ANALYZE, FORMAT JSON)`), so a query
shape that goes back to reading every open record fails here, at any speed.

The backlog: 30,000 Open installment records right after a bulk insert (no ANALYZE, as just after the installment
job made them, or with one), the 10,000 oldest waiting a day for their next attempt (a storm of soft declines).
"""

from __future__ import annotations

import json
from datetime import date
from typing import Any

import pytest

from engine.metrics import first_due_payment
from engine.store import Store, sql

DUE, WAITING, LIMIT = 20_000, 10_000, 50


async def seed(store: Store, analyze: bool) -> None:
    async with store.pool.acquire() as conn:
        await conn.execute("INSERT INTO accounts (name) VALUES ('Backlog')")
        await conn.execute(
            "INSERT INTO subscriptions (account_id, installment_count_remaining, installment_anchor_date, "
            "installment_next_run_date, currency, unit_price) SELECT 1, 1, current_date, current_date + 30, 'USD', 10 "
            "FROM generate_series(1, $1)", DUE + WAITING)
        # The waiting ones are the oldest (declined first), so they lie at the front of the claim index.
        await conn.execute(
            "INSERT INTO subscription_process_data (subscription_id, installment_number, installment_run_date, "
            "next_attempt_at) "
            "SELECT g, 1, current_date - 3 + (g > $1)::int + (g % 2), "
            "       CASE WHEN g <= $1 THEN now() + interval '1 day' ELSE now() - interval '1 minute' END "
            "FROM generate_series(1, $2) g", WAITING, DUE + WAITING)
        if analyze:
            await conn.execute("ANALYZE")


def nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += nodes(child)
    return found


async def explain(store: Store, name: str, *args: Any) -> list[dict[str, Any]]:
    """The plan's nodes, run for real (a claim leases its rows, which the next claims leave alone)."""
    return nodes(json.loads(await store.pool.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + sql(name), *args))[0]["Plan"])


def read_from_records(found: list[dict[str, Any]]) -> int:
    """Rows every scan of subscription_process_data produced or threw away, loops included: what was read."""
    return sum(int(n["Actual Rows"] * n["Actual Loops"] + n.get("Rows Removed by Filter", 0)) for n in found
               if n.get("Relation Name") == "subscription_process_data" and "Scan" in n["Node Type"]
               and n.get("Index Name") != "subscription_process_data_subscription")  # the per-row earlier check


def assert_reads_a_window(found: list[dict[str, Any]], window: int, taken: int) -> None:
    """The statement reads its window (the function) and looks each window row up once: no sequential scan, no
    hash join, nothing read beyond the window."""
    kinds = {n["Node Type"] for n in found}
    assert not kinds & {"Hash Join", "Hash Anti Join", "Seq Scan"}, " ".join(sorted(kinds))
    [function] = [n for n in found if n["Node Type"] == "Function Scan"]
    assert function["Actual Rows"] <= window
    assert read_from_records(found) <= window + taken


async def assert_window_walks_the_index(store: Store, window: int) -> None:
    """The window function's own statement, planned as the function plans it (its SET options): an ordered walk
    of the claim index that stops at the limit."""
    fn = await store.pool.fetchrow("SELECT prosrc, proconfig FROM pg_proc WHERE proname = 'drjobs_payment_claim_window'")
    body = (fn["prosrc"].replace("after_date", "$1::date").replace("after_id", "$2::bigint").replace("size", "$3::int")
            .replace("= label", "= $4::text"))
    async with store.pool.acquire() as conn, conn.transaction():
        for option in fn["proconfig"]:
            name, value = option.split("=")
            await conn.execute(f"SET LOCAL {name} = {value}")
        plan = nodes(json.loads(await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + body, date.min, 0,
                                                    window, "DefaultStore"))[0]["Plan"])
    [scan] = [n for n in plan if n.get("Index Name") == "subscription_process_data_storefront_claim"]
    assert scan["Node Type"] == "Index Scan" and not {n["Node Type"] for n in plan} & {"Sort", "Seq Scan"}
    assert scan["Actual Rows"] + scan.get("Rows Removed by Filter", 0) <= window


@pytest.mark.parametrize("analyze", [False, True], ids=["fresh", "analyzed"])
async def test_a_claim_reads_a_window_of_the_claim_order_not_the_backlog(store: Store, analyze: bool) -> None:
    await seed(store, analyze)
    window = 1000
    # At the front: a window of waiting rows claims nothing; the job moves its cursor past it and goes on.
    await assert_window_walks_the_index(store, window)
    first = await explain(store, "claim_payment_records", "node", LIMIT, 300.0, [], date.min, 0, window,
                          "DefaultStore")
    assert_reads_a_window(first, window, 0)
    assert first[0]["Actual Rows"] == 0
    # Past the waiting rows: the claim takes its rows out of one window.
    cursor = await store.pool.fetchrow(
        "SELECT installment_run_date, id FROM subscription_process_data WHERE next_attempt_at <= now() "
        "ORDER BY installment_run_date, id OFFSET 5000 LIMIT 1")
    later = await explain(store, "claim_payment_records", "node", LIMIT, 300.0, [], cursor["installment_run_date"],
                          cursor["id"], window, "DefaultStore")
    assert_reads_a_window(later, window, LIMIT)
    assert later[0]["Actual Rows"] == LIMIT


@pytest.mark.parametrize("analyze", [False, True], ids=["fresh", "analyzed"])
async def test_drain_and_metrics_find_the_first_due_record_a_window_at_a_time(store: Store, analyze: bool) -> None:
    await seed(store, analyze)
    window = 5000
    await assert_window_walks_the_index(store, window)
    found = await explain(store, "payment_claim_window_end", date.min, 0, window, "DefaultStore")
    assert_reads_a_window(found, window, 0)
    assert await first_due_payment(store, window) is not None
    # The waiting rows fill the first two windows: the third finds the first due record.
    ends = []
    cursor: tuple[Any, int] = (date.min, 0)
    while (row := await store.fetchrow("payment_claim_window_end", *cursor, window, "DefaultStore")) is not None \
            and not row["due"]:
        ends.append(row["id"])
        cursor = (row["claim_date"], row["id"])
    assert len(ends) == WAITING // window


async def test_a_due_check_that_runs_out_of_time_is_one_line_and_the_drain_goes_on(store: Store) -> None:
    from structlog.testing import capture_logs

    from tests.integration.engines import engine_on
    await seed(store, analyze=False)
    await store.pool.execute("UPDATE subscription_process_data SET next_attempt_at = now() + interval '1 day'")
    async with engine_on(store, "http://127.0.0.1:9") as engine:
        job = engine.jobs["recurring-payments"]
        checks = 0

        async def slow_once() -> bool:
            nonlocal checks
            checks += 1
            if checks == 1:
                raise TimeoutError  # as asyncpg's command timeout raises it
            return False

        job.has_due = slow_once  # type: ignore[method-assign]
        with capture_logs() as logs:
            assert await engine.drain(pause_seconds=0.01) == 0
    [slow] = [e for e in logs if e["event"] == "due_check_slow"]
    assert (slow["job"], slow["table"]) == ("recurring-payments", "subscription_process_data")
    assert "exc_info" not in slow and slow["estimated_rows"] is not None
    assert not [e for e in logs if e["event"] == "drain_stopped"]


async def test_record_counts_estimate_large_analyzed_tables_and_count_the_rest(store: Store) -> None:
    from engine.metrics import record_counts

    await store.pool.execute("INSERT INTO accounts (name) VALUES ('Counts')")
    await store.pool.execute(
        "INSERT INTO subscriptions (account_id, installment_count_remaining, installment_anchor_date, "
        "installment_next_run_date, currency, unit_price) SELECT 1, 1, current_date, current_date, 'USD', 10 "
        "FROM generate_series(1, 50)")
    await store.pool.execute(
        "INSERT INTO subscription_process_data (subscription_id, installment_number, subscription_job_run_status) "
        "SELECT g, 1, CASE WHEN g <= 30 THEN 'Open' ELSE 'Failed' END FROM generate_series(1, 50) g")

    def process_data(rows: list[dict[str, Any]]) -> dict[str, tuple[int, bool]]:
        return {r["status"]: (r["count"], r["estimated"]) for r in rows if r["kind"] == "subscription_process_data"}

    # Never analyzed: counted, whatever the threshold.
    assert process_data(await record_counts(store, exact_below=10)) == {"Open": (30, False), "Failed": (20, False)}
    await store.pool.execute("ANALYZE subscription_process_data")
    # Analyzed and at the threshold or past it: from the statistics (ANALYZE read every row of so small a table).
    assert process_data(await record_counts(store, exact_below=10)) == {"Open": (30, True), "Failed": (20, True)}
    # Below the threshold: counted.
    assert process_data(await record_counts(store)) == {"Open": (30, False), "Failed": (20, False)}


async def test_account_time_zones_are_the_distinct_valid_ones(store: Store) -> None:
    await store.pool.execute(
        "INSERT INTO accounts (name, time_zone) SELECT 'Zones', z FROM unnest($1::text[]) z",
        ["UTC", "Europe/Paris", "Europe/Paris", "Pacific/Kiritimati", "Mars/Olympus_Mons", "UTC"])
    zones = [row["time_zone"] for row in await store.fetch("account_time_zones")]
    assert sorted(zones) == ["Europe/Paris", "Pacific/Kiritimati", "UTC"]
