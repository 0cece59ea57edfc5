"""log-cleanup deletes exactly the application_logs rows older than APP_LOG_RETENTION_DAYS, in small batches."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from actors import build_jobs
from actors.log_cleanup import LogCleanup
from engine.app import Engine
from engine.logs import install_app_log
from engine.settings import load
from engine.store import Store
from tests.support import engine_env, run_command


async def insert_logs(store: Store, ages: list[timedelta]) -> None:
    now = datetime.now(UTC)
    await store.pool.executemany(
        "INSERT INTO application_logs (created_at, message) VALUES ($1, $2)",
        [(now - age, f"age {age}") for age in ages])


async def test_deletes_exactly_the_rows_older_than_retention(store: Store, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(LogCleanup, "batch_size", 100)  # several batches
    old = [timedelta(days=30, minutes=1)] * 250 + [timedelta(days=400)]
    young = [timedelta(days=29, hours=23), timedelta(days=1), timedelta(seconds=1), timedelta(days=29, minutes=58)]
    await insert_logs(store, old + young)
    settings = load({"DR_API_KEY": "sk_test_x1234", "APP_LOG_RETENTION_DAYS": "30"}, command="run",
                    is_terminal=False)
    engine = Engine(settings, store, build_jobs)
    try:
        assert await engine.jobs["log-cleanup"].due_count() == len(old)
        assert await engine.run_job("log-cleanup") == 0
    finally:
        install_app_log(None)
    left = await store.pool.fetch("SELECT created_at FROM application_logs")
    assert len(left) == len(young)
    cutoff = datetime.now(UTC) - timedelta(days=30)
    assert all(r["created_at"] > cutoff for r in left)
    run = await store.pool.fetchrow("SELECT status, claimed, succeeded, failed FROM job_runs WHERE job = 'log-cleanup'")
    assert dict(run) == {"status": "succeeded", "claimed": len(old), "succeeded": len(old), "failed": 0}


async def test_retention_setting_moves_the_cutoff(database_url: str, store: Store) -> None:
    await insert_logs(store, [timedelta(days=3), timedelta(days=8)])
    code, _, err = await run_command(["run", "log-cleanup"], engine_env(database_url, APP_LOG_RETENTION_DAYS="7"))
    assert code == 0, err
    assert await store.pool.fetchval("SELECT count(*) FROM application_logs") == 1


async def test_batches_do_not_wait_on_rows_locked_elsewhere(store: Store, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A row locked by another transaction is skipped, not waited for: cleanup never queues behind a lock."""
    await insert_logs(store, [timedelta(days=90)] * 3)
    settings = load({"DR_API_KEY": "sk_test_x1234"}, command="run", is_terminal=False)
    engine = Engine(settings, store, build_jobs)
    async with store.pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT id FROM application_logs ORDER BY id LIMIT 1 FOR UPDATE")
        try:
            assert await asyncio.wait_for(engine.run_job("log-cleanup"), 10) == 0
        finally:
            install_app_log(None)
    assert await store.pool.fetchval("SELECT count(*) FROM application_logs") == 1
