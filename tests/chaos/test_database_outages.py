"""Long database outages: PostgreSQL is down for a minute and a half (or twice in quick succession) under a real
engine process.

`serve` waits the outage out: a crash that only says the database cannot be reached does not spend an actor's
restart budget, /readyz says the database is failing meanwhile, application-log rows are kept until they can be
written, and once PostgreSQL is back every installment is charged exactly once. `drain` cannot wait: it ends with
exit code 1 and one `drain_stopped` line saying why (no traceback), and the next `drain` finishes the work.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

import pytest

from sandbox.server import Sandbox
from tests.db import connection, crash, create_database, open_store, restart, status_counts, wait_settled
from tests.integration.factories import due_subscription
from tests.ledger_checks import assert_charged_once
from tests.support import EngineProcess, healthz, readyz, run_command, sandbox_fixture, serving_env

SUBSCRIPTIONS = 150
OUTAGE_SECONDS = 90.0
DATABASE_DOWN = "the database cannot be reached"
# Hard declines: records that end Failed with an ERROR application_logs row the charge writes itself.
DECLINE_SOURCE = "src_hard_decline_fraud"

sandbox = sandbox_fixture(seed=7, latency_ms=20)


async def seeded_database(server: Any, name: str, *, declines: Collection[int] = ()) -> tuple[str, list[int]]:
    """A fresh, migrated database on `server` with SUBSCRIPTIONS due subscriptions; the ones whose index is in
    `declines` pay with a hard-declining source. Returns (dsn, ids of the declining subscriptions)."""
    dsn = await create_database(server.get_uri("postgres"), name)
    declining = []
    async with open_store(dsn, "seed", max_size=2) as store:
        for index in range(SUBSCRIPTIONS):
            if index in declines:
                declining.append(await due_subscription(store, source=DECLINE_SOURCE))
            else:
                await due_subscription(store)
    return dsn, declining


async def assert_charged_once_but_declines(dsn: str, sandbox: Sandbox, declining_subscriptions: Sequence[int] = ()
                                           ) -> None:
    """One sandbox order per charged record, the one the record names; none for a declined record, which is
    Failed."""
    records = await assert_charged_once(dsn, sandbox, records=SUBSCRIPTIONS,
                                        successful=SUBSCRIPTIONS - len(declining_subscriptions))
    for rec in records:
        if rec["subscription_id"] in declining_subscriptions:
            assert rec["subscription_job_run_status"] == "Failed" and rec["dr_order_id"] is None, rec
        else:
            assert rec["subscription_job_run_status"] == "Successful", rec


async def poll_readyz(port: int, want: int, timeout: float = 20) -> dict[str, Any]:
    """/readyz until it answers `want` (the last body otherwise, for the assertion message)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = await readyz(port)
        if status == want or time.monotonic() > deadline:
            assert status == want, body
            return body
        await asyncio.sleep(0.5)


def forwarded_warnings(engine: EngineProcess) -> Counter[str]:
    """How many WARN/ERROR lines the engine logged per event name, for the events that the application log copies
    (the installment outcome lines are left out: their rows are written by the charge itself, or not at all when
    the caller said `app_logged`)."""
    return Counter(e["event"] for e in engine.events
                   if e.get("level") in ("warning", "error") and not e["event"].startswith("installment_"))


@pytest.mark.timeout(400)
async def test_serve_rides_out_a_90_second_outage(private_server: Any, sandbox: Sandbox) -> None:
    declines = set(range(3, SUBSCRIPTIONS, 17))  # 9 records, spread over the run (before, during, after)
    dsn, declining = await seeded_database(private_server, "drjobs_outage_90", declines=declines)
    env = serving_env(dsn, sandbox, APP_LOG_LEVEL="WARN")
    begun = time.monotonic()
    async with EngineProcess(["serve"], env) as engine:
        [listening] = await engine.wait_for("http_listening")
        port = listening["port"]
        await engine.wait_for("installment_charged", count=20, timeout=90)
        charged_before = len(engine.find("installment_charged"))
        failed_before = len(engine.find("installment_failed"))

        await asyncio.to_thread(crash, private_server)
        down = time.monotonic()
        status, body = await readyz(port)
        assert status == 503 and "database" in body["failing"], body  # /readyz tells the truth at once

        await asyncio.sleep(OUTAGE_SECONDS / 2)
        assert engine.proc is not None and engine.proc.returncode is None, engine.stderr
        status, body = await readyz(port)
        assert status == 503 and "database" in body["failing"], body
        assert await healthz(port) == 200  # alive, only not ready
        await asyncio.sleep(OUTAGE_SECONDS - (time.monotonic() - down))
        assert engine.proc.returncode is None
        await asyncio.to_thread(restart, private_server)
        outage = time.monotonic() - down

        settled = await wait_settled(dsn, SUBSCRIPTIONS - len(declining), len(declining))
        await poll_readyz(port, 200)
        engine.signal(signal.SIGTERM)
        assert await engine.wait() == 0, engine.stderr[-3000:]
    total = time.monotonic() - begun
    print(f"\n[90s outage] charged before crash={charged_before} failed before={failed_before} "
          f"outage={outage:.1f}s settled {settled:.1f}s after restart, total {total:.1f}s; "
          f"waiting_for_database={len(engine.find('actor_waiting_for_database'))} "
          f"resumed={len(engine.find('actor_resumed_after_outage'))} "
          f"log_write_failed={len(engine.find('application_log_write_failed'))}")

    await assert_charged_once_but_declines(dsn, sandbox, declining)
    assert not engine.find("actor_restart_budget_spent")
    assert engine.find("actor_waiting_for_database")
    assert engine.find("actor_resumed_after_outage")
    assert not engine.find("application_log_row_refused")
    assert not engine.find("application_log_rows_dropped")
    # The application log kept what it could not write while the database was down.
    assert engine.find("application_log_write_failed")

    async with connection(dsn) as conn:
        declined_records = {str(r["id"]) for r in await conn.fetch(
            "SELECT id FROM subscription_process_data WHERE subscription_id = ANY($1::bigint[])", declining)}
        rows = await conn.fetch("SELECT record_id, logging_level, message FROM application_logs")

    # Every hard decline logged one installment_failed line and wrote one ERROR row, none lost to the outage.
    failed_lines = Counter(str(e["record_id"]) for e in engine.find("installment_failed"))
    decline_rows = Counter(r["record_id"] for r in rows if r["message"].startswith("installment hard_decline"))
    assert set(failed_lines) == declined_records, (failed_lines, declined_records)
    assert decline_rows == failed_lines
    assert {r["logging_level"] for r in rows if r["message"].startswith("installment hard_decline")} == {"ERROR"}

    # And every WARN/ERROR line the engine copied into the application log is there, the outage's own included.
    copied = Counter(r["message"].split(" ", 1)[0] for r in rows)
    logged = forwarded_warnings(engine)
    assert logged["actor_waiting_for_database"] > 0
    assert {event: copied[event] for event in logged} == dict(logged)


@pytest.mark.timeout(400)
async def test_serve_survives_two_short_outages_in_a_row(private_server: Any, sandbox: Sandbox) -> None:
    dsn, _ = await seeded_database(private_server, "drjobs_outage_twice")
    begun = time.monotonic()
    async with EngineProcess(["serve"], serving_env(dsn, sandbox)) as engine:
        [listening] = await engine.wait_for("http_listening")
        await engine.wait_for("installment_charged", count=20, timeout=90)
        for outage in range(2):
            await asyncio.to_thread(crash, private_server)
            await asyncio.sleep(10)
            assert engine.proc is not None and engine.proc.returncode is None, f"engine exited in outage {outage + 1}"
            await asyncio.to_thread(restart, private_server)
            if outage == 0:
                await asyncio.sleep(3)
        settled = await wait_settled(dsn, SUBSCRIPTIONS)
        assert engine.proc is not None and engine.proc.returncode is None
        await poll_readyz(listening["port"], 200)
        engine.signal(signal.SIGTERM)
        assert await engine.wait() == 0, engine.stderr[-3000:]
    print(f"\n[two outages] settled {settled:.1f}s after the second restart, total {time.monotonic() - begun:.1f}s; "
          f"waiting_for_database={len(engine.find('actor_waiting_for_database'))} "
          f"actor_crashed={len(engine.find('actor_crashed'))}")
    assert not engine.find("actor_restart_budget_spent")
    assert engine.find("actor_waiting_for_database")
    await assert_charged_once_but_declines(dsn, sandbox)


@pytest.mark.timeout(400)
async def test_drain_stops_with_one_line_when_the_database_goes(private_server: Any, sandbox: Sandbox) -> None:
    dsn, _ = await seeded_database(private_server, "drjobs_outage_drain")
    env = serving_env(dsn, sandbox, SUBSCRIPTION_INSTALLMENTS_SCHEDULE="off", RECURRING_PAYMENTS_SCHEDULE="off")
    async with EngineProcess(["drain"], env) as engine:
        await engine.wait_for("installment_charged", count=20, timeout=90)
        await asyncio.to_thread(crash, private_server)
        down = time.monotonic()
        code = await engine.wait(timeout=60)  # ends on its own, long before the database is back
        exited_after = time.monotonic() - down
    print(f"\n[drain] exited {code} {exited_after:.1f}s after the crash; "
          f"charged before={len(engine.find('installment_charged'))}")
    assert code == 1, engine.stderr[-3000:]
    stopped = engine.find("drain_stopped")
    assert len(stopped) == 1, stopped
    assert stopped[0]["reason"] == DATABASE_DOWN, stopped
    assert not [line for line in engine.other_lines if "Traceback" in line], engine.other_lines[:20]

    await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down)))
    await asyncio.to_thread(restart, private_server)
    started = time.monotonic()
    code, out, err = await run_command(["drain"], env, timeout=240)
    print(f"[drain] second drain exited {code} after {time.monotonic() - started:.1f}s")
    assert code == 0, err[-3000:] + out[-3000:]
    assert "Traceback" not in err
    assert (await status_counts(dsn)) == {"Successful": SUBSCRIPTIONS}
    await assert_charged_once_but_declines(dsn, sandbox)
    # Last, so everything above is checked first: the first drain said why in one line and printed no traceback.
    assert "Traceback" not in engine.stderr, engine.stderr[-6000:]
