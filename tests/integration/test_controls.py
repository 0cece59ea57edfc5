"""Operator controls: pause/resume across engine processes, retry rules, and the audit trail."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest

from engine.store import Store
from sandbox.server import Sandbox
from tests.integration.factories import due_subscription, process_records, subscription
from tests.support import EngineProcess, engine_env, run_command, sandbox_fixture

sandbox = sandbox_fixture(seed=3)


async def test_paused_job_claims_nothing_on_any_process_until_resumed(database_url: str, store: Store,
                                                                      sandbox: Sandbox) -> None:
    for _ in range(3):
        await due_subscription(store)
    env = {"DR_API_URL": sandbox.url, "DRJOBS_OPERATOR": "ops-alice"}
    code, out, err = await run_command(["pause", "subscription-installments"], engine_env(database_url, **env))
    assert code == 0 and "paused" in out, err
    schedules = {"SUBSCRIPTION_INSTALLMENTS_SCHEDULE": "every 1s", "RECURRING_PAYMENTS_SCHEDULE": "every 1s"}
    engines = [EngineProcess(["serve"], engine_env(database_url, NODE_NAME=f"e{i}", **env, **schedules))
               for i in range(2)]
    for engine in engines:
        await engine.start()
    try:
        for engine in engines:
            await engine.wait_for("job_paused_run_skipped", count=2, job="subscription-installments")
        assert await store.pool.fetchval("SELECT count(*) FROM subscription_process_data") == 0
        code, out, err = await run_command(["status", "--json"], engine_env(database_url))
        installments = next(j for j in json.loads(out)["jobs"] if j["job"] == "subscription-installments")
        assert installments["paused"] and installments["paused_by"] == "ops-alice"

        code, _, err = await run_command(["resume", "subscription-installments"], engine_env(database_url, **env))
        assert code == 0, err

        async def charged() -> int:
            return int(await store.pool.fetchval(
                "SELECT count(*) FROM subscription_process_data WHERE subscription_job_run_status = 'Successful'"))

        async def until_all_charged() -> None:
            while await charged() < 3:
                await asyncio.sleep(0.2)

        await asyncio.wait_for(until_all_charged(), 60)
    finally:
        for engine in engines:
            engine.signal(signal.SIGTERM)
        for engine in engines:
            await engine.wait()
    audit = [r["message"] for r in await store.pool.fetch(
        "SELECT message FROM application_logs WHERE module_name = 'operator' ORDER BY id")]
    assert audit == ["subscription-installments paused by ops-alice", "subscription-installments resumed by ops-alice"]


async def test_run_of_a_paused_job_is_refused_and_drain_leaves_its_records(database_url: str, store: Store,
                                                                          sandbox: Sandbox) -> None:
    await due_subscription(store)
    env = engine_env(database_url, DR_API_URL=sandbox.url)
    assert (await run_command(["pause", "subscription-installments"], env))[0] == 0
    code, _, _ = await run_command(["run", "subscription-installments"], env)
    assert code == 1
    code, _, err = await run_command(["drain"], env)
    assert code == 0, err
    assert await store.pool.fetchval("SELECT count(*) FROM subscription_process_data") == 0


async def failed_record(store: Store, **columns: object) -> int:
    [record] = await process_records(store, await subscription(store), 1, subscription_job_run_status="Failed",
                                     subscription_retry_count=4, **columns)
    return record


async def test_retry_puts_a_failed_installment_back_to_open_with_counts_reset(database_url: str,
                                                                             store: Store) -> None:
    record = await failed_record(store, outage_count=3)
    code, _, err = await run_command(["retry", "installment", str(record)],
                                       engine_env(database_url, DRJOBS_OPERATOR="ops-bob"))
    assert code == 0, err
    row = await store.pool.fetchrow("SELECT * FROM subscription_process_data WHERE id = $1", record)
    assert (row["subscription_job_run_status"], row["subscription_retry_count"], row["outage_count"]) == ("Open", 0, 0)
    audit = await store.pool.fetchval("SELECT message FROM application_logs WHERE record_id = $1", str(record))
    assert audit == f"installment {record} retried by ops-bob (was Failed)"


async def test_retry_is_refused_while_the_record_is_claimed(database_url: str, store: Store) -> None:
    record = await failed_record(store, locked_by="node-x")
    await store.pool.execute("UPDATE subscription_process_data SET locked_until = now() + interval '5 minutes'")
    code, _, err = await run_command(["retry", "installment", str(record)], engine_env(database_url))
    assert code == 1 and "claimed" in err
    status = await store.pool.fetchval("SELECT subscription_job_run_status FROM subscription_process_data")
    assert status == "Failed"


async def test_retry_is_refused_for_an_installment_that_has_a_digital_river_order(database_url: str,
                                                                                 store: Store) -> None:
    record = await failed_record(store, dr_order_id="ord_123")
    code, _, err = await run_command(["retry", "installment", str(record)], engine_env(database_url))
    assert code == 1 and "ord_123" in err and "charge twice" in err


async def test_retry_is_refused_for_a_record_that_has_not_failed(database_url: str, store: Store) -> None:
    [record] = await process_records(store, await subscription(store), 1)
    code, _, err = await run_command(["retry", "installment", str(record)], engine_env(database_url))
    assert code == 1 and "only Failed records" in err
    code, _, err = await run_command(["retry", "installment", "999999"], engine_env(database_url))
    assert code == 1 and "no installment record 999999" in err


async def test_retry_puts_failed_fulfillments_back_to_open(database_url: str, store: Store) -> None:
    async with store.pool.acquire() as conn:
        account = await conn.fetchval("INSERT INTO accounts (name) VALUES ('a') RETURNING id")
        order = await conn.fetchval("INSERT INTO orders (account_id, dr_order_id) VALUES ($1, 'o1') RETURNING id",
                                    account)
        item = await conn.fetchval("INSERT INTO order_items (order_id, quantity) VALUES ($1, 2) RETURNING id", order)
        fulfillment = await conn.fetchval(
            "INSERT INTO fulfillments (order_id, efn_status, retry_count) VALUES ($1, 'Failed', 6) RETURNING id", order)
        line = await conn.fetchval(
            "INSERT INTO line_item_fulfillments (fulfillment_id, order_item_id, fulfill_quantity, efn_status, "
            "retry_count) VALUES ($1, $2, 1, 'Failed', 6) RETURNING id", fulfillment, item)
    for kind, record in (("fulfillment", fulfillment), ("line-item", line)):
        code, _, err = await run_command(["retry", kind, str(record)], engine_env(database_url))
        assert code == 0, err
    assert await store.pool.fetchval("SELECT efn_status || retry_count FROM fulfillments") == "Open0"
    assert await store.pool.fetchval("SELECT efn_status || retry_count FROM line_item_fulfillments") == "Open0"


@pytest.mark.parametrize(("args", "expected"), [
    (["retry", "payment", "1"], "unknown record kind 'payment'"),
    (["retry", "installment", "abc"], "record id 'abc' is not a positive whole number"),
    (["retry", "installment"], "retry takes KIND and ID"),
    (["pause", "everything"], "unknown job 'everything'"),
    (["resume"], "resume takes exactly one JOB"),
])
async def test_bad_control_commands_exit_2_with_one_line(database_url: str, args: list[str], expected: str) -> None:
    code, _, err = await run_command(args, engine_env(database_url))
    assert code == 2 and expected in err and err.count("\n") == 1
