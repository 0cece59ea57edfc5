"""Secrets: the whole pipeline with a recognisable key, every error path on, and the key nowhere.

Real `python run.py` processes (drain, run, status) against an in-test sandbox that accepts exactly that key,
with APP_LOG_LEVEL=DEBUG and LOG_LEVEL=debug so that everything that can be logged is: 500s on checkouts,
a soft decline, a 400, then a second key Digital River refuses (401). Afterwards the key (and the refused
one) must appear in no line the processes printed, in no row of any table (exception texts, messages, request
and response bodies included), and `Authorization` must never have been logged. /metrics is covered with the
HTTP surface elsewhere. The web console's pages get the same treatment, with DR_WEBHOOK_SECRET and ADMIN_TOKEN set
too, in `test_no_console_page_shows_a_secret`.
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


ADMIN = "CANARY_admin_token_5e6f7a8b9c0d1e2f"
WEBHOOK = "whsec_CANARY_webhook_3c4d5e6f7a8b9c"
CONSOLE_MARKS = (*MARKS, ADMIN, WEBHOOK, ADMIN[7:], WEBHOOK[13:])


async def test_no_console_page_shows_a_secret(database_url: str, store: Store, sandbox: Sandbox) -> None:
    """A `serve` process with all three secrets set (DR_API_KEY, DR_WEBHOOK_SECRET, ADMIN_TOKEN) charges and fails
    records through the sandbox; a record's message is then made to hold all three (as a bug might store them).
    No console page, signed out or signed in, shows any of them, nor does the session cookie or a log line."""
    import re
    import signal

    import aiohttp

    from tests.support import EngineProcess

    await due_subscription(store)
    await due_subscription(store, source="src_hard_decline_fraud")
    env = env_for(database_url, sandbox) | {
        "DR_WEBHOOK_SECRET": WEBHOOK, "ADMIN_TOKEN": ADMIN, "SUBSCRIPTION_INSTALLMENTS_SCHEDULE": "every 1s",
        "RECURRING_PAYMENTS_SCHEDULE": "every 1s", "LOG_LEVEL": "info"}
    seen: list[tuple[str, str]] = []  # (what, text)
    async with EngineProcess(["serve"], env) as engine:
        [listening] = await engine.wait_for("http_listening")
        await engine.wait_for("installment_charged", timeout=60)
        await engine.wait_for("installment_failed", timeout=60)
        failed = await store.pool.fetchval(
            "SELECT id FROM subscription_process_data WHERE subscription_job_run_status = 'Failed'")
        await store.pool.execute(
            "UPDATE subscription_process_data SET last_error_message = $2 WHERE id = $1", failed,
            f"leaked {KEY} {WEBHOOK} {ADMIN} by a bug")
        base = f"http://127.0.0.1:{listening['port']}"
        paths = ["/", "/backlog", "/failures", "/failures?job=recurring-payments&code=fraud", "/digital-river",
                 "/processes", "/login", f"/records/installment/{failed}", f"/failures?code={ADMIN}"]
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            for signed_in in (False, True):
                if signed_in:
                    async with http.post(base + "/login", data={"token": ADMIN, "next": "/"},
                                         headers={"Origin": base}) as response:
                        assert response.status == 200 and "signed in" in await response.text()
                        cookie = response.history[0].headers["Set-Cookie"]
                        seen.append(("Set-Cookie", cookie))
                for path in paths:
                    async with http.get(base + path) as response:
                        assert response.status == 200, path
                        seen.append((path, await response.text() + str(response.headers)))
            page = dict(seen)[f"/records/installment/{failed}"]
            assert "leaked [redacted] [redacted] [redacted] by a bug" in page
            csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
            assert csrf
            async with http.post(base + "/actions/retry", data={"kind": "installment", "id": str(failed),
                                                               "csrf": csrf.group(1)},
                                 headers={"Origin": base}) as response:
                assert response.status == 200
                seen.append(("retry", await response.text()))
        engine.signal(signal.SIGTERM)
        await engine.wait()
    seen += [("log", line) for line in engine.other_lines + [str(e) for e in engine.events]]
    seen += [("stderr", engine.stderr)]
    assert any(e["event"] == "console_signed_in" for e in engine.events)
    for what, text in seen:
        for mark in CONSOLE_MARKS:
            assert mark not in text, f"{what}: {mark} in {text[:300]}"
    # The engine itself stored neither the admin token nor the webhook secret anywhere (the message planted above
    # aside).
    await store.pool.execute("UPDATE subscription_process_data SET last_error_message = 'planted' WHERE id = $1",
                             failed)
    tables = await dump_every_table(store)
    for table, rows in tables.items():
        for row in rows:
            for mark in (ADMIN, WEBHOOK, ADMIN[7:]):
                assert mark not in row, f"{table}: {row[:300]}"
