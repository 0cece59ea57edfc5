"""The engine as an operator runs it: real `python run.py` processes on a real database."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
from datetime import UTC, datetime, timedelta

import pytest

from actors import JOB_CLASSES
from engine.settings import JOBS
from engine.store import Store
from tests.support import EngineProcess, engine_env, run_command


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["launch"], {}, "unknown command 'launch'; expected one of: serve, migrate, run, drain, status"),
    (["run"], {}, "run takes exactly one JOB, one of: subscription-installments"),
    (["run", "payments"], {}, "unknown job 'payments'; expected one of: subscription-installments"),
    (["status", "--yaml"], {}, "status takes only --json"),
    (["serve"], {"LEASE_SECONDS": "soon"}, "bad setting LEASE_SECONDS='soon': expected a whole number from 5"),
    (["serve"], {"RECURRING_PAYMENTS_SCHEDULE": "0 0 * * *"}, "bad setting RECURRING_PAYMENTS_SCHEDULE="),
    (["drain"], {"DR_API_KEY": ""}, "bad setting DR_API_KEY=unset"),
])
async def test_bad_input_is_one_line_exit_2_and_nothing_written(database_url: str, store: Store, args: list[str],
                                                                 env: dict[str, str], expected: str) -> None:
    code, out, err = await run_command(args, engine_env(database_url, **env))
    assert code == 2
    assert err.count("\n") == 1 and expected in err, err
    assert out == ""
    assert await store.pool.fetchval("SELECT count(*) FROM engine_nodes") == 0
    assert await store.pool.fetchval("SELECT count(*) FROM job_runs") == 0


async def test_migrate_can_run_again_and_again(database_url: str) -> None:
    for _ in range(2):
        code, _, err = await run_command(["migrate"], engine_env(database_url))
        assert code == 0, err


async def test_status_lists_the_five_jobs_in_text_and_json(database_url: str, store: Store) -> None:
    await store.pool.execute("INSERT INTO job_runs (job, fire_time, node, status, claimed, succeeded, finished_at) "
                             "VALUES ('log-cleanup', now(), 'n1', 'succeeded', 4, 4, now())")
    code, out, err = await run_command(["status"], engine_env(database_url))
    assert code == 0, err
    for job in JOBS:
        assert job in out
    code, out, err = await run_command(["status", "--json"], engine_env(database_url))
    assert code == 0, err
    data = json.loads(out)
    assert [j["job"] for j in data["jobs"]] == list(JOBS)
    cleanup = next(j for j in data["jobs"] if j["job"] == "log-cleanup")
    assert cleanup["schedule"] == "off"  # the test environment turns schedules off
    assert cleanup["last_run"]["claimed"] == 4 and cleanup["last_run"]["node"] == "n1"


async def test_two_engines_run_every_tick_exactly_once(database_url: str, store: Store) -> None:
    env = {"LOG_CLEANUP_SCHEDULE": "every 1s"}
    engines = [EngineProcess(["serve"], engine_env(database_url, NODE_NAME=f"engine-{i}", **env)) for i in range(2)]
    for engine in engines:
        await engine.start()
    try:
        for engine in engines:
            await engine.wait_for("job_run_finished", count=2, timeout=60)
        await asyncio.sleep(4)
    finally:
        for engine in engines:
            engine.signal(signal.SIGTERM)
        codes = [await engine.wait() for engine in engines]
    assert codes == [0, 0], [e.stderr for e in engines]
    rows = await store.pool.fetch("SELECT fire_time, node, status FROM job_runs WHERE job = 'log-cleanup' "
                                  "ORDER BY fire_time")
    ticks = [r["fire_time"] for r in rows]
    # Every second between the first and the last tick has exactly one run…
    assert len(ticks) >= 5
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(ticks))
    assert all(r["status"] == "succeeded" for r in rows)
    # …and each tick was offered on both processes: one ran it, the other found it taken.
    started = sum(len(e.find("job_run_started", job="log-cleanup")) for e in engines)
    taken = sum(len(e.find("job_tick_taken_elsewhere", job="log-cleanup")) for e in engines)
    assert started == len(ticks)
    assert taken >= len(ticks) - 2  # the first and last tick may fall outside one process's lifetime
    assert {r["node"] for r in rows} <= {"engine-0", "engine-1"}


async def test_sigterm_stops_gracefully_and_marks_the_node_stopped(database_url: str, store: Store) -> None:
    async with EngineProcess(["serve"], engine_env(database_url, NODE_NAME="graceful")) as engine:
        await engine.wait_for("engine_started")
        engine.signal(signal.SIGTERM)
        assert await engine.wait() == 0, engine.stderr
    assert engine.find("engine_stopped", clean=True)
    node = await store.pool.fetchrow("SELECT stopped_at FROM engine_nodes WHERE name = 'graceful'")
    assert node["stopped_at"] is not None


async def test_runs_of_a_killed_engine_are_marked_failed_by_a_live_one(database_url: str, store: Store) -> None:
    await store.pool.execute(
        "INSERT INTO engine_nodes (name, heartbeat_at) VALUES ('dead', now() - interval '10 minutes');"
        "INSERT INTO job_runs (job, fire_time, node, status) VALUES ('log-cleanup', now(), 'dead', 'running')")
    async with EngineProcess(["serve"], engine_env(database_url)) as engine:
        await engine.wait_for("job_run_abandoned", node="dead")
        engine.signal(signal.SIGTERM)
        assert await engine.wait() == 0
    row = await store.pool.fetchrow("SELECT status, error FROM job_runs WHERE node = 'dead'")
    assert row["status"] == "failed" and "stopped" in row["error"]


async def test_serve_on_the_embedded_default_logs_next_fire_times_and_stops_on_ctrl_c(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = engine_env(None, DATA_DIR=str(tmp_path / "data"))
    for job in JOBS:
        env.pop(f"{job.upper().replace('-', '_')}_SCHEDULE")
    async with EngineProcess([], env) as engine:
        await engine.wait_for("engine_started", timeout=90)
        for job in JOB_CLASSES:
            [line] = await engine.wait_for("job_next_fire", job=job)
            assert line["next_fire_time"] and line["schedule"]
        engine.signal(signal.SIGINT)
        assert await engine.wait() == 0, engine.stderr
    assert (tmp_path / "data" / "pg").is_dir()


async def test_status_shows_records_by_status_oldest_due_age_and_live_nodes(database_url: str, store: Store) -> None:
    from tests.integration.factories import process_records, subscription

    sub = await subscription(store)
    await process_records(store, sub, 2, next_attempt_at=datetime.now(UTC) - timedelta(minutes=10))
    await store.pool.execute("UPDATE subscription_process_data SET subscription_job_run_status = 'Failed' "
                             "WHERE installment_number = 2")
    await store.pool.execute("INSERT INTO engine_nodes (name, heartbeat_at) VALUES ('alive-node', now()), "
                             "('dead-node', now() - interval '1 hour')")
    code, out, err = await run_command(["status", "--json"], engine_env(database_url))
    assert code == 0, err
    data = json.loads(out)
    assert data["records"]["subscription_process_data"] == {"Failed": 1, "Open": 1}
    payments = next(j for j in data["jobs"] if j["job"] == "recurring-payments")
    assert 590 < payments["oldest_due_seconds"] < 900
    assert {n["name"]: n["live"] for n in data["nodes"]} == {"alive-node": True, "dead-node": False}
    code, text, _ = await run_command(["status"], engine_env(database_url))
    assert "oldest due record waiting 10m" in text and "alive-node" in text


async def test_status_json_is_only_json_and_logs_go_to_stderr(pg_server_dsn: str) -> None:
    from tests.db import admin, drop_database, with_database

    name = "drjobs_status_fresh"
    await admin(pg_server_dsn, f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"')
    env = engine_env(with_database(pg_server_dsn, name), LOG_LEVEL="debug")
    try:
        code, _, err = await run_command(["migrate"], env)
        assert code == 0, err
        code, out, err = await run_command(["status", "--json"], env)
    finally:
        await drop_database(pg_server_dsn, name)
    assert code == 0, err
    assert [j["job"] for j in json.loads(out)["jobs"]] == list(JOBS)  # any log went to stderr
