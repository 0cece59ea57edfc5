"""Benchmark (not a test): webhook intake latency and event throughput.

A fresh database; the engine's webhook listener (engine/webhooks.py) in this process on its own port; N signed
`order.accepted` deliveries POSTed by C concurrent clients (a separate aiohttp session, as Digital River would
send them), each timed from send to answer; then the digital-river-events job applies every stored event
(events for orders the store does not know are `Ignored`; with --orders, that many Pending installment records'
orders get a real `order.accepted` that pays them).

    .venv/bin/python bench/events.py                    # N=10000, C=64
    .venv/bin/python bench/events.py --n 2000 --concurrency 16 --orders 1000
    BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/events.py

Reported: deliveries/s, intake latency p50/p95/p99/max (Digital River waits 3 s), then events applied per second
by one job run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import build_jobs
from bench.common import database_server, fresh_database
from engine.app import Engine
from engine.logs import configure as configure_logging
from engine.metrics import Metrics
from engine.settings import load
from engine.store import Store
from engine.webhooks import PATH, WebhookServer, sign

SECRET = "whsec_bench_0123456789"


async def seed_pending(store: Store, count: int) -> list[str]:
    """`count` Pending installment records, each with its order, as recurring-payments leaves them."""
    ids = []
    async with store.pool.acquire() as conn:
        account = await conn.fetchval("INSERT INTO accounts (name) VALUES ('Bench') RETURNING id")
        sub = await conn.fetchval("INSERT INTO subscriptions (account_id, installment_count_remaining, "
                                  "installment_anchor_date, installment_next_run_date, currency, unit_price) "
                                  "VALUES ($1, 0, current_date, current_date, 'USD', 10) RETURNING id", account)
        for n in range(1, count + 1):
            order_id = f"ord_bench_{n}"
            order = await conn.fetchval("INSERT INTO orders (account_id, dr_order_id, dr_order_state, currency, "
                                        "total_amount) VALUES ($1, $2, 'pending_payment', 'USD', 10) RETURNING id",
                                        account, order_id)
            await conn.execute("INSERT INTO subscription_process_data (subscription_id, installment_number, "
                               "subscription_job_run_status, dr_order_id, order_id, account_id) "
                               "VALUES ($1, $2, 'Pending', $3, $4, $5)", sub, n, order_id, order, account)
            ids.append(order_id)
    return ids


async def main(n: int, concurrency: int, orders: int) -> None:
    configure_logging("warning", "console")
    async with database_server() as server:
        dsn = await fresh_database(server, "drjobs_bench_events")
        store = await Store.connect(dsn, "bench-events", max_size=10)
        order_ids = await seed_pending(store, orders)
        listener = WebhookServer("127.0.0.1", 0, store, Metrics(), secret=SECRET, tolerance=300, wake=lambda: None)
        await listener.start()
        url = f"http://127.0.0.1:{listener.port}{PATH}"
        latencies: list[float] = []
        statuses: list[int] = []

        async def deliver(http: aiohttp.ClientSession, gate: asyncio.Semaphore, i: int) -> None:
            order_id = order_ids[i] if i < len(order_ids) else f"ord_unknown_{i}"
            body = json.dumps({"id": f"evt_bench_{i}", "type": "order.accepted",
                               "createdTime": datetime.now(UTC).isoformat(),
                               "data": {"object": {"id": order_id, "state": "accepted"}}}).encode()
            async with gate:
                now = int(time.time())
                started = time.perf_counter()
                async with http.post(url, data=body,
                                     headers={"DigitalRiver-Signature": f"t={now}, {sign(SECRET, now, body)}"}) as r:
                    await r.read()
                    statuses.append(r.status)
                latencies.append(time.perf_counter() - started)

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
            gate = asyncio.Semaphore(concurrency)
            started = time.perf_counter()
            await asyncio.gather(*(deliver(http, gate, i) for i in range(n)))
            intake = time.perf_counter() - started
        await listener.stop()
        q = statistics.quantiles(latencies, n=100)
        print(f"intake: {n} deliveries, {concurrency} at once: {n / intake:.0f}/s; latency ms p50 {q[49] * 1000:.1f} "
              f"p95 {q[94] * 1000:.1f} p99 {q[98] * 1000:.1f} max {max(latencies) * 1000:.1f}; "
              f"non-200: {sum(1 for s in statuses if s != 200)}")

        settings = load({"DR_API_KEY": "sk_test_bench", "DR_API_URL": "http://127.0.0.1:9", "NODE_NAME": "bench",
                         "DATABASE_URL": dsn, "APP_LOG_LEVEL": "ERROR", "LOG_LEVEL": "warning"},
                        command="drain", is_terminal=False)
        engine = Engine(settings, store, build_jobs)
        job = engine.jobs["digital-river-events"]

        async def apply() -> int:
            run = await job.run_now("message")  # a webhook's run: applies, does not poll
            assert run is not None
            return run.claimed

        started = time.perf_counter()
        applied = await engine.drive(apply)
        took = time.perf_counter() - started
        paid = await store.pool.fetchval("SELECT count(*) FROM subscription_process_data "
                                         "WHERE subscription_job_run_status = 'Successful'")
        print(f"apply: one run, exit {applied}; {await store.pool.fetchval('SELECT count(*) FROM dr_events')} events "
              f"in {took:.1f} s ({n / took:.0f}/s); installments paid {paid} of {orders}")
        await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--orders", type=int, default=2_000)
    args = parser.parse_args()
    asyncio.run(main(args.n, args.concurrency, args.orders))
