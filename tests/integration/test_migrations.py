"""Schema upgrades (engine/schema.py): numbered migrations applied once each and in order, a database of release
0.1.0 brought to the current schema with its data intact while an engine of that release keeps running, and
`migrate` refusing what it must not apply, in one line.

The mechanism is tested with migrations of the tests' own in a temporary directory (a concurrent index built
outside a transaction, a backfill): the real engine/migrations/ holds only the baseline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from engine.schema import (
    MIGRATIONS_DIR,
    MigrationError,
    load_migrations,
    migrate,
    pending_migrations,
    split_statements,
)
from engine.store import SCHEMA_PATH, Store
from tests.db import admin, connection, drop_database, fetch, fetchval, open_store, with_database
from tests.integration.factories import subscription
from tests.support import ROOT, engine_env, run_command

FIXTURES = ROOT / "tests" / "fixtures"
# schema.sql of release 0.1.0 (commit 89c0b70), the last release before numbered migrations.
SCHEMA_0_1_0 = FIXTURES / "schema_0.1.0.sql"
# The numbers the tests' own migrations take: after the real ones.
NEXT = len(load_migrations()) + 1

CONCURRENT_INDEX = """-- drjobs: no-transaction
-- Built without blocking writes; refused inside a transaction. No IF NOT EXISTS: a second run would fail.
CREATE INDEX CONCURRENTLY subscriptions_currency ON subscriptions (currency);
CREATE INDEX CONCURRENTLY subscriptions_unit_price ON subscriptions (unit_price);
"""
BACKFILL = """-- A new column filled from the rows already there, then required. No IF NOT EXISTS: a second run would fail.
ALTER TABLE subscriptions ADD COLUMN billing_currency char(3);
UPDATE subscriptions SET billing_currency = coalesce(currency, 'USD');
ALTER TABLE subscriptions ALTER COLUMN billing_currency SET NOT NULL;
"""


def migrations_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    """A migrations directory: copies of the real migrations, then `files` (name → text)."""
    directory = tmp_path / "migrations"
    directory.mkdir(exist_ok=True)
    for path in MIGRATIONS_DIR.glob("*.sql"):
        shutil.copyfile(path, directory / path.name)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def index_and_backfill(tmp_path: Path, *, slow: bool = False) -> Path:
    backfill = BACKFILL + ("SELECT pg_sleep(0.3);\n" if slow else "")
    return migrations_dir(tmp_path, {f"{NEXT:04d}_subscriptions_currency_index.sql": CONCURRENT_INDEX,
                                     f"{NEXT + 1:04d}_subscriptions_billing_currency.sql": backfill})


async def recorded(db: Store | str) -> list[tuple[int, str, str]]:
    return [(r["version"], r["name"], r["checksum"])
            for r in await fetch(db, "SELECT version, name, checksum FROM schema_migrations ORDER BY version")]


def expected_records(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, str, str]]:
    return [(m.version, m.name, m.checksum) for m in load_migrations(directory)]


@asynccontextmanager
async def empty_database(pg_server_dsn: str) -> AsyncIterator[str]:
    """A new, empty database beside the test server's; its dsn. Dropped after."""
    name = f"drjobs_migrations_{uuid.uuid4().hex[:12]}"
    await admin(pg_server_dsn, f'CREATE DATABASE "{name}"')
    try:
        yield with_database(pg_server_dsn, name)
    finally:
        await drop_database(pg_server_dsn, name)


def log_events(stdout: str) -> list[dict[str, Any]]:
    events = []
    for line in stdout.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return events


# --- the files ---------------------------------------------------------------------------------------------------


def test_the_real_migrations_are_numbered_from_0001_and_start_with_the_baseline() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].file == "0001_baseline.sql" and split_statements(migrations[0].text) == []


def test_a_migration_marked_no_transaction_on_its_first_line_runs_outside_one(tmp_path: Path) -> None:
    directory = index_and_backfill(tmp_path)
    by_version = {m.version: m for m in load_migrations(directory)}
    assert by_version[NEXT].transactional is False and by_version[NEXT + 1].transactional is True


@pytest.mark.parametrize(("files", "message"), [
    # Numbered after the real migrations, whatever their count (NEXT is the first free number).
    ({f"{NEXT:04d}-bad-name.sql": "SELECT 1;"}, "is not named NNNN_short_name.sql"),
    ({f"{NEXT + 1:04d}_gap.sql": "SELECT 1;"}, f"{NEXT + 1:04d}_gap.sql comes where {NEXT:04d} should be"),
    ({f"{NEXT:04d}_one.sql": "SELECT 1;", f"{NEXT:04d}_two.sql": "SELECT 2;"},
     f"two migrations in .* have the number {NEXT:04d}"),
])
def test_badly_numbered_migration_files_are_refused(tmp_path: Path, files: dict[str, str], message: str) -> None:
    with pytest.raises(MigrationError, match=message):
        load_migrations(migrations_dir(tmp_path, files))


def test_statements_are_split_at_semicolons_outside_quotes_and_comments() -> None:
    script = r"""-- drjobs: no-transaction
-- a comment; with a semicolon
CREATE INDEX CONCURRENTLY a ON t (x);  /* block; /* nested; */ comment */
UPDATE t SET note = 'it''s; fine', other = E'a\'; b' WHERE "odd;name" = 1;
DO $body$ BEGIN PERFORM 1; END $body$;
SELECT $$;$$, $1, x$y;
-- trailing comment;
"""
    assert split_statements(script) == [
        "-- drjobs: no-transaction\n-- a comment; with a semicolon\nCREATE INDEX CONCURRENTLY a ON t (x)",
        "/* block; /* nested; */ comment */\nUPDATE t SET note = 'it''s; fine', other = E'a\\'; b' "
        "WHERE \"odd;name\" = 1",
        "DO $body$ BEGIN PERFORM 1; END $body$",
        "SELECT $$;$$, $1, x$y",
    ]


def test_pending_migrations_refuse_a_changed_an_unknown_or_a_skipped_one(tmp_path: Path) -> None:
    migrations = load_migrations(index_and_backfill(tmp_path))
    rows = [{"version": m.version, "name": m.name, "checksum": m.checksum} for m in migrations]
    assert pending_migrations(migrations, rows[:NEXT - 1]) == migrations[NEXT - 1:]
    assert pending_migrations(migrations, rows) == []
    with pytest.raises(MigrationError, match="changed after it was applied"):
        pending_migrations(migrations, [*rows[:-1], rows[-1] | {"checksum": "0" * 64}])
    with pytest.raises(MigrationError, match="which this release does not have"):
        pending_migrations(migrations[:-1], rows)
    with pytest.raises(MigrationError, match="is not applied to this database but the later"):
        pending_migrations(migrations, [*rows[:NEXT - 1], rows[-1]])


# --- applying them -----------------------------------------------------------------------------------------------


async def test_a_fresh_database_gets_schema_sql_and_every_migration_recorded(store: Store) -> None:
    # `store` is a clone of a database that `migrate` made from nothing.
    assert await recorded(store) == expected_records()
    digest = hashlib.sha256(SCHEMA_PATH.read_text().encode()).hexdigest()
    assert await fetchval(store, "SELECT array_agg(version) FROM schema_versions") == [digest]


async def test_migrations_are_applied_once_in_order_and_recorded(store: Store, tmp_path: Path) -> None:
    subs = [await subscription(store, currency=currency) for currency in ("USD", "EUR", None)]
    directory = index_and_backfill(tmp_path)

    assert await store.migrate(migrations_dir=directory) is True
    assert await recorded(store) == expected_records(directory)
    valid = await fetch(store, "SELECT indexrelid::regclass::text AS name, indisvalid FROM pg_index "
                               "WHERE indexrelid::regclass::text LIKE 'subscriptions_%' AND indisvalid")
    assert {"subscriptions_currency", "subscriptions_unit_price"} <= {r["name"] for r in valid}
    rows = await fetch(store, "SELECT id, billing_currency FROM subscriptions ORDER BY id")
    assert [(r["id"], r["billing_currency"]) for r in rows] == list(zip(subs, ["USD", "EUR", "USD"], strict=True))

    # Again: nothing left to apply (a second run of either file would fail: they have no IF NOT EXISTS).
    applied_at = await fetch(store, "SELECT version, applied_at FROM schema_migrations ORDER BY version")
    assert await store.migrate(migrations_dir=directory) is False
    assert await fetch(store, "SELECT version, applied_at FROM schema_migrations ORDER BY version") == applied_at


async def test_a_changed_applied_migration_is_refused_in_one_line_and_nothing_is_applied(store: Store,
                                                                                      tmp_path: Path) -> None:
    directory = index_and_backfill(tmp_path)
    await store.migrate(migrations_dir=directory)
    changed = directory / f"{NEXT:04d}_subscriptions_currency_index.sql"
    changed.write_text(CONCURRENT_INDEX.replace("(currency)", "(currency, id)"))
    later = directory / f"{NEXT + 2:04d}_later.sql"
    later.write_text("CREATE TABLE later_table (id int);\n")
    await store.pool.execute("DELETE FROM schema_versions")  # schema.sql would be applied too

    with pytest.raises(MigrationError) as refused:
        await store.migrate(migrations_dir=directory)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"migration {changed.name} was changed after it was applied to this database")
    assert "Restore the file as it was and put the change in a new migration" in message
    assert await fetchval(store, "SELECT to_regclass('later_table') IS NULL")
    assert await fetchval(store, "SELECT count(*) FROM schema_versions") == 0
    assert [v for v, _, _ in await recorded(store)] == list(range(1, NEXT + 2))


async def test_a_failing_migration_keeps_nothing_and_runs_once_fixed(store: Store, tmp_path: Path) -> None:
    name = f"{NEXT:04d}_broken.sql"
    directory = migrations_dir(tmp_path, {name: "ALTER TABLE subscriptions ADD COLUMN half_done int;\n"
                                                "SELECT 1 / 0;\n"})
    with pytest.raises(MigrationError, match=f"migration {name} failed: DivisionByZeroError: division by zero; "
                                             "nothing of it was kept"):
        await store.migrate(migrations_dir=directory)
    assert await fetchval(store, "SELECT count(*) FROM information_schema.columns "
                                 "WHERE table_name = 'subscriptions' AND column_name = 'half_done'") == 0
    assert [v for v, _, _ in await recorded(store)] == list(range(1, NEXT))

    (directory / name).write_text("ALTER TABLE subscriptions ADD COLUMN half_done int;\n")
    assert await store.migrate(migrations_dir=directory) is True
    assert [v for v, _, _ in await recorded(store)] == list(range(1, NEXT + 1))


async def test_a_concurrent_index_in_a_transaction_is_refused_with_the_mark_to_add(store: Store,
                                                                                tmp_path: Path) -> None:
    directory = migrations_dir(tmp_path, {f"{NEXT:04d}_unmarked.sql": CONCURRENT_INDEX.split("\n", 1)[1]})
    with pytest.raises(MigrationError, match="make `-- drjobs: no-transaction` its first line"):
        await store.migrate(migrations_dir=directory)


async def test_an_index_a_failed_concurrent_build_left_invalid_is_not_recorded(store: Store, tmp_path: Path) -> None:
    for _ in range(2):
        await subscription(store, currency="USD")
    # A unique concurrent build over duplicates fails, and leaves its index behind, invalid.
    with pytest.raises(asyncpg.UniqueViolationError):
        await store.pool.execute("CREATE UNIQUE INDEX CONCURRENTLY subscriptions_currency ON subscriptions (currency)")
    name = f"{NEXT:04d}_subscriptions_currency_index.sql"
    build = "CREATE INDEX CONCURRENTLY IF NOT EXISTS subscriptions_currency ON subscriptions (currency);\n"
    directory = migrations_dir(tmp_path, {name: f"-- drjobs: no-transaction\n{build}"})
    with pytest.raises(MigrationError, match=f"migration {name} left invalid indexes subscriptions_currency "):
        await store.migrate(migrations_dir=directory)
    assert [v for v, _, _ in await recorded(store)] == list(range(1, NEXT))

    # Not recorded, so it may still change: as the message says, it drops the leftover first.
    (directory / name).write_text("-- drjobs: no-transaction\n"
                                  f"DROP INDEX CONCURRENTLY IF EXISTS subscriptions_currency;\n{build}")
    assert await store.migrate(migrations_dir=directory) is True
    assert await fetchval(store, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'subscriptions_currency'::regclass")
    assert [v for v, _, _ in await recorded(store)] == list(range(1, NEXT + 1))


async def test_through_a_transaction_pooler_a_no_transaction_migration_is_refused(store: Store,
                                                                               tmp_path: Path) -> None:
    directory = index_and_backfill(tmp_path)
    with pytest.raises(MigrationError, match=re.escape("needs a session of its own: run `python run.py migrate` "
                                                       "once on a direct connection")):
        await migrate(store.pool, SCHEMA_PATH, directory, sessions=False)
    assert await fetchval(store, "SELECT to_regclass('subscriptions_currency') IS NULL")


async def test_concurrent_migrations_apply_each_step_once(database_url: str, store: Store, tmp_path: Path) -> None:
    for currency in ("USD", "EUR"):
        await subscription(store, currency=currency)
    directory = index_and_backfill(tmp_path, slow=True)
    stores = [await Store.connect(database_url, f"migrator-{i}", min_size=1, max_size=1) for i in range(3)]
    try:
        # Each file fails when run twice, so any step applied twice raises here.
        results = await asyncio.gather(*(s.migrate(migrations_dir=directory) for s in stores))
    finally:
        for s in stores:
            await s.close()
    assert any(results)
    assert await recorded(store) == expected_records(directory)
    assert await fetchval(store, "SELECT count(*) FROM subscriptions WHERE billing_currency IS NOT NULL") == 2


async def test_processes_migrating_an_empty_database_at_once_apply_it_once(pg_server_dsn: str) -> None:
    async with empty_database(pg_server_dsn) as dsn:
        outcomes = await asyncio.gather(*(run_command(["migrate"], engine_env(dsn)) for _ in range(2)))
        assert [code for code, _, _ in outcomes] == [0, 0], outcomes
        applied = [e for _, out, _ in outcomes for e in log_events(out) if e.get("event") == "schema_applied"]
        assert len(applied) == 1 and applied[0]["fresh"] is True
        assert await recorded(dsn) == expected_records()
        assert await fetchval(dsn, "SELECT count(*) FROM schema_versions") == 1


async def test_a_database_a_newer_release_migrated_is_refused_in_one_line(database_url: str, store: Store) -> None:
    await store.pool.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (9999, 'from_later', '')")
    await store.pool.execute("DELETE FROM schema_versions")  # schema.sql would be applied otherwise
    code, out, err = await run_command(["migrate"], engine_env(database_url))
    assert code == 2, (out, err)
    [line] = err.strip().splitlines()
    assert "cannot migrate" in line and "this database has migration 9999_from_later, which this release does " \
        "not have" in line and "a newer release migrated it" in line
    assert await fetchval(store, "SELECT count(*) FROM schema_versions") == 0


# --- from release 0.1.0 ------------------------------------------------------------------------------------------

# Statements of a release-0.1.0 engine (its engine/sql/engine.sql), as it goes on running while the database is
# upgraded under it. Its claim is the shape of every claim: SKIP LOCKED, a lease and a fencing token.
OLD_HEARTBEAT = """
INSERT INTO engine_nodes (name, started_at, heartbeat_at, pid, host, version)
VALUES ($1, now(), now(), $2, $3, $4)
ON CONFLICT (name) DO UPDATE
   SET heartbeat_at = now(), stopped_at = NULL, pid = EXCLUDED.pid, host = EXCLUDED.host,
       version = EXCLUDED.version,
       started_at = CASE WHEN engine_nodes.stopped_at IS NOT NULL OR engine_nodes.pid IS DISTINCT FROM EXCLUDED.pid
                         THEN now() ELSE engine_nodes.started_at END"""
OLD_STATUS_NODES = """
SELECT name, started_at, heartbeat_at, stopped_at, pid, host, version,
       (stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => $1)) AS live
  FROM engine_nodes WHERE heartbeat_at > now() - interval '1 day' ORDER BY heartbeat_at DESC"""
OLD_CLAIM = """
UPDATE subscription_process_data w
   SET locked_by = $1, locked_until = now() + interval '5 minutes', lease_token = nextval('drjobs_lease_tokens')
 WHERE w.id = (SELECT id FROM subscription_process_data
                WHERE subscription_job_run_status = 'Open' AND NOT is_recurring_payment_processed
                  AND (locked_until IS NULL OR locked_until < now())
                ORDER BY coalesce(installment_run_date, '-infinity'::date), id
                LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING w.id, w.lease_token"""
OLD_RELEASE = """
UPDATE subscription_process_data t
   SET locked_by = NULL, locked_until = NULL, lease_token = NULL
  FROM unnest($1::bigint[], $2::bigint[]) AS u(id, token)
 WHERE t.id = u.id AND t.lease_token = u.token"""
OLD_START_RUN = "INSERT INTO job_runs (job, fire_time, trigger, node) VALUES ($1, now(), 'manual', $2) RETURNING id"

# Rows of every kind, as outside systems and a 0.1.0 engine wrote them (ids start at 1 in a new database).
OLD_ROWS = """
INSERT INTO accounts (name, dr_customer_id, email, bill_to, time_zone)
VALUES ('Acme', 'cus_acme', 'billing@acme.example', '{"name": "Acme"}', 'Europe/Berlin');
INSERT INTO products (sku, name, dr_sku_id, tax_code) VALUES ('SKU-1', 'Widget', 'sku_widget', '4512.1');
INSERT INTO stored_payments (account_id, dr_source_id) VALUES (1, 'src_card_ok');
INSERT INTO orders (account_id, dr_order_id, currency, subtotal, total_tax, total_amount, dr_order_state, ship_to)
VALUES (1, 'ord_parent', 'USD', 20, 1.6, 21.6, 'accepted', '{"address": {"country": "US"}}');
INSERT INTO order_items (order_id, product_id, quantity, unit_price, dr_order_item_id, dr_billing_agreement_id)
VALUES (1, 1, 2, 10, 'item_parent', 'ba_1');
INSERT INTO subscriptions (account_id, product_id, stored_payment_id, parent_order_id, parent_order_item_id, quantity,
                           unit_price, currency, installment_anchor_date, installment_count,
                           installment_count_remaining, installment_next_run_date, dr_billing_agreement_id)
VALUES (1, 1, 1, 1, 1, 2, 10, 'USD', '2026-01-31', 12, 9, '2026-04-30', 'ba_1');
INSERT INTO orders (account_id, parent_order_id, dr_order_id, dr_checkout_id, dr_order_source, currency, total_amount,
                    dr_order_state)
VALUES (1, 1, 'ord_installment_1', 'chk_1', 'Subscription—Installment', 'USD', 21.6, 'complete');
INSERT INTO subscription_process_data (subscription_id, installment_number, parent_order_id, stored_payment_id,
                                       product_id, account_id, installment_run_date, is_recurring_payment_processed,
                                       subscription_job_run_status, dr_checkout_id, dr_order_id, order_id,
                                       dr_failed_order_ids)
VALUES (1, 1, 1, 1, 1, 1, '2026-01-31', true, 'Successful', 'chk_1', 'ord_installment_1', 2, '{ord_failed_0}');
INSERT INTO subscription_process_data (subscription_id, installment_number, installment_run_date,
                                       subscription_job_run_status, subscription_retry_count, last_error_code,
                                       last_error_message)
VALUES (1, 2, '2026-02-28', 'Failed', 3, 'hard_decline', 'card declined');
INSERT INTO subscription_process_data (subscription_id, installment_number, installment_run_date)
VALUES (1, 3, '2026-03-31');
INSERT INTO payment_attempts (process_data_id, subscription_id, outcome, dr_checkout_id, dr_order_id, amount, currency,
                              node)
VALUES (1, 1, 'charged', 'chk_1', 'ord_installment_1', 21.6, 'USD', 'old-node'),
       (2, 1, 'hard_decline', 'chk_2', NULL, 21.6, 'USD', 'old-node');
INSERT INTO fulfillments (order_id, dr_order_id, dr_order_state, ofi_received, efn_status)
VALUES (1, 'ord_parent', 'accepted', true, 'Open');
INSERT INTO line_item_fulfillments (fulfillment_id, order_item_id, dr_order_item_id, fulfill_quantity,
                                    tracking_company, tracking_number)
VALUES (1, 1, 'item_parent', 2, 'UPS', '1Z999');
INSERT INTO job_runs (job, fire_time, node, status, finished_at, claimed, succeeded)
VALUES ('recurring-payments', '2026-03-31 00:00+00', 'old-node', 'succeeded', now(), 1, 1);
INSERT INTO job_controls (job, paused, changed_by) VALUES ('log-cleanup', true, 'ops');
INSERT INTO application_logs (logging_level, module_name, message, record_id, node, request)
VALUES ('ERROR', 'recurring-payments', 'card declined', '2', 'old-node', '{"amount": 21.6}');
INSERT INTO dr_events (event_id, type, dr_order_id, payload, source)
VALUES ('evt_1', 'order.accepted', 'ord_parent', '{"id": "evt_1"}', 'webhook');
INSERT INTO dr_event_cursors (storefront, seen_until, last_event_id) VALUES ('DefaultStore', '2026-03-01 00:00+00', 'evt_1');
INSERT INTO dr_rate_pauses (key_id, paused_until) VALUES ('0123456789abcdef', '2026-03-01 00:00+00');
"""

# What a database's schema is made of, for comparing an upgraded one with a fresh one. Columns are compared as a
# set: an upgraded table may have them in another order.
SCHEMA_PARTS = {
    "columns": """SELECT table_name, column_name, data_type, udt_name, character_maximum_length, numeric_precision,
                         numeric_scale, is_nullable, column_default, is_identity, identity_generation
                    FROM information_schema.columns WHERE table_schema = 'public'""",
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'",
    "constraints": """SELECT conrelid::regclass::text AS table_name, conname, contype,
                             pg_get_constraintdef(oid) AS definition
                        FROM pg_constraint WHERE connamespace = 'public'::regnamespace""",
    "triggers": """SELECT tgrelid::regclass::text AS table_name, tgname, pg_get_triggerdef(oid) AS definition
                     FROM pg_trigger WHERE NOT tgisinternal""",
    "functions": """SELECT proname, pg_get_function_identity_arguments(oid) AS arguments,
                           pg_get_functiondef(oid) AS definition
                      FROM pg_proc WHERE pronamespace = 'public'::regnamespace""",
    "sequences": "SELECT sequence_name, data_type FROM information_schema.sequences WHERE sequence_schema = 'public'",
}


async def schema_of(dsn: str) -> dict[str, set[tuple[Any, ...]]]:
    async with connection(dsn) as conn:
        return {part: {tuple(r.values()) for r in await conn.fetch(query)} for part, query in SCHEMA_PARTS.items()}


TABLES = ["accounts", "products", "stored_payments", "orders", "order_items", "subscriptions",
          "subscription_process_data", "payment_attempts", "fulfillments", "line_item_fulfillments", "job_runs",
          "job_controls", "engine_nodes", "application_logs", "dr_events", "dr_event_cursors", "dr_rate_pauses"]
# Moved by the old engine's own heartbeat and the updated_at triggers, not by the upgrade.
MOVING = {"updated_at", "heartbeat_at"}


async def rows_of(dsn: str) -> dict[str, list[dict[str, Any]]]:
    async with connection(dsn) as conn:
        return {table: [json.loads(r["row"]) for r in await conn.fetch(
            f"SELECT to_jsonb(t)::text AS row FROM {table} t ORDER BY id")] for table in TABLES}


async def database_at_0_1_0(dsn: str) -> None:
    """The database as release 0.1.0's `migrate` left it (schema.sql applied, its sha256 recorded), with rows."""
    schema = SCHEMA_0_1_0.read_text()
    async with connection(dsn) as conn, conn.transaction():
        await conn.execute("SET LOCAL client_min_messages = warning")
        await conn.execute(schema)
        await conn.execute("INSERT INTO schema_versions (version) VALUES ($1)",
                           hashlib.sha256(schema.encode()).hexdigest())
        await conn.execute(OLD_ROWS)


async def wait_for_migrate_to_wait_on_a_lock(dsn: str, upgrade: asyncio.Task[Any], timeout: float = 60) -> None:
    async def waiting() -> None:
        while not await fetchval(dsn, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                      "AND application_name LIKE 'drjobs:%' AND wait_event_type = 'Lock'"):
            if upgrade.done():
                raise AssertionError(f"migrate did not wait for the old engine: {upgrade.result()}")
            await asyncio.sleep(0.1)
    await asyncio.wait_for(waiting(), timeout)


async def test_a_release_0_1_0_database_is_upgraded_under_a_running_old_engine(pg_server_dsn: str,
                                                                             database_url: str) -> None:
    """`python run.py migrate` on a database of release 0.1.0 (no migrations table) while an engine of that release
    has a claim open: migrate waits for its transaction instead of breaking it, the old engine's statements work
    before, during and after, every row is as it was, and the schema is a fresh database's."""
    assert not SCHEMA_0_1_0.read_text().count("schema_migrations")
    async with empty_database(pg_server_dsn) as dsn:
        await database_at_0_1_0(dsn)
        async with connection(dsn) as old:
            await old.execute(OLD_HEARTBEAT, "old-node", 4242, "old-host", "0.1.0")
            before = await rows_of(dsn)

            # The old engine is mid-run: a job run started, a record claimed, its transaction still open.
            in_flight = old.transaction()
            await in_flight.start()
            await old.fetchval(OLD_START_RUN, "recurring-payments", "old-node")
            claimed = await old.fetchrow(OLD_CLAIM, "old-node")
            assert claimed["id"] == 3
            upgrade = asyncio.create_task(run_command(["migrate"], engine_env(dsn), timeout=120))
            await wait_for_migrate_to_wait_on_a_lock(dsn, upgrade)
            assert not upgrade.done()
            await old.execute(OLD_HEARTBEAT, "old-node", 4242, "old-host", "0.1.0")  # still works meanwhile
            await in_flight.commit()
            code, out, err = await upgrade
            assert code == 0, (out, err)
            events = [e["event"] for e in log_events(out)]
            assert events.count("migration_applied") == len(load_migrations()) and "schema_applied" in events

            # The old engine goes on: heartbeats, status, gives the record back, claims it again.
            await old.execute(OLD_HEARTBEAT, "old-node", 4242, "old-host", "0.1.0")
            assert [(r["name"], r["live"]) for r in await old.fetch(OLD_STATUS_NODES, 30.0)] == [("old-node", True)]
            assert await old.execute(OLD_RELEASE, [claimed["id"]], [claimed["lease_token"]]) == "UPDATE 1"
            again = await old.fetchrow(OLD_CLAIM, "old-node")
            assert again["id"] == 3 and again["lease_token"] > claimed["lease_token"]
            await old.execute(OLD_RELEASE, [again["id"]], [again["lease_token"]])

        # Every row as it was (new columns aside), and the old engine's run.
        after = await rows_of(dsn)
        for table, rows in before.items():
            assert [{k: now[k] for k in then if k not in MOVING} for now, then in zip(after[table][:len(rows)], rows, strict=True)] == \
                [{k: v for k, v in then.items() if k not in MOVING} for then in rows], table
        assert len(after["job_runs"]) == len(before["job_runs"]) + 1
        assert all(len(after[t]) == len(before[t]) for t in TABLES if t != "job_runs")

        # The schema is a fresh database's, with the same migrations recorded.
        assert await schema_of(dsn) == await schema_of(database_url)
        assert await recorded(dsn) == await recorded(database_url) == expected_records()
        # An engine of release 0.1.0 starting now finds its own schema.sql recorded, so it applies nothing.
        old_digest = hashlib.sha256(SCHEMA_0_1_0.read_text().encode()).hexdigest()
        assert await fetchval(dsn, "SELECT count(*) FROM schema_versions WHERE version = $1", old_digest) == 1

        # `migrate` again (and again): nothing to do.
        for _ in range(2):
            code, out, err = await run_command(["migrate"], engine_env(dsn))
            assert code == 0, (out, err)
            assert not {"schema_applied", "migration_applied"} & {e.get("event") for e in log_events(out)}
        assert await schema_of(dsn) == await schema_of(database_url)


async def test_a_store_on_the_upgraded_database_passes_the_store_checks(pg_server_dsn: str) -> None:
    """Every named query of this release prepares against a database upgraded from 0.1.0, as against a fresh one."""
    from engine.store import QUERIES, sql

    async with empty_database(pg_server_dsn) as dsn:
        await database_at_0_1_0(dsn)
        async with open_store(dsn, "upgrader") as store:
            assert await store.migrate() is True
            async with store.pool.acquire() as conn:
                for name in QUERIES:
                    table = "subscription_process_data" if "{table}" in QUERIES[name] else None
                    try:
                        await conn.prepare(sql(name, table))
                    except asyncpg.PostgresError as exc:  # pragma: no cover - the message says which
                        raise AssertionError(f"{name}: {exc}") from exc
