"""Actors and the supervisor: bounded inboxes, restart with backoff, restart budget, graceful shutdown."""

from __future__ import annotations

import asyncio

import pytest

from engine.actor import Actor, Supervisor


class Recorder(Actor[str]):
    inbox_size = 2

    def __init__(self) -> None:
        super().__init__("recorder")
        self.seen: list[str] = []
        self.stopped = False

    async def handle(self, message: str) -> None:
        self.seen.append(message)

    async def on_stop(self) -> None:
        self.stopped = True


class Crasher(Actor[str]):
    """Raises on every `boom` message; counts its starts."""

    def __init__(self) -> None:
        super().__init__("crasher")
        self.starts = 0
        self.handled: list[str] = []

    async def on_start(self) -> None:
        self.starts += 1

    async def handle(self, message: str) -> None:
        if message == "boom":
            raise RuntimeError("boom")
        self.handled.append(message)


class Slow(Actor[float]):
    """Works on each message for that many seconds; `finished` counts completed work, on_stop runs last."""

    def __init__(self) -> None:
        super().__init__("slow")
        self.started = asyncio.Event()
        self.finished = 0
        self.cancelled = False
        self.on_stop_ran = False

    async def handle(self, message: float) -> None:
        self.started.set()
        try:
            await asyncio.sleep(message)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        self.finished += 1

    async def on_stop(self) -> None:
        await asyncio.sleep(0)  # a real await: the final write must survive the cancellation around it
        self.on_stop_ran = True


async def test_inbox_is_bounded_and_offer_reports_a_full_inbox() -> None:
    actor = Recorder()
    assert actor.offer("a") and actor.offer("b")
    assert not actor.offer("c")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(actor.send("c"), 0.05)  # send waits for room: backpressure


async def test_actor_handles_messages_in_order() -> None:
    actor = Recorder()
    supervisor = Supervisor([actor])
    task = asyncio.create_task(supervisor.run())
    for m in "abcde":
        await actor.send(m)
    while len(actor.seen) < 5:
        await asyncio.sleep(0.001)
    await supervisor.shutdown(1.0)
    await task
    assert actor.seen == list("abcde")
    assert actor.stopped


async def test_crashed_actor_is_restarted_with_growing_backoff() -> None:
    actor = Crasher()
    sleeps: list[float] = []
    supervisor = Supervisor([actor], max_restarts=5, backoff_base=0.01, backoff_max=1.0)
    real_wait_for = asyncio.wait_for

    async def recording_wait_for(aw, timeout):  # type: ignore[no-untyped-def]
        sleeps.append(timeout)
        return await real_wait_for(aw, timeout)

    asyncio.wait_for = recording_wait_for  # type: ignore[assignment]
    try:
        task = asyncio.create_task(supervisor.run())
        for _ in range(3):
            await actor.send("boom")
        await actor.send("fine")
        while "fine" not in actor.handled:
            await asyncio.sleep(0.005)
    finally:
        asyncio.wait_for = real_wait_for
    assert actor.starts == 4  # first start and three restarts
    assert sleeps[:3] == [0.01, 0.02, 0.04]
    assert supervisor.failed is None
    await supervisor.shutdown(1.0)
    await task


async def test_spent_restart_budget_stops_the_engine() -> None:
    actor = Crasher()
    other = Recorder()
    supervisor = Supervisor([actor, other], max_restarts=2, window_seconds=60, backoff_base=0.001)
    task = asyncio.create_task(supervisor.run())
    for _ in range(3):
        await actor.send("boom")
    await asyncio.wait_for(task, 5)  # run() returns once the budget is spent
    assert supervisor.failed is not None and "crasher crashed 3 times" in supervisor.failed
    await supervisor.shutdown(1.0)
    assert other.stopped


async def test_crashes_outside_the_window_do_not_spend_the_budget() -> None:
    now = [0.0]
    actor = Crasher()
    supervisor = Supervisor([actor], max_restarts=1, window_seconds=10, backoff_base=0.001, clock=lambda: now[0])
    task = asyncio.create_task(supervisor.run())
    for _ in range(4):
        now[0] += 11  # each crash is more than a window after the previous one
        await actor.send("boom")
        starts = actor.starts
        while actor.starts == starts:
            await asyncio.sleep(0.001)
    assert supervisor.failed is None
    await supervisor.shutdown(1.0)
    await task


async def test_shutdown_lets_in_flight_work_finish_within_grace() -> None:
    actor = Slow()
    supervisor = Supervisor([actor])
    task = asyncio.create_task(supervisor.run())
    await actor.send(0.2)
    await actor.started.wait()
    await supervisor.shutdown(grace_seconds=5)
    await task
    assert actor.finished == 1 and not actor.cancelled
    assert actor.on_stop_ran


async def test_shutdown_cancels_work_past_grace_and_still_runs_on_stop() -> None:
    actor = Slow()
    supervisor = Supervisor([actor])
    task = asyncio.create_task(supervisor.run())
    await actor.send(30)
    await actor.started.wait()
    await supervisor.shutdown(grace_seconds=0.1)
    await task
    assert actor.cancelled and actor.finished == 0
    assert actor.on_stop_ran


async def test_failed_side_task_fails_its_actor() -> None:
    class WithSideLoop(Recorder):
        async def on_start(self) -> None:
            async def loop() -> None:
                raise ValueError("side loop died")
            self.spawn(loop(), "side")

    actor = WithSideLoop()
    with pytest.raises(ValueError, match="side loop died"):
        await asyncio.wait_for(actor.run(), 2)


class OutageCrasher(Crasher):
    """Raises ConnectionRefusedError (what a stopped database answers) on every `down` message."""

    async def handle(self, message: str) -> None:
        if message == "down":
            raise ConnectionRefusedError("connection refused")
        await super().handle(message)


async def test_crashes_from_a_database_outage_are_waited_out_without_spending_the_budget() -> None:
    actor = OutageCrasher()
    probes: list[bool] = []
    database_up = asyncio.Event()

    async def recovered() -> bool:
        probes.append(database_up.is_set())
        return database_up.is_set()

    supervisor = Supervisor([actor], max_restarts=1, window_seconds=60, backoff_base=0.001,
                            outage=lambda exc: isinstance(exc, OSError), recovered=recovered,
                            outage_backoff_max=0.01)
    task = asyncio.create_task(supervisor.run())
    for _ in range(3):
        await actor.send("down")
        starts = actor.starts
        while len(probes) < 3:  # the actor waits, probing, while the database is down
            await asyncio.sleep(0.001)
        assert supervisor.running["crasher"] is False
        database_up.set()
        while actor.starts == starts:
            await asyncio.sleep(0.001)
        database_up.clear()
        probes.clear()
    assert supervisor.failed is None  # three crashes, a budget of one: none was counted
    await supervisor.shutdown(1.0)
    await task


async def test_an_outage_error_while_the_database_answers_counts_as_a_crash() -> None:
    actor = OutageCrasher()

    async def recovered() -> bool:
        return True

    supervisor = Supervisor([actor], max_restarts=1, window_seconds=60, backoff_base=0.001,
                            outage=lambda exc: isinstance(exc, OSError), recovered=recovered)
    task = asyncio.create_task(supervisor.run())
    for _ in range(2):
        await actor.send("down")
    await asyncio.wait_for(task, 5)
    assert supervisor.failed is not None and "crasher crashed 2 times" in supervisor.failed
    await supervisor.shutdown(1.0)
