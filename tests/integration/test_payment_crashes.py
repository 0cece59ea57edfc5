"""Exactly-once under crashes: real engine processes, SIGKILLed between every pair of steps of the protocol.

Each test seeds due subscriptions, runs `python run.py drain` with one failpoint set (the process kills itself
with SIGKILL there), then drains again without it. Whatever step the kill hit, every installment ends with
exactly one Digital River order (the sandbox's ledger) and `Successful` in the store.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from engine.store import Store
from sandbox.server import Sandbox
from tests.integration.factories import due_subscription
from tests.ledger_checks import assert_charged_once
from tests.support import EngineProcess, run_command, sandbox_env, sandbox_fixture

STEPS = ["after_claim", "after_checkout_created", "after_checkout_saved", "after_order_created",
         "after_order_saved"]

sandbox = sandbox_fixture(seed=11)


@pytest.mark.parametrize("step", STEPS)
async def test_kill_between_steps_leaves_exactly_one_order_per_installment(
        database_url: str, store: Store, sandbox: Sandbox, step: str) -> None:
    for _ in range(3):
        await due_subscription(store)
    code, _, err = await run_command(["drain"], sandbox_env(database_url, sandbox, DRJOBS_FAILPOINTS=step), timeout=90)
    assert code == -signal.SIGKILL, f"the failpoint {step} was never reached: {err}"
    code, _, err = await run_command(["drain"], sandbox_env(database_url, sandbox), timeout=90)
    assert code == 0, err
    await assert_charged_once(store, sandbox, records=3, successful=3)


async def test_kill_in_the_middle_of_a_busy_run_charges_nobody_twice(database_url: str, store: Store,
                                                                   sandbox: Sandbox) -> None:
    for _ in range(60):
        await due_subscription(store)
    sandbox.configure(latency_ms=20)
    async with EngineProcess(["drain"], sandbox_env(database_url, sandbox)) as engine:
        await engine.wait_for("installment_charged", count=10, timeout=60)
        engine.kill()
        assert await engine.wait() == -signal.SIGKILL
    code, _, err = await run_command(["drain"], sandbox_env(database_url, sandbox), timeout=90)
    assert code == 0, err
    await assert_charged_once(store, sandbox, records=60, successful=60)


async def test_two_engines_draining_one_backlog_charge_each_installment_once(database_url: str, store: Store,
                                                                            sandbox: Sandbox) -> None:
    for i in range(80):
        await due_subscription(store, months_behind=i % 2)
    # Slow enough (120 installments × 2 calls × 100 ms / 8 in flight ≈ 3 s alone) that both engines are busy
    # on the same backlog at once.
    sandbox.configure(latency_ms=100)
    env = {"RECURRING_PAYMENTS_CONCURRENCY": "8"}
    results = await asyncio.gather(*(run_command(
        ["drain"], sandbox_env(database_url, sandbox, NODE_NAME=f"drainer-{i}", **env), timeout=120) for i in range(2)))
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    await assert_charged_once(store, sandbox, records=120, successful=120)
    nodes = {r["node"] for r in await store.pool.fetch("SELECT node FROM payment_attempts")}
    assert nodes == {"drainer-0", "drainer-1"}


async def test_serve_wakes_payments_right_after_installments(database_url: str, store: Store,
                                                            sandbox: Sandbox) -> None:
    await due_subscription(store)
    env = sandbox_env(database_url, sandbox, SUBSCRIPTION_INSTALLMENTS_SCHEDULE="every 1s")  # payments stay off
    async with EngineProcess(["serve"], env) as engine:
        [charged] = await engine.wait_for("installment_charged", timeout=60)
        engine.signal(signal.SIGTERM)
        assert await engine.wait() == 0
    assert charged["job"] == "recurring-payments"
    runs = await store.pool.fetch("SELECT trigger FROM job_runs WHERE job = 'recurring-payments'")
    assert {r["trigger"] for r in runs} == {"message"}
    await assert_charged_once(store, sandbox, records=1, successful=1)
