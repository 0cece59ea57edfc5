"""Actors and their supervisor.

An `Actor` owns a bounded inbox and handles its messages one at a time in `handle`. Producers feel
backpressure (`send` waits for room) or learn that the actor is busy (`offer` returns False); nothing is queued
without bound. Long-lived side loops an actor needs (a lease heartbeat, a periodic flush) are started with
`self.spawn`, which names and owns them: their failure is the actor's failure.

The `Supervisor` runs each actor as a named task. An actor that raises is logged and restarted with
exponential backoff; more than `max_restarts` crashes within `window_seconds` spends the budget, and the
supervisor then stops the engine (`failed` is set) rather than run without that actor. A crash that only says
the database is unreachable (`outage(exc)`) is not counted: the actor waits until `recovered()` says the
database answers again (however long that takes) and starts anew, so an outage of any length is ridden out.
Shutdown is by event:
`stop` is set, actors finish what they are doing within the grace period, whatever is left is cancelled, and
each actor's `on_stop` (release leases, flush buffers) runs shielded from cancellation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

import structlog

from engine.logs import error_text, get_logger

M = TypeVar("M")
log = get_logger(component="actor")


class Actor(Generic[M]):
    """Base actor: a bounded inbox and a loop that handles one message at a time."""

    inbox_size = 16

    def __init__(self, name: str) -> None:
        self.name = name
        self.inbox: asyncio.Queue[M] = asyncio.Queue(self.inbox_size)
        self.stopping = asyncio.Event()
        self._side_tasks: set[asyncio.Task[Any]] = set()

    async def send(self, message: M) -> None:
        """Deliver a message, waiting while the inbox is full."""
        await self.inbox.put(message)

    def offer(self, message: M) -> bool:
        """Deliver a message if there is room; False when the inbox is full."""
        try:
            self.inbox.put_nowait(message)
        except asyncio.QueueFull:
            return False
        return True

    async def handle(self, message: M) -> None:
        raise NotImplementedError

    async def on_start(self) -> None:
        """Runs before the first message, on every (re)start."""

    async def on_stop(self) -> None:
        """Runs once after the actor has stopped or was cancelled; shielded from cancellation."""

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start a side task owned by this actor; if it fails, the actor's main loop fails with it."""
        task = asyncio.create_task(coro, name=f"{self.name}:{name}")
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
        return task

    async def run(self) -> None:
        """The actor's main loop: until `stopping` is set, take a message and handle it."""
        structlog.contextvars.bind_contextvars(actor=self.name)
        await self.on_start()
        stop_wait = asyncio.create_task(self.stopping.wait(), name=f"{self.name}:stop-wait")
        try:
            while not self.stopping.is_set():
                get = asyncio.create_task(self.inbox.get(), name=f"{self.name}:inbox")
                watched = {get, stop_wait, *self._side_tasks}
                done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
                for task in done - {get, stop_wait}:
                    task.result()  # a failed side task fails the actor (its exception propagates)
                if get in done:
                    await self.handle(get.result())
                else:
                    get.cancel()
                    # A message that arrived while cancelling must not be lost.
                    try:
                        message = await get
                    except asyncio.CancelledError:
                        continue
                    if not self.stopping.is_set():
                        await self.handle(message)
        finally:
            stop_wait.cancel()
            for task in list(self._side_tasks):
                task.cancel()
            await asyncio.gather(*self._side_tasks, return_exceptions=True)


class Supervisor:
    """Runs actors, restarts the ones that crash, and stops them all gracefully."""

    def __init__(
        self,
        actors: list[Actor[Any]],
        *,
        max_restarts: int = 5,
        window_seconds: float = 60.0,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        stop: asyncio.Event | None = None,
        outage: Callable[[BaseException], bool] | None = None,
        recovered: Callable[[], Awaitable[bool]] | None = None,
        outage_backoff_max: float = 5.0,
    ) -> None:
        self.actors = actors
        self.max_restarts = max_restarts
        self.window_seconds = window_seconds
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.clock = clock
        self.stop = stop or asyncio.Event()
        self.outage = outage
        self.recovered = recovered
        self.outage_backoff_max = outage_backoff_max
        self.failed: str | None = None
        self.restarts: dict[str, list[float]] = {a.name: [] for a in actors}
        # Which actors are running right now (False while one waits out its restart backoff): for /readyz.
        self.running: dict[str, bool] = {a.name: False for a in actors}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Supervise until `stop` is set (by a signal or because a restart budget is spent)."""
        for actor in self.actors:
            actor.stopping.clear()
        self._tasks = {a.name: asyncio.create_task(self._keep_running(a), name=f"supervise:{a.name}")
                       for a in self.actors}
        await self.stop.wait()

    async def _keep_running(self, actor: Actor[Any]) -> None:
        while not self.stop.is_set():
            try:
                self.running[actor.name] = True
                await actor.run()
                self.running[actor.name] = False
                return  # stopped on purpose
            except asyncio.CancelledError:
                self.running[actor.name] = False
                raise
            except Exception as exc:
                self.running[actor.name] = False
                # A database outage is waited out without spending the budget; but if the database answers at
                # once, the crash was not the outage it looked like, and it counts as any other.
                if self.outage is not None and self.recovered is not None and self.outage(exc) \
                        and not await self.recovered():
                    await self._wait_for_database(actor, exc)
                    continue
                now = self.clock()
                history = [t for t in self.restarts[actor.name] if now - t < self.window_seconds]
                history.append(now)
                self.restarts[actor.name] = history
                if len(history) > self.max_restarts:
                    self.failed = f"actor {actor.name} crashed {len(history)} times in {self.window_seconds:.0f}s"
                    log.error("actor_restart_budget_spent", actor=actor.name, crashes=len(history),
                              window_seconds=self.window_seconds, error=error_text(exc),
                              exc_info=exc)
                    self.stop.set()
                    return
                delay = min(self.backoff_max, self.backoff_base * 2 ** (len(history) - 1))
                log.error("actor_crashed", actor=actor.name, error=error_text(exc),
                          restart_in_seconds=delay, crashes_in_window=len(history), exc_info=exc)
                try:
                    await asyncio.wait_for(self.stop.wait(), timeout=delay)
                except TimeoutError:
                    log.info("actor_restarted", actor=actor.name)

    async def _wait_for_database(self, actor: Actor[Any], exc: BaseException) -> None:
        """The database is unreachable: wait (probing with backoff) until it answers again or the engine stops."""
        assert self.recovered is not None
        log.warning("actor_waiting_for_database", actor=actor.name, error=error_text(exc))
        started = self.clock()
        delay = 0.5
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), timeout=delay)
                return
            except TimeoutError:
                pass
            if await self.recovered():
                log.info("actor_resumed_after_outage", actor=actor.name,
                         waited_seconds=round(self.clock() - started, 1))
                return
            delay = min(self.outage_backoff_max, delay * 2)

    async def shutdown(self, grace_seconds: float) -> None:
        """Stop every actor: let them finish within `grace_seconds`, cancel the rest, run their `on_stop`."""
        self.stop.set()
        for actor in self.actors:
            actor.stopping.set()
        tasks = list(self._tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_seconds)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("shutdown_grace_expired", cancelled=sorted(t.get_name() for t in pending),
                            grace_seconds=grace_seconds)
            await asyncio.gather(*tasks, return_exceptions=True)
        for actor in reversed(self.actors):
            try:
                await asyncio.shield(actor.on_stop())
            except Exception as exc:
                log.error("actor_stop_failed", actor=actor.name, error=error_text(exc))
