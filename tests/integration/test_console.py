"""The operator console over HTTP, without a browser: every page on a seeded store, and the rules an action must pass
(ADMIN_TOKEN set, signed in, the session's CSRF token, a same-origin POST), each refusal and each action's effect
on the store and the audit log. tests/browser/test_console.py drives the same pages in Chromium."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from actors.subscription_installments import add_months
from engine import forecast
from engine.console import Console
from engine.console.auth import COOKIE, Auth, origin_refusal
from engine.console.dr_view import DrSampler
from engine.console.forecast_view import ForecastCache
from engine.http import Health, HttpServer
from engine.metrics import Metrics
from engine.settings import SettingsError, load
from engine.store import Store
from tests.integration.factories import process_records, subscription

TOKEN = "console-test-admin-token-0123456789"
Start = Callable[..., Awaitable["Served"]]


@dataclass
class Served:
    server: HttpServer
    console: Console

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


@pytest.fixture
async def serve(database_url: str, store: Store) -> AsyncIterator[Start]:
    """Start the HTTP listener with the console on the test's store: `await serve(ADMIN_TOKEN=…)`."""
    async with AsyncExitStack() as stack:
        async def start(sampler: DrSampler | None = None, read_only_reason: str | None = None,
                        **env: str) -> Served:
            settings = load({"DATABASE_URL": database_url, "HTTP_PORT": "0", **env}, command="status",
                            is_terminal=False)
            console = Console(settings, store, built=set(settings.jobs), sampler=sampler,
                              read_only_reason=read_only_reason)
            server = HttpServer("127.0.0.1", 0, Metrics(), Health(store, dict, lambda: True), console=console)
            await server.start()
            stack.push_async_callback(server.stop)
            return Served(server, console)
        yield start


@dataclass
class Seeded:
    failed: int
    failed_code: int
    open_record: int
    fulfillment: int
    line: int
    ids: dict[str, int] = field(default_factory=dict)


async def seed(store: Store) -> Seeded:
    """Two Failed installments (declined, fraud), an Open one after a decline, a Failed line item of a Failed
    fulfillment, application_logs rows about them, job runs and a live engine process."""
    sub = await subscription(store)
    failed, failed_code, open_record = await process_records(store, sub, 3)
    await store.pool.execute(
        "UPDATE subscription_process_data SET subscription_job_run_status = 'Failed', subscription_retry_count = 4, "
        "last_error_code = 'insufficient_funds', last_error_message = 'declined <b>four</b> times', "
        "dr_checkout_id = 'chk_console_1' WHERE id = $1", failed)
    await store.pool.execute(
        "UPDATE subscription_process_data SET subscription_job_run_status = 'Failed', last_error_code = 'fraud', "
        "last_error_message = 'hard decline: fraud' WHERE id = $1", failed_code)
    await store.pool.execute(
        "UPDATE subscription_process_data SET subscription_retry_count = 1, next_attempt_at = now() + interval '1 day',"
        " last_error_code = 'insufficient_funds' WHERE id = $1", open_record)
    account = await store.pool.fetchval("SELECT account_id FROM subscriptions WHERE id = $1", sub)
    order = await store.pool.fetchval(
        "INSERT INTO orders (account_id, dr_order_id, dr_order_state) VALUES ($1, 'ord_console_9', 'accepted') "
        "RETURNING id", account)
    fulfillment = await store.pool.fetchval(
        "INSERT INTO fulfillments (order_id, dr_order_id, dr_order_state, efn_status, message) VALUES "
        "($1, 'ord_console_9', 'accepted', 'Failed', 'order refused') RETURNING id", order)
    line = await store.pool.fetchval(
        "INSERT INTO line_item_fulfillments (fulfillment_id, fulfill_quantity, efn_status, retry_count, message, "
        "dr_order_item_id) VALUES ($1, 1, 'Failed', 6, 'quantity exceeds the available quantity', 'item_9') "
        "RETURNING id", fulfillment)
    await store.pool.execute(
        "INSERT INTO application_logs (logging_level, module_name, message, record_id, response_status_code, request,"
        " response) VALUES ('ERROR', 'recurring-payments', 'installment_failed: declined', $1, 409, "
        "'{\"path\": \"/orders\"}', '{\"type\": \"conflict\"}'), "
        "('ERROR', 'line-item-fulfillment', 'line_item_failed: refused', $2, 409, NULL, NULL)",
        str(failed), str(line))
    await store.pool.execute(
        "INSERT INTO job_runs (job, fire_time, node, started_at, finished_at, status, claimed, succeeded, failed) "
        "VALUES ('recurring-payments', now() - interval '1 hour', 'node-a', now() - interval '1 hour', "
        "now() - interval '1 hour' + interval '2.5 seconds', 'succeeded', 3, 1, 2)")
    await store.execute("node_heartbeat", "node-a", 4242, "host-a", "0.1.0",
                        '{"jobs": {"recurring-payments": {"schedule": "every 30s", "schedule_description": '
                        '"every 30 seconds", "concurrency": 7}}, "dr_api_url": "https://user:pw@dr.example"}')
    return Seeded(failed, failed_code, open_record, fulfillment, line)


async def get(base: str, path: str, **kwargs: Any) -> tuple[int, str, Any]:
    async with aiohttp.ClientSession() as http, http.get(base + path, allow_redirects=False, **kwargs) as response:
        return response.status, await response.text(), response.headers


class Client:
    """A cookie-keeping client of one console, posting forms as a browser on the console's own page would."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def close(self) -> None:
        await self.http.close()

    async def get(self, path: str) -> tuple[int, str]:
        async with self.http.get(self.base + path, allow_redirects=False) as response:
            return response.status, await response.text()

    async def post(self, path: str, form: dict[str, str], *, origin: str | None = "", referer: str | None = None
                   ) -> tuple[int, str, Any]:
        headers = {}
        if origin is not None:
            headers["Origin"] = origin or self.base
        if referer is not None:
            headers["Referer"] = referer
        async with self.http.post(self.base + path, data=form, headers=headers, allow_redirects=False) as response:
            return response.status, await response.text(), response.headers

    async def sign_in(self, token: str = TOKEN) -> tuple[int, Any]:
        status, _, headers = await self.post("/login", {"token": token, "next": "/failures"})
        return status, headers

    async def csrf(self, path: str = "/") -> str:
        _, page = await self.get(path)
        found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
        assert found, "no CSRF token on the page: not signed in?"
        return found.group(1)


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[[Served], Client]]:
    clients: list[Client] = []

    def make(served: Served) -> Client:
        clients.append(Client(served.base))
        return clients[-1]
    yield make
    for c in clients:
        await c.close()


async def audit(store: Store) -> list[str]:
    return [r["message"] for r in await store.pool.fetch(
        "SELECT message FROM application_logs WHERE module_name = 'operator' ORDER BY id")]


# --- pages ---------------------------------------------------------------------------------------------------------


async def test_every_page_renders_the_seeded_store(serve: Start, store: Store) -> None:
    seeded = await seed(store)
    await store.execute("set_job_paused", "order-fulfillment", True, "ops-carol")
    served = await serve()
    base = served.base

    status, page, headers = await get(base, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "every 30 seconds" in page and "subscription-installments" in page  # the live engine's schedule, in words
    assert re.search(r"by ops-carol", page) and "paused" in page
    assert "2.5 s" in page  # the last run's duration
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "DENY"

    status, page, _ = await get(base, "/backlog")
    assert status == 200
    assert re.search(r'data-why="decline_retry">.*?<td class="num">1</td>', page, re.S)
    assert f'href="/records/installment/{seeded.open_record}"' in page
    assert re.search(r'data-status="Failed" data-how="exact">2<', page)
    assert re.search(r'<tr data-job="order-fulfillment"><td>order-fulfillment</td><td>ops-carol', page)

    status, page, _ = await get(base, "/failures")
    assert status == 200
    ids = re.findall(r'<tr data-kind="([a-z-]+)" data-id="(\d+)">', page)
    assert set(ids) == {("installment", str(seeded.failed)), ("installment", str(seeded.failed_code)),
                        ("fulfillment", str(seeded.fulfillment)), ("line-item", str(seeded.line))}
    assert "declined &lt;b&gt;four&lt;/b&gt; times" in page and "<b>four" not in page  # escaped

    status, page, _ = await get(base, f"/records/installment/{seeded.failed}")
    assert status == 200
    assert "chk_console_1" in page and "installment_failed: declined" in page and "&#34;/orders&#34;" in page
    status, page, _ = await get(base, f"/records/line-item/{seeded.line}")
    assert status == 200 and "line_item_failed: refused" in page and "ord_console_9" in page
    assert "installment_failed" not in page  # another kind's rows are not this record's
    status, page, _ = await get(base, f"/records/fulfillment/{seeded.fulfillment}")
    assert status == 200 and f'href="/records/line-item/{seeded.line}"' in page

    status, page, _ = await get(base, "/digital-river")
    assert status == 200 and "this engine process's view" in page and 'id="no-client"' in page

    status, page, _ = await get(base, "/processes")
    assert status == 200 and "node-a" in page and "every 30 seconds" in page and "4242" in page
    assert "https://***@dr.example" in page and "pw@" not in page

    assert (await get(base, "/records/installment/999999"))[0] == 404
    assert (await get(base, "/records/payment/1"))[0] == 404
    assert (await get(base, "/console.css"))[0] == 200


async def test_failures_filter_by_job_and_code_and_page_newest_first(serve: Start, store: Store) -> None:
    seeded = await seed(store)
    base = (await serve()).base
    _, page, _ = await get(base, "/failures?job=recurring-payments")
    assert re.findall(r'data-kind="([a-z-]+)" data-id="(\d+)"', page) == [
        ("installment", str(seeded.failed_code)), ("installment", str(seeded.failed))]  # updated last, first
    _, page, _ = await get(base, "/failures?job=recurring-payments&code=fraud")
    assert re.findall(r'data-id="(\d+)"', page) == [str(seeded.failed_code)]
    _, page, _ = await get(base, "/failures?job=line-item-fulfillment&code=quantity%20exceeds%20the%20available%20quantity")
    assert re.findall(r'data-id="(\d+)"', page) == [str(seeded.line)]
    _, page, _ = await get(base, "/failures?code=nothing-has-this")
    assert "No Failed records match" in page

    # 60 more failed installments: page 1 holds 50, page 2 the rest, and nothing is lost or repeated between them.
    for _ in range(2):
        await process_records(store, await subscription(store), 30, subscription_job_run_status="Failed",
                              last_error_code="bad_data")
    _, first, _ = await get(base, "/failures?job=recurring-payments")
    _, second, _ = await get(base, "/failures?job=recurring-payments&page=2")
    one, two = re.findall(r'data-id="(\d+)"', first), re.findall(r'data-id="(\d+)"', second)
    assert len(one) == 50 and len(two) == 12 and not set(one) & set(two)
    assert 'rel="next"' in first and 'rel="prev"' in second and 'rel="next"' not in second


async def test_the_digital_river_page_charts_this_process_requests_against_its_budget(serve: Start) -> None:
    client = FakeClient()
    sampler = DrSampler(client, interval=0.05, span=60)  # type: ignore[arg-type]
    served = await serve(sampler=sampler)
    for status in ("201", "201", "429", "500", "timeout"):
        client.stats.requests[("POST /checkouts", status)] += 1
    await asyncio.sleep(0.06)
    sampler.sample()
    _, page, _ = await get(served.base, "/digital-river")
    assert '<polyline class="rate"' in page and '<polyline class="budget"' in page
    assert '<rect class="throttled"' in page and '<rect class="errors"' in page
    assert re.search(r'data-kind="429">1<', page) and re.search(r'data-kind="ok">2<', page)
    assert re.search(r'data-kind="timeout">1<', page) and re.search(r'data-kind="5xx">1<', page)
    assert "<code>POST /checkouts</code>" in page and "19.6/s" in page


async def test_the_forecast_page_shows_the_cached_forecast_computed_in_the_background(
        serve: Start, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    today = datetime.now(UTC).date()
    next_month = add_months(today, 1)  # the same day next month (a month end when today's day is not in it)
    # Its account's time zone is UTC (the column's default), so its run dates are UTC dates.
    await subscription(store, quantity=2, unit_price=Decimal("10.00"), currency="USD",
                       installment_anchor_date=today, installment_next_run_date=today)
    calls: list[int] = []
    collect = forecast.collect

    async def counted(store: Store, days: int = forecast.DEFAULT_DAYS, now: datetime | None = None) -> dict[str, Any]:
        calls.append(days)
        return await collect(store, days, now)

    monkeypatch.setattr(forecast, "collect", counted)
    served = await serve()
    base = served.base

    # Nothing cached yet: the page answers at once and says so; one background computation starts.
    status, page, _ = await get(base, "/forecast?days=40")
    assert status == 200 and 'id="computing"' in page and "reload in a moment" in page
    assert 'href="/forecast" class="active"' in page
    await served.console.forecasts.idle()
    assert calls == [40]

    status, page, _ = await get(base, "/forecast?days=40")
    assert status == 200 and 'id="computing"' not in page
    assert re.search(r"Computed at \d\d:\d\d:\d\d UTC", page)
    rows = re.findall(r'<tr data-date="([\d-]+)" data-currency="(\w+)"><td>[\d-]+</td><td>\w+</td>'
                      r'<td class="num">(\d+)</td><td class="num">([\d.,]+)</td>', page)
    # One installment a day, of 2 × 10.00.
    assert rows == [(today.isoformat(), "USD", "1", "20.00"), (next_month.isoformat(), "USD", "1", "20.00")]
    assert re.search(r'<tr data-currency="USD"><td>USD</td><td class="num">2</td><td class="num">40.00</td>', page)
    assert '<svg class="chart" data-currency="USD"' in page and page.count('<rect class="amount"') == 2
    assert page.count('<line class="axis"') == 2  # the chart's axes (the shared `_chart.html` macro)
    assert f'data-date="{today.isoformat()}" x="' in page
    assert re.search(r'data-key="pending_installments"><td>pending installments</td><td class="num">0<', page)
    assert "Declines and retries are not foreseen" in page
    # A second request within 10 minutes serves the cached result: no new computation.
    await get(base, "/forecast?days=40")
    await served.console.forecasts.idle()
    assert calls == [40]

    # The default is 30 days: a value of its own (next month may be past day 29, so only today's row is certain).
    _, page, _ = await get(base, "/forecast")
    assert "the next 30 days" in page and 'id="computing"' in page
    await served.console.forecasts.idle()
    assert calls == [40, 30]

    # Stale: the old result is served while one new computation runs.
    served.console.forecasts.max_age = 0
    _, page, _ = await get(base, "/forecast?days=40")
    assert "Computed at" in page and "a new one is being computed" in page
    await served.console.forecasts.idle()
    assert calls == [40, 30, 40]

    for bad in ("0", "367", "abc", "-5", "1.5", "%C2%B2", "9" * 5000):
        status, page, _ = await get(base, f"/forecast?days={bad}")
        assert status == 400 and "days must be a whole number of days from 1 to 366" in page, bad
    assert calls == [40, 30, 40]


async def test_the_forecast_cache_computes_one_at_a_time_keeps_a_few_and_stops() -> None:
    running, peak, done = 0, 0, []
    release = asyncio.Event()

    async def compute(days: int) -> dict[str, Any]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        done.append(days)
        return {"days": days}

    cache = ForecastCache(compute, keep=2)
    for days in (1, 2, 1, 3, 3):  # asked for again: 1 is newer than 2; 3 is waiting already
        lookup = cache.get(days)
        assert lookup.result is None and lookup.computing
    release.set()
    await cache.idle()
    assert peak == 1 and done == [1, 3]  # one at a time, each once, and only the 2 newest asked for
    assert cache.get(2).result is None and cache.get(1).fresh and cache.get(3).fresh
    for days in (2, 4):  # kept: the 2 newest computed
        cache.get(days)
    await cache.idle()
    assert done == [1, 3, 2, 4] and cache.get(3).result is None and cache.get(4).result is not None
    release.clear()
    await asyncio.sleep(0)
    await cache.stop()  # cancels the computation of 3 (asked for again just above) under way
    assert done == [1, 3, 2, 4] and running == 1 and cache.get(3).result is None and not cache.get(3).computing


@dataclass
class FakeStats:
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    rate_limit_wait_seconds: float = 0.0


@dataclass
class FakeBucket:
    rate: float = 19.6


@dataclass
class FakeClient:
    """What DrSampler reads of a DigitalRiverClient."""

    stats: FakeStats = field(default_factory=FakeStats)
    bucket: FakeBucket = field(default_factory=FakeBucket)
    max_requests_per_second: float = 20.0


# --- actions -------------------------------------------------------------------------------------------------------


async def test_without_admin_token_the_console_is_read_only_and_says_so(serve: Start, store: Store,
                                                                         client_for: Callable[[Served], Client]
                                                                         ) -> None:
    seeded = await seed(store)
    client = client_for(await serve())
    _, page = await client.get("/")
    assert "ADMIN_TOKEN is unset" in page and 'name="csrf"' not in page
    status, page, _ = await client.post("/actions/retry", {"kind": "installment", "id": str(seeded.failed)})
    assert status == 403 and "ADMIN_TOKEN is unset" in page
    status, page, _ = await client.post("/actions/pause", {"job": "recurring-payments"})
    assert status == 403 and "ADMIN_TOKEN is unset" in page
    status, page, _ = await client.post("/login", {"token": TOKEN})
    assert status == 403 and "ADMIN_TOKEN is unset" in page
    assert await store.pool.fetchval("SELECT subscription_job_run_status FROM subscription_process_data "
                                     "WHERE id = $1", seeded.failed) == "Failed"
    assert await store.pool.fetchval("SELECT count(*) FROM job_controls") == 0
    assert await audit(store) == []


async def test_a_read_only_console_refuses_actions_with_its_reason(serve: Start, store: Store,
                                                                    client_for: Callable[[Served], Client]) -> None:
    seeded = await seed(store)
    client = client_for(await serve(read_only_reason="the demo's console is read-only", ADMIN_TOKEN=TOKEN))
    assert (await client.sign_in())[0] == 403
    status, page, _ = await client.post("/actions/retry", {"kind": "installment", "id": str(seeded.failed)})
    assert status == 403 and "the demo&#39;s console is read-only" in page


async def test_sign_in_sets_an_httponly_samesite_strict_cookie_that_is_not_the_token(
        serve: Start, client_for: Callable[[Served], Client]) -> None:
    client = client_for(await serve(ADMIN_TOKEN=TOKEN))
    started = time.monotonic()
    status, _ = await client.sign_in("wrong-token-wrong-token")
    assert status == 403 and time.monotonic() - started >= 0.9  # a failed sign-in is slowed down
    assert not client.http.cookie_jar.filter_cookies(client.base)
    status, headers = await client.sign_in()
    assert status == 303 and headers["Location"] == "/failures"
    cookie = headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Path=/" in cookie and TOKEN not in cookie and TOKEN[:12] not in cookie
    _, page = await client.get("/")
    assert "signed in (session" in page and 'name="csrf"' in page


async def test_an_action_is_refused_without_a_session_csrf_token_or_same_origin(
        serve: Start, store: Store, client_for: Callable[[Served], Client]) -> None:
    seeded = await seed(store)
    served = await serve(ADMIN_TOKEN=TOKEN)
    retry_form = {"kind": "installment", "id": str(seeded.failed)}

    anonymous = client_for(served)
    status, page, _ = await anonymous.post("/actions/retry", retry_form)
    assert status == 401 and "sign in" in page

    client = client_for(served)
    await client.sign_in()
    csrf = await client.csrf()
    status, page, _ = await client.post("/actions/retry", retry_form)  # no CSRF token
    assert status == 403 and "CSRF" in page
    status, page, _ = await client.post("/actions/retry", retry_form | {"csrf": "0" * 64})
    assert status == 403 and "CSRF" in page
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{served.server.port + 1}"):
        status, page, _ = await client.post("/actions/retry", retry_form | {"csrf": csrf}, origin=origin)
        assert status == 403 and "cross-site" in page, origin
    status, page, _ = await client.post("/actions/retry", retry_form | {"csrf": csrf}, origin=None)
    assert status == 403 and "neither an Origin nor a Referer" in page
    status, page, _ = await client.post("/actions/retry", retry_form | {"csrf": csrf}, origin=None,
                                        referer="http://evil.example/page")
    assert status == 403 and "cross-site" in page
    # A session cookie of another ADMIN_TOKEN (the token was changed since) is no session.
    other = Auth("another-admin-token-987654321").new_session()
    async with aiohttp.ClientSession() as http, http.post(
            served.base + "/actions/retry", data=retry_form | {"csrf": csrf},
            headers={"Cookie": f"{COOKIE}={other}", "Origin": served.base}) as response:
        assert response.status == 401

    assert await store.pool.fetchval("SELECT subscription_job_run_status FROM subscription_process_data "
                                     "WHERE id = $1", seeded.failed) == "Failed"
    assert await audit(store) == []
    # Actions are POST only.
    async with aiohttp.ClientSession() as http, http.get(served.base + "/actions/retry") as response:
        assert response.status == 405


async def test_retry_through_the_console_is_the_cli_retry_audited_as_the_console(
        serve: Start, store: Store, client_for: Callable[[Served], Client]) -> None:
    seeded = await seed(store)
    served = await serve(ADMIN_TOKEN=TOKEN)
    client = client_for(served)
    await client.sign_in()
    csrf = await client.csrf(f"/records/installment/{seeded.failed}")
    session = re.search(r"signed in \(session ([0-9a-f]{8})\)", (await client.get("/"))[1])
    assert session

    status, page, _ = await client.post("/actions/retry", {"kind": "installment", "id": str(seeded.failed),
                                                           "csrf": csrf}, origin=None,
                                        referer=f"{served.base}/records/installment/{seeded.failed}")
    assert status == 200 and f"installment {seeded.failed} is Open again" in page
    row = await store.pool.fetchrow("SELECT subscription_job_run_status, subscription_retry_count FROM "
                                    "subscription_process_data WHERE id = $1", seeded.failed)
    assert (row["subscription_job_run_status"], row["subscription_retry_count"]) == ("Open", 0)
    who = f"console client 127.0.0.1 session {session.group(1)}"
    assert await audit(store) == [f"installment {seeded.failed} retried by {who} (was Failed)"]

    # Refused as the CLI refuses it: the record is not Failed any more.
    status, page, _ = await client.post("/actions/retry", {"kind": "installment", "id": str(seeded.failed),
                                                           "csrf": csrf})
    assert status == 409 and "only Failed records can be retried" in page
    status, page, _ = await client.post("/actions/retry", {"kind": "line-item", "id": str(seeded.line),
                                                           "csrf": csrf})
    assert status == 200
    assert await store.pool.fetchval("SELECT efn_status FROM line_item_fulfillments WHERE id = $1",
                                     seeded.line) == "Open"
    status, page, _ = await client.post("/actions/retry", {"kind": "payment", "id": "1", "csrf": csrf})
    assert status == 400
    # The record's page lists the audit row among its application_logs.
    _, page = await client.get(f"/records/installment/{seeded.failed}")
    assert f"retried by {who}" in page


async def test_pause_and_resume_through_the_console_change_the_job_and_are_audited(
        serve: Start, store: Store, client_for: Callable[[Served], Client]) -> None:
    served = await serve(ADMIN_TOKEN=TOKEN)
    client = client_for(served)
    await client.sign_in()
    csrf = await client.csrf()
    status, page, _ = await client.post("/actions/pause", {"job": "recurring-payments", "csrf": csrf})
    assert status == 200 and "recurring-payments paused" in page
    row = await store.pool.fetchrow("SELECT paused, changed_by FROM job_controls WHERE job = 'recurring-payments'")
    assert row["paused"] and row["changed_by"].startswith("console client 127.0.0.1 session ")
    assert await store.fetchval("job_paused", "recurring-payments")
    _, page = await client.get("/")
    assert re.search(r'data-job="recurring-payments">.*?paused.*?data-action="resume"', page, re.S)

    status, _, _ = await client.post("/actions/resume", {"job": "recurring-payments", "csrf": csrf})
    assert status == 200 and not await store.fetchval("job_paused", "recurring-payments")
    status, _, _ = await client.post("/actions/pause", {"job": "everything", "csrf": csrf})
    assert status == 400
    messages = await audit(store)
    assert [m.split(" by ")[0] for m in messages] == ["recurring-payments paused", "recurring-payments resumed"]
    assert all(m.split(" by ")[1] == row["changed_by"] for m in messages)


async def test_sign_out_ends_the_session(serve: Start, client_for: Callable[[Served], Client]) -> None:
    client = client_for(await serve(ADMIN_TOKEN=TOKEN))
    await client.sign_in()
    status, _, _ = await client.post("/logout", {})
    assert status == 303
    _, page = await client.get("/")
    assert 'name="csrf"' not in page and "Sign in" in page


# --- the rules themselves ------------------------------------------------------------------------------------------


def test_sessions_are_hmacs_under_the_token_that_expire() -> None:
    auth = Auth(TOKEN, session_seconds=60)
    cookie = auth.new_session(now=1000)
    session = auth.session(cookie, now=1030)
    assert session is not None and len(session.id) == 8 and TOKEN not in cookie
    assert auth.session(cookie, now=1061) is None  # expired
    assert auth.session(cookie.replace(".1000.", ".1001."), now=1030) is None  # tampered
    assert Auth("x" * 20).session(cookie, now=1030) is None  # another token
    assert Auth(None).session(cookie, now=1030) is None and not Auth(None).token_matches("")
    assert auth.token_matches(TOKEN) and not auth.token_matches(TOKEN + "x")
    assert auth.csrf_matches(session, session.csrf) and not auth.csrf_matches(session, None)


@pytest.mark.parametrize(("origin", "referer", "allowed"), [
    ("http://127.0.0.1:8080", None, True),
    ("https://127.0.0.1:8080", None, True),
    (None, "http://127.0.0.1:8080/failures?job=x", True),
    ("http://127.0.0.1:8081", None, False),
    ("http://localhost:8080", None, False),
    ("null", None, False),
    (None, None, False),
    ("http://127.0.0.1:8080.evil.example", None, False),
    ("http://evil.example", "http://127.0.0.1:8080/", False),  # Origin wins over Referer
])
def test_origin_must_be_the_console_itself(origin: str | None, referer: str | None, allowed: bool) -> None:
    assert (origin_refusal("127.0.0.1:8080", origin, referer) is None) is allowed


def test_admin_token_is_a_secret_setting_checked_at_start() -> None:
    settings = load({"ADMIN_TOKEN": TOKEN}, command="status", is_terminal=False)
    assert settings.admin_token == TOKEN and TOKEN in settings.secrets and TOKEN not in repr(settings)
    assert load({}, command="status", is_terminal=False).admin_token is None
    for bad in ("short", "has a space in it 1234", "tab\tinside-0123456789"):
        with pytest.raises(SettingsError) as refused:
            load({"ADMIN_TOKEN": bad}, command="status", is_terminal=False)
        assert "ADMIN_TOKEN=<redacted>" in str(refused.value) and bad not in str(refused.value)


# --- the demo's console --------------------------------------------------------------------------------------------


async def test_demo_console_serves_the_demo_results_read_only_until_interrupted(tmp_path: Any) -> None:
    import signal
    import sys

    from tests.support import ROOT, engine_env

    env = engine_env(None, DATA_DIR=str(tmp_path / "data"))
    for name in [k for k in env if k.endswith("_SCHEDULE")]:
        del env[name]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "run.py"), "demo", "--subscriptions", "150", "--console", env=env, cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        lines = []
        while not any(line.startswith("console: ") for line in lines):
            raw = await asyncio.wait_for(proc.stdout.readline(), 240)
            assert raw, f"the demo ended before serving the console: {''.join(lines)}"
            lines.append(raw.decode())
        charged = int(re.search(r"^\s+charged\s+(\d+)", "".join(lines), re.M).group(1))  # type: ignore[union-attr]
        base = re.search(r"console: (http://127\.0\.0\.1:\d+)/", lines[-1]).group(1)  # type: ignore[union-attr]

        status, page, _ = await get(base, "/backlog")
        assert status == 200 and "the demo&#39;s console: read-only" in page
        assert re.search(rf'data-status="Successful" data-how="exact">{charged}<', page), page
        status, page, _ = await get(base, "/failures")
        failed = re.findall(r'<tr data-kind="installment" data-id="(\d+)">', page)
        assert status == 200 and failed  # the seeded bad records
        status, page, _ = await get(base, f"/records/installment/{failed[0]}")
        assert status == 200 and re.search(r'id="logs">.*?<td>recurring-payments</td>', page, re.S)  # its log rows
        status, page, _ = await get(base, "/digital-river")
        assert re.search(r'data-kind="ok">[1-9]', page) and '<polyline class="rate"' in page  # the demo's requests
        async with aiohttp.ClientSession() as http, http.post(
                base + "/actions/retry", data={"kind": "installment", "id": failed[0]},
                headers={"Origin": base}) as response:
            assert response.status == 403 and "read-only" in await response.text()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
