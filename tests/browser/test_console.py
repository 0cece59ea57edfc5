"""The operator console in Chromium, served by a real `serve` process on a seeded test database: every page renders
(a screenshot of each goes to the artefacts directory), a retry and a pause done by clicking change the store and
the audit log, and an action without a session or from another origin is refused."""

from __future__ import annotations

import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from engine.store import Store
from tests.browser.conftest import missing
from tests.integration.test_console import TOKEN, Seeded, seed
from tests.support import EngineProcess, engine_env

if missing():
    pytest.skip(missing() or "", allow_module_level=True)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[str]:
    """A `serve` process with ADMIN_TOKEN on the test database (every schedule off); yields its console's URL."""
    process = EngineProcess(["serve"], engine_env(database_url, ADMIN_TOKEN=TOKEN, NODE_NAME="browser-node"))
    async with process:
        [listening] = await process.wait_for("http_listening")
        yield f"http://127.0.0.1:{listening['port']}"
        process.signal(signal.SIGTERM)
        assert await process.wait() == 0


async def audit(store: Store) -> list[str]:
    return [r["message"] for r in await store.pool.fetch(
        "SELECT message FROM application_logs WHERE module_name = 'operator' ORDER BY id")]


async def sign_in(context: Any, base: str, then: str = "/") -> Any:
    page = await context.new_page()
    await page.goto(f"{base}/login?next={then}")
    await page.fill('input[name="token"]', TOKEN)
    await page.click('form[action="/login"] button[type="submit"]')
    await page.wait_for_url(base + then)
    return page


async def test_every_page_renders_against_a_seeded_store(browser: Any, engine: str, store: Store,
                                                         artifacts: Path) -> None:
    seeded = await seed(store)
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    page = await sign_in(context, engine)
    checks: list[tuple[str, str, str, str]] = [
        # name, path, selector, text it must hold
        ("jobs", "/", '#jobs tr[data-job="recurring-payments"]', "every 30 seconds"),
        ("backlog", "/backlog", '#waiting tr[data-why="decline_retry"]', "1"),
        ("failures", "/failures", f'#failures tr[data-id="{seeded.failed}"][data-kind="installment"]',
         "insufficient_funds"),
        ("installment", f"/records/installment/{seeded.failed}", "#logs", "installment_failed: declined"),
        ("fulfillment", f"/records/fulfillment/{seeded.fulfillment}", "#lines", "item_9"),
        ("line-item", f"/records/line-item/{seeded.line}", "#logs", "line_item_failed: refused"),
        ("digital-river", "/digital-river", "#this-process", "this engine process's view"),
        ("processes", "/processes", '#nodes tr[data-node="browser-node"]', "live"),
        ("forecast", "/forecast?days=40", "h1", "Forecast: the next 40 days"),
    ]
    for name, path, selector, text in checks:
        response = await page.goto(engine + path)
        assert response is not None and response.status == 200, path
        assert text in await page.locator(selector).inner_text(), (path, selector)
        assert await page.locator("nav a.active").count() == 1
        await page.screenshot(path=str(artifacts / f"console-{name}.png"), full_page=True)
    # The chart is drawn on the Digital River page (this process has a client, so the SVG is there).
    await page.goto(engine + "/digital-river")
    assert await page.locator("svg#chart").is_visible()
    # Signed out, the login page.
    anonymous = await (await browser.new_context()).new_page()
    await anonymous.goto(engine + "/login")
    await anonymous.screenshot(path=str(artifacts / "console-login.png"), full_page=True)
    await context.close()


async def test_a_retry_and_a_pause_clicked_in_the_pages_change_the_store_and_the_audit_log(
        browser: Any, engine: str, store: Store, artifacts: Path) -> None:
    seeded = await seed(store)
    context = await browser.new_context()
    page = await sign_in(context, engine, "/failures")
    session = re.search(r"session ([0-9a-f]{8})", await page.inner_text("header .who"))
    assert session
    who = f"console client 127.0.0.1 session {session.group(1)}"

    row = page.locator(f'#failures tr[data-kind="installment"][data-id="{seeded.failed}"]')
    await row.locator('button[data-action="retry"]').click()
    await page.wait_for_selector("#outcome")
    assert f"installment {seeded.failed} is Open again" in await page.inner_text("#outcome")
    await page.screenshot(path=str(artifacts / "console-retried.png"), full_page=True)
    assert await store.pool.fetchval("SELECT subscription_job_run_status FROM subscription_process_data "
                                     "WHERE id = $1", seeded.failed) == "Open"

    await page.goto(engine + "/")
    await page.locator('#jobs tr[data-job="recurring-payments"] button[data-action="pause"]').click()
    await page.wait_for_selector("#outcome")
    assert "recurring-payments paused" in await page.inner_text("#outcome")
    assert await store.fetchval("job_paused", "recurring-payments")
    await page.goto(engine + "/")
    assert await page.locator('#jobs tr[data-job="recurring-payments"] button[data-action="resume"]').count() == 1
    await page.screenshot(path=str(artifacts / "console-paused.png"), full_page=True)

    assert await audit(store) == [f"installment {seeded.failed} retried by {who} (was Failed)",
                                  f"recurring-payments paused by {who}"]
    await context.close()


async def test_an_action_without_a_session_or_from_another_origin_is_refused(browser: Any, engine: str,
                                                                             store: Store) -> None:
    seeded: Seeded = await seed(store)
    form = {"kind": "installment", "id": str(seeded.failed)}

    # Not signed in: refused even from the console's own origin.
    anonymous = await (await browser.new_context()).new_page()
    await anonymous.goto(engine + "/failures")
    assert await anonymous.locator('button[data-action="retry"]').count() == 0
    response = await anonymous.request.post(engine + "/actions/retry", form=form, headers={"Origin": engine})
    assert response.status == 401

    # Signed in, with the session's CSRF token, but sent from another origin.
    context = await browser.new_context()
    page = await sign_in(context, engine, "/failures")
    csrf = await page.locator('input[name="csrf"]').first.get_attribute("value")
    response = await page.request.post(engine + "/actions/retry", form=form | {"csrf": csrf},
                                       headers={"Origin": "http://evil.example"})
    assert response.status == 403 and "cross-site" in await response.text()

    # A page of another origin whose form posts to the console (as a cross-site attack would, here even knowing
    # the CSRF token): the browser sends its own Origin, and the console refuses.
    evil = web.Application()

    async def attack(request: web.Request) -> web.Response:
        return web.Response(content_type="text/html", text=(
            f'<form method="post" action="{engine}/actions/pause"><input name="job" value="recurring-payments">'
            f'<input name="csrf" value="{csrf}"><button id="go">win a prize</button></form>'))
    evil.router.add_get("/", attack)
    runner = web.AppRunner(evil)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        evil_port = runner.addresses[0][1]
        await page.goto(f"http://127.0.0.1:{evil_port}/")
        async with page.expect_navigation():
            await page.click("#go")
        assert "cross-site" in await page.inner_text("#outcome")
    finally:
        await runner.cleanup()

    assert await store.pool.fetchval("SELECT subscription_job_run_status FROM subscription_process_data "
                                     "WHERE id = $1", seeded.failed) == "Failed"
    assert not await store.fetchval("job_paused", "recurring-payments")
    assert await audit(store) == []
    await context.close()
