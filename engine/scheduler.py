"""Ticks → a `RunRequest` to the job's actor, which takes the tick in `job_runs`.

Every process runs a scheduler and computes the same fire times (cron maths in `engine.cron` are pure
functions of time); the unique (`job`, `fire_time`) in `job_runs` lets exactly one process run each tick.
A job actor that is busy with a long run does not queue ticks without bound: the tick is offered, and if the
inbox is full it is skipped here; an idle process elsewhere takes it.

Missed ticks collapse: after downtime (no scheduled run since an earlier tick) the job runs once, for the
latest missed tick, then follows its schedule. The same holds when this loop wakes late (a suspended host).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from engine.actor import Actor
from engine.cron import Schedule
from engine.jobs import Job, RunRequest
from engine.logs import get_logger
from engine.store import Store

log = get_logger(component="scheduler")
# Longest single sleep: the loop re-reads the clock at least this often (wall clock jumps, suspend).
MAX_SLEEP_SECONDS = 30.0


def utc_now() -> datetime:
    return datetime.now(UTC)


class Scheduler(Actor[None]):
    """Fires each job's ticks on this process."""

    def __init__(self, jobs: dict[str, Job], schedules: dict[str, Schedule], store: Store,
                 clock: Callable[[], datetime] = utc_now) -> None:
        super().__init__("scheduler")
        self.jobs = jobs
        self.schedules = {name: s for name, s in schedules.items() if name in jobs and not s.is_off}
        self.store = store
        self.clock = clock
        self.next_fire: dict[str, datetime] = {}

    async def on_start(self) -> None:
        now = self.clock()
        for name, schedule in sorted(self.schedules.items()):
            last = await self.store.fetchval("last_scheduled_fire_time", name)
            missed = schedule.last_at_or_before(now)
            if last is not None and missed is not None and missed > last:
                log.info("job_missed_ticks_collapsed", job=name, last_fire_time=last.isoformat(),
                         catch_up_fire_time=missed.isoformat())
                self._fire(name, missed)
            self._plan(name, now)
        for name in sorted(set(self.jobs) - set(self.schedules)):
            log.info("job_schedule_off", job=name)

    def _plan(self, name: str, after: datetime) -> None:
        schedule = self.schedules[name]
        nxt = schedule.next_after(after)
        if nxt is None:
            self.next_fire.pop(name, None)
            log.info("job_schedule_ended", job=name, schedule=schedule.text)
            return
        self.next_fire[name] = nxt
        log.info("job_next_fire", job=name, schedule=schedule.text, next_fire_time=nxt.isoformat())

    def _fire(self, name: str, fire_time: datetime) -> None:
        if not self.jobs[name].offer(RunRequest(fire_time, "schedule")):
            log.warning("job_tick_skipped_busy", job=name, fire_time=fire_time.isoformat())

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(actor=self.name)
        await self.on_start()
        while not self.stopping.is_set():
            if not self.next_fire:
                await self.stopping.wait()
                break
            now = self.clock()
            due_at = min(self.next_fire.values())
            wait = (due_at - now).total_seconds()
            if wait > 0:
                try:
                    await asyncio.wait_for(self.stopping.wait(), timeout=min(wait, MAX_SLEEP_SECONDS))
                except TimeoutError:
                    pass
                continue
            for name, fire_time in sorted(self.next_fire.items()):
                if fire_time > now:
                    continue
                # Woken late past several ticks: run once, for the latest of them.
                latest = self.schedules[name].last_at_or_before(now) or fire_time
                if latest > fire_time:
                    log.info("job_missed_ticks_collapsed", job=name, last_fire_time=fire_time.isoformat(),
                             catch_up_fire_time=latest.isoformat())
                self._fire(name, max(latest, fire_time))
                self._plan(name, now)
