"""The command line as an operator meets it: help, one-line database errors, read-only status, the cluster's
schedules and failure reasons in `status`, and `serve` refusing a misspelt setting."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pytest

from engine.node import NodeHeartbeat, published_settings
from engine.settings import JOBS, load
from engine.store import Store
from tests.db import admin, drop_database, fetchval, with_database
from tests.integration.factories import process_records, subscription
from tests.support import engine_env, run_command

CANARY_PASSWORD = "pw-canary-7f3a"


def _replace(dsn: str, *, user: str | None = None, password: str | None = None, database: str | None = None) -> str:
    """The test database's URL (TCP, or the embedded server's socket in `?host=`) as another user or database."""
    parts = urlsplit(dsn)
    netloc = (user or parts.username or "postgres") + (f":{password}" if password else "") + "@"
    if parts.hostname:
        netloc += f"{parts.hostname}:{parts.port or 5432}"
    return urlunsplit((parts.scheme, netloc, "/" + (database or parts.path.lstrip("/")), parts.query, ""))


def _expected_target(dsn: str) -> str:
    parts = urlsplit(dsn)
    host = parts.hostname or parse_qs(parts.query)["host"][0]
    return f"{host}:{parts.port or 5432}, database '{parts.path.lstrip('/')}', user '{parts.username}'"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_help_lists_commands_and_each_command_its_options_and_settings(tmp_path: Path) -> None:
    env = engine_env(None, DATA_DIR=str(tmp_path))
    code, out, err = await run_command(["--help"], env)
    assert code == 0 and err == ""
    for command in ("serve", "migrate", "run JOB", "drain", "status", "pause JOB", "retry KIND ID", "demo"):
        assert f"  {command}" in out, out
    code, out, _ = await run_command(["status", "--help"], env)
    assert code == 0 and "--json" in out and "DATABASE_URL" in out and "only reads" in out.lower().replace("\n", " ")
    code, out, _ = await run_command(["run", "--help"], env)
    assert code == 0 and all(job in out for job in JOBS) and "DR_API_KEY" in out
    code, out, _ = await run_command(["demo", "--help"], env)
    assert code == 0 and "--keep" in out and "--subscriptions" in out
    assert not (tmp_path / "pg").exists()


async def test_database_errors_are_one_line_naming_host_port_database_and_user(database_url: str) -> None:
    cases = [
        (f"postgresql://postgres:{CANARY_PASSWORD}@127.0.0.1:{_free_port()}/drjobs", "refused"),
        (_replace(database_url, user="drjobs_no_such_role", password=CANARY_PASSWORD), "drjobs_no_such_role"),
        (_replace(database_url, database="drjobs_no_such_database", password=CANARY_PASSWORD), "does not exist"),
    ]
    for dsn, reason in cases:
        for command in (["migrate"], ["status"]):
            code, out, err = await run_command(command, engine_env(dsn))
            assert code == 2, (command, dsn, err)
            assert err.count("\n") == 1 and "Traceback" not in err, err
            assert f"PostgreSQL at {_expected_target(dsn)}" in err and reason in err, err
            assert CANARY_PASSWORD not in err + out


async def test_status_on_a_database_without_the_schema_says_so_and_creates_nothing(pg_server_dsn: str) -> None:
    await admin(pg_server_dsn, 'DROP DATABASE IF EXISTS "drjobs_cli_empty" WITH (FORCE)',
                'CREATE DATABASE "drjobs_cli_empty"')
    dsn = with_database(pg_server_dsn, "drjobs_cli_empty")
    try:
        code, out, err = await run_command(["status"], engine_env(dsn))
        assert code == 2 and err.count("\n") == 1 and "no drjobs schema" in err and "migrate" in err, err
        assert out == ""
        tables = await fetchval(dsn, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert tables == 0
        code, _, err = await run_command(["status", "--json"], engine_env(dsn))
        assert code == 2 and "no drjobs schema" in err
    finally:
        await drop_database(pg_server_dsn, "drjobs_cli_empty")


async def test_status_without_a_database_url_or_an_embedded_database_makes_none(tmp_path: Path) -> None:
    code, _, err = await run_command(["status"], engine_env(None, DATA_DIR=str(tmp_path / "data")))
    assert code == 2 and err.count("\n") == 1 and "DATABASE_URL is unset" in err, err
    assert not (tmp_path / "data").exists()


async def test_serve_refuses_a_misspelt_setting_and_other_commands_warn(database_url: str) -> None:
    env = engine_env(database_url, DATABASE_ULR=database_url)
    code, out, err = await run_command(["serve"], env, timeout=30)
    assert code == 2 and err.count("\n") == 1, err
    assert "DATABASE_ULR" in err and "DATABASE_URL" in err
    code, out, err = await run_command(["migrate"], env)
    assert code == 0 and "setting_unknown" in out + err


async def test_status_shows_the_schedules_live_engines_report_not_the_shells(store: Store, database_url: str) -> None:
    # An engine with its own schedule for recurring-payments publishes it in engine_nodes.
    engine_settings = load({"DR_API_KEY": "sk_test_x", "RECURRING_PAYMENTS_SCHEDULE": "every 7m",
                            "RECURRING_PAYMENTS_CONCURRENCY": "5"}, command="serve", is_terminal=False)
    node = NodeHeartbeat(store, "test", published=published_settings(engine_settings, set(JOBS)))
    await node.beat()
    published = json.loads(await fetchval(store, "SELECT settings FROM engine_nodes WHERE name = $1", store.node))
    assert published["jobs"]["recurring-payments"] == {"schedule": "every 7m", "concurrency": 5,
                                                       "schedule_description": published["jobs"][
                                                           "recurring-payments"]["schedule_description"]}
    assert "sk_test_x" not in json.dumps(published)

    # The shell running `status` has the default schedule; status shows the engine's.
    code, out, err = await run_command(["status", "--json"], engine_env(database_url))
    assert code == 0, err
    jobs = {job["job"]: job for job in json.loads(out)["jobs"]}
    assert jobs["recurring-payments"]["schedule"] == "every 7m"
    assert jobs["recurring-payments"]["concurrency"] == 5
    assert jobs["recurring-payments"]["schedule_source"] == "engines"


async def test_status_with_no_live_engine_says_its_schedules_are_the_shells(database_url: str) -> None:
    code, out, err = await run_command(["status"], engine_env(database_url, RECURRING_PAYMENTS_SCHEDULE="every 9m"))
    assert code == 0, err
    assert "every 9m" in out and "schedule of this shell (no live engine)" in out


async def test_status_lists_the_top_failure_reasons_per_job(store: Store, database_url: str) -> None:
    sub = await subscription(store)
    records = await process_records(store, sub, 3, subscription_job_run_status="Failed")
    for record, code in zip(records, ("declined_hard", "declined_hard", "bad_data"), strict=True):
        await store.pool.execute("UPDATE subscription_process_data SET last_error_code = $2, "
                                 "last_error_message = $3 WHERE id = $1", record, code, f"because {code}")
    code, out, err = await run_command(["status", "--json"], engine_env(database_url))
    assert code == 0, err
    jobs = {job["job"]: job for job in json.loads(out)["jobs"]}
    assert [(f["reason"], f["count"]) for f in jobs["recurring-payments"]["failures"]] == [
        ("declined_hard", 2), ("bad_data", 1)]
    code, out, _ = await run_command(["status"], engine_env(database_url))
    assert "WHY RECORDS FAILED" in out and "declined_hard: because declined_hard" in out


async def _snapshot(store: Store) -> dict[str, tuple[int, object]]:
    """Every table's row count and newest updated_at: what a write of any kind would change."""
    snapshot: dict[str, tuple[int, object]] = {}
    for table in await store.pool.fetch("SELECT table_name FROM information_schema.tables "
                                        "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"):
        name = table["table_name"]
        has_updated = await store.pool.fetchval(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = $1 AND column_name = 'updated_at'",
            name)
        row = await store.pool.fetchrow(f'SELECT count(*), {"max(updated_at)" if has_updated else "NULL"} '
                                        f'FROM "{name}"')
        assert row is not None
        snapshot[name] = (row[0], row[1])
    return snapshot


@pytest.mark.parametrize("command", [["status"], ["status", "--json"]])
async def test_status_changes_nothing(store: Store, database_url: str, command: list[str]) -> None:
    sub = await subscription(store)
    await process_records(store, sub, 2)
    before = await _snapshot(store)
    code, _, err = await run_command(command, engine_env(database_url))
    assert code == 0, err
    assert await _snapshot(store) == before
    assert await fetchval(store, "SELECT count(*) FROM engine_nodes") == 0  # status registered no process
