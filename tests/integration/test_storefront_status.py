"""Records of a storefront with no Digital River key are named by `status`, /metrics and the console as waiting for
a key; a storefront's name is matched to its settings by the same label in Python and in SQL."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from engine import status
from engine.console import Console
from engine.http import Health, HttpServer
from engine.metrics import Metrics
from engine.settings import load, storefront_label
from engine.store import Store
from tests.integration.factories import fulfillment_order, process_records, subscription
from tests.support import TEST_KEY

NAMES = ["DefaultStore", "EU Store", "eu-store", "Store 1", "défault", "ß-shop", "A.B/C", "DEFAULTSTORE", "x" * 60,
         "日本", "tab\there", ""]


async def test_a_storefront_label_is_the_same_in_python_and_in_sql(store: Store) -> None:
    labels = await store.pool.fetch("SELECT n, drjobs_storefront_label(n) AS label FROM unnest($1::text[]) n", NAMES)
    assert {row["n"]: row["label"] for row in labels} == {name: storefront_label(name) for name in NAMES}
    assert storefront_label("EU Store") == "EU_STORE" and storefront_label("DefaultStore") == "DefaultStore"
    assert storefront_label("défault") == "D_FAULT"  # only ASCII letters are upper-cased, in both


async def seed(store: Store) -> dict[str, int]:
    """Open installments of DefaultStore (2) and of `Nowhere` (3), and two open lines of a Nowhere order."""
    keyed = await subscription(store)
    await process_records(store, keyed, 2)
    lost = await subscription(store, storefront="Nowhere")  # due since 2026-01-31
    await process_records(store, lost, 3, storefront="Nowhere")
    order, _, _, lines = await fulfillment_order(store, dr_order_id="ord_nowhere_1",
                                                 items=[{"quantity": 1}, {"quantity": 2}],
                                                 lines=[{"item": 0, "fulfill_quantity": 1},
                                                        {"item": 1, "fulfill_quantity": 2}])
    await store.pool.execute("UPDATE orders SET storefront = 'Nowhere' WHERE id = $1", order)
    # A cancelled order of Nowhere's, whose cancellation waits too (the accepted one above is no cancellation).
    cancelled, _, _, _ = await fulfillment_order(store, dr_order_id="ord_nowhere_2", items=[{"quantity": 1}],
                                                 order_state="cancelled", dr_order_state="cancelled")
    await store.pool.execute("UPDATE orders SET storefront = 'Nowhere' WHERE id = $1", cancelled)
    return {"lines": len(lines)}


async def test_status_names_the_storefronts_waiting_for_a_key_and_what_they_hold(database_url: str,
                                                                                store: Store) -> None:
    seeded = await seed(store)
    settings = load({"DATABASE_URL": database_url, "DR_API_KEY": TEST_KEY}, command="status", is_terminal=False)
    data = await status.collect(settings, store, set(settings.jobs))
    fronts = data["storefronts"]
    assert fronts["with_key"] == ["DefaultStore"] and "no engine is live" in fronts["key_source"]
    assert fronts["waiting_for_key"] == [{"storefront": "NOWHERE", "setting": "DR_API_KEY_NOWHERE", "records": {
        "installments": 3, "cancellations": 1, "fulfillment_lines": seeded["lines"], "subscriptions_due": 1}}]
    text = status.render_text(data)
    assert "NOWHERE" in text and "waiting for a key: cancellations=1" in text and "set DR_API_KEY_NOWHERE" in text
    json.loads(status.render_json(data))

    # DefaultStore's key is DR_API_KEY; with no engine live and no key here, nothing is said to wait (a guess).
    only_eu = load({"DATABASE_URL": database_url, "DR_API_KEY_NOWHERE": TEST_KEY}, command="status",
                   is_terminal=False)
    fronts = (await status.collect(only_eu, store, set(settings.jobs)))["storefronts"]
    assert [(row["storefront"], row["setting"]) for row in fronts["waiting_for_key"]] == [
        ("DefaultStore", "DR_API_KEY")]
    no_keys = load({"DATABASE_URL": database_url}, command="status", is_terminal=False)
    fronts = (await status.collect(no_keys, store, set(settings.jobs)))["storefronts"]
    assert fronts["waiting_for_key"] == [] and "not known" in fronts["key_source"]

    # A live engine with NOWHERE's key: its records are not waiting any more, whatever this command's settings say.
    await store.pool.execute(
        "INSERT INTO engine_nodes (name, pid, host, version, settings) VALUES ('live-1', 1, 'h', 'x', $1::jsonb)",
        json.dumps({"storefronts": {"DefaultStore": {"key_id": "a"}, "NOWHERE": {"key_id": "b"}}}))
    data = await status.collect(settings, store, set(settings.jobs))
    assert data["storefronts"]["with_key"] == ["DefaultStore", "NOWHERE"]
    assert data["storefronts"]["key_source"] == "live engines" and data["storefronts"]["waiting_for_key"] == []


async def test_metrics_count_the_records_waiting_for_a_key_by_storefront_and_kind(store: Store) -> None:
    seeded = await seed(store)
    metrics = Metrics()
    assert await metrics.refresh_from_store(store)
    assert "drjobs_storefront_waiting_records{" not in metrics.render().decode()  # no engine said which have keys
    metrics.storefronts(["DefaultStore"])
    assert await metrics.refresh_from_store(store)
    body = metrics.render().decode()
    assert 'drjobs_storefront_waiting_records{kind="installments",storefront="NOWHERE"} 3.0' in body
    assert f'drjobs_storefront_waiting_records{{kind="fulfillment_lines",storefront="NOWHERE"}} {seeded["lines"]}.0' \
        in body
    assert not [line for line in body.splitlines()
                if line.startswith("drjobs_storefront_waiting_records{") and 'storefront="DefaultStore"' in line]
    metrics.storefronts(["DefaultStore", "NOWHERE"])
    assert await metrics.refresh_from_store(store)
    assert "drjobs_storefront_waiting_records{" not in metrics.render().decode()


async def test_the_console_backlog_shows_a_storefront_waiting_for_its_key(database_url: str, store: Store) -> None:
    await seed(store)
    settings = load({"DATABASE_URL": database_url, "DR_API_KEY": TEST_KEY, "HTTP_PORT": "0"}, command="status",
                    is_terminal=False)
    console = Console(settings, store, built=set(settings.jobs))
    server = HttpServer("127.0.0.1", 0, Metrics(), Health(store, dict, lambda: True), console=console)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{server.port}/backlog") as response:
            page = await response.text()
    finally:
        await server.stop()
    assert response.status == 200
    assert 'data-storefront="NOWHERE"' in page and "DR_API_KEY_NOWHERE" in page
    assert "Installment records of storefront <code>NOWHERE</code>" in page


async def test_subscriptions_of_a_storefront_without_a_key_get_no_installments_and_drain_ends(store: Store) -> None:
    from sandbox.config import SandboxConfig
    from sandbox.server import Sandbox
    from tests.integration.engines import drain
    from tests.integration.factories import due_subscription

    keyed = await due_subscription(store)
    lost = await due_subscription(store, storefront="Nowhere")
    async with Sandbox(SandboxConfig(api_key=TEST_KEY)) as sandbox:
        assert await drain(store, sandbox) == 0
    made = {row["subscription_id"]: row["n"] for row in await store.pool.fetch(
        "SELECT subscription_id, count(*) AS n FROM subscription_process_data GROUP BY 1")}
    assert made == {keyed: 1}
    row = await store.pool.fetchrow("SELECT installment_count, installment_next_run_date, updated_at = created_at "
                                    "AS untouched FROM subscriptions WHERE id = $1", lost)
    assert row["installment_count"] == 0 and row["untouched"]


async def test_the_console_digital_river_page_shows_each_storefronts_own_client(database_url: str,
                                                                              store: Store) -> None:
    from engine.console.dr_view import DrSampler
    from engine.digital_river import DigitalRiverClient

    settings = load({"DATABASE_URL": database_url, "DR_API_KEY": TEST_KEY, "HTTP_PORT": "0"}, command="status",
                    is_terminal=False)
    clients = {"DefaultStore": DigitalRiverClient("http://127.0.0.1:9", TEST_KEY, max_requests_per_second=20),
               "EU_STORE": DigitalRiverClient("http://127.0.0.1:9", "sk_test_eu", max_requests_per_second=250)}
    samplers = {label: DrSampler(client, interval=0.05, span=60) for label, client in clients.items()}
    for sampler in samplers.values():
        sampler.sample()
    clients["DefaultStore"].stats.requests[("POST /checkouts", "201")] += 3
    clients["EU_STORE"].stats.requests[("POST /orders", "429")] += 7
    await asyncio.sleep(0.06)  # the page's own sample is a new point, 3 and 7 requests after the first
    console = Console(settings, store, built=set(settings.jobs), samplers=samplers)
    server = HttpServer("127.0.0.1", 0, Metrics(), Health(store, dict, lambda: True), console=console)
    await server.start()
    pages = {}
    try:
        async with aiohttp.ClientSession() as session:
            for query in ("", "?storefront=EU%20Store", "?storefront=unknown"):
                async with session.get(f"http://127.0.0.1:{server.port}/digital-river{query}") as response:
                    assert response.status == 200
                    pages[query] = await response.text()
    finally:
        await server.stop()
    default, eu, unknown = pages.values()
    assert "storefront <code>DefaultStore</code>" in default and "POST /checkouts" in default
    assert "POST /orders" not in default and 'href="/digital-river?storefront=EU_STORE"' in default
    assert "storefront <code>EU_STORE</code>" in eu and 'data-kind="429">7<' in eu and "POST /checkouts" not in eu
    assert "DR_MAX_REQUESTS_PER_SECOND_EU_STORE" in eu and "250" in eu
    assert "storefront <code>DefaultStore</code>" in unknown  # an unknown storefront: the first one
