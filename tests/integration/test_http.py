"""The HTTP surface on a real server and a real database: /healthz, /readyz, /metrics, loopback by default."""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from engine import settings
from engine.http import Health, HttpServer
from engine.metrics import Metrics
from engine.store import Store
from tests.db import admin
from tests.integration.factories import due_subscription, process_records

ACTORS = {"node": True, "log-writer": True, "recurring-payments": True}
Serve = Callable[..., Awaitable[HttpServer]]


class World:
    """What the engine would hand to Health: actor states and the key flag, changeable by a test."""

    def __init__(self) -> None:
        self.actors = dict(ACTORS)
        self.key_ok = True

    def health(self, store: Store, **kwargs: Any) -> Health:
        return Health(store, lambda: dict(self.actors), lambda: self.key_ok, **kwargs)


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start HttpServers on 127.0.0.1, any free port; all stopped after the test."""
    async with AsyncExitStack() as stack:
        async def start(health: Health, metrics: Metrics | None = None, host: str = "127.0.0.1") -> HttpServer:
            server = HttpServer(host, 0, metrics or Metrics(), health)
            await server.start()
            stack.push_async_callback(server.stop)
            return server
        yield start


async def get(server: HttpServer, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{server.port}{path}", timeout=aiohttp.ClientTimeout(total=10)) as resp:
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, (resp.headers["Content-Type"], await resp.text())


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def gauge(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


async def test_healthz_answers_ok(serve: Serve, store: Store) -> None:
    server = await serve(World().health(store))
    assert await get(server, "/healthz") == (200, {"status": "ok"})


async def test_readyz_is_200_when_database_actors_and_key_are_good(serve: Serve, store: Store) -> None:
    server = await serve(World().health(store))
    status, body = await get(server, "/readyz")
    assert status == 200
    assert body["status"] == "ready"
    assert {name: check["ok"] for name, check in body["checks"].items()} == {
        "database": True, "actors": True, "digital_river_key": True}
    assert body["checks"]["actors"]["running"] == ACTORS


async def test_readyz_is_503_naming_the_key_when_digital_river_refused_it(serve: Serve, store: Store) -> None:
    world = World()
    server = await serve(world.health(store))
    world.key_ok = False
    status, body = await get(server, "/readyz")
    assert (status, body["status"], body["failing"]) == (503, "not_ready", ["digital_river_key"])
    assert body["checks"]["digital_river_key"] == {"ok": False}


async def test_readyz_is_503_naming_the_actor_that_is_down(serve: Serve, store: Store) -> None:
    world = World()
    server = await serve(world.health(store))
    world.actors["recurring-payments"] = False
    status, body = await get(server, "/readyz")
    assert (status, body["failing"]) == (503, ["actors"])
    assert body["checks"]["actors"]["down"] == ["recurring-payments"]


async def test_readyz_is_503_while_no_actor_runs_yet(serve: Serve, store: Store) -> None:
    world = World()
    world.actors = {}
    server = await serve(world.health(store))
    status, body = await get(server, "/readyz")
    assert (status, body["failing"]) == (503, ["actors"])


async def test_readyz_is_503_naming_the_database_when_the_pool_is_closed(serve: Serve, database_url: str) -> None:
    closed = await Store.connect(database_url, "test-node", min_size=1, max_size=1)
    await closed.close()
    server = await serve(World().health(closed))
    status, body = await get(server, "/readyz")
    assert (status, body["failing"]) == (503, ["database"])
    assert "pool is closed" in body["checks"]["database"]["error"]


async def test_readyz_is_503_naming_the_database_when_it_was_dropped(serve: Serve, pg_server_dsn: str,
                                                                     database_url: str) -> None:
    # No connection held, so the store meets the dropped database on its next query.
    store = await Store.connect(database_url, "test-node", min_size=0, max_size=1)
    try:
        await admin(pg_server_dsn, f'DROP DATABASE "{urlsplit(database_url).path.lstrip("/")}" WITH (FORCE)')
        server = await serve(World().health(store))
        status, body = await get(server, "/readyz")
        assert (status, body["failing"]) == (503, ["database"])
        assert "does not exist" in body["checks"]["database"]["error"]
    finally:
        await store.close()


async def test_readyz_is_503_naming_the_database_when_it_does_not_answer_in_time(serve: Serve,
                                                                                 database_url: str) -> None:
    busy = await Store.connect(database_url, "test-node", min_size=1, max_size=1)
    try:
        server = await serve(World().health(busy, db_timeout=0.3))
        async with busy.pool.acquire():  # its only connection is taken: the ping waits past the time box
            started = time.monotonic()
            status, body = await get(server, "/readyz")
            elapsed = time.monotonic() - started
    finally:
        await busy.close()
    assert (status, body["failing"]) == (503, ["database"])
    assert body["checks"]["database"]["error"] == "no answer within 0.3 s"
    assert elapsed < 2.0


async def test_metrics_report_oldest_due_expired_leases_records_and_live_nodes(serve: Serve, store: Store) -> None:
    now = datetime.now(UTC)
    subscription = await due_subscription(store, months_behind=1)
    # An Open installment due two hours ago, claimed by a process whose lease ran out a minute ago.
    await process_records(store, subscription, 1, next_attempt_at=now - timedelta(hours=2), locked_by="dead-node",
                          locked_until=now - timedelta(minutes=1))
    await store.execute("node_heartbeat", store.node, 1, "test-host", "test", "{}")
    metrics = Metrics()
    metrics.set_in_flight_source(lambda: {"recurring-payments": 0})
    server = await serve(World().health(store), metrics)

    status, (content_type, text) = await get(server, "/metrics")
    assert status == 200
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    found = samples(text)
    assert gauge(found, "drjobs_metrics_db_up") == 1
    installments_age = gauge(found, "drjobs_oldest_due_seconds", job="subscription-installments")
    assert installments_age is not None and 28 * 86400 <= installments_age <= 33 * 86400
    payments_age = gauge(found, "drjobs_oldest_due_seconds", job="recurring-payments")
    assert payments_age is not None and 2 * 3600 <= payments_age <= 2 * 3600 + 300
    assert gauge(found, "drjobs_oldest_due_seconds", job="order-fulfillment") == 0
    assert gauge(found, "drjobs_oldest_due_seconds", job="line-item-fulfillment") == 0
    assert gauge(found, "drjobs_expired_leases", table="subscription_process_data") == 1
    assert gauge(found, "drjobs_expired_leases", table="fulfillments") == 0
    assert gauge(found, "drjobs_expired_leases", table="line_item_fulfillments") == 0
    assert gauge(found, "drjobs_records", kind="subscriptions", status="Active") == 1
    assert gauge(found, "drjobs_records", kind="subscription_process_data", status="Open") == 1
    assert gauge(found, "drjobs_live_nodes") == 1
    assert gauge(found, "drjobs_in_flight", job="recurring-payments") == 0


async def test_metrics_follow_the_database_from_one_scrape_to_the_next(serve: Serve, store: Store) -> None:
    server = await serve(World().health(store))
    _, (_, text) = await get(server, "/metrics")
    before = samples(text)
    assert gauge(before, "drjobs_oldest_due_seconds", job="recurring-payments") == 0
    assert gauge(before, "drjobs_expired_leases", table="subscription_process_data") == 0

    subscription = await due_subscription(store)
    now = datetime.now(UTC)
    await process_records(store, subscription, 1, next_attempt_at=now - timedelta(minutes=10),
                          locked_by="dead-node", locked_until=now - timedelta(seconds=5))
    _, (_, text) = await get(server, "/metrics")
    after = samples(text)
    assert (gauge(after, "drjobs_oldest_due_seconds", job="recurring-payments") or 0) >= 600
    assert gauge(after, "drjobs_expired_leases", table="subscription_process_data") == 1


async def test_metrics_answer_within_the_time_box_when_a_query_hangs(serve: Serve, store: Store,
                                                                     database_url: str) -> None:
    metrics = Metrics(db_timeout=0.5)
    metrics.rate_limited()
    server = await serve(World().health(store), metrics)
    blocker = await asyncpg.connect(database_url)
    try:
        # The live-node count waits behind this lock; the other database reads do not touch engine_nodes.
        await blocker.execute("BEGIN; LOCK TABLE engine_nodes IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        with capture_logs() as logs:
            status, (_, text) = await get(server, "/metrics")
        elapsed = time.monotonic() - started
    finally:
        await blocker.close()
    assert [(e["event"], e["gauges"], e["error"]) for e in logs] == [
        ("metrics_db_refresh_failed", ["drjobs_live_nodes"], "no answer within 0.5 s")]
    assert status == 200
    assert elapsed < 2.0
    found = samples(text)
    assert gauge(found, "drjobs_metrics_db_up") == 0
    assert gauge(found, "drjobs_live_nodes") is None
    assert gauge(found, "drjobs_expired_leases", table="fulfillments") == 0
    assert gauge(found, "drjobs_dr_events_backlog", what="events_pending") == 0
    assert gauge(found, "drjobs_dr_429_total", storefront="DefaultStore") == 1

    _, (_, text) = await get(server, "/metrics")
    assert gauge(samples(text), "drjobs_metrics_db_up") == 1


async def test_metrics_flag_the_database_down_and_keep_the_counters_when_the_pool_is_closed(
        serve: Serve, database_url: str) -> None:
    closed = await Store.connect(database_url, "test-node", min_size=1, max_size=1)
    await closed.close()
    metrics = Metrics()
    metrics.run_finished("recurring-payments", "succeeded", 1, 1, 0, 0.2)
    server = await serve(World().health(closed), metrics)
    with capture_logs() as logs:
        status, (_, text) = await get(server, "/metrics")
    assert status == 200
    assert [e["event"] for e in logs] == ["metrics_db_refresh_failed"]
    found = samples(text)
    assert gauge(found, "drjobs_metrics_db_up") == 0
    assert not {name for name, _ in found} & {"drjobs_oldest_due_seconds", "drjobs_expired_leases", "drjobs_records",
                                              "drjobs_live_nodes"}
    assert gauge(found, "drjobs_job_runs_total", job="recurring-payments", status="succeeded") == 1


async def test_server_binds_to_loopback_by_default(store: Store) -> None:
    defaults = settings.load({"HTTP_PORT": "0"}, command="status", is_terminal=False)
    assert defaults.http_host == "127.0.0.1"
    server = HttpServer(defaults.http_host, defaults.http_port, Metrics(), World().health(store))
    await server.start()
    try:
        # The listening sockets' own addresses (getsockname), not the configured text.
        assert all(ip_address(host).is_loopback for host, _ in server.addresses)
        assert server.address[0] == "127.0.0.1" and server.port > 0
        assert (await get(server, "/healthz"))[0] == 200
    finally:
        await server.stop()


async def test_a_stopped_server_refuses_connections(serve: Serve, store: Store) -> None:
    server = await serve(World().health(store))
    port = server.port
    await server.stop()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"http://127.0.0.1:{port}/healthz")


async def test_live_nodes_count_heartbeats_younger_than_node_lost_seconds(store: Store) -> None:
    await store.execute("node_heartbeat", "fresh", 1, "test-host", "test", "{}")
    await store.execute("node_heartbeat", "quiet", 2, "test-host", "test", "{}")
    await store.pool.execute("UPDATE engine_nodes SET heartbeat_at = now() - interval '60 seconds' WHERE name = 'quiet'")
    strict, patient = Metrics(node_lost_seconds=30), Metrics(node_lost_seconds=120)
    assert await strict.refresh_from_store(store) and await patient.refresh_from_store(store)
    assert gauge(samples(strict.render().decode()), "drjobs_live_nodes") == 1
    assert gauge(samples(patient.render().decode()), "drjobs_live_nodes") == 2


async def test_the_api_key_never_reaches_metrics_or_health(database_url: str, store: Store) -> None:
    """A whole serve process with a recognisable key, some charges and a refused call: /metrics, /readyz and
    /healthz never show the key or an Authorization header."""
    from sandbox.config import SandboxConfig
    from sandbox.server import Sandbox
    from tests.integration.factories import due_subscription
    from tests.support import EngineProcess, engine_env

    canary = "sk_test_CANARY_metrics_0123456789abcdef"
    for _ in range(3):
        await due_subscription(store)
    await due_subscription(store, source="src_hard_decline_fraud")
    async with Sandbox(SandboxConfig(seed=1)) as sandbox:
        env = engine_env(database_url, DR_API_KEY=canary, DR_API_URL=sandbox.url,
                         SUBSCRIPTION_INSTALLMENTS_SCHEDULE="every 1s", RECURRING_PAYMENTS_SCHEDULE="every 1s")
        async with EngineProcess(["serve"], env) as engine:
            [listening] = await engine.wait_for("http_listening")
            await engine.wait_for("installment_charged", count=3, timeout=60)
            sandbox.configure(api_key="sk_test_some_other_key")  # the next call is refused: 401
            await store.pool.execute("UPDATE subscriptions SET installment_next_run_date = current_date - 40")
            await engine.wait_for("installment_key_refused", timeout=60)
            bodies = []
            async with aiohttp.ClientSession() as session:
                for path in ("/metrics", "/readyz", "/healthz"):
                    async with session.get(f"http://127.0.0.1:{listening['port']}{path}") as response:
                        bodies.append(await response.text())
            engine.signal(signal.SIGTERM)
            await engine.wait()
    metrics, ready, _ = bodies
    assert 'drjobs_record_outcomes_total{job="recurring-payments",outcome="installment_charged"} 3.0' in metrics
    assert "digital_river_key" in ready
    for body in bodies:
        assert canary not in body and "Authorization" not in body and "Bearer" not in body


async def test_metrics_report_each_jobs_last_success_and_whether_it_is_paused(store: Store) -> None:
    finished = datetime(2026, 11, 30, 12, 0, 5, tzinfo=UTC)
    await store.pool.execute(
        "INSERT INTO job_runs (job, fire_time, status, started_at, finished_at) VALUES "
        "('recurring-payments', $1, 'succeeded', $1, $2), "
        "('recurring-payments', $1 + interval '1 hour', 'failed', $1 + interval '1 hour', $2 + interval '1 hour'), "
        "('order-fulfillment', $1, 'failed', $1, $2)", finished - timedelta(seconds=5), finished)
    await store.pool.execute("INSERT INTO job_controls (job, paused, changed_by) VALUES ('log-cleanup', true, 'ops')")
    metrics = Metrics()
    assert await metrics.refresh_from_store(store)
    found = samples(metrics.render().decode())
    # The newest succeeded run, not the newest run; no series for a job that never succeeded.
    assert gauge(found, "drjobs_job_last_success_timestamp_seconds", job="recurring-payments") == finished.timestamp()
    assert gauge(found, "drjobs_job_last_success_timestamp_seconds", job="order-fulfillment") is None
    assert gauge(found, "drjobs_job_paused", job="log-cleanup") == 1
    assert gauge(found, "drjobs_job_paused", job="recurring-payments") == 0
