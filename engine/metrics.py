"""Prometheus metrics of one engine: counters the engine feeds as work happens, gauges read at scrape time.

One `Metrics` per engine, on its own `CollectorRegistry` (never the library's global one), so tests and several
engines in one process never share a series. `render()` gives the text exposition format for `/metrics`.

Fed by the engine (each call is a dict lookup and an addition; they run per record and per request):

    drjobs_job_runs_total{job,status}                     run_finished
    drjobs_job_records_total{job,outcome}                 run_finished (outcome: claimed | succeeded | failed)
    drjobs_job_run_seconds{job}                           run_finished (histogram)
    drjobs_record_outcomes_total{job,outcome}             record_outcome (outcome: the record's log event)
    drjobs_dr_requests_total{endpoint,status,storefront}  dr_request (status: HTTP status, `error` without one)
    drjobs_dr_request_seconds{endpoint}                   dr_request (histogram, 5 ms … 30 s)
    drjobs_dr_rate_limit_wait_seconds_total               rate_limit_wait
    drjobs_dr_429_total{storefront}                       rate_limited
    drjobs_lease_lost_total{table}                        lease_lost
    drjobs_settlement_conflicts_total{job}                settlement_conflict (an alarm: see docs/reliability.md)

Read when scraped, from callables the engine registers:

    drjobs_in_flight{job}                                 set_in_flight_source
    drjobs_inbox_depth{actor}                             set_queue_depth_source

Read from the database by `refresh_from_store` (which `/metrics` awaits before `render`), within
`db_timeout` seconds in all, so a slow database cannot hang a scrape:

    drjobs_oldest_due_seconds{job}                        age of the job's oldest due record; 0 when none is due
    drjobs_expired_leases{table}                          leased rows whose lease ran out
    drjobs_records{kind,status}                           the `status_counts` of `status`
    drjobs_live_nodes                                     engine processes heartbeating (within node_lost_seconds)
    drjobs_job_last_success_timestamp_seconds{job}        when a run of the job last succeeded, cluster-wide
    drjobs_job_paused{job}                                1 while the job is paused
    drjobs_installments_needing_attention{reason,status}  `status_attention`: records an operator should look at
    drjobs_metrics_db_up                                  1 if every read of the last refresh succeeded, else 0

A database gauge whose read failed or ran out of time is left out of the output (a stale number would look
current); the others are exported and `drjobs_metrics_db_up` is 0.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from engine.logs import error_text, get_logger
from engine.node import LOST_AFTER_SECONDS
from engine.settings import DEFAULT_STOREFRONT, JOBS
from engine.store import LEASED_TABLES

if TYPE_CHECKING:
    from engine.store import Store

log = get_logger(component="metrics")

# The text format `generate_latest` writes (prometheus-client's CONTENT_TYPE_LATEST names a newer version).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Digital River answers in tens of milliseconds; the client's timeout is 30 s by default.
DR_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A run is a second's work on a quiet hour and tens of minutes on a backlog.
JOB_RUN_BUCKETS = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)
DB_TIMEOUT_SECONDS = 2.0
# Jobs whose oldest due record is measured (log-cleanup has no "due" record).
# Rows of the claim order read per query when looking for recurring-payments' first due record.
OLDEST_DUE_WINDOW = 5000
DUE_JOBS = ("subscription-installments", "recurring-payments", "order-fulfillment", "line-item-fulfillment")

Sample = tuple[tuple[str, ...], float]  # label values, value
Source = Callable[[], dict[str, int]]
# What a failed database read raises: no connection, a closed pool, an SQL error, the time box.
DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class Metrics:
    """The engine's metrics; see the module docstring for every series."""

    def __init__(self, *, db_timeout: float = DB_TIMEOUT_SECONDS,
                 node_lost_seconds: float = LOST_AFTER_SECONDS) -> None:
        """`db_timeout`: the time box of all database reads of one scrape. `node_lost_seconds`: a node is live
        while its heartbeat is younger (NODE_LOST_SECONDS)."""
        self.registry = CollectorRegistry()
        self.db_timeout = db_timeout
        self.node_lost_seconds = node_lost_seconds
        # The labels of the storefronts this process has a key for (set by the engine); None: no
        # drjobs_storefront_waiting_records gauge.
        self.storefronts_with_key: list[str] | None = None
        self.content_type = CONTENT_TYPE
        r = self.registry
        self._runs = Counter("drjobs_job_runs", "Job runs by how they ended.", ["job", "status"], registry=r)
        self._records = Counter("drjobs_job_records", "Records claimed, succeeded and failed by job runs.",
                                ["job", "outcome"], registry=r)
        self._run_seconds = Histogram("drjobs_job_run_seconds", "Duration of job runs.", ["job"],
                                      buckets=JOB_RUN_BUCKETS, registry=r)
        self._outcomes = Counter("drjobs_record_outcomes", "Records by outcome event (installment_charged, …).",
                                 ["job", "outcome"], registry=r)
        self._dr_requests = Counter("drjobs_dr_requests", "Digital River requests (each attempt) by status and the "
                                    "storefront whose key sent them.", ["endpoint", "status", "storefront"],
                                    registry=r)
        self._dr_seconds = Histogram("drjobs_dr_request_seconds", "Digital River request latency.", ["endpoint"],
                                     buckets=DR_REQUEST_BUCKETS, registry=r)
        self._rate_wait = Counter("drjobs_dr_rate_limit_wait_seconds",
                                  "Seconds requests waited for the Digital River rate budget.", registry=r)
        self._dr_429 = Counter("drjobs_dr_429", "Digital River 429 (rate limited) answers, by storefront.",
                               ["storefront"], registry=r)
        self._lease_lost = Counter("drjobs_lease_lost", "In-flight rows whose lease this process lost.", ["table"],
                                   registry=r)
        self._conflicts = Counter(
            "drjobs_settlement_conflicts",
            "Write-backs that found their record already settled by another worker with a different result.",
            ["job"], registry=r)
        self._events = Counter("drjobs_dr_events", "Digital River events applied, by type and outcome "
                               "(Processed, Ignored, Failed).", ["type", "outcome"], registry=r)
        self._events_stored = Counter("drjobs_dr_events_stored", "Digital River events stored, by how they came "
                                      "(webhook, poll); a repeat delivery is not counted.", ["source"], registry=r)
        self._webhook_refusals = Counter("drjobs_webhook_refusals", "Webhook deliveries refused, by reason "
                                         "(signature_missing, signature_malformed, signature_wrong, stale, "
                                         "no_secret, bad_body, too_large, store_failed).", ["reason"], registry=r)
        # Labelled children by label values: `labels()` validates and locks on every call, a dict get does not.
        self._children: dict[tuple[object, ...], Any] = {}
        # At 0 from the start (for DefaultStore, and each storefront `storefronts` names), so the first 429 is an
        # increase a rule sees.
        self._child(self._dr_429, DEFAULT_STOREFRONT)
        self._in_flight: Source | None = None
        self._queue_depth: Source | None = None
        self._db: dict[str, list[Sample]] = {}
        self._db_up: float | None = None  # None until the first refresh
        self._refreshing = asyncio.Lock()
        r.register(_ScrapeTime(self))

    # -- fed by the engine ---------------------------------------------------------------------------------------

    def run_finished(self, job: str, status: str, claimed: int, succeeded: int, failed: int, seconds: float) -> None:
        """A job run ended (`status`: succeeded | failed) after `seconds`, having counted these records."""
        self._child(self._runs, job, status).inc()
        if claimed:
            self._child(self._records, job, "claimed").inc(claimed)
        if succeeded:
            self._child(self._records, job, "succeeded").inc(succeeded)
        if failed:
            self._child(self._records, job, "failed").inc(failed)
        self._child(self._run_seconds, job).observe(seconds)

    def dr_event_applied(self, kind: str, outcome: str) -> None:
        """A stored Digital River event was applied (`outcome`: Processed, Ignored, Failed)."""
        self._child(self._events, kind, outcome).inc()

    def dr_events_stored(self, source: str, count: int) -> None:
        if count:
            self._child(self._events_stored, source).inc(count)

    def webhook_refused(self, reason: str) -> None:
        self._child(self._webhook_refusals, reason).inc()

    def record_outcome(self, job: str, outcome: str) -> None:
        """One record ended with `outcome`, its log event (installment_charged, fulfillment_completed, …)."""
        self._child(self._outcomes, job, outcome).inc()

    def dr_request(self, endpoint: str, status: int | None, seconds: float,
                   storefront: str = DEFAULT_STOREFRONT) -> None:
        """One Digital River request (every attempt, retries included) with `storefront`'s key; `status` None when
        no answer came."""
        key = (self._dr_requests, endpoint, status, storefront)
        counter = self._children.get(key)
        if counter is None:
            counter = self._children[key] = self._dr_requests.labels(
                endpoint, "error" if status is None else str(status), storefront)
        counter.inc()
        self._child(self._dr_seconds, endpoint).observe(seconds)

    def rate_limit_wait(self, seconds: float) -> None:
        """A request waited `seconds` for the rate budget (the token bucket, or a 429 pause)."""
        self._rate_wait.inc(seconds)

    def storefronts(self, labels: Iterable[str]) -> None:
        """The storefronts this process has a key for: their 429 counters start at 0, and records of every other
        storefront are counted as waiting for a key (drjobs_storefront_waiting_records)."""
        self.storefronts_with_key = list(labels)
        for label in self.storefronts_with_key:
            self._child(self._dr_429, label)

    def rate_limited(self, storefront: str = DEFAULT_STOREFRONT) -> None:
        """Digital River answered 429 to `storefront`'s key."""
        self._child(self._dr_429, storefront).inc()

    def lease_lost(self, table: str, count: int) -> None:
        """A heartbeat found `count` in-flight rows of `table` no longer leased to this process."""
        self._child(self._lease_lost, table).inc(count)

    def settlement_conflict(self, job: str) -> None:
        """A write-back found its record settled by someone else with another Digital River id: an alarm."""
        self._child(self._conflicts, job).inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- read at scrape time -------------------------------------------------------------------------------------

    def set_in_flight_source(self, fn: Source) -> None:
        """`fn()` → {job: records in flight}, called on every scrape."""
        self._in_flight = fn

    def set_queue_depth_source(self, fn: Source) -> None:
        """`fn()` → {actor: messages waiting in its inbox}, called on every scrape."""
        self._queue_depth = fn

    async def refresh_from_store(self, store: Store) -> bool:
        """Read the database gauges, all within `db_timeout` seconds; True if every read succeeded.

        A read that fails or runs out of time drops its gauge until the next refresh and sets
        `drjobs_metrics_db_up` to 0; the others are kept. Concurrent scrapes refresh one after the other.
        """
        async with self._refreshing:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.db_timeout
            failed: dict[str, str] = {}
            for name, read in (
                ("drjobs_oldest_due_seconds", _oldest_due),
                ("drjobs_expired_leases", _expired_leases),
                ("drjobs_records", _records),
                ("drjobs_installments_needing_attention", _attention),
                ("drjobs_dr_events_backlog", _events_backlog),
                ("drjobs_job_last_success_timestamp_seconds", _last_success),
                ("drjobs_job_paused", _paused),
                ("drjobs_storefront_waiting_records", self._waiting),
                ("drjobs_live_nodes", self._live_nodes),
            ):
                try:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise TimeoutError
                    self._db[name] = await asyncio.wait_for(read(store), remaining)
                except DB_ERRORS as exc:
                    self._db.pop(name, None)
                    failed[name] = _describe(exc, self.db_timeout)
            self._db_up = 0.0 if failed else 1.0
            if failed:
                log.warning("metrics_db_refresh_failed", gauges=sorted(failed), error=next(iter(failed.values())))
            return not failed

    async def _waiting(self, store: Store) -> list[Sample]:
        if self.storefronts_with_key is None:
            return []
        return [((row["label"], row["kind"]), float(row["count"]))
                for row in await waiting_for_key(store, self.storefronts_with_key)]

    async def _live_nodes(self, store: Store) -> list[Sample]:
        return [((), float(await store.fetchval("live_node_count", self.node_lost_seconds)))]

    def render(self) -> bytes:
        """Every series in the Prometheus text format (`content_type`)."""
        return generate_latest(self.registry)

    def _scrape_families(self) -> Iterable[Metric]:
        yield from _source_family("drjobs_in_flight", "Records in flight by job.", "job", self._in_flight)
        yield from _source_family("drjobs_inbox_depth", "Messages waiting in each actor's inbox.", "actor",
                                  self._queue_depth)
        for name, (documentation, labels) in DB_GAUGES.items():
            samples = self._db.get(name)
            if samples is None:
                continue
            family = GaugeMetricFamily(name, documentation, labels=labels)
            for values, value in samples:
                family.add_metric(list(values), value)
            yield family
        if self._db_up is not None:
            yield GaugeMetricFamily("drjobs_metrics_db_up", "1 if the last scrape read every database gauge in time.",
                                    value=self._db_up)


class _ScrapeTime:
    """The collector of the scrape-time gauges (prometheus-client calls `collect` inside `generate_latest`)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics._scrape_families()


DB_GAUGES: dict[str, tuple[str, list[str]]] = {
    "drjobs_oldest_due_seconds": ("Age of the job's oldest due record; 0 when nothing is due.", ["job"]),
    "drjobs_expired_leases": ("Leased rows whose lease ran out (their process died or stalled).", ["table"]),
    "drjobs_records": ("Records by status (as in `run.py status`).", ["kind", "status"]),
    "drjobs_live_nodes": ("Engine processes heartbeating.", []),
    "drjobs_job_last_success_timestamp_seconds": ("When a run of the job last succeeded on any engine process (Unix "
                                                  "time); no series for a job that never succeeded.", ["job"]),
    "drjobs_job_paused": ("1 while the job is paused (`pause JOB`), else 0.", ["job"]),
    "drjobs_storefront_waiting_records": (
        "Open records of a storefront this process has no Digital River key for (DR_API_KEY_<STORE>): no job touches "
        "them. kind: installments (counted up to 100,000), cancellations, fulfillment_lines.", ["storefront", "kind"]),
    "drjobs_dr_events_backlog": ("Digital River events stored and not applied yet; installment records Pending "
                                 "(order made, payment not confirmed); seconds since the newest event was heard.",
                                 ["what"]),
    "drjobs_installments_needing_attention": (
        "Installment records an operator should look at, by reason (checkout_unknown: Digital River does not know "
        "the record's checkout; subscription_cancelled/suspended: not charged) and status.", ["reason", "status"]),
}


def _source_family(name: str, documentation: str, label: str, source: Source | None) -> Iterable[Metric]:
    if source is None:
        return
    try:
        values = source()
    except Exception as exc:  # the engine's callable: a bug there must not take /metrics down
        log.warning("metrics_source_failed", metric=name, error=error_text(exc))
        return
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    yield family


async def _oldest_due(store: Store) -> list[Sample]:
    ages = {row["job"]: row["age"] for row in await oldest_due(store)}
    return [((job,), max(0.0, ages.get(job) or 0.0)) for job in DUE_JOBS]


async def first_due_payment(store: Store, window: int = OLDEST_DUE_WINDOW,
                            labels: Iterable[str] | None = None) -> datetime | None:
    """The earliest next_attempt_at among the first due record in claim order of each storefront in `labels`
    (storefront_label; None: every storefront with open records), None when none is due. Each storefront's claim
    order is walked `window` rows at a time (`payment_claim_window_end`): it costs the rows before its first due
    record, never a count of the backlog. Drain's check (the storefronts with a key) and the oldest-due age use it."""
    if labels is None:
        labels = [row["label"] for row in await store.fetch("payment_storefronts")]
    first: datetime | None = None
    for label in labels:
        cursor: tuple[Any, int] = (date.min, 0)
        while True:
            found = await store.fetchrow("payment_claim_window_end", *cursor, window, label)
            if found is None:
                break
            if found["due"]:
                if first is None or found["first_due_at"] < first:
                    first = found["first_due_at"]
                break
            cursor = (found["claim_date"], found["id"])
    return first


async def oldest_due(store: Store) -> list[dict[str, Any]]:
    """Per job ({"job", "age"}), the age in seconds of its oldest due record (also for `status`): the jobs'
    `metrics_oldest_due`, and recurring-payments' first due record in claim order (`first_due_payment`)."""
    zones = [row["time_zone"] for row in await store.fetch("account_time_zones")]
    rows = [dict(row) for row in await store.fetch("metrics_oldest_due", zones)]
    first_due = await first_due_payment(store)
    age = None if first_due is None else (datetime.now(UTC) - first_due).total_seconds()
    return [*rows, {"job": "recurring-payments", "age": age}]


async def _expired_leases(store: Store) -> list[Sample]:
    return [((table,), float(await store.fetchval("expired_lease_count", table=table)))
            for table in sorted(LEASED_TABLES)]


async def _attention(store: Store) -> list[Sample]:
    return [((row["reason"], row["status"]), float(row["count"])) for row in await store.fetch("status_attention")]


async def _events_backlog(store: Store) -> list[Sample]:
    row = await store.fetchrow("events_status")
    if row is None:
        return []
    samples: list[Sample] = [(("events_pending",), float(row["backlog"])),
                             (("installments_pending",), float(row["pending_installments"]))]
    if row["last_received_at"] is not None:
        age = (datetime.now(UTC) - row["last_received_at"]).total_seconds()
        samples.append((("seconds_since_last_event",), max(0.0, age)))
    return samples


async def _last_success(store: Store) -> list[Sample]:
    return [((row["job"],), row["at"]) for row in await store.fetch("metrics_last_success", list(JOBS))]


async def _paused(store: Store) -> list[Sample]:
    return [((row["job"],), row["paused"]) for row in await store.fetch("metrics_paused", list(JOBS))]


async def _records(store: Store) -> list[Sample]:
    return [((row["kind"], row["status"]), float(row["count"])) for row in await record_counts(store)]


# The tables whose records `status` and /metrics count by status, and the status column of each.
COUNTED_TABLES: dict[str, str] = {
    "subscriptions": "status",
    "subscription_process_data": "subscription_job_run_status",
    "fulfillments": "efn_status",
    "line_item_fulfillments": "efn_status",
    "application_logs": "logging_level",
    "dr_events": "status",
}
# A table the planner puts at this many rows or more is counted from its statistics, not row by row: a count of
# 1,000,000 process-data records took 0.5-0.8 s here (issue 14); the estimate reads the catalog.
COUNT_EXACTLY_BELOW = 100_000


async def record_counts(store: Store, exact_below: int = COUNT_EXACTLY_BELOW) -> list[dict[str, Any]]:
    """Records by status for each of COUNTED_TABLES: {"kind", "status", "count", "estimated"}. Tables the planner
    puts at COUNT_EXACTLY_BELOW rows or more are estimated from the last ANALYZE (row count × each status's share
    among the column's most common values) when those statistics cover every row; the rest are counted."""
    kinds, columns = list(COUNTED_TABLES), list(COUNTED_TABLES.values())
    stats: dict[str, tuple[float, list[tuple[str, float]]]] = {}
    for row in await store.fetch("record_count_estimates", kinds, columns):
        rows, shares = stats.setdefault(row["kind"], (row["rows"], []))
        if row["status"] is not None:
            shares.append((row["status"], row["freq"]))
    estimated: list[dict[str, Any]] = []
    exact: list[str] = []
    for kind in kinds:
        rows, shares = stats.get(kind, (-1.0, []))
        if rows >= exact_below and shares and sum(freq for _, freq in shares) >= 0.999:
            estimated += [{"kind": kind, "status": status, "count": round(freq * rows), "estimated": True}
                          for status, freq in shares]
        else:
            exact.append(kind)
    counted = [{"kind": r["kind"], "status": r["status"], "count": r["count"], "estimated": False}
               for r in await store.fetch("status_counts", exact)] if exact else []
    return sorted(counted + estimated, key=lambda r: (r["kind"], r["status"] or ""))




# Open installment records of a storefront without a key are counted up to this many (one index walk each).
WAITING_COUNT_LIMIT = 100_000


async def waiting_for_key(store: Store, with_key: Iterable[str], *,
                          subscriptions: bool = False) -> list[dict[str, Any]]:
    """Records of storefronts not in `with_key` (labels), which wait for a key: {"label", "kind", "count"}; with
    `subscriptions`, also their due subscriptions (kind `subscriptions_due`: a walk of every due subscription, so
    for status and the console, not for every scrape)."""
    labels = list(with_key)
    rows = [dict(row) for row in await store.fetch("storefronts_waiting_for_key", labels, WAITING_COUNT_LIMIT)]
    if subscriptions:
        rows += [dict(row) for row in await store.fetch("subscriptions_waiting_for_key", labels, WAITING_COUNT_LIMIT)]
    return sorted(rows, key=lambda row: (row["label"], row["kind"]))


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    return error_text(exc)
