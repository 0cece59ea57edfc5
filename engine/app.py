"""The engine on one process: the store, the actors and their supervisor, and the commands that drive them.

`run.py` parses the command line and settings, then calls one of `serve`, `run_job`, `drain`, `migrate` or
`status` here. The engine never imports `actors/`: `run.py` passes a `JobFactory` that builds the job actors.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg

from engine import __version__
from engine.actor import Actor, Supervisor
from engine.console import Console
from engine.console.dr_view import DrSampler
from engine.database import DatabaseUnavailable, connection_failure, describe_target, open_database
from engine.http import Health, HttpServer
from engine.jobs import Job, Run, RunRequest, Services
from engine.log_writer import LogWriter
from engine.logs import AppLogSink, error_text, get_logger, install_app_log
from engine.metrics import Metrics
from engine.node import NodeHeartbeat, published_settings
from engine.rate_pauses import RatePauses
from engine.scheduler import Scheduler
from engine.schema import MigrationError
from engine.settings import JOBS, Settings
from engine.store import Store, is_outage
from engine.storefronts import Storefronts
from engine.webhooks import WebhookServer

log = get_logger(component="engine")
JobFactory = Callable[[Services], dict[str, Job]]


# How long the first connection may take before the command gives up with one line (asyncpg waits 60 s).
CONNECT_TIMEOUT_SECONDS = 15.0


@asynccontextmanager
async def opened_store(settings: Settings, *, migrate: bool = True, read_only: bool = False) -> AsyncIterator[Store]:
    """The store for these settings (starting the embedded database if needed), migrated, closed after.

    A database that cannot be reached or refuses us raises DatabaseUnavailable, one line naming host, port,
    database and user, and so does a database `migrate` refuses (an applied migration's file changed, a newer
    release migrated it). `read_only` (status, forecast): nothing is created, migrated or changed, and a database
    without the schema raises DatabaseUnavailable saying so."""
    database = await open_database(settings.database_url, settings.data_dir, create=not read_only)
    try:
        try:
            store = await asyncio.wait_for(
                Store.connect(database.dsn, settings.node_name, max_size=settings.database_pool_size,
                              min_size=1 if read_only else 2, pooler=settings.database_pooler),
                CONNECT_TIMEOUT_SECONDS)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise connection_failure(database.dsn, exc) from None
        try:
            if read_only and not await store.fetchval("schema_present"):
                raise DatabaseUnavailable(f"{describe_target(database.dsn)} has no drjobs schema (no job_runs "
                                          "table): run `migrate` first, or point DATABASE_URL at the engines' database")
            if migrate and not read_only:
                try:
                    await store.migrate()
                except MigrationError as exc:
                    # One line and exit 2, as for a database that refuses us (engine/schema.py).
                    raise DatabaseUnavailable(f"cannot migrate {describe_target(database.dsn)}: {exc}") from None
            yield store
        finally:
            await store.close()
    finally:
        await database.close()


def _stopped(event: str, job: str | None, exc: BaseException) -> int:
    """`run`/`drain` cannot go on: one line saying why (no traceback for a database outage), exit code 1."""
    error = error_text(exc, 500)
    if is_outage(exc):
        log.error(event, job=job, error=error, reason="the database cannot be reached")
    else:
        log.error(event, job=job, error=error, exc_info=exc)
    return 1


class Engine:
    """Every actor of this process, supervised."""

    def __init__(self, settings: Settings, store: Store, build_jobs: JobFactory) -> None:
        self.settings = settings
        self.store = store
        self.stop = asyncio.Event()
        self.app_log = AppLogSink(settings.app_log_level, settings.node_name)
        install_app_log(self.app_log)
        self.metrics = Metrics(node_lost_seconds=settings.node_lost_seconds)
        # A client per storefront with a key (engine/storefronts.py); DefaultStore's is `dr`.
        self.storefronts = Storefronts(settings, self.app_log, self.metrics)
        self.metrics.storefronts(self.storefronts.labels)
        dr = self.storefronts.default
        self.dr = dr
        # A 429 met here pauses every engine on this database using the key, and theirs pause this one.
        self.rate_pauses = RatePauses(store, self.storefronts.clients) if self.storefronts.clients else None
        # The webhook listener, once `serve` has started it (tests read its port).
        self.webhooks: WebhookServer | None = None
        self.services = Services(settings, store, self.app_log, self.stop, metrics=self.metrics,
                                 storefronts=self.storefronts)
        self.jobs = build_jobs(self.services)
        self.services.jobs = self.jobs
        self.node = NodeHeartbeat(store, __version__, self.storefronts.set_shares,
                                  lost_after=settings.node_lost_seconds,
                                  published=published_settings(settings, set(self.jobs), self.storefronts.published()),
                                  default_key_id=dr.key_id if dr is not None else None)
        self.log_writer = LogWriter(store, self.app_log)
        self.supervisor: Supervisor | None = None
        self.metrics.set_in_flight_source(lambda: {name: job.in_flight() for name, job in self.jobs.items()})
        self.metrics.set_queue_depth_source(
            lambda: {a.name: a.inbox.qsize() for a in (self.supervisor.actors if self.supervisor else [])})
        # Ready while Digital River accepts the key of at least one storefront (or none is configured): one
        # storefront's refused key is named in the check, but the process serves the others.
        self.health = Health(store, lambda: dict(self.supervisor.running) if self.supervisor else {},
                             lambda: len(self.storefronts.key_refused()) < max(1, len(self.storefronts)),
                             refused_storefronts=self.storefronts.key_refused)

    def _supervisor(self, with_scheduler: bool) -> Supervisor:
        actors: list[Actor[Any]] = [self.node, self.log_writer, *self.jobs.values()]
        if self.rate_pauses is not None:
            actors.append(self.rate_pauses)
        if with_scheduler:
            schedules = {name: job.schedule for name, job in self.settings.jobs.items()}
            actors.append(Scheduler(self.jobs, schedules, self.store))
        self.supervisor = Supervisor(actors, stop=self.stop, outage=is_outage, recovered=self.store.ping)
        return self.supervisor

    def _on_signals(self) -> None:
        loop = asyncio.get_running_loop()

        def stop(signame: str) -> None:
            if self.stop.is_set():
                return
            log.info("shutdown_requested", signal=signame, grace_seconds=self.settings.shutdown_grace_seconds)
            self.stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop, sig.name)

    async def serve(self) -> int:
        """Run every job on its schedule until SIGTERM/SIGINT; 0 after a clean stop, 1 if an actor gave up."""
        for name in JOBS:
            if name not in self.jobs:
                log.warning("job_not_built", job=name, detail="this engine version does not implement it yet")
        supervisor = self._supervisor(with_scheduler=True)
        self.services.autonomous = True
        self._on_signals()
        # In engine_nodes before anything else, so even a process stopped at once was seen.
        await self.node.beat()
        log.info("engine_started", node=self.store.node, version=__version__, jobs=sorted(self.jobs))
        http = HttpServer(self.settings.http_host, self.settings.http_port, self.metrics, self.health,
                          console=self.console())
        try:
            await http.start()
        except OSError as exc:
            log.error("http_port_unavailable", host=self.settings.http_host, port=self.settings.http_port,
                      error=str(exc), detail="set HTTP_HOST/HTTP_PORT to a free address (HTTP_PORT=0 picks one)")
            return 1
        log.info("http_listening", host=self.settings.http_host, port=http.port,
                 paths=["/", "/healthz", "/readyz", "/metrics"], console_actions=self.settings.admin_token is not None)
        webhooks = self._webhooks()
        if webhooks is not None:
            try:
                await webhooks.start()
            except OSError as exc:
                await http.stop()
                log.error("webhook_port_unavailable", host=self.settings.webhook_host,
                          port=self.settings.webhook_port, error=str(exc),
                          detail="set WEBHOOK_HOST/WEBHOOK_PORT to a free address, or WEBHOOK_PORT=off")
                return 1
        try:
            async with self._dr_open():
                await supervisor.run()
                await supervisor.shutdown(self.settings.shutdown_grace_seconds)
        finally:
            if webhooks is not None:
                await webhooks.stop()
            await http.stop()
        log.info("engine_stopped", clean=supervisor.failed is None, reason=supervisor.failed)
        return 0 if supervisor.failed is None else 1

    def console(self, read_only_reason: str | None = None) -> Console:
        """The operator console of this process (engine/console), on its HTTP listener: its Digital River page
        samples this process's client."""
        samplers = {storefront.label: DrSampler(storefront.client) for storefront in self.storefronts}
        return Console(self.settings, self.store, built=set(self.jobs), samplers=samplers,
                       read_only_reason=read_only_reason)

    def _webhooks(self) -> WebhookServer | None:
        """The webhook listener of `serve` (None with WEBHOOK_PORT=off): each stored event wakes this process's
        digital-river-events job."""
        if self.settings.webhook_port is None:
            return None
        events = self.jobs.get("digital-river-events")

        def wake() -> None:
            # A full inbox already holds a run that will apply this event.
            if events is not None:
                events.offer(RunRequest(datetime.now(UTC), "message"))

        # DefaultStore's path always (refusing every delivery without DR_WEBHOOK_SECRET), and one per other
        # storefront this process has a key for.
        secrets = {config.label: config.webhook_secret for config in self.settings.keyed_storefronts}
        self.webhooks = WebhookServer(self.settings.webhook_host, self.settings.webhook_port, self.store,
                                      self.metrics, secret=self.settings.dr_webhook_secret,
                                      tolerance=self.settings.webhook_tolerance_seconds, wake=wake, secrets=secrets)
        return self.webhooks

    async def drive(self, work: Callable[[], Any]) -> int:
        """Run the actors (no scheduler) while `work` drives the jobs; stop them after. `work`'s result, or 1 if
        an actor gave up."""
        supervisor = self._supervisor(with_scheduler=False)
        self.services.autonomous = False
        self.stop.clear()
        self._on_signals()
        await self.node.beat()
        async with self._dr_open():
            supervising = asyncio.create_task(supervisor.run(), name="supervisor")
            try:
                result: int = await work()
            finally:
                await supervisor.shutdown(self.settings.shutdown_grace_seconds)
                await supervising
        return result if supervisor.failed is None else 1

    @asynccontextmanager
    async def _dr_open(self) -> AsyncIterator[None]:
        async with self.storefronts:
            yield

    async def run_job(self, name: str) -> int:
        """One run of `name` now: 0 if it finished (even with failed records), 1 if it crashed."""
        async def work() -> int:
            try:
                if await self.jobs[name].is_paused():
                    log.error("job_is_paused", job=name, detail="resume it with `python run.py resume JOB` first")
                    return 1
                run = await self._run(self.jobs[name], "manual")
            except Exception as exc:
                return _stopped("run_stopped", name, exc)
            if run is not None and run.status != "succeeded":
                log.error("run_stopped", job=name, error=run.error)
            return 0 if run is not None and run.status == "succeeded" else 1
        return await self.drive(work)

    async def drain(self, pause_seconds: float = 1.0) -> int:
        """Run the jobs again and again until nothing is due anywhere; 1 (with one line saying why) as soon as a
        run crashes or the database cannot be reached."""
        async def work() -> int:
            while not self.stop.is_set():
                name = None
                try:
                    # A paused job's records are not due for drain: nobody may claim them until it is resumed.
                    due = {}
                    for name, job in self.jobs.items():
                        due[name] = False if await job.is_paused() else await self._has_due(job)
                    name = None
                    if not any(due.values()):
                        log.info("drain_finished")
                        return 0
                    progress = False
                    for name, job in self.jobs.items():
                        if self.stop.is_set() or not due[name]:
                            continue
                        run = await self._run(job, "drain")
                        if run is not None and run.status != "succeeded":
                            # As `run JOB`: a crashed run (a refused key, the database gone) ends the drain with 1
                            # rather than being repeated at once, again and again.
                            log.error("drain_stopped", job=name, error=run.error)
                            return 1
                        progress |= run is not None and run.claimed > 0
                except Exception as exc:
                    return _stopped("drain_stopped", name, exc)
                if not progress:
                    # Due rows are leased by another process (or are being finished): wait for them.
                    log.info("drain_waiting", due=sorted(k for k, v in due.items() if v))
                    try:
                        await asyncio.wait_for(self.stop.wait(), timeout=pause_seconds)
                    except TimeoutError:
                        pass
            return 0
        return await self.drive(work)

    async def _has_due(self, job: Job) -> bool:
        """Whether `job` has work, for drain. A check that runs out of time (a database far larger than its
        statistics say, say) is one line naming the job's check and the size of the table it reads, and the job is
        run as if it had work: a slow question never ends a drain that still has work."""
        try:
            return await job.has_due()
        except (TimeoutError, asyncpg.QueryCanceledError) as exc:
            rows = await self.store.fetchval("table_size_estimate", job.due_table) if job.due_table else None
            log.warning("due_check_slow", job=job.job_name, table=job.due_table, estimated_rows=rows,
                        error=error_text(exc, 200), detail="run as if it had work")
            return True

    async def _run(self, job: Job, trigger: str) -> Run | None:
        # Fire time is now; on the rare clash with another process's run of the same microsecond, try again
        # (a None also means the job was paused meanwhile: then stop trying).
        for _ in range(3):
            run = await job.run_now(trigger)
            if run is not None or job.paused:
                return run
        return None
