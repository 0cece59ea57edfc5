"""A 429's Retry-After is honoured in full, by every engine process on the key (issue 12, point 5).

Digital River refuses every call with a key until the Retry-After of a 429 has passed (its example is 120 s). The
sandbox here refuses everything for WALL seconds, longer than the client's retry backoff cap (30 s), the old
per-process bound. Engine A meets the wall; engine B starts two seconds later. Every 429 must come within the
first second of the wall (requests already on their way); none later, from A after 30 s or from B at its start.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from engine.store import Store
from sandbox.server import Sandbox
from tests.integration.factories import due_subscription
from tests.ledger_checks import assert_charged_once
from tests.support import EngineProcess, sandbox_fixture, serving_env

sandbox = sandbox_fixture(seed=23, latency_ms=50)
SUBSCRIPTIONS = 120
WALL = 36.0


async def fast_forward(store: Store) -> None:
    """Records put off by the wall's 429s (1 minute of outage backoff) are tried again at once."""
    await store.pool.execute("UPDATE subscription_process_data SET next_attempt_at = now() "
                             "WHERE subscription_job_run_status = 'Open' AND next_attempt_at > now()")


def answers_429(sandbox: Sandbox) -> list[float]:
    return sorted(r.at for r in sandbox.ledger.requests if r.status == 429)


@pytest.mark.timeout(240)
async def test_two_engines_wait_out_a_long_retry_after_with_no_further_429(database_url: str, store: Store,
                                                                           sandbox: Sandbox) -> None:
    for _ in range(SUBSCRIPTIONS):
        await due_subscription(store)
    env = serving_env(database_url, sandbox, DR_MAX_REQUESTS_PER_SECOND="12", LOG_LEVEL="warning")
    first = await EngineProcess(["serve"], env | {"NODE_NAME": "engine-a"}).start()
    second: EngineProcess | None = None
    try:
        while await store.pool.fetchval("SELECT count(*) FROM subscription_process_data "
                                        "WHERE subscription_job_run_status = 'Successful'") < 5:
            await asyncio.sleep(0.2)
        sandbox.block(WALL)
        blocked_at = time.time()
        while not answers_429(sandbox):
            await asyncio.sleep(0.05)
        first_429 = answers_429(sandbox)[0]
        await asyncio.sleep(2)
        second = await EngineProcess(["serve"], env | {"NODE_NAME": "engine-b"}).start()
        while time.time() < blocked_at + WALL + 3:
            await fast_forward(store)
            await asyncio.sleep(1)
        walled = [at for at in answers_429(sandbox) if at < blocked_at + WALL]
        assert walled and max(walled) <= first_429 + 1.0, [round(at - first_429, 2) for at in walled]
        # Afterwards everything is charged, once.
        for _ in range(120):
            await fast_forward(store)
            if await store.pool.fetchval("SELECT count(*) FROM subscription_process_data "
                                         "WHERE subscription_job_run_status = 'Successful'") == SUBSCRIPTIONS:
                break
            await asyncio.sleep(1)
        for engine in (first, second):
            engine.signal(signal.SIGTERM)
        assert [await first.wait(), await second.wait()] == [0, 0]
    finally:
        for engine in (first, second):
            if engine is not None and engine.proc and engine.proc.returncode is None:
                engine.kill()
                await engine.wait()
    await assert_charged_once(store, sandbox, successful=SUBSCRIPTIONS)
    assert first.find("dr_rate_pause_shared")
    assert second.find("dr_rate_paused_by_another_process")
