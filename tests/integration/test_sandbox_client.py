"""The real client against an in-process sandbox: every call, every scripted failure, the ledger."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from engine.digital_river import (
    AuthError,
    BadRequestError,
    ConflictError,
    DeclinedError,
    DigitalRiverClient,
    ErrorKind,
    NotFoundError,
    Order,
    TransientError,
)
from engine.logs import AppLogSink
from sandbox.server import Sandbox, config_from_args
from tests.support import sandbox_fixture

KEY = "sk_test_integration_0123456789"


sandbox = sandbox_fixture(seed=7)


def make_client(sb: Sandbox, **kwargs: Any) -> DigitalRiverClient:
    options: dict[str, Any] = {"max_requests_per_second": 10_000.0, "backoff_base": 0.001, "backoff_max": 0.01,
                               "timeout_seconds": 5.0}
    options.update(kwargs)
    return DigitalRiverClient(sb.url, KEY, **options)


@pytest.fixture
async def client(sandbox: Sandbox) -> AsyncIterator[DigitalRiverClient]:
    async with make_client(sandbox, app_log=AppLogSink("ERROR")) as c:
        yield c


def checkout_body(*, source: str = "src_ok", country: str = "US", price: float = 19.99, quantity: int = 1,
                  upstream_id: str = "up_1", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "currency": "USD",
        "customerId": "cus_1",
        "sourceId": source,
        "chargeType": "merchant_initiated",
        "upstreamId": upstream_id,
        "email": "buyer@example.com",
        "shipTo": {"address": {"line1": "1 Main St", "city": "Minneapolis", "country": country}},
        "items": [{
            "skuId": "sku_widget",
            "price": price,
            "quantity": quantity,
            "subscriptionInfo": {"autoRenewal": True, "billingAgreementId": "ba_123", "subscriptionId": "sub_1"},
        }],
    }
    body.update(extra)
    return body


async def order_for(client: DigitalRiverClient, **kwargs: Any) -> Order:
    checkout = await client.create_checkout(checkout_body(**kwargs))
    return await client.create_order(checkout.id)


# -- checkouts ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("country", "tax"), [("US", "4.95"), ("GB", "11.99"), ("DE", "11.39"), ("JP", "6.00")])
async def test_checkout_tax_follows_the_ship_to_country(client: DigitalRiverClient, country: str,
                                                        tax: str) -> None:
    checkout = await client.create_checkout(checkout_body(country=country, price=19.99, quantity=3))
    assert checkout.subtotal == Decimal("59.97")
    assert checkout.total_tax == Decimal(tax)
    assert checkout.total_amount == Decimal("59.97") + Decimal(tax)
    assert checkout.items[0].tax_amount == Decimal(tax)
    assert checkout.payment_session_state == "requires_confirmation"
    assert checkout.id.startswith("chk_")


async def test_checkout_tax_is_rounded_half_up_per_item(client: DigitalRiverClient) -> None:
    body = checkout_body()
    # 10.00 at 8.25% = 0.825 → 0.83 each; the total is the sum of rounded items, not a rounded sum.
    body["items"] = [{"skuId": "a", "price": 10.0, "quantity": 1}, {"skuId": "b", "aggregatePrice": 10.0,
                                                                     "quantity": 2}]
    checkout = await client.create_checkout(body)
    assert [i.tax_amount for i in checkout.items] == [Decimal("0.83"), Decimal("0.83")]
    assert checkout.total_tax == Decimal("1.66")
    assert checkout.items[1].price == Decimal("5")


async def test_checkout_without_source_is_not_ready_and_its_order_fails_submit(
        client: DigitalRiverClient) -> None:
    body = checkout_body()
    del body["sourceId"]
    checkout = await client.create_checkout(body)
    assert checkout.payment_session_state == "requires_source"
    with pytest.raises(BadRequestError) as caught:
        await client.create_order(checkout.id)
    assert caught.value.code == "order_submit_failed"


@pytest.mark.parametrize(("change", "code", "parameter"), [
    ({"colour": "red"}, "unknown_parameter", "colour"),
    ({"currency": None}, "missing_parameter", "currency"),
    ({"currency": "XYZ"}, "invalid_parameter", "currency"),
    ({"chargeType": "whenever"}, "invalid_parameter", "chargeType"),
    ({"items": []}, "invalid_parameter", "items"),
    ({"items": [{"skuId": "s", "price": 1.0, "quantity": 0}]}, "invalid_parameter", "items[0].quantity"),
    ({"items": [{"price": 1.0, "quantity": 1}]}, "missing_parameter", "items[0].skuId"),
    ({"items": [{"skuId": "s", "quantity": 1}]}, "missing_parameter", "items[0].price"),
    ({"items": [{"skuId": "s", "price": "1.00", "quantity": 1}]}, "invalid_parameter", "items[0].price"),
    ({"items": [{"skuId": "s", "price": 1.0, "quantity": 1, "colour": 1}]}, "unknown_parameter",
     "items[0].colour"),
    ({"metadata": {"nested": {"a": 1}}}, "invalid_parameter", "metadata.nested"),
    ({"metadata": {"ratio": 0.5}}, "invalid_parameter", "metadata.ratio"),
    ({"customerId": "cus_invalid_42"}, "invalid_parameter", "customerId"),
    ({"items": [{"skuId": "sku_invalid_9", "price": 1.0, "quantity": 1}]}, "invalid_parameter", "items[0].skuId"),
])
async def test_checkout_validation_answers_400_naming_the_parameter(client: DigitalRiverClient,
                                                                    change: dict[str, Any], code: str,
                                                                    parameter: str) -> None:
    body = checkout_body()
    body.update(change)
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(BadRequestError) as caught:
        await client.create_checkout(body)
    assert (caught.value.status, caught.value.type, caught.value.code, caught.value.parameter) == (
        400, "bad_request", code, parameter)


async def test_checkout_with_product_details_instead_of_sku_is_accepted(client: DigitalRiverClient) -> None:
    body = checkout_body()
    body["items"] = [{"productDetails": {"id": "WID-1", "name": "Widget", "skuGroupId": "g1", "countryOfOrigin": "US"},
                      "price": 5.0, "quantity": 2}]
    checkout = await client.create_checkout(body)
    assert checkout.items[0].sku_id is None
    assert checkout.subtotal == Decimal("10")


@pytest.mark.parametrize(("details", "code", "parameter"), [
    # Digital River's own answers (GitBook product-management/using-product-details.md).
    ({"name": "Widget", "countryOfOrigin": "US"}, "missing_parameter", "skuGroupId"),
    ({"name": "Widget", "skuGroupId": "g1"}, "missing_parameter", "countryOfOrigin"),
    ({"name": "Widget", "skuGroupId": "g1", "countryOfOrigin": "USA"}, "invalid_parameter", "countryOfOrigin"),
    # taxCode and eccn are SKU fields, not product-details fields.
    ({"name": "Widget", "skuGroupId": "g1", "countryOfOrigin": "US", "taxCode": "4512.1"}, "unknown_parameter",
     "items[0].productDetails.taxCode"),
    ({"skuGroupId": "g1", "countryOfOrigin": "US"}, "missing_parameter", "items[0].productDetails.name"),
])
async def test_product_details_are_refused_as_digital_river_refuses_them(
        client: DigitalRiverClient, details: dict[str, str], code: str, parameter: str) -> None:
    body = checkout_body()
    body["items"] = [{"productDetails": details, "price": 5.0, "quantity": 1}]
    with pytest.raises(BadRequestError) as caught:
        await client.create_checkout(body)
    assert (caught.value.status, caught.value.code, caught.value.parameter) == (400, code, parameter)


# -- orders ------------------------------------------------------------------------------------------------------


async def test_order_carries_checkout_upstream_totals_and_billing_agreement(client: DigitalRiverClient,
                                                                           sandbox: Sandbox) -> None:
    checkout = await client.create_checkout(checkout_body(upstream_id="up_carry"))
    order = await client.create_order(checkout.id)
    assert (order.state, order.checkout_id, order.upstream_id, order.customer_id) == (
        "accepted", checkout.id, "up_carry", "cus_1")
    assert (order.subtotal, order.total_tax, order.total_amount) == (
        checkout.subtotal, checkout.total_tax, checkout.total_amount)
    [item] = order.items
    assert (item.sku_id, item.quantity, item.amount, item.tax_amount, item.billing_agreement_id, item.state) == (
        "sku_widget", 1, Decimal("19.99"), Decimal("1.65"), "ba_123", "created")
    assert sandbox.ledger.orders_for_checkout(checkout.id)[0]["id"] == order.id
    assert sandbox.ledger.orders_for_upstream("up_carry")[0]["id"] == order.id


async def test_a_checkout_becomes_an_order_once_then_answers_not_found(client: DigitalRiverClient,
                                                                       sandbox: Sandbox) -> None:
    checkout = await client.create_checkout(checkout_body())
    await client.create_order(checkout.id)
    with pytest.raises(NotFoundError) as caught:
        await client.create_order(checkout.id)
    assert caught.value.code == "not_found"
    assert len(sandbox.ledger.orders_for_checkout(checkout.id)) == 1


async def test_order_for_an_unknown_checkout_is_not_found(client: DigitalRiverClient) -> None:
    with pytest.raises(NotFoundError):
        await client.create_order("chk_never_made")


async def test_orders_are_found_by_checkout_id_upstream_ids_and_ids(client: DigitalRiverClient) -> None:
    first = await order_for(client, upstream_id="up_a")
    second = await order_for(client, upstream_id="up_b")
    await order_for(client, upstream_id="up_c")
    assert [o.id for o in await client.list_orders(checkout_id=first.checkout_id)] == [first.id]
    by_upstream = await client.list_orders(upstream_ids=["up_a", "up_b"])
    assert {o.id for o in by_upstream} == {first.id, second.id}
    assert [o.id for o in await client.list_orders(ids=[second.id])] == [second.id]
    assert await client.list_orders(checkout_id="chk_nothing") == []
    assert await client.list_orders(upstream_ids="up_nothing") == []


async def test_get_order_returns_the_order_and_unknown_ids_are_not_found(client: DigitalRiverClient) -> None:
    order = await order_for(client)
    fetched = await client.get_order(order.id)
    assert (fetched.id, fetched.total_amount, fetched.items[0].id) == (order.id, order.total_amount,
                                                                       order.items[0].id)
    with pytest.raises(NotFoundError):
        await client.get_order("404404")


# -- scripted outcomes by data -------------------------------------------------------------------------------------


async def test_soft_decline_source_answers_409_and_burns_the_checkout(client: DigitalRiverClient,
                                                                      sandbox: Sandbox) -> None:
    checkout = await client.create_checkout(checkout_body(source="src_soft_decline_insufficient_funds"))
    with pytest.raises(DeclinedError) as caught:
        await client.create_order(checkout.id)
    assert (caught.value.code, caught.value.soft, caught.value.kind) == (
        "insufficient_funds", True, ErrorKind.SOFT_DECLINE)
    assert sandbox.ledger.declines[checkout.id] == "insufficient_funds"
    assert sandbox.ledger.orders_for_checkout(checkout.id) == []
    with pytest.raises(DeclinedError):  # burned: no order comes from it later either
        await client.create_order(checkout.id)


async def test_hard_decline_source_answers_409_with_its_code(client: DigitalRiverClient) -> None:
    checkout = await client.create_checkout(checkout_body(source="src_hard_decline_fraud"))
    with pytest.raises(DeclinedError) as caught:
        await client.create_order(checkout.id)
    assert (caught.value.code, caught.value.soft, caught.value.kind) == ("fraud", False, ErrorKind.HARD_DECLINE)


@pytest.mark.parametrize(("source", "state"), [("src_pending_payment", "pending_payment"),
                                               ("src_in_review", "in_review"), ("src_visa_4242", "accepted")])
async def test_source_scripts_the_order_state(client: DigitalRiverClient, source: str, state: str) -> None:
    assert (await order_for(client, source=source)).state == state


async def test_submit_failed_source_answers_400_order_submit_failed(client: DigitalRiverClient) -> None:
    checkout = await client.create_checkout(checkout_body(source="src_order_submit_failed"))
    with pytest.raises(BadRequestError) as caught:
        await client.create_order(checkout.id)
    assert caught.value.code == "order_submit_failed"


@pytest.mark.parametrize(("price", "outcome"), [(9.91, "insufficient_funds"), (9.92, "fraud"),
                                                (9.93, "pending_payment"), (9.94, "in_review"), (9.95, "accepted")])
async def test_unit_price_cents_script_the_outcome(client: DigitalRiverClient, price: float, outcome: str) -> None:
    checkout = await client.create_checkout(checkout_body(price=price))
    try:
        order = await client.create_order(checkout.id)
    except DeclinedError as exc:
        assert exc.code == outcome
    else:
        assert order.state == outcome


async def test_amount_rules_can_be_switched_off(client: DigitalRiverClient, sandbox: Sandbox) -> None:
    sandbox.configure(amount_rules=False)
    assert (await order_for(client, price=9.91)).state == "accepted"


# -- scripted failures by configuration ---------------------------------------------------------------------------


async def test_drop_after_order_gives_a_transient_error_and_the_order_is_findable(client: DigitalRiverClient,
                                                                                  sandbox: Sandbox) -> None:
    sandbox.configure(drop_after_order_rate=1.0)
    checkout = await client.create_checkout(checkout_body(upstream_id="up_dropped"))
    with pytest.raises(TransientError) as caught:
        await client.create_order(checkout.id)
    assert caught.value.status is None and caught.value.code == "connection_error"
    [found] = await client.list_orders(checkout_id=checkout.id)
    assert found.upstream_id == "up_dropped"
    assert sandbox.ledger.dropped_orders == [found.id]
    assert sandbox.ledger.count_requests("POST", "/orders") == 1


async def test_server_errors_are_retried_for_checkouts_then_raised(sandbox: Sandbox) -> None:
    sandbox.configure(error_rate=1.0, fault_endpoints=["POST /checkouts"])
    async with make_client(sandbox, max_retries=2) as c:
        with pytest.raises(TransientError) as caught:
            await c.create_checkout(checkout_body())
        assert (caught.value.status, caught.value.attempts) == (500, 3)
        assert await c.list_orders(checkout_id="x") == []  # other endpoints unaffected
    assert sandbox.ledger.count_requests("POST", "/checkouts", 500) == 3


async def test_server_error_on_order_creation_is_not_retried(client: DigitalRiverClient,
                                                             sandbox: Sandbox) -> None:
    checkout = await client.create_checkout(checkout_body())
    sandbox.configure(error_rate=1.0, fault_endpoints=["POST /orders"])
    with pytest.raises(TransientError):
        await client.create_order(checkout.id)
    assert sandbox.ledger.count_requests("POST", "/orders") == 1


async def test_a_share_of_errors_is_deterministic_for_a_seed(sandbox: Sandbox) -> None:
    async def outcomes() -> list[int]:
        sandbox.reset()
        statuses = []
        async with make_client(sandbox, max_retries=0) as c:
            for _ in range(20):
                try:
                    await c.list_orders()
                    statuses.append(200)
                except TransientError as exc:
                    statuses.append(exc.status or 0)
        return statuses

    sandbox.configure(error_rate=0.5, seed=123)
    first = await outcomes()
    second = await outcomes()
    assert first == second
    assert 0 < first.count(500) < 20


async def test_timeouts_become_transient_timeout_errors(sandbox: Sandbox) -> None:
    sandbox.configure(timeout_rate=1.0, timeout_seconds=30.0)
    async with make_client(sandbox, timeout_seconds=0.2, max_retries=1) as c:
        with pytest.raises(TransientError) as caught:
            await c.get_order("1")
    assert (caught.value.code, caught.value.attempts) == ("timeout", 2)
    for _ in range(100):  # the server notices the closed connections a moment later
        if sandbox.ledger.count_requests("GET", "/orders/1", status=0) == 2:
            break
        await asyncio.sleep(0.01)
    assert sandbox.ledger.count_requests("GET", "/orders/1", status=0) == 2


async def test_throttled_requests_answer_429_with_retry_after(sandbox: Sandbox) -> None:
    sandbox.configure(throttle_rate=1.0, retry_after_seconds=0.01)
    async with make_client(sandbox, max_retries=2) as c:
        with pytest.raises(TransientError) as caught:
            await c.list_orders()
        assert (caught.value.status, caught.value.retry_after, caught.value.attempts) == (429, 0.01, 3)
        assert c.stats.rate_limited == 3


async def test_rate_limit_refuses_requests_over_it_until_retry_after(sandbox: Sandbox) -> None:
    sandbox.configure(rate_limit=2, retry_after_seconds=30)
    async with make_client(sandbox, max_retries=0) as c:
        await c.list_orders()
        await c.list_orders()
        with pytest.raises(TransientError) as caught:
            await c.list_orders()
        assert (caught.value.status, caught.value.retry_after) == (429, 30.0)
    assert sandbox.ledger.count_requests("GET", "/orders", 429) == 1


async def test_wrong_or_missing_key_is_an_auth_error(sandbox: Sandbox) -> None:
    async with DigitalRiverClient(sandbox.url, "pk_live_not_a_secret_key") as c:
        with pytest.raises(AuthError) as caught:
            await c.list_orders()
    assert caught.value.status == 401
    sandbox.configure(api_key="sk_test_only_this_one")
    async with make_client(sandbox) as c:
        with pytest.raises(AuthError):
            await c.list_orders()
    async with aiohttp.ClientSession() as session, session.get(f"{sandbox.url}/orders") as response:
        assert response.status == 401


# -- fulfillments -------------------------------------------------------------------------------------------------


async def two_item_order(client: DigitalRiverClient) -> Order:
    body = checkout_body()
    body["items"] = [{"skuId": "sku_a", "price": 5.0, "quantity": 2}, {"skuId": "sku_b", "price": 7.0,
                                                                      "quantity": 3}]
    return await client.create_order((await client.create_checkout(body)).id)


async def test_fulfillment_capture_then_repeat_answers_item_fulfilled(client: DigitalRiverClient,
                                                                      sandbox: Sandbox) -> None:
    order = await two_item_order(client)
    a = order.items[0]
    fulfillment = await client.create_fulfillment({"orderId": order.id, "items": [{"itemId": a.id, "quantity": 2}]})
    assert fulfillment.id.startswith("ful_") and fulfillment.order_id == order.id
    assert [(i.item_id, i.quantity) for i in fulfillment.items] == [(a.id, 2)]
    with pytest.raises(ConflictError) as caught:
        await client.create_fulfillment({"orderId": order.id, "items": [{"itemId": a.id, "quantity": 2}]})
    assert caught.value.code == "item_fulfilled"
    state = await client.get_order(order.id)
    assert ([i.state for i in state.items], state.state) == (["fulfilled", "created"], "accepted")
    assert len(sandbox.ledger.fulfillments_for_order(order.id)) == 1


async def test_fulfillment_cancel_then_repeat_answers_item_cancelled(client: DigitalRiverClient) -> None:
    order = await two_item_order(client)
    b = order.items[1]
    await client.create_fulfillment({"orderId": order.id, "items": [{"itemId": b.id, "cancelQuantity": 3}]})
    with pytest.raises(ConflictError) as caught:
        await client.create_fulfillment({"orderId": order.id, "items": [{"itemId": b.id, "cancelQuantity": 1}]})
    assert caught.value.code == "item_cancelled"


async def test_fulfillment_beyond_the_remaining_quantity_is_quantity_too_large(client: DigitalRiverClient,
                                                                               sandbox: Sandbox) -> None:
    order = await two_item_order(client)
    a, b = order.items
    await client.create_fulfillment({"orderId": order.id, "items": [{"itemId": b.id, "quantity": 2}]})
    with pytest.raises(ConflictError) as caught:
        # The first item is fine, the second asks for 2 of the 1 left: one error, and nothing applied.
        await client.create_fulfillment({"orderId": order.id, "items": [
            {"itemId": a.id, "quantity": 1}, {"itemId": b.id, "cancelQuantity": 2}]})
    assert caught.value.code == "quantity_too_large"
    assert sandbox.ledger.items[a.id].fulfilled == 0


async def test_whole_order_fulfilled_or_cancelled_answers_order_complete_or_cancelled(
        client: DigitalRiverClient) -> None:
    done = await two_item_order(client)
    await client.create_fulfillment({"orderId": done.id, "items": [
        {"itemId": done.items[0].id, "quantity": 2}, {"itemId": done.items[1].id, "quantity": 2,
                                                      "cancelQuantity": 1}]})
    assert (await client.get_order(done.id)).state == "complete"
    with pytest.raises(ConflictError) as complete:
        await client.create_fulfillment({"orderId": done.id, "items": [{"itemId": done.items[0].id, "quantity": 1}]})
    assert complete.value.code == "order_complete"

    cancelled = await two_item_order(client)
    await client.create_fulfillment({"orderId": cancelled.id, "items": [
        {"itemId": i.id, "cancelQuantity": i.quantity} for i in cancelled.items]})
    assert (await client.get_order(cancelled.id)).state == "cancelled"
    with pytest.raises(ConflictError) as was_cancelled:
        await client.create_fulfillment({"orderId": cancelled.id, "items": [
            {"itemId": i.id, "cancelQuantity": i.quantity} for i in cancelled.items]})
    assert was_cancelled.value.code == "order_cancelled"


async def test_capture_needs_an_accepted_order_but_cancel_does_not(client: DigitalRiverClient,
                                                                   sandbox: Sandbox) -> None:
    order = await order_for(client, source="src_pending_payment")
    with pytest.raises(ConflictError) as caught:
        await client.create_fulfillment({"orderId": order.id, "items": [{"itemId": order.items[0].id,
                                                                         "quantity": 1}]})
    assert caught.value.code == "order_not_accepted"
    await client.create_fulfillment({"orderId": order.id, "items": [{"itemId": order.items[0].id,
                                                                     "cancelQuantity": 1}]})
    assert (await client.get_order(order.id)).state == "cancelled"


async def test_fulfillment_validation_answers_400_or_404(client: DigitalRiverClient) -> None:
    order = await order_for(client)
    with pytest.raises(BadRequestError) as unknown_item:
        await client.create_fulfillment({"orderId": order.id, "items": [{"itemId": "nope", "quantity": 1}]})
    assert unknown_item.value.parameter == "items[0].itemId"
    with pytest.raises(BadRequestError) as nothing:
        await client.create_fulfillment({"orderId": order.id, "items": [{"itemId": order.items[0].id}]})
    assert nothing.value.code == "missing_parameter"
    with pytest.raises(BadRequestError) as extra:
        await client.create_fulfillment({"orderId": order.id, "carrier": "x", "items": []})
    assert extra.value.parameter == "carrier"
    with pytest.raises(NotFoundError):
        await client.create_fulfillment({"orderId": "999", "items": [{"itemId": "x", "quantity": 1}]})


# -- control endpoints and ledger over HTTP ---------------------------------------------------------------------


async def test_control_endpoints_change_config_move_orders_and_show_the_ledger(client: DigitalRiverClient,
                                                                               sandbox: Sandbox) -> None:
    order = await order_for(client, source="src_pending_payment", upstream_id="up_http")
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{sandbox.url}/_sandbox/config", json={"latency_ms": 1, "error_rate": 0.25}) as r:
            assert r.status == 200
            assert (await r.json())["error_rate"] == 0.25
        assert sandbox.config.latency_ms == 1.0
        async with http.post(f"{sandbox.url}/_sandbox/config", json={"error_rate": 2}) as r:
            assert r.status == 400
        async with http.post(f"{sandbox.url}/_sandbox/config", json={"no_such_setting": 1}) as r:
            assert r.status == 400
        assert sandbox.config.error_rate == 0.25  # a rejected change changes nothing
        async with http.post(f"{sandbox.url}/_sandbox/orders/{order.id}/state", json={"state": "accepted"}) as r:
            assert r.status == 200
        async with http.get(f"{sandbox.url}/_sandbox/ledger") as r:
            ledger = await r.json()
    assert ledger["ordersByUpstreamId"]["up_http"] == [order.id]
    assert ledger["orders"][0]["state"] == "accepted"
    assert ledger["counts"]["orders"] == 1
    assert [(e["method"], e["path"], e["status"]) for e in ledger["requests"]] == [
        ("POST", "/checkouts", 201), ("POST", "/orders", 201)]


async def test_unknown_paths_answer_in_the_error_envelope(sandbox: Sandbox) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{sandbox.url}/nothing-here") as r:
            assert (r.status, (await r.json())["type"]) == (404, "not_found")
        async with http.delete(f"{sandbox.url}/orders") as r:
            assert r.status == 405
        async with http.post(f"{sandbox.url}/checkouts", data=b"{not json") as r:
            assert (r.status, (await r.json())["errors"][0]["code"]) == (400, "invalid_request")


def test_command_line_flags_become_a_config() -> None:
    host, port, config = config_from_args(["--port", "9999", "--latency-ms", "50", "--latency-max-ms", "80",
                                           "--error-rate", "0.1", "--rate-limit", "25", "--seed", "3",
                                           "--fault-endpoints", "POST /orders,GET /orders"])
    assert (host, port) == ("127.0.0.1", 9999)
    assert (config.latency_ms, config.latency_max_ms, config.error_rate, config.rate_limit, config.seed) == (
        50.0, 80.0, 0.1, 25.0, 3)
    assert config.fault_endpoints == ("POST /orders", "GET /orders")


async def test_a_bill_to_without_an_address_is_refused_as_digital_river_refuses_it(client: DigitalRiverClient) -> None:
    # Billing.address is required in Digital River's models (digital-river-php docs/Model/Billing.md).
    body = checkout_body()
    body["billTo"] = {"name": "Acme", "email": "billing@acme.example"}
    with pytest.raises(BadRequestError) as caught:
        await client.create_checkout(body)
    assert (caught.value.status, caught.value.code, caught.value.parameter) == (400, "missing_parameter",
                                                                                "billTo.address")


async def test_fulfillments_are_listed_by_order_newest_first_with_their_metadata(client: DigitalRiverClient,
                                                                                 sandbox: Sandbox) -> None:
    order = await two_item_order(client)
    other = await two_item_order(client)
    a, b = order.items
    made = [await client.create_fulfillment({"orderId": order.id, "items": [{"itemId": a.id, "quantity": 1}],
                                             "metadata": {"drjobsJob": "line-item-fulfillment", "drjobsIds": "7"}}),
            await client.create_fulfillment({"orderId": order.id, "items": [{"itemId": b.id, "quantity": 1}],
                                             "metadata": {"drjobsIds": "8", "flag": True, "n": 3}})]
    await client.create_fulfillment({"orderId": other.id, "items": [{"itemId": other.items[0].id, "quantity": 1}]})
    first, more = await client.list_fulfillments(order.id, limit=1)
    assert ([f.id for f in first], more) == ([made[1].id], True)
    assert first[0].metadata == {"drjobsIds": "8", "flag": True, "n": 3}
    rest, more = await client.list_fulfillments(order.id, starting_after=first[0].id, limit=1)
    assert ([f.id for f in rest], more) == ([made[0].id], False)
    assert rest[0].metadata == {"drjobsJob": "line-item-fulfillment", "drjobsIds": "7"}


@pytest.mark.parametrize(("query", "code", "parameter"), [
    ("orderId=1&colour=red", "unknown_parameter", "colour"),
    ("orderId=1&limit=101", "invalid_parameter", "limit"),
    ("orderId=1&limit=0", "invalid_parameter", "limit"),
])
async def test_fulfillment_list_parameters_are_checked(sandbox: Sandbox, query: str, code: str,
                                                       parameter: str) -> None:
    async with aiohttp.ClientSession() as http, http.get(
            f"{sandbox.url}/fulfillments?{query}", headers={"Authorization": f"Bearer {KEY}"}) as response:
        body = await response.json()
    assert response.status == 400
    assert (body["errors"][0]["code"], body["errors"][0]["parameter"]) == (code, parameter)


@pytest.mark.parametrize(("change", "code", "parameter"), [
    ({"colour": "red"}, "unknown_parameter", "colour"),
    ({"items": [{"itemId": "x", "quantity": 1, "colour": 1}]}, "unknown_parameter", "items[0].colour"),
    ({"metadata": {"ids": ["1", "2"]}}, "invalid_parameter", "metadata.ids"),
    ({"metadata": "1,2"}, "invalid_parameter", "metadata"),
])
async def test_fulfillment_bodies_are_checked_as_digital_river_checks_them(client: DigitalRiverClient,
                                                                           change: dict[str, Any], code: str,
                                                                           parameter: str) -> None:
    order = await two_item_order(client)
    body: dict[str, Any] = {"orderId": order.id, "items": [{"itemId": order.items[0].id, "quantity": 1}]}
    body.update(change)
    with pytest.raises(BadRequestError) as caught:
        await client.create_fulfillment(body)
    assert (caught.value.code, caught.value.parameter) == (code, parameter)


async def test_every_request_carries_the_api_version_the_engine_was_built_for(client: DigitalRiverClient,
                                                                              sandbox: Sandbox) -> None:
    from engine.settings import DR_API_VERSION_BUILT_FOR
    await two_item_order(client)
    assert sandbox.ledger.api_versions == {DR_API_VERSION_BUILT_FOR: 2}
    async with make_client(sandbox, api_version="2024-08-21") as pinned:
        await pinned.list_orders(checkout_id="chk_none")
    assert sandbox.ledger.api_versions == {DR_API_VERSION_BUILT_FOR: 2, "2024-08-21": 1}
