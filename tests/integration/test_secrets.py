"""Secrets: the whole pipeline with a recognisable key, every error path on, and the key nowhere.

Real `python run.py` processes (drain, run, status) against an in-test sandbox that accepts exactly that key,
with APP_LOG_LEVEL=DEBUG and LOG_LEVEL=debug so that everything that can be logged is: 500s on checkouts,
a soft decline, a 400, then a second key Digital River refuses (401). Afterwards the key (and the refused
one) must appear in no line the processes printed, in no row of any table (exception texts, messages, request
and response bodies included), and `Authorization` must never have been logged. /metrics is covered with the
HTTP surface elsewhere.
"""

from __future__ import annotations

import json

from engine.store import Store
from sandbox.server import Sandbox
from tests.integration.factories import due_subscription
from tests.support import engine_env, run_command, sandbox_fixture

KEY = "sk_test_CANARY_secret_7f3e9a1c5b2d4e6f"
WRONG_KEY = "sk_test_CANARY_refused_0a9b8c7d6e5f"
MARKS = ("CANARY", KEY, WRONG_KEY, KEY[8:], WRONG_KEY[8:])


sandbox = sandbox_fixture(api_key=KEY, seed=3)


def env_for(database_url: str, sandbox: Sandbox, key: str = KEY) -> dict[str, str]:
    return engine_env(database_url, DR_API_KEY=key, DR_API_URL=sandbox.url, APP_LOG_LEVEL="DEBUG",
                      LOG_LEVEL="debug", DR_MAX_REQUESTS_PER_SECOND="1000")


async def dump_every_table(store: Store) -> dict[str, list[str]]:
    """Every row of every table of the store, each as PostgreSQL's text of the whole row."""
    tables = [r["tablename"] for r in await store.pool.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")]
    return {t: [r["row"] for r in await store.pool.fetch(f'SELECT t::text AS row FROM "{t}" t')] for t in tables}


async def test_the_key_is_in_no_log_line_no_table_and_no_exception_text(database_url: str, store: Store,
                                                                        sandbox: Sandbox) -> None:
    good = await due_subscription(store)
    declined = await due_subscription(store, source="src_soft_decline_insufficient_funds")
    refused = await due_subscription(store, product={"dr_sku_id": "sku_invalid_retired"})
    outputs: list[tuple[str, str, str]] = []  # (command, stdout, stderr)

    async def run(args: list[str], key: str = KEY) -> int:
        code, out, err = await run_command(args, env_for(database_url, sandbox, key), timeout=60)
        outputs.append((" ".join(args), out, err))
        return code

    # 1. Every checkout answered 500, retries and all: outages, logged with their responses.
    sandbox.configure(error_rate=1.0, fault_endpoints=["POST /checkouts"])
    assert await run(["drain"]) == 0
    # 2. Digital River back: one charged, one declined (409), one refused (400).
    sandbox.configure(error_rate=0.0)
    await store.pool.execute("UPDATE subscription_process_data SET next_attempt_at = now()")
    assert await run(["drain"]) == 0
    # 3. A key Digital River refuses (401): the run stops and says so.
    late = await due_subscription(store)
    assert await run(["run", "subscription-installments"], WRONG_KEY) == 0
    assert await run(["run", "recurring-payments"], WRONG_KEY) == 1
    assert await run(["status", "--json"]) == 0

    # The error paths did run (otherwise this test proves nothing).
    statuses = {r["subscription_id"]: r["subscription_job_run_status"] for r in await store.pool.fetch(
        "SELECT subscription_id, subscription_job_run_status FROM subscription_process_data")}
    assert statuses == {good: "Successful", declined: "Open", refused: "Failed", late: "Open"}
    logged = {r["response_status_code"] for r in await store.pool.fetch(
        "SELECT DISTINCT response_status_code FROM application_logs")}
    assert {500, 409, 400} <= logged, logged
    assert await store.pool.fetchval(
        "SELECT count(*) FROM job_runs WHERE status = 'failed' AND error LIKE '%refused the API key%'") == 1
    assert sandbox.ledger.count_requests(status=401) >= 1 and sandbox.ledger.count_requests(status=500) >= 4

    # No printed line holds the key, the refused key or the Authorization header.
    lines = [(command, line) for command, out, err in outputs for line in (out + err).splitlines()]
    assert any('"event": "dr_request"' in line for _, line in lines)  # debug logging was on
    for command, line in lines:
        for mark in MARKS:
            assert mark not in line, f"{command}: {line}"
        assert "authorization" not in line.lower() and "bearer" not in line.lower(), f"{command}: {line}"

    # No row of any table holds them: exception texts, error messages, request and response bodies included.
    tables = await dump_every_table(store)
    assert tables["application_logs"] and tables["job_runs"]
    for table, rows in tables.items():
        for row in rows:
            for mark in MARKS:
                assert mark not in row, f"{table}: {row[:300]}"
            assert "bearer" not in row.lower(), f"{table}: {row[:300]}"
    for row in await store.pool.fetch("SELECT request, response FROM application_logs"):
        for body in (row["request"], row["response"]):
            assert "authorization" not in json.dumps(body).lower()
