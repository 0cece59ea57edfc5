"""Digital River's decline table for merchant-initiated charges, through the engine and the sandbox.

Every hard code of Digital River's table (GitBook `payments/authorization-declines.md`) fails the record at
once; every soft code leaves it Open for a day; a code the table does not list is soft within the same limits,
and the record's message names it as unclassified.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from engine.store import Store
from sandbox.server import Sandbox
from tests.integration.engines import drain
from tests.integration.factories import due_subscription
from tests.support import sandbox_fixture
from tests.unit.test_digital_river import DR_HARD_CODES, DR_SOFT_CODES

sandbox = sandbox_fixture(seed=13)


async def only_record(store: Store, subscription_id: int) -> dict[str, object]:
    [row] = await store.pool.fetch("SELECT * FROM subscription_process_data WHERE subscription_id = $1",
                                   subscription_id)
    return dict(row)


@pytest.mark.parametrize("code", ["invalid_card_bin", "fraud_block", "card_type_block", "invalid_pin",
                                  "issuer_not_found", "voice_authorization_required"])
async def test_hard_codes_the_engine_once_retried_fail_the_record_at_once(store: Store, sandbox: Sandbox,
                                                                         code: str) -> None:
    assert code in DR_HARD_CODES
    sub = await due_subscription(store, source=f"src_decline_{code}")
    assert await drain(store, sandbox) == 0
    rec = await only_record(store, sub)
    assert (rec["subscription_job_run_status"], rec["last_error_code"]) == ("Failed", code)
    assert "not in Digital River's table" not in str(rec["last_error_message"])
    assert len(sandbox.ledger.declines) == 1 and not sandbox.ledger.orders


@pytest.mark.parametrize("code", ["card_limit_exceeded", "card_velocity_exceeded", "mid_limit_exceeded",
                                  "pin_try_exceeded"])
async def test_soft_codes_wait_a_day(store: Store, sandbox: Sandbox, code: str) -> None:
    assert code in DR_SOFT_CODES
    sub = await due_subscription(store, source=f"src_decline_{code}")
    before = datetime.now(UTC)
    assert await drain(store, sandbox) == 0
    rec = await only_record(store, sub)
    assert (rec["subscription_job_run_status"], rec["last_error_code"]) == ("Open", code)
    assert rec["next_attempt_at"] >= before + timedelta(hours=24)  # type: ignore[operator]
    assert "not in Digital River's table" not in str(rec["last_error_message"])


async def test_an_unclassified_code_is_soft_and_named_in_the_message(store: Store, sandbox: Sandbox) -> None:
    sub = await due_subscription(store, source="src_decline_failed-request")
    before = datetime.now(UTC)
    assert await drain(store, sandbox) == 0
    rec = await only_record(store, sub)
    assert (rec["subscription_job_run_status"], rec["subscription_retry_count"]) == ("Open", 1)
    assert rec["next_attempt_at"] >= before + timedelta(hours=24)  # type: ignore[operator]
    assert "decline code 'failed-request' is not in Digital River's table" in str(rec["last_error_message"])
