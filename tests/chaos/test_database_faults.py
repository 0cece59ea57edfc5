"""Database faults: PostgreSQL crashes and restarts mid-run, and the engine's connections are killed.

The engine reconnects (the pool replaces dead connections; a crashed actor is restarted by its supervisor),
the run finishes or the next one picks the work up, and nobody is charged twice.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from engine.store import Store
from sandbox.server import Sandbox
from tests.db import crash, create_database, open_store, restart, wait_settled
from tests.integration.factories import due_subscription
from tests.ledger_checks import assert_charged_once
from tests.support import EngineProcess, readyz, sandbox_fixture, serving_env

SUBSCRIPTIONS = 150

sandbox = sandbox_fixture(seed=5, latency_ms=20)


@pytest.mark.timeout(300)
async def test_engine_rides_out_a_postgres_crash_and_restart(private_server: Any, sandbox: Sandbox) -> None:
    dsn = await create_database(private_server.get_uri("postgres"), "drjobs_crash")
    async with open_store(dsn, "seed", max_size=2) as store:
        for _ in range(SUBSCRIPTIONS):
            await due_subscription(store)

    async with EngineProcess(["serve"], serving_env(dsn, sandbox)) as engine:
        [listening] = await engine.wait_for("http_listening")
        await engine.wait_for("installment_charged", count=20, timeout=90)
        await asyncio.to_thread(crash, private_server)
        status, body = await readyz(listening["port"])
        assert status == 503 and "database" in body["failing"]  # /readyz tells the truth meanwhile
        await asyncio.sleep(1)
        await asyncio.to_thread(restart, private_server)
        await wait_settled(dsn, SUBSCRIPTIONS, timeout=120)
        status, body = await readyz(listening["port"])
        assert status == 200, body
        engine.signal(signal.SIGTERM)
        assert await engine.wait() == 0, engine.stderr[-3000:]
    assert engine.find("actor_crashed") or engine.find("installment_crashed") or engine.find("job_run_crashed")
    await assert_charged_once(dsn, sandbox, records=SUBSCRIPTIONS, successful=SUBSCRIPTIONS)


@pytest.mark.timeout(300)
async def test_engine_reconnects_after_its_connections_are_killed(database_url: str, store: Store,
                                                                 sandbox: Sandbox) -> None:
    for _ in range(SUBSCRIPTIONS):
        await due_subscription(store)
    async with EngineProcess(["serve"], serving_env(database_url, sandbox)) as engine:
        await engine.wait_for("installment_charged", count=20, timeout=90)
        killed = 0
        for _ in range(3):
            killed += await store.pool.fetchval(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE 'drjobs:%' AND application_name <> 'drjobs:test-node') t")
            await asyncio.sleep(1)
        assert killed > 0
        await wait_settled(database_url, SUBSCRIPTIONS, timeout=120)
        engine.signal(signal.SIGTERM)
        assert await engine.wait() == 0, engine.stderr[-3000:]
    await assert_charged_once(database_url, sandbox, records=SUBSCRIPTIONS, successful=SUBSCRIPTIONS)
