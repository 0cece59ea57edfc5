"""The sandbox's Digital River events: emitted on every order change, listed by GET /events, delivered as signed
webhooks (late, twice, never, retried), and orders that settle by themselves."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sandbox.config import config_from_args
from sandbox.server import Sandbox
from sandbox.webhooks import sign_webhook
from tests.support import sandbox_fixture

KEY = "sk_test_events_0123456789"
SECRET = "whsec_sandbox_events"
EVENT_ID = re.compile(r"evt_[0-9a-f]{32}")
CREATED_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")

sandbox = sandbox_fixture(seed=7)


@pytest.fixture
async def http(sandbox: Sandbox) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=sandbox.url, headers={"Authorization": f"Bearer {KEY}"}) as session:
        yield session


async def call(http: aiohttp.ClientSession, method: str, path: str, body: Any = None,
               **params: str) -> tuple[int, Any]:
    async with http.request(method, path, json=body, params=params or None) as response:
        return response.status, await response.json()


async def new_order(http: aiohttp.ClientSession, source: str = "src_ok", price: float = 19.99,
                    quantity: int = 1) -> dict[str, Any]:
    status, checkout = await call(http, "POST", "/checkouts", {
        "currency": "USD", "sourceId": source, "items": [{"skuId": "sku_a", "price": price, "quantity": quantity}]})
    assert status == 201, checkout
    status, order = await call(http, "POST", "/orders", {"checkoutId": checkout["id"]})
    assert status == 201, order
    return dict(order)


def types_of(sb: Sandbox, order_id: str) -> list[str]:
    return [e["type"] for e in sb.ledger.events_for_order(order_id)]


def assert_times_strictly_increase(sb: Sandbox) -> None:
    times = [e["createdTime"] for e in sb.ledger.events]
    assert all(CREATED_TIME.fullmatch(t) for t in times)
    assert all(a < b for a, b in itertools.pairwise(times))  # ISO strings of one format sort as times


async def wait_until(condition: Any, seconds: float = 3.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)


# -- events emitted ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "price", "state", "event_type"), [
    ("src_ok", 19.99, "accepted", "order.accepted"),
    ("src_pending_payment", 19.99, "pending_payment", "order.pending_payment"),
    ("src_in_review", 19.99, "in_review", "order.review_opened"),
    ("src_ok", 19.93, "pending_payment", "order.pending_payment"),
    ("src_ok", 19.94, "in_review", "order.review_opened"),
])
async def test_a_new_order_emits_the_event_of_its_state(sandbox: Sandbox, http: aiohttp.ClientSession, source: str,
                                                        price: float, state: str, event_type: str) -> None:
    order = await new_order(http, source, price)
    assert order["state"] == state
    [event] = sandbox.ledger.events_for_order(order["id"])
    assert set(event) == {"id", "type", "createdTime", "data", "liveMode"}
    assert EVENT_ID.fullmatch(event["id"]) and CREATED_TIME.fullmatch(event["createdTime"])
    assert (event["type"], event["liveMode"], event["data"]) == (event_type, False, {"object": order})
    assert sandbox.ledger.events == [event] and sandbox.ledger.events_by_id[event["id"]] is event


async def test_state_controls_and_charge_failures_emit_events_in_strict_time_order(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    accepted, failed, blocked = [await new_order(http, "src_pending_payment") for _ in range(3)]
    async with aiohttp.ClientSession() as control:
        async with control.post(f"{sandbox.url}/_sandbox/orders/{accepted['id']}/state",
                                json={"state": "accepted"}) as r:
            assert r.status == 200
        async with control.post(f"{sandbox.url}/_sandbox/orders/{failed['id']}/charge_failed") as r:
            assert (r.status, (await r.json())["state"]) == (200, "cancelled")
        async with control.post(f"{sandbox.url}/_sandbox/orders/{failed['id']}/charge_failed") as r:
            assert r.status == 409  # a cancelled order's charge cannot fail again
        async with control.post(f"{sandbox.url}/_sandbox/orders/404/charge_failed") as r:
            assert r.status == 404
    sandbox.set_order_state(blocked["id"], "blocked")
    sandbox.set_order_state(accepted["id"], "complete")
    with pytest.raises(ValueError, match="can no longer fail"):
        sandbox.fail_charge(accepted["id"])
    with pytest.raises(KeyError):
        sandbox.set_order_state("nope", "accepted")

    assert types_of(sandbox, accepted["id"]) == ["order.pending_payment", "order.accepted", "order.complete"]
    assert types_of(sandbox, failed["id"]) == ["order.pending_payment", "order.charge.failed", "order.cancelled"]
    assert types_of(sandbox, blocked["id"]) == ["order.pending_payment", "order.blocked"]
    assert_times_strictly_increase(sandbox)
    # Each event holds the order as it was then; the charge moves with the order.
    created, charge_failed, cancelled = sandbox.ledger.events_for_order(failed["id"])
    assert created["data"]["object"]["payment"]["charges"][0]["state"] == "pending"
    assert (charge_failed["data"]["object"]["state"],
            charge_failed["data"]["object"]["payment"]["charges"][0]["state"]) == ("pending_payment", "failed")
    assert (cancelled["data"]["object"]["state"], cancelled["data"]["object"]["payment"]["charges"][0]["state"]) == (
        "cancelled", "failed")
    assert sandbox.ledger.events_for_order(accepted["id"])[1]["data"]["object"]["payment"]["charges"][0][
        "state"] == "capturable"
    assert sandbox.ledger.orders[blocked["id"]]["fraudState"] == "blocked"


async def test_fulfillments_that_finish_an_order_emit_its_event(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    shipped, cancelled = await new_order(http, quantity=2), await new_order(http, quantity=2)
    item = shipped["items"][0]["id"]
    for quantity in (1, 1):  # the first leaves one unit: no event
        status, _ = await call(http, "POST", "/fulfillments",
                               {"orderId": shipped["id"], "items": [{"itemId": item, "quantity": quantity}]})
        assert status == 201
        if len(sandbox.ledger.fulfillments) == 1:
            assert types_of(sandbox, shipped["id"]) == ["order.accepted"]
    status, _ = await call(http, "POST", "/fulfillments", {
        "orderId": cancelled["id"], "items": [{"itemId": cancelled["items"][0]["id"], "cancelQuantity": 2}]})
    assert status == 201
    assert types_of(sandbox, shipped["id"]) == ["order.accepted", "order.complete"]
    assert types_of(sandbox, cancelled["id"]) == ["order.accepted", "order.cancelled"]
    assert sandbox.ledger.events[-1]["data"]["object"]["items"][0]["state"] == "cancelled"


# -- GET /events ---------------------------------------------------------------------------------------------


async def test_events_are_listed_newest_first_with_filters_and_cursors(sandbox: Sandbox,
                                                                       http: aiohttp.ClientSession) -> None:
    orders = [await new_order(http, source) for source in ("src_ok", "src_pending_payment", "src_in_review")]
    sandbox.set_order_state(orders[1]["id"], "accepted")
    sandbox.fail_charge(orders[2]["id"])
    events = sandbox.ledger.events
    newest_first = [e["id"] for e in reversed(events)]
    assert len(events) == 6

    status, page = await call(http, "GET", "/events")
    assert (status, page["hasMore"], [e["id"] for e in page["data"]]) == (200, False, newest_first)
    assert page["data"] == list(reversed(events))

    _, page = await call(http, "GET", "/events", limit="2")
    assert ([e["id"] for e in page["data"]], page["hasMore"]) == (newest_first[:2], True)
    _, page = await call(http, "GET", "/events", limit="2", startingAfter=newest_first[1])
    assert ([e["id"] for e in page["data"]], page["hasMore"]) == (newest_first[2:4], True)
    _, page = await call(http, "GET", "/events", limit="2", startingAfter=newest_first[3])
    assert ([e["id"] for e in page["data"]], page["hasMore"]) == (newest_first[4:], False)
    _, page = await call(http, "GET", "/events", limit="2", endingBefore=newest_first[4])
    assert [e["id"] for e in page["data"]] == newest_first[2:4]

    def ids(page: dict[str, Any]) -> list[str]:
        return [e["id"] for e in page["data"]]

    by_type = {e["type"]: e["id"] for e in events if e["type"] != "order.accepted"}
    accepted = [e["id"] for e in reversed(events) if e["type"] == "order.accepted"]
    assert ids((await call(http, "GET", "/events", type="order.accepted"))[1]) == accepted
    assert ids((await call(http, "GET", "/events", type="order.charge.*"))[1]) == [by_type["order.charge.failed"]]
    assert ids((await call(http, "GET", "/events", type="order.*"))[1]) == newest_first
    assert ids((await call(http, "GET", "/events", types="order.blocked,order.review_opened"))[1]) == [
        by_type["order.review_opened"]]
    assert ids((await call(http, "GET", "/events", ids=f"{events[0]['id']},{events[5]['id']},evt_x"))[1]) == [
        events[5]["id"], events[0]["id"]]
    middle = events[2]["createdTime"]
    assert ids((await call(http, "GET", "/events", **{"createdTime[gt]": middle}))[1]) == newest_first[:3]
    assert ids((await call(http, "GET", "/events", **{"createdTime[gte]": middle}))[1]) == newest_first[:4]
    assert ids((await call(http, "GET", "/events", **{"createdTime[lt]": middle}))[1]) == newest_first[4:]
    assert ids((await call(http, "GET", "/events", **{"createdTime[lte]": middle,
                                                      "createdTime[gt]": events[0]["createdTime"]}))[1]) == [
        events[2]["id"], events[1]["id"]]
    assert ids((await call(http, "GET", "/events", createdTime=middle))[1]) == [events[2]["id"]]

    status, one = await call(http, "GET", f"/events/{events[3]['id']}")
    assert (status, one) == (200, events[3])
    status, missing = await call(http, "GET", "/events/evt_missing")
    assert (status, missing["errors"][0]["code"]) == (404, "not_found")
    async with aiohttp.ClientSession() as anonymous, anonymous.get(f"{sandbox.url}/events") as r:
        assert r.status == 401
    assert sandbox.ledger.count_requests("GET", "/events*") == 18  # the 401 too


@pytest.mark.parametrize(("params", "code", "parameter"), [
    ({"colour": "red"}, "unknown_parameter", "colour"),
    ({"createdTime[after]": "2024-01-01T00:00:00Z"}, "unknown_parameter", "createdTime[after]"),
    ({"limit": "0"}, "invalid_parameter", "limit"),
    ({"limit": "101"}, "invalid_parameter", "limit"),
    ({"limit": "ten"}, "invalid_parameter", "limit"),
    ({"createdTime[gt]": "yesterday"}, "invalid_parameter", "createdTime[gt]"),
    ({"createdTime[lte]": "2024-13-01T00:00:00Z"}, "invalid_parameter", "createdTime[lte]"),
    ({"type": "order.accepted", "types": "order.blocked"}, "invalid_parameter", "types"),
    ({"types": ",".join(f"t{i}" for i in range(20))}, "invalid_parameter", "types"),
])
async def test_event_list_parameters_are_checked(http: aiohttp.ClientSession, params: dict[str, str], code: str,
                                                 parameter: str) -> None:
    status, body = await call(http, "GET", "/events", **params)
    assert status == 400
    assert (body["type"], body["errors"][0]["code"], body["errors"][0]["parameter"]) == ("bad_request", code,
                                                                                         parameter)


async def test_faults_can_target_the_event_endpoints(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    await new_order(http)
    sandbox.configure(error_rate=1.0, fault_endpoints=["GET /events/{id}"])
    assert (await call(http, "GET", "/events"))[0] == 200
    assert (await call(http, "GET", f"/events/{sandbox.ledger.events[0]['id']}"))[0] == 500
    async with http.post("/events") as r:
        assert r.status == 405


# -- webhooks ------------------------------------------------------------------------------------------------


@dataclass
class Receiver:
    """A webhook endpoint: records each POST, answers the scripted statuses in turn (then 200)."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((dict(request.headers), await request.read()))
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)

    def event_ids(self) -> list[str]:
        return [json.loads(body)["id"] for _, body in self.received]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    app = web.Application()
    app.router.add_post("/hooks", found.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    found.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hooks"
    try:
        yield found
    finally:
        await runner.cleanup()


def verify(headers: dict[str, str], body: bytes, secret: str = SECRET) -> int:
    """Check a DigitalRiver-Signature header as a receiver would (own HMAC code); answer its timestamp."""
    header = headers["DigitalRiver-Signature"]
    match = re.fullmatch(r"t=(\d+), (\S+)", header)
    assert match, header
    timestamp, signature = match.group(1), match.group(2)
    expected = base64.b64encode(hmac.new(secret.encode(), timestamp.encode() + b"." + body,
                                         hashlib.sha256).digest()).decode()
    assert hmac.compare_digest(signature, expected)
    return int(timestamp)


async def idle(sb: Sandbox) -> None:
    async with asyncio.timeout(4):
        await sb.webhooks_idle()


async def test_every_event_is_posted_signed_exactly_as_listed(sandbox: Sandbox, http: aiohttp.ClientSession,
                                                              receiver: Receiver) -> None:
    sandbox.configure(webhook_url=receiver.url, webhook_secret=SECRET)
    order = await new_order(http, "src_pending_payment")
    sandbox.set_order_state(order["id"], "accepted")
    await idle(sandbox)
    assert sorted(receiver.event_ids()) == sorted(e["id"] for e in sandbox.ledger.events)
    for headers, body in receiver.received:
        verify(headers, body)
        assert headers["Content-Type"] == "application/json"
        event = json.loads(body)
        assert event == (await call(http, "GET", f"/events/{event['id']}"))[1]
        assert body == json.dumps(event).encode()
    assert sign_webhook(SECRET, 1700000000, b"{}") == "t=1700000000, " + base64.b64encode(
        hmac.new(SECRET.encode(), b"1700000000.{}", hashlib.sha256).digest()).decode()
    deliveries = sandbox.ledger.webhook_deliveries
    assert [(d["status"], d["attempt"], d["url"]) for d in deliveries] == [(200, 1, receiver.url)] * 2
    assert {d["eventId"]: d["type"] for d in deliveries} == {e["id"]: e["type"] for e in sandbox.ledger.events}
    assert all(d["durationMs"] >= 0 for d in deliveries)


async def test_a_duplicate_rate_of_one_delivers_every_event_twice(sandbox: Sandbox, http: aiohttp.ClientSession,
                                                                  receiver: Receiver) -> None:
    sandbox.configure(webhook_url=receiver.url, webhook_secret=SECRET, webhook_duplicate_rate=1.0)
    order = await new_order(http)
    await idle(sandbox)
    [event] = sandbox.ledger.events_for_order(order["id"])
    assert receiver.event_ids() == [event["id"], event["id"]]


async def test_a_drop_rate_of_one_delivers_nothing_but_events_are_still_listed(
        sandbox: Sandbox, http: aiohttp.ClientSession, receiver: Receiver) -> None:
    sandbox.configure(webhook_url=receiver.url, webhook_drop_rate=1.0)
    order = await new_order(http)
    sandbox.set_order_state(order["id"], "cancelled")
    await idle(sandbox)
    assert receiver.received == [] and sandbox.ledger.webhook_deliveries == []
    _, page = await call(http, "GET", "/events")
    assert [e["type"] for e in page["data"]] == ["order.cancelled", "order.accepted"]


async def test_a_refused_delivery_is_retried_with_a_fresh_signature(sandbox: Sandbox, http: aiohttp.ClientSession,
                                                                    receiver: Receiver) -> None:
    receiver.statuses = [500, 500, 500]
    sandbox.configure(webhook_url=receiver.url, webhook_secret=SECRET)
    await new_order(http)
    await idle(sandbox)  # 0.2 + 0.5 + 1 s of backoff
    assert [(d["attempt"], d["status"]) for d in sandbox.ledger.webhook_deliveries] == [
        (1, 500), (2, 500), (3, 500), (4, 200)]
    assert len(set(receiver.event_ids())) == 1
    stamps = [verify(headers, body) for headers, body in receiver.received]
    assert stamps == sorted(stamps) and stamps[0] < stamps[-1]  # 1.7 s apart: a later timestamp, re-signed
    signatures = [headers["DigitalRiver-Signature"] for headers, _ in receiver.received]
    assert signatures[0] != signatures[-1]


async def test_without_retries_a_refusal_or_connection_error_is_one_attempt(
        sandbox: Sandbox, http: aiohttp.ClientSession, receiver: Receiver) -> None:
    receiver.statuses = [503]
    sandbox.configure(webhook_url=receiver.url, webhook_retry=False)
    await new_order(http)
    await idle(sandbox)
    assert "DigitalRiver-Signature" not in receiver.received[0][0]  # no secret, no signature
    sandbox.configure(webhook_url="http://127.0.0.1:9/hooks")  # nothing listens on the discard port
    await new_order(http)
    await idle(sandbox)
    assert [(d["attempt"], d["status"]) for d in sandbox.ledger.webhook_deliveries] == [(1, 503), (1, 0)]


async def test_random_delays_reorder_deliveries(sandbox: Sandbox, http: aiohttp.ClientSession,
                                                receiver: Receiver) -> None:
    orders = [await new_order(http, "src_pending_payment") for _ in range(6)]
    sandbox.configure(webhook_url=receiver.url, webhook_delay_ms=300)
    for order in orders:  # six events at once: only the seeded delays order their arrival
        sandbox.set_order_state(order["id"], "accepted")
    await idle(sandbox)
    emitted = [e["id"] for e in sandbox.ledger.events if e["type"] == "order.accepted"]
    arrived = receiver.event_ids()
    assert sorted(arrived) == sorted(emitted) and arrived != emitted
    # createdTime is a total order: the receiver can put them back.
    by_id = sandbox.ledger.events_by_id
    assert sorted(arrived, key=lambda i: by_id[i]["createdTime"]) == emitted


async def test_reset_and_stop_cancel_deliveries_in_flight(receiver: Receiver) -> None:
    async with Sandbox() as sb:
        sb.configure(webhook_url=receiver.url, webhook_delay_ms=5_000, seed=1)
        async with aiohttp.ClientSession(base_url=sb.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
            await new_order(http)
            assert sb.state.webhooks.in_flight == 1
            sb.reset()
            await idle(sb)
            await new_order(http)
        assert sb.state.webhooks.in_flight == 1
    assert sb.state.webhooks.in_flight == 0 and sb.state.webhooks.session is None
    assert receiver.received == []


# -- orders that settle later --------------------------------------------------------------------------------


async def test_settle_sources_settle_to_their_outcome(sandbox: Sandbox, http: aiohttp.ClientSession,
                                                      receiver: Receiver) -> None:
    sandbox.configure(settle_after_seconds=0.1, webhook_url=receiver.url, webhook_secret=SECRET)
    accept, fail, block, plain, ok = [await new_order(http, s) for s in (
        "src_settle_accept_1", "src_settle_fail", "src_settle_block_x", "src_pending_payment", "src_ok")]
    assert {accept["state"], fail["state"], block["state"]} == {"pending_payment"}
    await wait_until(lambda: sandbox.state.settling == 0)
    assert types_of(sandbox, accept["id"]) == ["order.pending_payment", "order.accepted"]
    assert types_of(sandbox, fail["id"]) == ["order.pending_payment", "order.charge.failed", "order.cancelled"]
    assert types_of(sandbox, block["id"]) == ["order.pending_payment", "order.blocked"]
    assert types_of(sandbox, plain["id"]) == ["order.pending_payment", "order.accepted"]  # settle_to: accepted
    assert types_of(sandbox, ok["id"]) == ["order.accepted"]
    assert sandbox.ledger.orders[fail["id"]]["payment"]["charges"][0]["state"] == "failed"
    assert_times_strictly_increase(sandbox)
    await idle(sandbox)
    assert sorted(receiver.event_ids()) == sorted(e["id"] for e in sandbox.ledger.events)


@pytest.mark.parametrize(("settle_to", "expected"), [
    ("charge_failed", ["order.review_opened", "order.charge.failed", "order.cancelled"]),
    ("blocked", ["order.review_opened", "order.blocked"]),
])
async def test_settle_to_applies_to_pending_and_in_review_orders(sandbox: Sandbox, http: aiohttp.ClientSession,
                                                                 settle_to: str, expected: list[str]) -> None:
    sandbox.configure(settle_after_seconds=0.05, settle_to=settle_to)
    order = await new_order(http, price=5.94)  # in_review by its price
    await wait_until(lambda: sandbox.state.settling == 0)
    assert types_of(sandbox, order["id"]) == expected


async def test_settle_sources_wait_a_second_by_default_and_skip_orders_already_moved(
        sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    waiting, moved = await new_order(http, "src_settle_accept"), await new_order(http, "src_settle_fail")
    plain = await new_order(http, "src_pending_payment")  # settle_after_seconds 0: stays pending
    sandbox.set_order_state(moved["id"], "accepted")
    await asyncio.sleep(0.5)
    assert sandbox.ledger.orders[waiting["id"]]["state"] == "pending_payment"
    await wait_until(lambda: sandbox.state.settling == 0, 2.0)
    assert types_of(sandbox, waiting["id"]) == ["order.pending_payment", "order.accepted"]
    assert types_of(sandbox, moved["id"]) == ["order.pending_payment", "order.accepted"]
    assert types_of(sandbox, plain["id"]) == ["order.pending_payment"]


async def test_reset_cancels_settle_timers(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    sandbox.configure(settle_after_seconds=0.05)
    order = await new_order(http, "src_settle_block")
    assert sandbox.state.settling == 1
    sandbox.reset()
    assert sandbox.state.settling == 0 and sandbox.ledger.events == []
    await asyncio.sleep(0.15)
    assert sandbox.ledger.events == [] and order["id"] not in sandbox.ledger.orders  # the timer never fired


# -- settings and ledger -------------------------------------------------------------------------------------


async def test_event_settings_are_set_at_runtime_and_the_secret_is_not_shown(sandbox: Sandbox,
                                                                             receiver: Receiver) -> None:
    changes = {"webhook_url": receiver.url, "webhook_secret": SECRET, "webhook_delay_ms": 5,
               "webhook_duplicate_rate": "0.5", "webhook_drop_rate": 0, "webhook_retry": False,
               "settle_after_seconds": 2, "settle_to": "blocked"}
    async with aiohttp.ClientSession() as control:
        async with control.post(f"{sandbox.url}/_sandbox/config", json=changes) as r:
            shown = await r.json()
        assert r.status == 200
        assert shown["webhook_secret"] == "[set]" and SECRET not in json.dumps(shown)
        assert (shown["webhook_duplicate_rate"], shown["webhook_retry"], shown["settle_after_seconds"]) == (
            0.5, False, 2.0)
        for bad in ({"settle_to": "complete"}, {"webhook_drop_rate": 2}, {"webhook_url": "ftp://x"},
                    {"webhook_retry": "yes"}, {"settle_after_seconds": -1}, {"webhook_delay_ms": -1}):
            async with control.post(f"{sandbox.url}/_sandbox/config", json=bad) as r:
                assert r.status == 400, bad
        async with control.post(f"{sandbox.url}/_sandbox/config", json={"webhook_url": ""}) as r:
            assert (await r.json())["webhook_url"] is None
    assert sandbox.config.webhook_secret == SECRET and sandbox.config.settle_to == "blocked"


async def test_the_ledger_shows_events_and_deliveries(sandbox: Sandbox, http: aiohttp.ClientSession,
                                                      receiver: Receiver) -> None:
    sandbox.configure(webhook_url=receiver.url)
    await new_order(http)
    await idle(sandbox)
    async with aiohttp.ClientSession() as control, control.get(f"{sandbox.url}/_sandbox/ledger?requests=0") as r:
        ledger = await r.json()
    assert ledger["events"] == sandbox.ledger.events and len(ledger["events"]) == 1
    assert ledger["webhookDeliveries"][0]["eventId"] == ledger["events"][0]["id"]
    assert (ledger["counts"]["events"], ledger["counts"]["webhookDeliveries"]) == (1, 1)
    sandbox.reset()
    assert sandbox.ledger.events == [] and sandbox.ledger.webhook_deliveries == []
    assert sandbox.ledger.events_by_id == {} and sandbox.ledger.events_by_order == {}


def test_command_line_flags_set_events_and_webhooks() -> None:
    _, _, config = config_from_args([
        "--settle-after-seconds", "3", "--settle-to", "charge_failed", "--webhook-url", "http://127.0.0.1:1/h",
        "--webhook-secret", "s", "--webhook-delay-ms", "50", "--webhook-duplicate-rate", "0.1",
        "--webhook-drop-rate", "0.2", "--no-webhook-retry"])
    assert (config.settle_after_seconds, config.settle_to, config.webhook_url, config.webhook_secret,
            config.webhook_delay_ms, config.webhook_duplicate_rate, config.webhook_drop_rate,
            config.webhook_retry) == (3.0, "charge_failed", "http://127.0.0.1:1/h", "s", 50.0, 0.1, 0.2, False)
    _, _, default = config_from_args([])
    assert (default.settle_after_seconds, default.webhook_url, default.webhook_retry) == (0.0, None, True)
