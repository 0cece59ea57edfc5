"""At most one charge per record when an engine process lives on past its lease: real `python run.py` processes.

A lease lapses under a live worker in two ways, and both are played here against the local Digital River:

- another database session holds records' rows locked (`SELECT … FOR UPDATE`) for longer than LEASE_SECONDS,
  so the engine can neither renew those leases nor write those records while its workers are in the middle of
  them, and the rest of the backlog keeps the engine (and a second one) claiming;
- the engine process itself is frozen (SIGSTOP) with records in flight, a second engine takes them over once
  their leases lapse, and the frozen one is let go (SIGCONT) while the second is still working on them, with
  Digital River's answers to its own calls waiting for it.

Whatever the timing, the sandbox's ledger must show at most one order per installment record (exactly one for
each `Successful` record, none for any other), at most one decline per declining card, and the store must agree.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest

from engine.store import Store
from sandbox.server import Sandbox
from tests.db import other_session
from tests.integration.factories import due_subscription
from tests.ledger_checks import assert_charged_once, declines_by_subscription
from tests.support import EngineProcess, sandbox_env, sandbox_fixture

LEASE_SECONDS = 5
# Longer than the lease: whatever the engine was doing with a held row, its lease has run out before the lock goes.
HOLD_SECONDS = 12.0
DECLINING_SOURCE = "src_soft_decline_insufficient_funds"

# Rows an engine holds a live lease on and has not finished: records in flight.
IN_FLIGHT = """
SELECT p.id, p.subscription_id, p.locked_by, p.dr_checkout_id
  FROM subscription_process_data p
 WHERE p.locked_by IS NOT NULL AND p.locked_until > now()
   AND p.subscription_job_run_status = 'Open' AND NOT p.is_recurring_payment_processed
"""
# Conditions on such a row `p`: which step its worker is at, whether its card declines.
MAKING_CHECKOUT = "p.dr_checkout_id IS NULL"
MAKING_ORDER = "p.dr_checkout_id IS NOT NULL"
DECLINER = ("EXISTS (SELECT 1 FROM subscriptions s JOIN stored_payments sp ON sp.id = s.stored_payment_id "
            f"WHERE s.id = p.subscription_id AND sp.dr_source_id = '{DECLINING_SOURCE}')")


sandbox = sandbox_fixture(seed=23)


def env_for(database_url: str, sandbox: Sandbox, node: str, **extra: str) -> dict[str, str]:
    return sandbox_env(database_url, sandbox, LEASE_SECONDS=str(LEASE_SECONDS), NODE_NAME=node,
                       RECURRING_PAYMENTS_CONCURRENCY="8", **extra)


@asynccontextmanager
async def rows_held(database_url: str, wanted: Sequence[str], timeout: float = 30.0
                    ) -> AsyncIterator[list[dict[str, Any]]]:
    """What a stuck session does to the engine: in one transaction, lock one in-flight record per condition in
    `wanted` (SQL on `p`) as soon as one is in flight; yield the rows as they were when locked; roll back."""
    async with other_session(database_url) as conn:
        locked: list[dict[str, Any]] = []
        pending = list(wanted)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for condition in list(pending):
                # FOR UPDATE re-checks the conditions on the row it locks: it is in flight when taken.
                row = await conn.fetchrow(
                    f"{IN_FLIGHT} AND ({condition}) AND p.id <> ALL($1::bigint[]) "
                    "ORDER BY p.id LIMIT 1 FOR UPDATE OF p SKIP LOCKED", [r["id"] for r in locked])
                if row is not None:
                    locked.append(dict(row))
                    pending.remove(condition)
            if pending:
                await asyncio.sleep(0.01)
        assert not pending, f"no record in flight matched {pending} within {timeout}s (locked: {locked})"
        yield locked


def taken_over_mid_flight(sandbox: Sandbox) -> bool:
    """Whether Digital River has seen a second checkout for an installment that has no order yet: another claim
    is working on a record whose first checkout was made under an earlier one."""
    checkouts = Counter(c["upstreamId"] for c in sandbox.ledger.checkouts.values())
    return any(n > 1 and not sandbox.ledger.orders_by_upstream.get(u) for u, n in checkouts.items())


async def hold_past_the_lease(store: Store, sandbox: Sandbox, held: list[dict[str, Any]]) -> None:
    """Keep the rows locked HOLD_SECONDS; meanwhile the engines must go on with everything else, so by then no
    record but the held ones is still due (one stuck row does not stall an engine). If, past the lease, some
    record is taken over while an earlier claim's checkout for it is still unsettled, the rows are let go at once
    instead: whatever was waiting on them then races the claim that took over."""
    started = time.monotonic()
    while time.monotonic() - started < HOLD_SECONDS:
        if time.monotonic() - started > LEASE_SECONDS and taken_over_mid_flight(sandbox):
            return
        await asyncio.sleep(0.05)
    stuck = await store.pool.fetch(
        "SELECT id FROM subscription_process_data WHERE subscription_job_run_status = 'Open' "
        "AND NOT is_recurring_payment_processed AND next_attempt_at <= now() AND id <> ALL($1::bigint[])",
        [h["id"] for h in held])
    assert stuck == [], f"records still due after {HOLD_SECONDS}s with {len(held)} rows held: {stuck}"


async def finish(engines: Sequence[EngineProcess], timeout: float = 90.0) -> None:
    codes = await asyncio.gather(*(e.wait(timeout) for e in engines))
    assert list(codes) == [0] * len(engines), [e.stderr[-3000:] for e in engines]


async def drain_leftovers(database_url: str, sandbox: Sandbox, store: Store, engines: list[EngineProcess]) -> int:
    """A worker that gave a record up can leave it Open with a backoff: make every Open record due and drain once
    more. Returns how many were made due."""
    made_due = await store.pool.fetchval(
        "WITH due AS (UPDATE subscription_process_data SET next_attempt_at = now() "
        "WHERE subscription_job_run_status = 'Open' RETURNING 1) SELECT count(*) FROM due")
    if made_due:
        engine = EngineProcess(["drain"], env_for(database_url, sandbox, "mop-up"))
        engines.append(engine)
        async with engine:
            await finish([engine])
    return int(made_due)


def no_alarms(engines: Sequence[EngineProcess]) -> None:
    for engine in engines:
        for event in ("installment_settlement_conflict", "installment_crashed", "job_run_crashed"):
            assert engine.find(event) == [], (engine.env["NODE_NAME"], engine.find(event))


@pytest.mark.timeout(90)
async def test_rows_locked_past_their_lease_under_one_engine_are_charged_once(
        database_url: str, store: Store, sandbox: Sandbox) -> None:
    for _ in range(40):
        await due_subscription(store)
    # About a second per record at 8 in flight: the engine is still claiming when the held leases run out.
    sandbox.configure(latency_ms=300, latency_max_ms=700)
    engines = [EngineProcess(["drain"], env_for(database_url, sandbox, "solo"))]
    async with engines[0]:
        # One record still making its checkout, one whose checkout is saved and whose order is being made.
        async with rows_held(database_url, [MAKING_CHECKOUT, MAKING_ORDER]) as held:
            await hold_past_the_lease(store, sandbox, held)
        await finish(engines)
    await drain_leftovers(database_url, sandbox, store, engines)
    no_alarms(engines)
    await assert_charged_once(store, sandbox, records=40, successful=40)
    assert {h["locked_by"] for h in held} == {"solo"}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("second", ["second", "first"], ids=["two-names", "same-name"])
async def test_rows_locked_past_their_lease_under_two_engines_are_charged_once(
        database_url: str, store: Store, sandbox: Sandbox, second: str) -> None:
    """A second engine joins the backlog while rows of the first are held. In the `same-name` case it runs
    under the first one's NODE_NAME (a replacement started for a process believed stuck), so nothing but the
    leases themselves tells the two engines' claims apart."""
    for _ in range(60):
        await due_subscription(store)
    sandbox.configure(latency_ms=300, latency_max_ms=700)
    engines = [EngineProcess(["drain"], env_for(database_url, sandbox, name)) for name in ("first", second)]
    async with AsyncExitStack() as running:
        await running.enter_async_context(engines[0])
        async with rows_held(database_url, [MAKING_CHECKOUT, MAKING_CHECKOUT, MAKING_ORDER, MAKING_ORDER]) as held:
            await running.enter_async_context(engines[1])
            charged_before = len(engines[0].find("installment_charged"))
            await hold_past_the_lease(store, sandbox, held)
            assert engines[1].find("installment_charged"), "the second engine never took part"
            assert len(engines[0].find("installment_charged")) > charged_before, "the first engine stalled"
        await finish(engines)
    await drain_leftovers(database_url, sandbox, store, engines)
    no_alarms(engines)
    await assert_charged_once(store, sandbox, records=60, successful=60)
    assert {h["locked_by"] for h in held} == {"first"}


@pytest.mark.timeout(90)
async def test_declining_cards_locked_past_their_lease_are_declined_once(
        database_url: str, store: Store, sandbox: Sandbox) -> None:
    declining = set()
    for i in range(45):
        if i % 3 == 1:
            declining.add(str(await due_subscription(store, source=DECLINING_SOURCE)))
        else:
            await due_subscription(store)
    sandbox.configure(latency_ms=300, latency_max_ms=700)
    engines = [EngineProcess(["drain"], env_for(database_url, sandbox, f"drainer-{i}")) for i in range(2)]
    async with engines[0], engines[1]:
        async with rows_held(database_url, [
                f"{DECLINER} AND {MAKING_CHECKOUT}", f"{DECLINER} AND {MAKING_ORDER}",
                f"NOT {DECLINER} AND {MAKING_CHECKOUT}", f"NOT {DECLINER} AND {MAKING_ORDER}"]) as held:
            await hold_past_the_lease(store, sandbox, held)
        await finish(engines)
    # The declined records wait their day (Open); made due again now, Digital River's once-a-day limit still holds.
    assert await drain_leftovers(database_url, sandbox, store, engines) >= len(declining)
    no_alarms(engines)
    recs = await assert_charged_once(store, sandbox, records=45, successful=30)
    for rec in recs:
        assert rec["subscription_job_run_status"] == ("Open" if str(rec["subscription_id"]) in declining
                                                      else "Successful"), rec
    assert declines_by_subscription(sandbox) == Counter({s: 1 for s in declining})
    # Nor was a declined checkout submitted again: Digital River answered one decline per declining card ...
    assert sandbox.ledger.count_requests("POST", "/orders", 409) == len(declining)
    # ... and each is on record once, for Digital River's limits on declined merchant-initiated charges.
    attempts = await store.pool.fetch(
        "SELECT subscription_id, count(*) AS n FROM payment_attempts WHERE outcome = 'soft_decline' "
        "GROUP BY subscription_id")
    assert {str(a["subscription_id"]): a["n"] for a in attempts} == {s: 1 for s in declining}
    assert {str(h["subscription_id"]) in declining for h in held} == {True, False}


async def freeze_until_taken_over(store: Store, frozen: EngineProcess, taker: EngineProcess,
                                  ready: str) -> set[int]:
    """SIGSTOP `frozen` as soon as its records in flight satisfy `ready` (SQL on the set of rows `f`), start
    `taker`, and SIGCONT `frozen` once its leases have run out and `taker` has claimed (or finished) every record
    it had in flight: it wakes up in the middle of the other engine's work on them, with Digital River's answers
    to its own calls waiting. Returns the ids of those records."""
    mine = f"{IN_FLIGHT} AND p.locked_by = '{frozen.env['NODE_NAME']}'"
    deadline = time.monotonic() + 45
    while not await store.pool.fetchval(f"SELECT {ready} FROM ({mine}) f"):
        assert time.monotonic() < deadline, f"the engine never had records in flight such that {ready}"
        await asyncio.sleep(0.01)
    frozen.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    stranded = {r["id"] for r in await store.pool.fetch(mine)}
    await taker.start()
    while True:
        left = await store.pool.fetchval(
            "SELECT count(*) FROM subscription_process_data WHERE id = ANY($1::bigint[]) AND locked_by = $2 "
            "AND locked_until <= now() AND NOT is_recurring_payment_processed", list(stranded),
            frozen.env["NODE_NAME"])
        waited = time.monotonic() - stopped_at
        if left == 0 and waited >= LEASE_SECONDS + 1:
            break
        assert waited < 40, f"{left} records of the frozen engine were never taken over"
        await asyncio.sleep(0.05)
    frozen.signal(signal.SIGCONT)
    return stranded


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("command", "taker_name"), [("drain", "taker"), ("serve", "taker"), ("drain", "frozen")],
                         ids=["drain", "serve", "drain-same-name"])
async def test_a_frozen_engine_whose_records_were_taken_over_charges_nobody_twice(
        database_url: str, store: Store, sandbox: Sandbox, command: str, taker_name: str) -> None:
    """An engine frozen (SIGSTOP) with records in flight past its lease, taken over by another engine, and let go
    (SIGCONT) while the other is still working on them. In the last case the other engine runs under the frozen
    one's NODE_NAME, as a supervisor's replacement for a process it believed dead would."""
    for _ in range(24):
        await due_subscription(store)
    # Slow calls (1.5-2.5 s each), so the frozen engine has records at both steps and answers waiting for it.
    sandbox.configure(latency_ms=1500, latency_max_ms=2500)
    schedules = {"SUBSCRIPTION_INSTALLMENTS_SCHEDULE": "every 1s", "RECURRING_PAYMENTS_SCHEDULE": "every 1s"} \
        if command == "serve" else {}
    frozen = EngineProcess([command], env_for(database_url, sandbox, "frozen", **schedules))
    taker = EngineProcess(["drain"], env_for(database_url, sandbox, taker_name))
    engines = [frozen, taker]
    async with frozen, AsyncExitStack() as cleanup:
        cleanup.push_async_exit(taker)
        # Some of its records still making their checkouts, others making their orders.
        stranded = await freeze_until_taken_over(
            store, frozen, taker, "bool_or(f.dr_checkout_id IS NULL) AND bool_or(f.dr_checkout_id IS NOT NULL)")
        if command == "serve":
            await finish([taker])
            deadline = time.monotonic() + 60
            while await store.pool.fetchval("SELECT count(*) FROM subscription_process_data "
                                            "WHERE subscription_job_run_status = 'Open'"):
                assert time.monotonic() < deadline, "serve never finished the backlog"
                await asyncio.sleep(0.2)
            frozen.signal(signal.SIGTERM)
        await finish(engines)
    await drain_leftovers(database_url, sandbox, store, engines)
    no_alarms(engines)
    await assert_charged_once(store, sandbox, records=24, successful=24)
    # The frozen engine found out it had lost them, and settled none of the records it had in flight.
    assert frozen.find("lease_lost") or frozen.find("installment_lease_lost"), frozen.events[-20:]
    late = [(e["event"], e["record_id"]) for e in frozen.events
            if e.get("record_id") in stranded and str(e.get("event")).startswith("installment_")]
    assert {event for event, _ in late} <= {"installment_lease_lost", "installment_settled_elsewhere"}, late
    if taker_name != "frozen":
        writers = await store.pool.fetch(
            "SELECT process_data_id, node FROM payment_attempts WHERE process_data_id = ANY($1::bigint[])",
            list(stranded))
        assert {w["process_data_id"] for w in writers} == stranded
        assert {w["node"] for w in writers} == {taker_name}, [dict(w) for w in writers]


@pytest.mark.timeout(120)
async def test_a_frozen_engine_whose_declined_cards_were_taken_over_records_each_decline_once(
        database_url: str, store: Store, sandbox: Sandbox) -> None:
    """As above, with declining cards whose POST /orders the frozen engine had sent when it was stopped: Digital
    River declined them while it was frozen, the other engine took the records over without knowing that."""
    declining = {str(await due_subscription(store, source=DECLINING_SOURCE)) for _ in range(16)}
    sandbox.configure(latency_ms=1500, latency_max_ms=2500)
    frozen = EngineProcess(["drain"], env_for(database_url, sandbox, "frozen"))
    taker = EngineProcess(["drain"], env_for(database_url, sandbox, "taker"))
    engines = [frozen, taker]
    async with frozen, AsyncExitStack() as cleanup:
        cleanup.push_async_exit(taker)
        await freeze_until_taken_over(store, frozen, taker, "count(*) FILTER (WHERE f.dr_checkout_id IS NOT NULL) >= 2")
        await finish(engines)
    await drain_leftovers(database_url, sandbox, store, engines)
    no_alarms(engines)
    recs = await assert_charged_once(store, sandbox, records=16, successful=0)
    assert {r["subscription_job_run_status"] for r in recs} == {"Open"}
    assert declines_by_subscription(sandbox) == Counter({s: 1 for s in declining})
    attempts = await store.pool.fetch(
        "SELECT subscription_id, count(*) AS n, array_agg(node ORDER BY id) AS nodes FROM payment_attempts "
        "WHERE outcome = 'soft_decline' GROUP BY subscription_id")
    twice = {a["subscription_id"]: a["nodes"] for a in attempts if a["n"] > 1}
    assert twice == {}, f"one decline recorded more than once (subscription: nodes that wrote it): {twice}"
    assert {str(a["subscription_id"]) for a in attempts} == declining
