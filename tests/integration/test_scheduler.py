"""The scheduler on a real database: missed ticks collapse into one run; ticks go to the job's inbox."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from actors import build_jobs
from engine.app import Engine
from engine.cron import parse_schedule
from engine.jobs import RunRequest
from engine.logs import install_app_log
from engine.scheduler import Scheduler
from engine.settings import load
from engine.store import Store
from tests.db import open_store


def engine_for(store: Store) -> Engine:
    settings = load({"DR_API_KEY": "sk_test_x1234"}, command="serve", is_terminal=False)
    engine = Engine(settings, store, build_jobs)
    install_app_log(None)
    return engine


async def test_missed_ticks_after_downtime_collapse_into_one_run(store: Store) -> None:
    engine = engine_for(store)
    job = engine.jobs["log-cleanup"]
    # The last tick anyone ran was three hours before "now"; 179 minute ticks were missed since.
    await store.pool.execute("INSERT INTO job_runs (job, fire_time, status) VALUES ('log-cleanup', $1, 'succeeded')",
                             datetime(2026, 11, 21, 7, 0, tzinfo=UTC))
    now = datetime(2026, 11, 21, 10, 0, 30, tzinfo=UTC)
    scheduler = Scheduler({"log-cleanup": job}, {"log-cleanup": parse_schedule("0 * * * * ?")}, store,
                          clock=lambda: now)
    await scheduler.on_start()
    assert job.inbox.qsize() == 1
    request = job.inbox.get_nowait()
    assert (request.fire_time, request.trigger) == (datetime(2026, 11, 21, 10, 0, tzinfo=UTC), "schedule")
    assert scheduler.next_fire["log-cleanup"] == datetime(2026, 11, 21, 10, 1, tzinfo=UTC)


async def test_a_first_start_does_not_run_old_ticks(store: Store) -> None:
    engine = engine_for(store)
    job = engine.jobs["log-cleanup"]
    now = datetime(2026, 11, 21, 10, 0, 30, tzinfo=UTC)
    scheduler = Scheduler({"log-cleanup": job}, {"log-cleanup": parse_schedule("0 * * * * ?")}, store,
                          clock=lambda: now)
    await scheduler.on_start()
    assert job.inbox.qsize() == 0
    assert scheduler.next_fire["log-cleanup"] == datetime(2026, 11, 21, 10, 1, tzinfo=UTC)


async def test_a_busy_job_skips_the_tick_instead_of_queueing_without_bound(store: Store) -> None:
    engine = engine_for(store)
    job = engine.jobs["log-cleanup"]
    await store.pool.execute("INSERT INTO job_runs (job, fire_time, status) VALUES ('log-cleanup', $1, 'succeeded')",
                             datetime(2026, 1, 1, tzinfo=UTC))
    now = datetime(2026, 11, 21, 10, 0, 30, tzinfo=UTC)
    scheduler = Scheduler({"log-cleanup": job}, {"log-cleanup": parse_schedule("every 1m")}, store,
                          clock=lambda: now)
    for _ in range(job.inbox_size + 3):
        scheduler._fire("log-cleanup", now)
    assert job.inbox.qsize() == job.inbox_size


async def test_a_tick_is_run_by_one_process_only(database_url: str, store: Store) -> None:
    first, second = engine_for(store), None
    async with open_store(database_url, "other-node", max_size=2) as other_store:
        second = engine_for(other_store)
        fire = datetime(2026, 11, 21, 0, 0, tzinfo=UTC)
        done = [asyncio.get_running_loop().create_future() for _ in range(2)]
        await asyncio.gather(
            first.jobs["log-cleanup"].handle(RunRequest(fire, "schedule", done[0])),
            second.jobs["log-cleanup"].handle(RunRequest(fire, "schedule", done[1])),
        )
        results = [d.result() for d in done]
    assert sorted(r is None for r in results) == [False, True]
    rows = await store.pool.fetch("SELECT node, status FROM job_runs WHERE job = 'log-cleanup'")
    assert len(rows) == 1 and rows[0]["status"] == "succeeded"
