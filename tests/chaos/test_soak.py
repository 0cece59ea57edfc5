"""Chaos soak: two engine processes drain a backlog while Digital River misbehaves and a driver keeps killing
them, stalling their heartbeats and taking their database away.

The sandbox answers 5% of requests with 500s, lets 2% time out, throttles 2% with 429s and drops the connection
after creating 1% of orders. Every few seconds the driver does one of: SIGKILL a random engine process and start
it again; lock a leased record from an outside session for longer than the lease (the worker that holds it lives
on, late: its heartbeat skips the row, the lease lapses, and its writes must change nothing); or stop
PostgreSQL (a cluster this test owns) for a few seconds (at most twice), which the engines must ride out. Then
the faults stop, the time-based backoffs are fast-forwarded (records waiting out an outage are made due now: the
rules only say when to try again, not that the test must wait an hour), the engines finish and stop, and:

- every installment has exactly one Digital River order, or is Failed / waiting a day for a reason the table of
  docs/billing-rules.md allows (declines, bad data);
- every fulfillment line was reported at most once and ends Completed or Failed;
- no record is left claimed; runs of killed processes are marked failed, and no tick ran twice;
- both engines are still running at the end (an outage never spends their restart budget).

DRJOBS_SOAK_SECONDS sets the chaos phase (default 40; longer soaks by hand).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from engine.demo import seed, write_fulfillment_requests
from engine.store import Store
from sandbox.server import Sandbox
from tests.db import DATABASE_DOWN, connection, crash, create_database, open_store, restart
from tests.ledger_checks import assert_charged_once, declines_by_subscription
from tests.support import EngineProcess, engine_env, run_command, sandbox_fixture

SOAK_SECONDS = float(os.environ.get("DRJOBS_SOAK_SECONDS", "40"))
LEASE_SECONDS = 5
# Each stall holds a leased row this long (longer than the lease); each outage keeps PostgreSQL down this long.
STALL_SECONDS = LEASE_SECONDS + 3
OUTAGE_SECONDS = 8
MAX_OUTAGES = 2
SUBSCRIPTIONS = 600
# Outcomes the rules allow for an installment without an order (last_error_code values).
DECLINE_CODES = {"insufficient_funds", "fraud", "decline_limit", "charge_failed", "order_blocked", "order_cancelled"}
WEBHOOK_SECRET = "whsec_soak_0123456789"
OUTAGE_CODES = ("dr_unavailable", "outcome_unknown", "checkout_consumed", "order_not_found")
# Open records the rules make wait a day: a declined one, and the later installments of its subscription
# (installments of one subscription go one after another).
WAITING_FOR_A_DAY = """
    SELECT array_agg(p.id) AS waiting_ids
      FROM subscription_process_data p
     WHERE p.subscription_job_run_status = 'Open'
       AND EXISTS (SELECT 1 FROM subscription_process_data d
                    WHERE d.subscription_id = p.subscription_id AND d.subscription_job_run_status = 'Open'
                      AND d.installment_number <= p.installment_number AND d.last_error_code = ANY($1::text[]))
"""


sandbox = sandbox_fixture(seed=2026)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def soak_database(private_server: Any) -> AsyncIterator[tuple[str, Store]]:
    """A database on a PostgreSQL cluster this test owns (so it can stop it), migrated, and a store on it."""
    dsn = await create_database(private_server.get_uri("postgres"), "drjobs_soak")
    async with open_store(dsn, "soak-driver") as store:
        yield dsn, store


async def erp(store: Store, stop: asyncio.Event) -> None:
    """An outside system writing fulfillment requests for the installment orders as they appear."""
    while not stop.is_set():
        try:
            await write_fulfillment_requests(store)
        except DATABASE_DOWN:
            pass  # the database is down for a moment: write them next time
        try:
            await asyncio.wait_for(stop.wait(), 2)
        except TimeoutError:
            pass


async def stall(dsn: str, stats: Counter[str]) -> None:
    """An outside session locks one leased record (an installment or an order's fulfillment) for longer than
    the lease, then lets go: the worker holding it lives on while its lease lapses."""
    try:
        async with connection(dsn, timeout=5) as conn:
            # Records are in flight for moments at a time: look for one for up to 3 seconds.
            for _ in range(30):
                async with conn.transaction():
                    for table in ("subscription_process_data", "fulfillments"):
                        row = await conn.fetchval(
                            f"SELECT id FROM {table} WHERE locked_by IS NOT NULL AND locked_until > now() "
                            "ORDER BY random() LIMIT 1 FOR UPDATE SKIP LOCKED")
                        if row is not None:
                            stats[f"stalled {table}"] += 1
                            await asyncio.sleep(STALL_SECONDS)
                            return
                await asyncio.sleep(0.1)
    except (*DATABASE_DOWN, TimeoutError):
        pass  # the database is down, or went down under the stall


async def start_engine(env: dict[str, str], store: Store, started: list[EngineProcess]) -> EngineProcess:
    """Start a `serve` process and wait until it is in engine_nodes: past its start-up (which needs the
    database), so an outage from here on is one it must ride out."""
    engine = await EngineProcess(["serve"], env).start()
    started.append(engine)
    assert engine.proc is not None

    async def registered() -> None:
        while not await store.pool.fetchval("SELECT count(*) FROM engine_nodes WHERE pid = $1 AND stopped_at IS NULL",
                                            engine.proc.pid):  # type: ignore[union-attr]
            await asyncio.sleep(0.1)
    await asyncio.wait_for(registered(), 60)
    return engine


async def fast_forward(store: Store) -> None:
    await store.pool.execute(
        "UPDATE subscription_process_data SET next_attempt_at = now() "
        "WHERE subscription_job_run_status = 'Open' AND last_error_code = ANY($1::text[])", list(OUTAGE_CODES))
    await store.pool.execute("UPDATE fulfillments SET next_attempt_at = now() WHERE efn_status IN ('Open', 'Pending')")
    await store.pool.execute(
        "UPDATE line_item_fulfillments SET next_attempt_at = now() WHERE efn_status IN ('Open', 'Pending')")
    # Pending payments whose events were lost are looked up now rather than in an hour.
    await store.pool.execute("UPDATE subscription_process_data SET next_attempt_at = now() "
                             "WHERE subscription_job_run_status = 'Pending'")


async def unfinished(store: Store) -> dict[str, int]:
    """Work left but what the rules say must wait (a declined card's day), by kind; empty when settled."""
    row = await store.pool.fetchrow(
        "SELECT (SELECT count(*) FROM subscription_process_data p WHERE subscription_job_run_status = 'Open' "
        "        AND p.id <> ALL(SELECT unnest(waiting_ids) FROM (" + WAITING_FOR_A_DAY + ") w)) AS installments,"
        " (SELECT count(*) FROM subscriptions s WHERE s.status = 'Active' AND s.installment_count_remaining > 0 "
        "        AND s.installment_next_run_date < current_date) AS subscriptions,"
        " (SELECT count(*) FROM fulfillments WHERE efn_status IN ('Open', 'Pending') "
        "        AND dr_order_state = 'cancelled') AS cancellations,"
        # Lines of an order Digital River cancelled (its charge failed) are order-fulfillment's: they wait.
        " (SELECT count(*) FROM line_item_fulfillments l JOIN fulfillments f ON f.id = l.fulfillment_id "
        "        WHERE l.efn_status IN ('Open', 'Pending') AND f.dr_order_state IS DISTINCT FROM 'cancelled') AS lines,"
        " (SELECT count(*) FROM subscription_process_data WHERE subscription_job_run_status = 'Pending') AS pending,"
        " (SELECT count(*) FROM dr_events WHERE status = 'Pending') AS events",
        list(DECLINE_CODES))
    return {kind: count for kind, count in dict(row).items() if count}


@pytest.mark.timeout(600)
async def test_two_engines_under_faults_kills_stalls_and_outages_charge_everyone_once(
        soak_database: tuple[str, Store], private_server: object, sandbox: Sandbox) -> None:
    dsn, store = soak_database
    await seed(store, SUBSCRIPTIONS)  # the demo's book: accounts, payments, acquisition orders, subscriptions
    # Payments Digital River confirms later: accepted, failed or blocked a second after the order.
    await store.pool.execute(
        "UPDATE stored_payments SET dr_source_id = CASE WHEN id % 10 = 1 THEN 'src_settle_accept' "
        "WHEN id % 20 = 3 THEN 'src_settle_fail' WHEN id % 40 = 7 THEN 'src_settle_block' ELSE dr_source_id END "
        "WHERE dr_source_id LIKE 'src_demo_card_%'")
    env = engine_env(
        dsn, DR_API_URL=sandbox.url, DR_TIMEOUT_SECONDS="1", DR_MAX_REQUESTS_PER_SECOND="2000",
        LEASE_SECONDS=str(LEASE_SECONDS), SHUTDOWN_GRACE_SECONDS="5", LOG_LEVEL="warning", NODE_LOST_SECONDS="4",
        SUBSCRIPTION_INSTALLMENTS_SCHEDULE="every 1s", RECURRING_PAYMENTS_SCHEDULE="every 1s",
        ORDER_FULFILLMENT_SCHEDULE="every 1s", LINE_ITEM_FULFILLMENT_SCHEDULE="every 1s",
        DIGITAL_RIVER_EVENTS_SCHEDULE="every 2s", DR_WEBHOOK_SECRET=WEBHOOK_SECRET, WEBHOOK_PORT="off",
        CC_SUBSCRIPTION_PROCESSOR_BATCH_SIZE="50", RECURRING_PAYMENT_BATCH_SIZE="20")
    # Webhooks go to the first engine (a fixed port it binds again after each restart); the second hears Digital
    # River only by polling. A tenth of the deliveries are lost, a fifth come twice, all of them late and reordered.
    port = free_port()
    envs = [env | {"WEBHOOK_PORT": str(port)}, env]
    sandbox.configure(error_rate=0.05, timeout_rate=0.02, timeout_seconds=1.5, throttle_rate=0.02,
                      retry_after_seconds=0.2, drop_after_order_rate=0.01, settle_after_seconds=1.0,
                      webhook_url=f"http://127.0.0.1:{port}/webhooks/digital-river", webhook_secret=WEBHOOK_SECRET,
                      webhook_drop_rate=0.1, webhook_duplicate_rate=0.2, webhook_delay_ms=500)
    rng = random.Random(7)
    started: list[EngineProcess] = []  # every process, killed ones too (their log lines count)
    engines = [await start_engine(envs[i], store, started) for i in range(2)]
    stop_erp = asyncio.Event()
    erp_task = asyncio.create_task(erp(store, stop_erp), name="erp")
    stats: Counter[str] = Counter()
    stalls: set[asyncio.Task[None]] = set()
    kills = outages = 0
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SOAK_SECONDS
        while loop.time() < deadline:
            await asyncio.sleep(rng.uniform(2, 5))
            action = rng.random()
            if action < 0.12 and outages < MAX_OUTAGES:
                await asyncio.to_thread(crash, private_server)
                await asyncio.sleep(OUTAGE_SECONDS)
                await asyncio.to_thread(restart, private_server)
                outages += 1
                continue
            if action < 0.45:
                task = asyncio.create_task(stall(dsn, stats), name="stall")
                stalls.add(task)
                task.add_done_callback(stalls.discard)
                continue
            victim = rng.randrange(len(engines))
            engines[victim].kill()
            await engines[victim].wait()
            kills += 1
            engines[victim] = await start_engine(envs[victim], store, started)
        if stalls:
            await asyncio.gather(*stalls)

        sandbox.configure(error_rate=0.0, timeout_rate=0.0, throttle_rate=0.0, drop_after_order_rate=0.0)
        for _ in range(60):
            await fast_forward(store)
            await asyncio.sleep(2)
            if not await unfinished(store):
                break
        stop_erp.set()
        await erp_task
        alive = [engine.proc is not None and engine.proc.returncode is None for engine in engines]
    finally:
        stop_erp.set()
        for engine in engines:
            if engine.proc and engine.proc.returncode is None:
                engine.signal(signal.SIGTERM)
        codes = [await engine.wait() for engine in engines]
    assert alive == [True, True], [e.stderr[-2000:] for e in engines]
    assert codes == [0, 0], [e.stderr[-2000:] for e in engines]
    assert kills >= 2
    # Events heard in the last moments before the engines stopped wait for the next run: the final drain below
    # applies them (and must leave none).
    left = {kind: n for kind, n in (await unfinished(store)).items() if kind != "events"}
    assert not left, f"work was left undone after the faults stopped: {left}"

    ledger = sandbox.ledger
    assert ledger.count_requests(status=500) > 0 and ledger.count_requests(status=429) > 0
    assert ledger.dropped_orders, "no unknown outcome was exercised"
    # Payments settled later, by webhooks (some lost, some twice) and by polling.
    settled = Counter(r["type"] for r in await store.pool.fetch("SELECT type FROM dr_events WHERE status = 'Processed'"))
    assert settled["order.accepted"] and settled["order.charge.failed"] and settled["order.blocked"], settled
    sources = Counter(r["source"] for r in await store.pool.fetch("SELECT source FROM dr_events"))
    assert sources["webhook"] and sources["poll"], sources

    # Every installment: exactly one order, or none and a reason the rules allow.
    records = await assert_charged_once(store, sandbox)
    waiting = set(await store.pool.fetchval(WAITING_FOR_A_DAY, list(DECLINE_CODES)) or [])
    assert len(records) > SUBSCRIPTIONS
    for rec in records:
        if rec["subscription_job_run_status"] != "Successful":
            allowed = (rec["id"] in waiting or rec["last_error_code"] in DECLINE_CODES
                       or (rec["last_error_code"] or "").startswith("invalid:"))
            assert allowed, f"record {rec['id']}: {rec['subscription_job_run_status']} {rec['last_error_code']}"
    # Digital River's rule for declined merchant-initiated charges: at most one decline per subscription a day.
    declined = declines_by_subscription(sandbox)
    assert not declined or max(declined.values()) == 1, declined.most_common(3)

    # Every fulfillment line reported at most once, and finished.
    lines = await store.pool.fetch("SELECT l.*, f.dr_order_state FROM line_item_fulfillments l "
                                   "JOIN fulfillments f ON f.id = l.fulfillment_id")
    assert lines and all(line["efn_status"] in ("Completed", "Failed") for line in lines
                         if line["dr_order_state"] != "cancelled")
    captured: Counter[str] = Counter()
    for fulfillment in ledger.fulfillments.values():
        for item in fulfillment["items"]:
            if item.get("quantity"):
                captured[item["itemId"]] += 1
    assert max(captured.values()) == 1
    # A Completed line was captured, unless Digital River cancelled its order first (a charge that failed after
    # the order): then 409 order_cancelled settles it with nothing to capture.
    cancelled = {o["id"] for o in ledger.orders.values() if o["state"] == "cancelled"}
    assert {line["dr_order_item_id"] for line in lines if line["efn_status"] == "Completed"
            and ledger.items[line["dr_order_item_id"]].order_id not in cancelled} <= set(captured)

    # No tick ran twice; the runs killed processes left behind were marked failed by a live one (a last drain,
    # started after the dead nodes' heartbeats aged past NODE_LOST_SECONDS, reaps any left from the final kills);
    # and after it nothing is left claimed. (A fulfillment cut short by the engines' stop keeps its lease until it
    # lapses, on purpose: its request may have reached Digital River, so the next claim looks before sending.)
    assert await store.pool.fetchval(
        "SELECT count(*) FROM (SELECT job, fire_time FROM job_runs GROUP BY 1, 2 HAVING count(*) > 1) d") == 0
    await asyncio.sleep(4)
    code, _, err = await run_command(["drain"], env)
    assert code == 0, err
    for table in ("subscription_process_data", "fulfillments", "line_item_fulfillments"):
        assert await store.pool.fetchval(f"SELECT count(*) FROM {table} WHERE locked_by IS NOT NULL") == 0
    assert await store.pool.fetchval("SELECT count(*) FROM dr_events WHERE status = 'Pending'") == 0
    stalled = sum(v for k, v in stats.items() if k.startswith("stalled"))
    lost = sum(1 for e in started for event in e.events if str(event.get("event", "")).endswith("lease_lost"))
    assert await store.pool.fetchval("SELECT count(*) FROM job_runs WHERE status = 'running'") == 0
    abandoned = await store.pool.fetchval("SELECT count(*) FROM job_runs WHERE error LIKE 'the engine process%'")
    assert abandoned > 0
    statuses = Counter(r["subscription_job_run_status"] for r in records)
    print(f"\nsoak: {SOAK_SECONDS:.0f}s, {kills} kills, {len(records)} installments {dict(statuses)}, "
          f"{len(ledger.orders)} orders, {len(lines)} fulfillment lines, {ledger.count_requests()} requests: "
          f"{ledger.count_requests(status=500)} 500s, {ledger.count_requests(status=429)} 429s, "
          f"{ledger.count_requests(status=0)} unanswered, {len(ledger.dropped_orders)} dropped after the order, "
          f"{abandoned} runs abandoned by killed processes, {stalled} leased rows locked past their lease "
          f"({dict(stats)}), {lost} lease_lost lines, {outages} database outages of {OUTAGE_SECONDS}s, "
          f"duplicates: {len(ledger.duplicate_upstream_ids())}")
