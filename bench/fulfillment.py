"""Benchmark (not a test): line-item-fulfillment on N accepted orders of 3 lines each, at 200 ms sandbox latency.

The sandbox runs in its own process (`run.py sandbox`) and the engine in another (`run.py drain`), so the
engine's CPU and memory are measured alone (`wait4` rusage of the engine process). For each scenario: a fresh
database; N orders created in the sandbox through its API (at no latency), each with items of quantity 2, 1
and 3; the store seeded as an ERP would (orders, order items, an accepted `fulfillments` row, and three lines:
fulfil 2, cancel 1, fulfil 2 and cancel 1); then the latency is set and the engine drains.

    .venv/bin/python bench/fulfillment.py                        # every scenario, N=5000
    .venv/bin/python bench/fulfillment.py --n 500 --scenario default
    BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/fulfillment.py

Without BENCH_DATABASE_URL the embedded PostgreSQL under .data/bench is used. Reported: orders/s over the
engine's wall time (process start to exit) and over the line-item runs alone (first start to last finish in
`job_runs`), Digital River requests per order (POST /fulfillments plus GET /orders/{id}; the target is exactly
one), and whether any order got more than one fulfillment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    database_server,
    engine_env,
    fetch_values,
    free_port,
    fresh_database,
    run_engine,
    wait_for_sandbox,
)
from engine.digital_river import DigitalRiverClient  # noqa: E402

KEY = "sk_test_bench"
QUANTITIES = (2, 1, 3)
SEED = """
WITH src AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS s(dr_order_id, item0, item1, item2)
), ord AS (
    INSERT INTO orders (dr_order_id, dr_order_state, currency)
    SELECT dr_order_id, 'accepted', 'USD' FROM src
    RETURNING id, dr_order_id
), items AS (
    INSERT INTO order_items (order_id, quantity, unit_price, dr_order_item_id)
    SELECT ord.id, q.quantity, 10, q.dr_item_id
      FROM ord JOIN src USING (dr_order_id)
     CROSS JOIN LATERAL (VALUES (2, src.item0), (1, src.item1), (3, src.item2)) AS q(quantity, dr_item_id)
    RETURNING id, order_id, quantity
), ful AS (
    INSERT INTO fulfillments (order_id, dr_order_id, dr_order_state)
    SELECT id, dr_order_id, 'accepted' FROM ord
    RETURNING id, order_id
)
INSERT INTO line_item_fulfillments (fulfillment_id, order_item_id, fulfill_quantity, cancel_quantity)
SELECT ful.id, items.id,
       CASE items.quantity WHEN 2 THEN 2 WHEN 1 THEN 0 ELSE 2 END,
       CASE items.quantity WHEN 2 THEN 0 WHEN 1 THEN 1 ELSE 1 END
  FROM items JOIN ful USING (order_id)
"""

SCENARIOS = {
    # The contract's defaults: LINE_ITEM_FULFILLMENT_CONCURRENCY 8, FULFILLMENT_QUERY_LIMIT 200.
    "default": {"concurrency": 8, "limit": 200},
    "c64": {"concurrency": 64, "limit": 200},
    "c64-limit15000": {"concurrency": 64, "limit": 15_000},
    "c256-limit15000": {"concurrency": 256, "limit": 15_000},
}


@dataclass
class Result:
    scenario: str
    concurrency: int
    limit: int
    orders: int
    seconds: float
    job_seconds: float
    posts: int
    gets: int
    completed_lines: int
    orders_sent_twice: int
    cpu_seconds: float
    peak_rss_mb: float
    latency_ms: int

    def line(self) -> str:
        bound = self.concurrency * 1000 / self.latency_ms
        return (f"| {self.scenario} | {self.concurrency} | {self.limit:,} | {self.orders:,} | {self.seconds:.1f} | "
                f"{self.orders / self.seconds:.0f} | {self.orders / self.job_seconds:.0f} | {bound:,.0f} | "
                f"{(self.posts + self.gets) / self.orders:.2f} | {self.orders_sent_twice} | "
                f"{self.cpu_seconds / self.orders * 1000:.2f} | {self.peak_rss_mb:.0f} |")


async def dr_orders(url: str, n: int) -> list[tuple[str, str, str, str]]:
    """N accepted orders in the sandbox, made through its API: (order id, item ids…) each."""
    client = DigitalRiverClient(url, KEY, max_requests_per_second=1_000_000.0, connection_limit=64, max_retries=0)
    made: list[tuple[str, str, str, str]] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < n:
            next_index += 1
            checkout = await client.create_checkout({
                "currency": "USD", "sourceId": "src_bench", "customerId": "cus_bench",
                "items": [{"skuId": f"sku_bench_{i}", "price": 10, "quantity": q} for i, q in enumerate(QUANTITIES)]})
            order = await client.create_order(checkout.id)
            assert order.state == "accepted" and [i.quantity for i in order.items] == list(QUANTITIES)
            made.append((order.id, order.items[0].id, order.items[1].id, order.items[2].id))

    async with client:
        async with asyncio.TaskGroup() as group:
            for i in range(64):
                group.create_task(worker(), name=f"bench-orders-{i}")
    return made


async def scenario(name: str, n: int, latency_ms: int, server_dsn: str) -> Result:
    spec = SCENARIOS[name]
    port = free_port()
    sandbox = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "run.py"), "sandbox", "--port", str(port), "--no-amount-rules", cwd=str(ROOT),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "LOG_LEVEL": "warning"})
    url = f"http://127.0.0.1:{port}"
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
    try:
        await wait_for_sandbox(http, url)
        orders = await dr_orders(url, n)
        columns = [list(column) for column in zip(*orders, strict=True)]
        dsn = await fresh_database(server_dsn, "drjobs_bench_fulfillment", (SEED, *columns), ("ANALYZE",))
        async with http.post(url + "/_sandbox/config", json={"latency_ms": latency_ms}) as response:
            response.raise_for_status()
        env = engine_env(dsn, url, KEY, DR_MAX_REQUESTS_PER_SECOND="100000",
                         LINE_ITEM_FULFILLMENT_CONCURRENCY=str(spec["concurrency"]),
                         FULFILLMENT_QUERY_LIMIT=str(spec["limit"]))
        wall, cpu, rss = await asyncio.to_thread(run_engine, ["drain"], env)
        async with http.get(url + "/_sandbox/ledger") as response:
            ledger = json.loads(await response.read())
    finally:
        await http.close()
        sandbox.terminate()
        await sandbox.wait()
    requests = Counter((r["method"], r["path"].split("/")[1], r["status"]) for r in ledger["requests"])
    posts = sum(c for (method, path, _), c in requests.items() if (method, path) == ("POST", "fulfillments"))
    gets = sum(c for (method, path, _), c in requests.items() if (method, path) == ("GET", "orders"))
    per_order = Counter(f["orderId"] for f in ledger["fulfillments"])
    completed, job_seconds = await fetch_values(
        dsn, "SELECT count(*) FROM line_item_fulfillments WHERE efn_status = 'Completed'",
        "SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM job_runs "
        "WHERE job = 'line-item-fulfillment' AND claimed > 0")
    return Result(name, int(spec["concurrency"]), int(spec["limit"]), n, wall, float(job_seconds), posts, gets,
                  completed, sum(1 for c in per_order.values() if c > 1), cpu, rss, latency_ms)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5_000)
    parser.add_argument("--latency-ms", type=int, default=200)
    parser.add_argument("--scenario", choices=list(SCENARIOS), action="append")
    args = parser.parse_args()
    # The order-making client's per-request DEBUG lines would only fill the screen.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    async with database_server() as server_dsn:
        print(f"# line-item-fulfillment: {args.n:,} orders × 3 lines, sandbox latency {args.latency_ms} ms, "
              f"{os.cpu_count()} CPUs\n")
        print("| scenario | concurrency | query limit | orders | seconds | orders/s | orders/s (runs) | bound | "
              "DR requests per order | orders sent twice | engine CPU s per 1,000 orders | peak RSS MB |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name in args.scenario or list(SCENARIOS):
            result = await scenario(name, args.n, args.latency_ms, server_dsn)
            print(result.line(), flush=True)
            if result.completed_lines != 3 * args.n:
                print(f"  note: {result.completed_lines} of {3 * args.n} lines Completed", flush=True)
            print(f"  POST /fulfillments {result.posts}, GET /orders {result.gets}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
