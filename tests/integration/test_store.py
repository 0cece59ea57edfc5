"""The store: migrations, named queries, and the claim primitive (SKIP LOCKED, leases, heartbeat, release)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap

import asyncpg
import pytest

from actors.recurring_payments import CLAIM_START, CLAIM_WINDOW
from engine.store import QUERIES, Leases, Store, load_queries, sql
from tests.db import open_store
from tests.integration.factories import process_records, subscription
from tests.support import ROOT

# The claim window and cursor arguments of a whole-backlog claim (a run's first).
PAYMENT_WINDOW = (*CLAIM_START, CLAIM_WINDOW, "DefaultStore")


async def test_migrate_runs_again_and_concurrently(store: Store) -> None:
    await asyncio.gather(store.migrate(), store.migrate(), store.migrate())
    tables = {r["tablename"] for r in await store.pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
    assert {"accounts", "products", "stored_payments", "orders", "order_items", "subscriptions", "carts",
            "cart_items", "subscription_process_data", "fulfillments", "line_item_fulfillments",
            "application_logs", "job_runs", "engine_nodes"} <= tables


async def test_migrate_skips_an_applied_schema_without_waiting_on_busy_tables(store: Store) -> None:
    sub = await subscription(store)
    async with store.pool.acquire() as conn, conn.transaction():
        # A running engine's open write holds a lock that re-creating triggers would queue behind.
        await conn.execute("UPDATE subscriptions SET quantity = 2 WHERE id = $1", sub)
        assert await asyncio.wait_for(store.migrate(), 5) is False


async def test_migrate_applies_a_changed_schema_once(store: Store) -> None:
    await store.pool.execute("DELETE FROM schema_versions")
    assert await store.migrate() is True
    assert await store.migrate() is False


async def test_every_named_query_is_valid_sql(store: Store) -> None:
    async with store.pool.acquire() as conn:
        for name in QUERIES:
            tables = ["subscription_process_data"] if "{table}" in QUERIES[name] else [None]
            for table in tables:
                await conn.prepare(sql(name, table))  # parses and plans against the real schema


def test_queries_file_rejects_duplicate_names(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "q.sql"
    path.write_text("-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n")
    with pytest.raises(ValueError, match="defined twice"):
        load_queries([path])


def test_table_placeholder_only_takes_leased_tables() -> None:
    with pytest.raises(ValueError, match="not a leased table"):
        sql("extend_leases", "accounts; DROP TABLE x")


async def test_schema_refuses_a_second_row_for_one_installment(store: Store) -> None:
    sub = await subscription(store)
    await process_records(store, sub, 1)
    with pytest.raises(asyncpg.UniqueViolationError):
        await process_records(store, sub, 1)


async def test_schema_refuses_unknown_statuses_and_negative_quantities(store: Store) -> None:
    sub = await subscription(store)
    with pytest.raises(asyncpg.CheckViolationError):
        await store.pool.execute("UPDATE subscriptions SET status = 'Paused' WHERE id = $1", sub)
    with pytest.raises(asyncpg.CheckViolationError):
        await store.pool.execute("UPDATE subscriptions SET quantity = -1 WHERE id = $1", sub)


async def test_concurrent_claims_never_take_the_same_row(database_url: str, store: Store) -> None:
    subs = [await subscription(store) for _ in range(40)]
    for sub in subs:
        await process_records(store, sub, 1)
    stores = [await Store.connect(database_url, f"node-{i}", min_size=1, max_size=2) for i in range(4)]
    try:
        leases = [Leases(s, "subscription_process_data", 60) for s in stores]
        results = await asyncio.gather(*(lease.claim("claim_payment_records", 15, *PAYMENT_WINDOW) for lease in leases))
    finally:
        for s in stores:
            await s.close()
    ids = [row["id"] for rows in results for row in rows]
    assert len(ids) == 40 and len(set(ids)) == 40
    owners = await store.pool.fetch("SELECT locked_by, count(*) FROM subscription_process_data GROUP BY 1")
    assert sum(r["count"] for r in owners) == 40 and all(r["locked_by"] for r in owners)


async def test_only_the_oldest_open_installment_of_a_subscription_is_claimable(store: Store) -> None:
    sub = await subscription(store)
    first, second, _ = await process_records(store, sub, 3)
    leases = Leases(store, "subscription_process_data", 60)
    assert [r["id"] for r in await leases.claim("claim_payment_records", 10, *PAYMENT_WINDOW)] == [first]
    assert await leases.claim("claim_payment_records", 10, *PAYMENT_WINDOW) == []  # the first is in flight: nothing else
    await store.pool.execute(
        "UPDATE subscription_process_data SET subscription_job_run_status = 'Failed', locked_by = NULL "
        "WHERE id = $1", first)
    leases.done([first])
    assert [r["id"] for r in await leases.claim("claim_payment_records", 10, *PAYMENT_WINDOW)] == [second]


async def test_heartbeat_extends_leases_and_release_gives_rows_back(store: Store) -> None:
    sub = await subscription(store)
    [row_id] = await process_records(store, sub, 1)
    leases = Leases(store, "subscription_process_data", 30)
    await leases.claim("claim_payment_records", 1, *PAYMENT_WINDOW)
    before = await store.pool.fetchval("SELECT locked_until FROM subscription_process_data WHERE id = $1", row_id)
    leases.lease_seconds = 600
    await leases.extend()
    after = await store.pool.fetchval("SELECT locked_until FROM subscription_process_data WHERE id = $1", row_id)
    assert (after - before).total_seconds() > 500
    await leases.release()
    row = await store.pool.fetchrow("SELECT locked_by, locked_until FROM subscription_process_data WHERE id = $1",
                                    row_id)
    assert row["locked_by"] is None and row["locked_until"] is None
    assert leases.in_flight == {}


async def test_heartbeat_reports_a_lease_taken_over_by_another_node(database_url: str, store: Store) -> None:
    sub = await subscription(store)
    [row_id] = await process_records(store, sub, 1)
    mine = Leases(store, "subscription_process_data", 30)
    await mine.claim("claim_payment_records", 1, *PAYMENT_WINDOW)
    # This node stalled past its lease and another node claimed the row.
    await store.pool.execute("UPDATE subscription_process_data SET locked_until = now() - interval '1 second'")
    async with open_store(database_url, "other-node", max_size=1) as other_store:
        taken = await Leases(other_store, "subscription_process_data", 30).claim("claim_payment_records", 1, *PAYMENT_WINDOW)
    assert [r["id"] for r in taken] == [row_id]
    await mine.extend()
    assert mine.lost == {row_id}
    with pytest.raises(Exception, match="no longer leased"):
        mine.check(row_id)


KILLED_CLAIMER = textwrap.dedent("""
    import asyncio, sys
    from actors.recurring_payments import CLAIM_START, CLAIM_WINDOW
    from engine.store import Leases, Store
    PAYMENT_WINDOW = (*CLAIM_START, CLAIM_WINDOW, "DefaultStore")

    async def main():
        store = await Store.connect(sys.argv[1], "doomed-node", min_size=1, max_size=1)
        leases = Leases(store, "subscription_process_data", int(sys.argv[2]))
        rows = await leases.claim("claim_payment_records", 100, *PAYMENT_WINDOW)
        print(len(rows), flush=True)
        await asyncio.sleep(3600)  # in flight until killed

    asyncio.run(main())
""")


async def test_rows_of_a_killed_process_are_claimable_once_the_lease_expires(database_url: str,
                                                                           store: Store) -> None:
    for _ in range(5):
        await process_records(store, await subscription(store), 1)
    lease_seconds = 3
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_CLAIMER, database_url, str(lease_seconds),
        cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout
    assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"5"
    proc.send_signal(signal.SIGKILL)
    await proc.wait()

    survivor = Leases(store, "subscription_process_data", 60)
    assert await survivor.claim("claim_payment_records", 100, *PAYMENT_WINDOW) == []  # still leased to the dead process
    while await store.pool.fetchval("SELECT count(*) FROM subscription_process_data WHERE locked_until >= now()"):
        await asyncio.sleep(0.2)
    claimed = await survivor.claim("claim_payment_records", 100, *PAYMENT_WINDOW)
    assert len(claimed) == 5
    assert {r["locked_by"] for r in claimed} == {"test-node"}


def test_fragments_are_filled_into_statements_with_their_parameters(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "q.sql"
    path.write_text("-- fragment: due\nx.zone = ANY(:zones) AND x.at <= now()\n"
                    "-- name: count\nSELECT count(*) FROM x WHERE {{due zones=$2}} AND x.id > $1;\n")
    assert load_queries([path]) == {"count": "SELECT count(*) FROM x WHERE (x.zone = ANY($2) AND x.at <= now()) "
                                             "AND x.id > $1"}


def test_an_undefined_fragment_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "q.sql"
    path.write_text("-- name: count\nSELECT count(*) FROM x WHERE {{nowhere}};\n")
    with pytest.raises(ValueError, match="fragment 'nowhere' is not defined"):
        load_queries([path])
