"""The job actor: what every job of the contract has in common.

A job actor receives `RunRequest`s (from the scheduler, from `run JOB`/`drain`, or from another job on the same
process). For each it first takes the run in `job_runs`: the unique (`job`, `fire_time`) lets exactly one
process take a scheduled tick, however many share the database. It then calls the job's `run_once`, which
claims and processes records and counts them in the `Run`, and records how the run ended.

A run that raises is recorded `failed` with the error and logged; the actor itself carries on with the next
request. Only a failure to record the run (the database is gone) escapes to the supervisor.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import structlog

from engine.actor import Actor
from engine.digital_river import AuthError, DigitalRiverClient
from engine.logs import AppLogSink, error_text, get_logger
from engine.metrics import Metrics
from engine.settings import Settings, storefront_label
from engine.store import LeaseLost, Leases, Store, is_outage
from engine.storefronts import Storefront, Storefronts

log = get_logger(component="jobs")
# How long a job trusts its last look at job_controls before asking again (pause takes effect within this).
PAUSE_CHECK_SECONDS = 1.0
BACKOFF_MAX = timedelta(hours=1)
# A storefront whose client is paused (a 429) for longer than this stops claiming for the rest of the run; a
# shorter pause is waited out.
LONG_PAUSE_SECONDS = 5.0
# How an outcome counts on its run (`Job.outcomes`).
SUCCEEDED, FAILED = "succeeded", "failed"
# A job's outcomes: event → (log level, SUCCEEDED / FAILED / None).
Outcomes = dict[str, tuple[str, str | None]]


def backoff(failures: int) -> timedelta:
    """How long to wait after the `failures`-th failure in a row (1, 2, 4 … minutes), at most an hour: the one
    backoff of every record that waits out an outage or a failed send."""
    return min(BACKOFF_MAX, timedelta(minutes=2 ** min(max(failures - 1, 0), 10)))


@dataclass
class Outcome:
    """How one unit of work ended: its event (a key of its job's `outcomes`) and the fields of its log line."""

    event: str
    fields: dict[str, Any] = field(default_factory=dict)


class BadData(ValueError):
    """A record that cannot be sent to Digital River. The message starts with the column at fault
    (`products.dr_sku_id is empty …`); `field` is that column, also the record's error code."""

    @property
    def field(self) -> str:
        return str(self).split(" ", 1)[0].rstrip(":")


# A claim step: (free slots, records still allowed) → None when nothing is claimable, or (records taken,
# [(name, unit of work)]).
Claim = Callable[[int, int], Awaitable[tuple[int, list[tuple[str, Coroutine[Any, Any, None]]]] | None]]


async def _give_back(leases: Sequence[Leases], beats: list[asyncio.Task[None]]) -> None:
    await asyncio.gather(*beats)
    for lease in reversed(leases):
        await lease.release()


@dataclass
class RunRequest:
    """Ask a job to run once. `done` (if given) receives the finished `Run`, or None if another process took it."""

    fire_time: datetime
    trigger: str  # schedule | manual | drain | message
    done: asyncio.Future[Run | None] | None = None


@dataclass
class Run:
    """One run of a job: its id in job_runs and the records it counted."""

    id: int
    job: str
    fire_time: datetime
    trigger: str
    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    status: str = "running"
    error: str | None = None
    started: float = field(default_factory=time.monotonic)


@dataclass
class Services:
    """What jobs share on one process."""

    settings: Settings
    store: Store
    app_log: AppLogSink
    stopping: asyncio.Event
    metrics: Metrics = field(default_factory=Metrics)
    # A client per storefront with a key (engine/storefronts.py); None: no Digital River client at all.
    storefronts: Storefronts | None = None
    jobs: dict[str, Job] = field(default_factory=dict)
    # True under `serve`: jobs may start each other's runs. `run JOB` and `drain` drive every run themselves.
    autonomous: bool = False


class Job(Actor[RunRequest]):
    """Base for the five jobs. Subclasses implement `run_once` and `due_count`, and list in `outcomes` every way a
    unit of their work can end: event → (log level, SUCCEEDED / FAILED / None: how it counts on the run). A job
    runs each unit with `attempt` (a lost lease and a crash become outcomes too) and ends it with `settle` (the
    count, the metric and one structured line), so a job module says only what happened to its record."""

    inbox_size = 4
    # Set by subclasses: the job's name in the contract.
    job_name = ""
    outcomes: ClassVar[Outcomes] = {}
    # The table its due check reads (named in the line drain logs when that check runs out of time).
    due_table: ClassVar[str | None] = None

    def __init__(self, services: Services) -> None:
        super().__init__(self.job_name)
        self.services = services
        # Record outcomes are logged under the job module's name (recurring_payments, order_fulfillment, …).
        self.log = get_logger(component=self.job_name.replace("-", "_"))
        self.settings = services.settings
        self.store = services.store
        self.concurrency = services.settings.jobs[self.job_name].concurrency
        self.running: Run | None = None
        self._paused = False
        self._pause_checked = -PAUSE_CHECK_SECONDS
        self._leases: list[Leases] = []
        # The storefronts whose key Digital River refused (401/403) in this run (`refuse`): they stop claiming, the
        # others go on, and the run ends `failed` naming them.
        self.refused: set[str] = set()

    @property
    def stop_requested(self) -> bool:
        """True once the engine is shutting down: stop claiming, finish what is in flight."""
        return self.stopping.is_set() or self.services.stopping.is_set()

    @property
    def storefronts(self) -> list[Storefront]:
        """The storefronts this process has a key for: each is claimed for on its own (`claim_by_storefront`)."""
        return [] if self.services.storefronts is None else list(self.services.storefronts)

    def ready_labels(self) -> list[str]:
        """The labels of the storefronts whose records can be sent now: a key, and no 429 pause of more than
        LONG_PAUSE_SECONDS. Drain's check counts only theirs: a paused storefront's records wait like records whose
        next attempt has not come."""
        return [s.label for s in self.storefronts if s.client.paused_for() <= LONG_PAUSE_SECONDS]

    def client_for(self, storefront: str) -> DigitalRiverClient | None:
        """The client for a record of the storefront named `storefront`; None when it has no key here."""
        label = storefront_label(storefront)
        for known in self.storefronts:
            if known.label == label:
                return known.client
        return None

    @property
    def key_refused(self) -> bool:
        """Whether Digital River refused a storefront's key in this run."""
        return bool(self.refused)

    def refuse(self, client: DigitalRiverClient) -> None:
        """A 401/403 with `client`'s key: its storefront stops claiming for the rest of the run."""
        self.refused.add(client.storefront)

    @property
    def paused(self) -> bool:
        """Whether the job was paused when last checked."""
        return self._paused

    async def is_paused(self) -> bool:
        """Whether an operator paused this job (`python run.py pause JOB`)."""
        self._paused = bool(await self.store.fetchval("job_paused", self.job_name))
        self._pause_checked = time.monotonic()
        return self._paused

    async def may_claim(self) -> bool:
        """Checked before every claim: False once the engine is stopping or the job was paused."""
        if self.stop_requested:
            return False
        if time.monotonic() - self._pause_checked >= PAUSE_CHECK_SECONDS:
            await self.is_paused()
        if self._paused:
            log.info("job_paused_stops_claiming", job=self.job_name)
        return not self._paused

    async def run_once(self, run: Run) -> None:
        """Claim and process this job's due records, counting them on `run`."""
        raise NotImplementedError

    async def due_count(self) -> int:
        """How many records are due for this job now (status, the demo's progress)."""
        raise NotImplementedError

    async def has_due(self) -> bool:
        """Whether anything is due for this job now: all drain needs to know. Jobs whose count reads the whole
        backlog answer this more cheaply."""
        return await self.due_count() > 0

    async def handle(self, message: RunRequest) -> None:
        # Whoever waits on this request (`run JOB`, `drain`) is told how it ended, whatever happens here: a
        # failure to even record the run (the database is gone) reaches the waiter as that error, then the
        # supervisor, which waits out a database outage.
        try:
            run = await self._handle(message)
        except BaseException as exc:
            if message.done and not message.done.done():
                if isinstance(exc, asyncio.CancelledError):
                    message.done.cancel()
                else:
                    message.done.set_exception(exc)
            raise
        if message.done and not message.done.done():
            message.done.set_result(run)

    async def _handle(self, message: RunRequest) -> Run | None:
        if await self.is_paused():
            log.info("job_paused_run_skipped", job=self.job_name, fire_time=message.fire_time.isoformat(),
                     trigger=message.trigger)
            return None
        run_id = await self.store.fetchval(
            "insert_job_run", self.job_name, message.fire_time, message.trigger, self.store.node)
        if run_id is None:
            log.info("job_tick_taken_elsewhere", job=self.job_name, fire_time=message.fire_time.isoformat())
            return None
        run = Run(run_id, self.job_name, message.fire_time, message.trigger)
        self.running = run
        self._leases = []
        self.refused = set()
        structlog.contextvars.bind_contextvars(job=self.job_name, run_id=run_id)
        log.info("job_run_started", fire_time=message.fire_time.isoformat(), trigger=message.trigger)
        try:
            await self.run_once(run)
            run.status = "succeeded"
        except asyncio.CancelledError:
            run.status, run.error = "failed", "cancelled at shutdown"
            await asyncio.shield(self._finish(run))
            raise
        except Exception as exc:
            run.status, run.error = "failed", error_text(exc)
            if is_outage(exc):
                # One line, not a traceback: the database went away under the run.
                log.error("job_run_crashed", error=run.error, reason="database unavailable")
            else:
                log.error("job_run_crashed", error=run.error, exc_info=exc)
        finally:
            self.running = None
        await self._finish(run)
        structlog.contextvars.unbind_contextvars("job", "run_id")
        return run

    def leases(self, table: str) -> Leases:
        """A claim primitive for `table`, reporting lost leases to the metrics, counted in `in_flight`."""
        leases = Leases(self.store, table, self.settings.lease_seconds, on_lost=self.services.metrics.lease_lost)
        self._leases.append(leases)
        return leases

    async def claim_by_storefront(self, each: Callable[[Storefront], Coroutine[Any, Any, None]]) -> None:
        """Run `each(storefront)` for every storefront with a key, at once: each claims, with its own concurrency
        slots, leases and query limit, only its storefront's records (a storefront paused by a 429, or whose key was
        refused, holds no slot another could use). An error of one (the database gone) cancels the others and is
        raised; a refused key ends the run `failed` naming its storefronts once the others are done."""
        async with asyncio.TaskGroup() as group:
            for storefront in self.storefronts:
                group.create_task(each(storefront), name=f"{self.job_name}:{storefront.label}")
        if self.refused:
            raise AuthError(f"Digital River refused the API key (401/403) of {', '.join(sorted(self.refused))}; "
                            "those storefronts stopped claiming")

    async def claim_and_process(self, run: Run, leases: Sequence[Leases], limit: int, claim: Claim, *,
                                wait_when_empty: bool = False, storefront: Storefront | None = None) -> None:
        """The claim loop every leasing job shares.

        While fewer than `limit` records were taken, the job may claim and the key is not refused: take a
        concurrency slot count first, then `claim(free_slots, remaining)`, which claims and returns how many
        records it took and the units of work to run, each as its own task (a record, or an order's lines).
        `claim` returns None when nothing is claimable: the loop ends, or with `wait_when_empty` waits for a
        unit in flight to finish first (finishing one can make another claimable). The leases are kept alive
        meanwhile; on the way out, work still in flight is awaited (or cancelled, if the run itself is), and
        unfinished leases are given back. A refused key ends the run as failed.

        With `storefront` (`claim_by_storefront`), the loop is that storefront's: it stops claiming once its key is
        refused (the caller raises), and claims nothing while its client waits out a 429 pause.
        """
        def refused() -> bool:
            return storefront.label in self.refused if storefront is not None else self.key_refused

        beat_stop = asyncio.Event()
        beats = [asyncio.create_task(lease.heartbeat(beat_stop), name=f"{self.job_name}:{lease.table}-heartbeat")
                 for lease in leases]
        in_flight: set[asyncio.Task[None]] = set()
        taken = 0
        try:
            while taken < limit and not refused() and await self.may_claim():
                free = self.concurrency - len(in_flight)
                if free <= 0:
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                paused = storefront.client.paused_for() if storefront is not None else 0.0
                if paused > LONG_PAUSE_SECONDS:
                    # Digital River refuses this key for a while (a 429's Retry-After): this storefront's records
                    # wait for a later run, and the run does not wait for them.
                    log.warning("storefront_paused_stops_claiming", storefront=storefront.label if storefront else None,
                                seconds=round(paused, 1))
                    break
                if paused > 0:
                    await self._wait(in_flight, paused)
                    continue
                claimed = await claim(free, limit - taken)
                if claimed is None:
                    if wait_when_empty and in_flight:
                        await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                        continue
                    break
                count, units = claimed
                taken += count
                run.claimed += count
                for name, unit in units:
                    task = asyncio.create_task(unit, name=f"{self.job_name}:{name}")
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
            if in_flight:
                await asyncio.wait(in_flight)
        finally:
            for task in in_flight:
                task.cancel()
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)
            beat_stop.set()
            await asyncio.shield(_give_back(leases, beats))
        if storefront is None and self.key_refused:
            raise AuthError("Digital River refused the API key (401/403); the run stopped claiming")

    async def _wait(self, in_flight: set[asyncio.Task[None]], seconds: float) -> None:
        """Wait `seconds`, or less when the engine stops or a unit in flight finishes."""
        waits: set[asyncio.Future[Any]] = set(in_flight)
        stop = asyncio.ensure_future(self.services.stopping.wait())
        waits.add(stop)
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()

    def in_flight(self) -> int:
        """Records of this job in flight on this process now (for /metrics)."""
        return sum(len(lease.in_flight) for lease in self._leases)

    def settlement_conflict(self, record_id: object, message: str) -> None:
        """A write-back found its record already settled by another worker with a different Digital River order
        or fulfillment: an alarm (counted in /metrics and written to application_logs), never a quiet no-op. The
        caller logs its own line, naming both ids."""
        self.services.metrics.settlement_conflict(self.job_name)
        self.services.app_log.write("ERROR", self.job_name, message, record_id=record_id)

    def record_outcome(self, outcome: str) -> None:
        """Count one record's outcome (the event name of its one log line) for /metrics."""
        self.services.metrics.record_outcome(self.job_name, outcome)

    async def attempt(self, work: Awaitable[Outcome], *, lease_lost: str, crashed: str, fields: dict[str, Any],
                      on_crash: Callable[[str], Awaitable[Outcome]] | None = None) -> Outcome:
        """Run one unit of work to its outcome. A lost lease (LeaseLost: the worker stopped without writing)
        becomes the `lease_lost` outcome; anything else raised is logged with its traceback and becomes
        `on_crash(error)` (putting the record back, say) or, if that fails too, the `crashed` outcome."""
        try:
            return await work
        except asyncio.CancelledError:
            raise
        except LeaseLost as exc:
            return Outcome(lease_lost, {"error": str(exc), **exc.fields})
        except Exception as exc:
            error = error_text(exc)
            self.log.error(crashed, exc_info=exc, **fields)
            if on_crash is not None:
                try:
                    return await on_crash(error)
                except Exception:  # the database refuses even that: the lease lapses and the record comes back
                    pass
            return Outcome(crashed, {"error": error})

    def settle(self, run: Run | None, outcome: Outcome, started: float, **fields: Any) -> None:
        """End one unit of work: count it on the run, in /metrics, and log its one line at its level."""
        level, counts = self.outcomes[outcome.event]
        if run is not None and counts == SUCCEEDED:
            run.succeeded += 1
        elif run is not None and counts == FAILED:
            run.failed += 1
        self.record_outcome(outcome.event)
        getattr(self.log, level)(outcome.event, duration_ms=round((time.monotonic() - started) * 1000), **fields,
                                 **outcome.fields)

    async def _finish(self, run: Run) -> None:
        await self.store.execute("finish_job_run", run.id, run.status, run.claimed, run.succeeded, run.failed,
                                 run.error)
        self.services.metrics.run_finished(run.job, run.status, run.claimed, run.succeeded, run.failed,
                                           time.monotonic() - run.started)
        log.info("job_run_finished", status=run.status, claimed=run.claimed, succeeded=run.succeeded,
                 failed=run.failed, duration_ms=round((time.monotonic() - run.started) * 1000), error=run.error)

    async def run_now(self, trigger: str) -> Run | None:
        """Queue a run with fire time now and wait for it to finish (for `run JOB` and `drain`)."""
        done: asyncio.Future[Run | None] = asyncio.get_running_loop().create_future()
        await self.send(RunRequest(datetime.now(UTC), trigger, done))
        return await done
