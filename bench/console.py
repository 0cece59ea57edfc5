"""Benchmark (not a test): every page of the web console against a store of 1,000,000 installment records.

Seeds a fresh database (`drjobs_console_bench` beside BENCH_DATABASE_URL's, or on the embedded PostgreSQL under
.data/bench) with N subscriptions as bench/pipeline.py's SEED makes them, ten installment records each (N=100,000:
1,000,000 records: seven Successful, the eighth Failed for half of the subscriptions, Pending or waiting a decline
retry for the others, then Open ones, some after an outage), a fulfillment with two line items for every parent
order (one in twenty Failed), application_logs rows for the failed records and as many again without a record,
job runs, engine processes, Digital River events and a paused job; then VACUUM ANALYZE, as autovacuum would have
done on a live store. Then it starts the engine's HTTP listener with the console on that database in this process
and times each page over HTTP: the first request (cold) and the median and slowest of the next ones.

    BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/console.py
    .venv/bin/python bench/console.py --subscriptions 10000 --repeat 5
    .venv/bin/python bench/console.py --reuse            # time again without seeding again

The target is every page under 300 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import database_server, fresh_database, with_database  # noqa: E402
from bench.pipeline import SEED as SUBSCRIPTIONS  # noqa: E402

DATABASE = "drjobs_console_bench"
CHUNK = 20_000  # subscriptions per seeding statement (200,000 installment records)
TARGET_MS = 300.0
CODES = ("insufficient_funds", "fraud", "invalid_sku", "checkout_unknown", "subscription_cancelled",
         "retries_exhausted")

# Ten installment records for each subscription of ids ($1, $2]: 1-7 Successful (each with its Digital River order),
# the 8th Failed (half of the subscriptions, six codes), Pending (a tenth) or Open after a soft decline, the 9th Open
# after an outage for a tenth of them, the rest Open and due. Failures are spread over the last ~70 days.
RECORDS = """
INSERT INTO subscription_process_data (
    subscription_id, installment_number, account_id, product_id, stored_payment_id, parent_order_id,
    installment_run_date, is_recurring_payment_processed, subscription_job_run_status, subscription_retry_count,
    next_attempt_at, dr_checkout_id, dr_order_id, last_error_code, last_error_message, outage_count,
    last_attempt_at, created_at, updated_at)
SELECT s.id, n, s.account_id, s.product_id, s.stored_payment_id, s.parent_order_id,
       current_date - (10 - n) * 30,
       n <= 7,
       CASE WHEN n <= 7 THEN 'Successful'
            WHEN n = 8 AND s.id % 10 < 5 THEN 'Failed'
            WHEN n = 8 AND s.id % 10 = 5 THEN 'Pending'
            ELSE 'Open' END,
       CASE WHEN n = 8 AND s.id % 10 >= 5 THEN 1 ELSE 0 END,
       CASE WHEN n = 8 AND s.id % 10 > 5 THEN now() + interval '20 hours'
            WHEN n = 9 AND s.id % 10 = 7 THEN now() + interval '10 minutes'
            ELSE now() - interval '1 hour' END,
       CASE WHEN n <= 8 THEN 'chk_b_' || s.id || '_' || n END,
       CASE WHEN n <= 7 OR (n = 8 AND s.id % 10 = 5) THEN 'ord_b_' || s.id || '_' || n END,
       CASE WHEN n = 8 AND s.id % 10 < 5 THEN ($3::text[])[1 + (s.id / 10) % 6]
            WHEN n = 8 AND s.id % 10 > 5 THEN 'insufficient_funds' END,
       CASE WHEN n = 8 AND s.id % 10 <> 5 THEN 'Digital River declined the order: ' || ($3::text[])[1 + (s.id / 10) % 6]
            END,
       CASE WHEN n = 9 AND s.id % 10 = 7 THEN 2 ELSE 0 END,
       CASE WHEN n <= 8 THEN now() - (s.id % 100000) * interval '1 minute' END,
       now() - (s.id % 100000) * interval '1 minute' - interval '1 day',
       now() - (s.id % 100000) * interval '1 minute'
  FROM subscriptions s CROSS JOIN generate_series(1, 10) n
 WHERE s.id > $1 AND s.id <= $2
"""

# A fulfillment (accepted) for every parent order and two line items, one order in twenty Failed with its lines.
FULFILLMENTS = """
WITH ful AS (
    INSERT INTO fulfillments (order_id, dr_order_id, dr_order_state, ofi_received, efn_status, retry_count, message,
                              updated_at)
    SELECT o.id, o.dr_order_id, 'accepted', true,
           CASE WHEN o.id % 20 = 0 THEN 'Failed' WHEN o.id % 20 = 1 THEN 'Pending' ELSE 'Completed' END,
           CASE WHEN o.id % 20 < 2 THEN 3 ELSE 0 END,
           CASE WHEN o.id % 20 = 0 THEN 'Digital River refused the cancellation: order ' || o.dr_order_id
                || ' is complete' END,
           now() - (o.id % 50000) * interval '2 minutes'
      FROM orders o
    RETURNING id, efn_status, dr_order_id, updated_at
)
INSERT INTO line_item_fulfillments (fulfillment_id, dr_order_item_id, fulfill_quantity, efn_status, retry_count,
                                    message, next_attempt_at, updated_at)
SELECT ful.id, 'item_' || ful.dr_order_id || '_' || i, 1, ful.efn_status,
       CASE WHEN ful.efn_status = 'Completed' THEN 0 ELSE 6 END,
       CASE WHEN ful.efn_status = 'Failed' THEN 'The requested quantity exceeds the available quantity for item item_'
            || ful.dr_order_id || '_' || i END,
       CASE WHEN ful.efn_status = 'Pending' THEN now() + interval '30 minutes' ELSE now() END,
       ful.updated_at
  FROM ful CROSS JOIN generate_series(1, 2) i
"""

# Two application_logs rows per failed record (the job's line and the failed request), and as many without one.
LOGS = """
INSERT INTO application_logs (logging_level, module_name, message, record_id, response_status_code, request, response,
                              created_at)
SELECT 'ERROR', m.module, 'installment_failed: ' || coalesce(p.last_error_message, 'failed'), p.id::text,
       CASE WHEN m.module = 'digital-river' THEN 409 END,
       CASE WHEN m.module = 'digital-river' THEN '{"method": "POST", "path": "/orders"}'::jsonb END,
       CASE WHEN m.module = 'digital-river' THEN '{"type": "conflict", "errors": [{"code": "failed"}]}'::jsonb END,
       p.updated_at
  FROM subscription_process_data p
 CROSS JOIN (VALUES ('recurring-payments'), ('digital-river')) m(module)
 WHERE p.subscription_job_run_status = 'Failed'
UNION ALL
SELECT 'INFO', 'recurring-payments', 'run finished ' || i, NULL, NULL, NULL, NULL, now() - i * interval '10 seconds'
  FROM generate_series(1, 100000) i
"""

JOB_RUNS = """
INSERT INTO job_runs (job, fire_time, trigger, node, started_at, finished_at, status, claimed, succeeded, failed)
SELECT j.job, date_trunc('minute', now()) - i * interval '5 minutes', 'schedule', 'bench-node-' || (i % 2),
       date_trunc('minute', now()) - i * interval '5 minutes',
       date_trunc('minute', now()) - i * interval '5 minutes' + (i % 50) * interval '1 second',
       CASE WHEN i % 97 = 0 THEN 'failed' ELSE 'succeeded' END, 200, 190, 10
  FROM unnest(ARRAY['subscription-installments', 'recurring-payments', 'order-fulfillment', 'line-item-fulfillment',
                    'digital-river-events', 'log-cleanup']) j(job)
 CROSS JOIN generate_series(1, 5000) i
"""

NODES = """
INSERT INTO engine_nodes (name, started_at, heartbeat_at, pid, host, version, settings)
SELECT 'bench-node-' || i, now() - interval '3 days', now(), 1000 + i, 'bench-host', '0.1.0',
       '{"jobs": {"recurring-payments": {"schedule": "0 0 * * * ?", "schedule_description": "every hour, at minute 0",
         "concurrency": 32}}, "schedule_time_zone": "UTC", "dr_api_url": "https://api.digitalriver.com",
         "dr_max_requests_per_second": 200, "lease_seconds": 300}'::jsonb
  FROM generate_series(0, 2) i
"""

EVENTS = """
INSERT INTO dr_events (event_id, type, dr_order_id, payload, source, status, processed_at)
SELECT 'evt_b_' || i, 'order.accepted', 'ord_bench_' || i, '{}'::jsonb, 'webhook',
       CASE WHEN i % 1000 = 0 THEN 'Pending' ELSE 'Processed' END, now()
  FROM generate_series(1, 50000) i
"""

PAUSED = "INSERT INTO job_controls (job, paused, changed_by) VALUES ('order-fulfillment', true, 'bench')"


def pages(record: int, line: int) -> list[tuple[str, str]]:
    return [
        ("jobs", "/"),
        ("backlog", "/backlog"),
        ("failures", "/failures"),
        ("failures, one job", "/failures?job=recurring-payments"),
        ("failures, job and code", "/failures?job=recurring-payments&code=fraud"),
        ("failures, page 20", "/failures?page=20"),
        ("installment record", f"/records/installment/{record}"),
        ("line-item record", f"/records/line-item/{line}"),
        ("digital river", "/digital-river"),
        ("engine processes", "/processes"),
    ]


async def seed(server_dsn: str, subscriptions: int) -> str:
    started = time.monotonic()
    statements: list[tuple[object, ...]] = []
    for start in range(0, subscriptions, CHUNK):
        size = min(CHUNK, subscriptions - start)
        statements.append((SUBSCRIPTIONS, size, start))
    dsn = await fresh_database(server_dsn, DATABASE, *statements)
    conn = await asyncpg.connect(dsn)
    try:
        low, high = await conn.fetchrow("SELECT min(id), max(id) FROM subscriptions")
        for first in range(low - 1, high, CHUNK):
            await conn.execute(RECORDS, first, first + CHUNK, list(CODES))
            print(f"  installment records of subscriptions up to {min(first + CHUNK, high):,}", flush=True)
        for statement in (FULFILLMENTS, LOGS, JOB_RUNS, NODES, EVENTS, PAUSED):
            await conn.execute(statement)
        await conn.execute("VACUUM ANALYZE")
        records = await conn.fetchval("SELECT count(*) FROM subscription_process_data")
    finally:
        await conn.close()
    print(f"  seeded {records:,} installment records in {time.monotonic() - started:.0f} s", flush=True)
    return dsn


async def time_pages(dsn: str, repeat: int) -> list[tuple[str, str, float, float, float]]:
    from engine.console import Console
    from engine.http import Health, HttpServer
    from engine.metrics import Metrics
    from engine.settings import load
    from engine.store import Store

    settings = load({"DATABASE_URL": dsn, "HTTP_PORT": "0"}, command="status", is_terminal=False)
    store = await Store.connect(dsn, "console-bench", min_size=2, max_size=4)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE engine_nodes SET heartbeat_at = now() WHERE name <> 'bench-node-2'")
        record = await conn.fetchval("SELECT id FROM subscription_process_data WHERE subscription_job_run_status = "
                                     "'Failed' ORDER BY updated_at DESC LIMIT 1")
        line = await conn.fetchval("SELECT id FROM line_item_fulfillments WHERE efn_status = 'Failed' LIMIT 1")
    finally:
        await conn.close()
    console = Console(settings, store, built=set(settings.jobs))
    server = HttpServer("127.0.0.1", 0, Metrics(), Health(store, dict, lambda: True), console=console)
    await server.start()
    results = []
    try:
        async with aiohttp.ClientSession() as http:
            for name, path in pages(record, line):
                times = []
                for _ in range(repeat + 1):
                    started = time.perf_counter()
                    async with http.get(f"http://127.0.0.1:{server.port}{path}") as response:
                        await response.read()
                        if response.status != 200:
                            raise SystemExit(f"{path}: HTTP {response.status}")
                    times.append((time.perf_counter() - started) * 1000)
                results.append((name, path, times[0], statistics.median(times[1:]), max(times[1:])))
    finally:
        await server.stop()
        await store.close()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subscriptions", type=int, default=100_000,
                        help="subscriptions to seed, ten installment records each (default 100000: 1,000,000)")
    parser.add_argument("--repeat", type=int, default=10, help="timed requests per page after the first")
    parser.add_argument("--reuse", action="store_true", help=f"time the pages of the {DATABASE} database seeded "
                                                             "by an earlier run")
    parser.add_argument("--seed-only", action="store_true", help="seed, do not time")
    args = parser.parse_args()
    async with database_server() as server_dsn:
        dsn = with_database(server_dsn, DATABASE) if args.reuse else await seed(server_dsn, args.subscriptions)
        if args.seed_only:
            return
        conn = await asyncpg.connect(dsn)
        try:
            records = await conn.fetchval("SELECT count(*) FROM subscription_process_data")
        finally:
            await conn.close()
        results = await time_pages(dsn, args.repeat)
    print(f"\n{records:,} installment records; {args.repeat} requests per page after the first\n")
    print("| page | path | first ms | median ms | slowest ms |")
    print("| --- | --- | --- | --- | --- |")
    for name, path, first, median, slowest in results:
        flag = "" if slowest < TARGET_MS else " (over target)"
        print(f"| {name} | `{path}` | {first:.0f} | {median:.0f} | {slowest:.0f}{flag} |")


if __name__ == "__main__":
    asyncio.run(main())
