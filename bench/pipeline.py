"""Benchmark: N due subscriptions through subscription-installments and recurring-payments.

The sandbox runs in its own process (`run.py sandbox`) and the engine in another (`run.py drain`), so the
engine's CPU and memory are measured alone (`wait4` rusage of the engine process). Each scenario gets a fresh
database, seeded with N subscriptions due today.

    .venv/bin/python bench/pipeline.py                       # the three scenarios of issue 4, N=10000
    .venv/bin/python bench/pipeline.py --n 2000 --scenario 0ms
    .venv/bin/python bench/pipeline.py --n 1000000 --charge 20000 --scenario 0ms   # a run of 20,000 at 1M due
    BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/pipeline.py

Without BENCH_DATABASE_URL the embedded PostgreSQL under .data/bench is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    database_server,
    engine_env,
    fetch_values,
    free_port,
    fresh_database,
    run_engine,
    with_database,
)

SEED = """
WITH acc AS (
    INSERT INTO accounts (name, dr_customer_id, email, bill_to)
    SELECT 'Bench ' || i, 'cus_bench_' || i, 'b' || i || '@bench.example',
           '{"address": {"country": "US", "postalCode": "55401"}, "name": "Bench"}'::jsonb
      FROM generate_series($2::int + 1, $2::int + $1::int) i
    RETURNING id
), prod AS (
    INSERT INTO products (sku, name, dr_sku_id) VALUES ('BENCH-1', 'Bench plan', 'sku_bench')
        ON CONFLICT (sku) DO UPDATE SET name = EXCLUDED.name RETURNING id
), pay AS (
    INSERT INTO stored_payments (account_id, dr_source_id)
    SELECT id, 'src_bench_' || id FROM acc
    RETURNING id, account_id
), ord AS (
    INSERT INTO orders (account_id, dr_order_id, currency, ship_to)
    SELECT id, 'ord_bench_' || id, 'USD', '{"address": {"country": "US"}}'::jsonb FROM acc RETURNING id, account_id
)
INSERT INTO subscriptions (account_id, product_id, stored_payment_id, parent_order_id, quantity, unit_price,
                           currency, installment_frequency, installment_anchor_date, installment_next_run_date,
                           installment_count_remaining, dr_billing_agreement_id)
SELECT ord.account_id, prod.id, pay.id, ord.id, 1, 19.00, 'USD', 'Monthly', current_date - 1, current_date - 1,
       12, 'ba_bench_' || ord.account_id
  FROM ord JOIN pay ON pay.account_id = ord.account_id CROSS JOIN prod
"""

SCENARIOS = {
    "0ms": {"latency_ms": 0, "rate": None, "concurrency": 64},
    "200ms": {"latency_ms": 200, "rate": None, "concurrency": 256},
    "250rps-300ms": {"latency_ms": 300, "rate": 250, "concurrency": 128},
}


@dataclass
class Result:
    scenario: str
    n: int
    seconds: float
    payments_seconds: float
    installments: int
    charged: int
    requests: int
    throttled: int
    cpu_seconds: float
    peak_rss_mb: float
    installments_cpu: float
    installments_rss_mb: float
    payments_cpu: float
    payments_rss_mb: float
    first_checkout_seconds: float
    claim_ms: tuple[float, float]

    def line(self) -> str:
        return (f"| {self.scenario} | {self.n} | {self.seconds:.1f} | {self.charged / self.seconds:.0f} | "
                f"{self.requests / self.payments_seconds:.0f} | {self.throttled} | "
                f"{self.cpu_seconds / self.charged * 1000:.2f} | {self.peak_rss_mb:.0f} |")

    def scale_line(self) -> str:
        """The backlog view (issue 14): the payment run alone, whatever part of the backlog it was allowed."""
        return (f"| {self.n:,} | {self.charged:,} | {self.seconds - self.payments_seconds:.1f} s, "
                f"{self.installments_cpu:.1f} CPU s, {self.installments_rss_mb:.0f} MB | "
                f"{self.charged / self.payments_seconds:.0f} | {self.payments_cpu / self.charged * 1000:.2f} | "
                f"{self.payments_rss_mb:.0f} | {self.first_checkout_seconds:.2f} s | "
                f"{self.claim_ms[0]:.1f} / {self.claim_ms[1]:.1f} ms |")


SEED_CHUNK = 100_000


async def time_claims(dsn: str, times: int = 20) -> tuple[float, float]:
    """PostgreSQL's time for one claim of 100 at the backlog the run left (median, max of `times` in ms): the
    production statement from the start of the claim order, each in a transaction rolled back."""
    import asyncpg

    from engine.store import sql

    conn = await asyncpg.connect(dsn)
    try:
        statement = sql("claim_payment_records")
        took = []
        for _ in range(times):
            tx = conn.transaction()
            await tx.start()
            started = time.perf_counter()
            await conn.fetch(statement, "bench-probe", 100, 300.0, [], date.min, 0, 1000)
            took.append((time.perf_counter() - started) * 1000)
            await tx.rollback()
    finally:
        await conn.close()
    took.sort()
    return took[len(took) // 2], took[-1]


async def scenario(name: str, n: int, server_dsn: str, profile: str | None = None, charge: int | None = None,
                   reuse: bool = False) -> Result:
    spec = SCENARIOS[name]
    seeded = time.monotonic()
    if reuse:
        dsn = with_database(server_dsn, "drjobs_bench")
    else:
        dsn = await fresh_database(server_dsn, "drjobs_bench",
                                   *[(SEED, min(SEED_CHUNK, n - start), start) for start in range(0, n, SEED_CHUNK)])
        print(f"  seeded {n:,} subscriptions in {time.monotonic() - seeded:.0f} s", flush=True)
    port = free_port()
    sandbox_args = [sys.executable, str(ROOT / "run.py"), "sandbox", "--port", str(port),
                    "--latency-ms", str(spec["latency_ms"]), "--no-amount-rules"]
    if spec["rate"]:
        sandbox_args += ["--rate-limit", str(spec["rate"])]
    sandbox = subprocess.Popen(sandbox_args, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "LOG_LEVEL": "warning"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/_sandbox/config", timeout=1).read()
            break
        except OSError:
            time.sleep(0.1)
    env = engine_env(dsn, url, "sk_test_bench", DR_MAX_REQUESTS_PER_SECOND=str(spec["rate"] or 100_000),
                     RECURRING_PAYMENTS_CONCURRENCY=str(spec["concurrency"]),
                     CC_SUBSCRIPTIONS_BATCH_QUERY_LIMIT=str(n),
                     RECURRING_PAYMENT_PROCESS_QUERY_LIMIT=str(charge or n),
                     RECURRING_PAYMENT_BATCH_SIZE="100", CC_SUBSCRIPTION_PROCESSOR_BATCH_SIZE="500")
    try:
        inst_wall, inst_cpu, inst_rss = (0.0, 0.0, 0.0) if reuse else run_engine(
            ["run", "subscription-installments"], env)
        charged_before = int((await fetch_values(
            dsn, "SELECT count(*) FROM subscription_process_data WHERE subscription_job_run_status = 'Successful'"))[0])
        pay_started = time.time()
        pay_wall, pay_cpu, pay_rss = run_engine(["run", "recurring-payments"], env, profile=profile)
        ledger = json.loads(urllib.request.urlopen(url + "/_sandbox/ledger", timeout=30).read())
        throttled = sum(1 for r in ledger.get("requests", []) if r["status"] == 429)
    finally:
        sandbox.terminate()
        _, _, sandbox_usage = os.wait4(sandbox.pid, 0)
        sandbox.returncode = 0
    print(f"  sandbox CPU {sandbox_usage.ru_utime + sandbox_usage.ru_stime:.1f} s", flush=True)
    installments, charged, first_checkout = await fetch_values(
        dsn, "SELECT count(*) FROM subscription_process_data",
        "SELECT count(*) FROM subscription_process_data WHERE subscription_job_run_status = 'Successful'",
        # The first checkout saved by this run: one claim and one checkout request after its start at the earliest.
        f"SELECT extract(epoch FROM min(last_attempt_at)) FROM subscription_process_data "
        f"WHERE last_attempt_at >= to_timestamp({pay_started})")
    charged -= charged_before
    requests = ledger["counts"]["requests"]
    if throttled == 0 and "requests" not in ledger:
        throttled = -1  # unknown: the ledger did not list requests
    return Result(name, n, inst_wall + pay_wall, pay_wall, installments, charged, requests, throttled,
                  inst_cpu + pay_cpu, max(inst_rss, pay_rss), inst_cpu, inst_rss, pay_cpu, pay_rss,
                  float(first_checkout) - pay_started, await time_claims(dsn))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append")
    parser.add_argument("--profile", metavar="FILE",
                        help="record the payment run with py-spy into FILE (speedscope JSON); CPU figures then "
                             "include py-spy's sampling")
    parser.add_argument("--charge", type=int, metavar="N",
                        help="the payment run charges N of the backlog (RECURRING_PAYMENT_PROCESS_QUERY_LIMIT) "
                             "and a second table shows the run against the backlog's size")
    parser.add_argument("--reuse", action="store_true",
                        help="no seeding and no installment run: another payment run on the backlog the last "
                             "benchmark left in drjobs_bench (--n must say its size)")
    args = parser.parse_args()
    async with database_server() as server_dsn:
        print("| scenario | subscriptions | seconds | installments/s | DR requests/s | 429s | CPU s per 1,000 | "
              "peak RSS MB |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for name in args.scenario or list(SCENARIOS):
            result = await scenario(name, args.n, server_dsn, args.profile, args.charge, args.reuse)
            print(result.line(), flush=True)
            print(f"  installments job {result.seconds - result.payments_seconds:.1f} s, payments job "
                  f"{result.payments_seconds:.1f} s, {result.installments} records", flush=True)
            if result.charged != (args.charge or args.n):
                print(f"  note: {result.charged} of {args.charge or args.n} charged", flush=True)
            print("| due subscriptions | charged | installments job | installments/s (payment run) | "
                  "payment run CPU s per 1,000 | payment run peak RSS MB | start to first checkout saved | "
                  "a claim of 100 in PostgreSQL afterwards (median / max) |")
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
            print(result.scale_line(), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
