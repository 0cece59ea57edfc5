"""The Digital River client against aioresponses: headers, parsing, the error tree, retries, rate, redaction."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import structlog
from aioresponses import CallbackResult, aioresponses
from yarl import URL

from engine import __version__
from engine.digital_river import (
    RATE_HEADROOM,
    AuthError,
    BadRequestError,
    ConflictError,
    DeclinedError,
    DigitalRiverClient,
    DigitalRiverError,
    ErrorKind,
    MalformedResponseError,
    NotFoundError,
    TokenBucket,
    TransientError,
    decline_is_soft,
    parse_retry_after,
)
from engine.logs import AppLogSink

BASE = "http://dr.test"
KEY = "sk_test_unitSECRET0123456789"
CHECKOUTS = f"{BASE}/checkouts"
ORDERS = f"{BASE}/orders"
ORDERS_ANY = re.compile(r"^http://dr\.test/orders(\?.*)?$")
FULFILLMENTS = f"{BASE}/fulfillments"


# -- harness ----------------------------------------------------------------------------------------------------


class _Response(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates the `stream_writer` argument aiohttp 3.13 added to ClientResponse."""

    def __init__(self, method: str, url: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


class DRMock(aioresponses):
    def add(self, url: Any, method: str = "GET", *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        kwargs.setdefault("response_class", _Response)
        super().add(url, method, *args, **kwargs)


def reply(status: int = 200, payload: Any = None, *, body: str | bytes = "", headers: dict[str, str] | None = None,
          content_type: str = "application/json") -> CallbackResult:
    return CallbackResult(status=status, payload=payload, body=body, headers=headers, content_type=content_type,
                          response_class=_Response)


class FakeTime:
    """A clock that sleeping moves forward at once (for sequential calls)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        target = self.now + seconds
        await asyncio.sleep(0)
        self.now = max(self.now, target)


class ManualTime:
    """A clock that moves only when the test says so; sleepers wake when it passes their time."""

    def __init__(self) -> None:
        self.now = 0.0
        self._waiters: list[tuple[float, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self.now + seconds, future))
        await future

    async def settle(self) -> None:
        for _ in range(50):
            await asyncio.sleep(0)

    async def advance_to(self, when: float) -> None:
        self.now = when
        for target, future in list(self._waiters):
            if target <= when + 1e-12:
                self._waiters.remove((target, future))
                future.set_result(None)
        await self.settle()

    async def run(self, *tasks: asyncio.Task[Any]) -> None:
        """Advance to each next wake-up until every task is done."""
        await self.settle()
        while not all(t.done() for t in tasks):
            assert self._waiters, "tasks are stuck without a sleeper to wake"
            await self.advance_to(min(t for t, _ in self._waiters))


class MaxRandom(random.Random):
    """Full jitter at its ceiling, so backoff waits are exact."""

    def uniform(self, a: float, b: float) -> float:
        return b


def checkout_json(**extra: Any) -> dict[str, Any]:
    body = {
        "id": "chk_1", "currency": "USD", "subtotal": 19.99, "totalTax": 1.65, "totalAmount": 21.64,
        "items": [{"id": "ci_1", "skuId": "sku_1", "quantity": 1, "price": 19.99, "amount": 19.99,
                   "tax": {"rate": 0.0825, "amount": 1.65},
                   "subscriptionInfo": {"billingAgreementId": "ba_1", "subscriptionId": "sub_1"}}],
        "payment": {"session": {"id": "ses_1", "state": "requires_confirmation"}},
        "upstreamId": "up_1",
    }
    body.update(extra)
    return body


def order_json(order_id: str = "190001", **extra: Any) -> dict[str, Any]:
    body = {
        "id": order_id, "state": "accepted", "checkoutId": "chk_1", "upstreamId": "up_1", "customerId": "cus_1",
        "currency": "USD", "subtotal": 19.99, "totalTax": 1.65, "totalAmount": 21.64,
        "items": [{"id": "oi_1", "skuId": "sku_1", "quantity": 1, "amount": 19.99, "state": "created",
                   "tax": {"amount": 1.65}, "subscriptionInfo": {"billingAgreementId": "ba_1"}}],
    }
    body.update(extra)
    return body


def error_json(error_type: str, code: str, message: str = "nope", parameter: str | None = None) -> dict[str, Any]:
    error = {"code": code, "message": message}
    if parameter:
        error["parameter"] = parameter
    return {"type": error_type, "errors": [error]}


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def sink() -> AppLogSink:
    return AppLogSink("ERROR")


@pytest.fixture
def make_client(fake_time: FakeTime, sink: AppLogSink) -> Callable[..., DigitalRiverClient]:
    def make(**kwargs: Any) -> DigitalRiverClient:
        options: dict[str, Any] = {"api_version": "2024-08-21", "app_log": sink, "clock": fake_time.clock,
                                   "sleep": fake_time.sleep, "rng": MaxRandom(), "max_requests_per_second": 1000.0}
        options.update(kwargs)
        return DigitalRiverClient(BASE, KEY, **options)
    return make


@pytest.fixture
async def client(make_client: Callable[..., DigitalRiverClient]) -> AsyncIterator[DigitalRiverClient]:
    async with make_client() as c:
        yield c


@pytest.fixture
def mock() -> AsyncIterator[DRMock]:
    with DRMock() as m:
        yield m


def rows(sink: AppLogSink) -> list[dict[str, Any]]:
    return sink.take(1000)


# -- headers and parsing ----------------------------------------------------------------------------------------


async def test_sends_bearer_json_tracing_and_version_headers(client: DigitalRiverClient, mock: DRMock) -> None:
    seen: list[dict[str, str]] = []

    def capture(url: Any, **kwargs: Any) -> CallbackResult:
        seen.append(dict(kwargs["headers"]))
        assert json.loads(kwargs["data"]) == {"checkoutId": "chk_1"}
        return reply(201, order_json())

    mock.post(ORDERS, callback=capture, repeat=True)
    await client.create_order("chk_1")
    await client.create_order("chk_1")

    first, second = seen
    assert first["Authorization"] == f"Bearer {KEY}"
    assert first["Content-Type"] == "application/json"
    assert first["upstream-application-id"] == f"drjobs/{__version__}"
    assert first["digitalriver-version"] == "2024-08-21"
    assert uuid.UUID(first["upstream-id"]).version == 4
    assert first["upstream-id"] != second["upstream-id"]


async def test_omits_version_header_when_no_api_version(make_client: Callable[..., DigitalRiverClient],
                                                        mock: DRMock) -> None:
    seen: list[dict[str, str]] = []
    mock.get(f"{ORDERS}/190001", callback=lambda url, **kw: seen.append(dict(kw["headers"])) or reply(
        200, order_json()))
    async with make_client(api_version=None) as c:
        await c.get_order("190001")
    assert "digitalriver-version" not in seen[0]


async def test_checkout_answer_parses_totals_items_and_session_as_decimals(client: DigitalRiverClient,
                                                                          mock: DRMock) -> None:
    mock.post(CHECKOUTS, status=201, payload=checkout_json())
    checkout = await client.create_checkout({"currency": "USD", "items": []})
    assert checkout.id == "chk_1"
    assert (checkout.subtotal, checkout.total_tax, checkout.total_amount) == (
        Decimal("19.99"), Decimal("1.65"), Decimal("21.64"))
    assert checkout.payment_session_state == "requires_confirmation"
    item = checkout.items[0]
    assert (item.id, item.sku_id, item.quantity, item.tax_amount, item.billing_agreement_id) == (
        "ci_1", "sku_1", 1, Decimal("1.65"), "ba_1")


async def test_order_answer_with_unknown_fields_and_states_passes_through(client: DigitalRiverClient,
                                                                          mock: DRMock) -> None:
    answer = order_json(state="partially_teleported", brandNewField={"x": 1})
    answer["items"][0]["state"] = "quantum"
    answer["items"][0]["novelty"] = True
    mock.get(f"{ORDERS}/190001", payload=answer)
    order = await client.get_order("190001")
    assert order.state == "partially_teleported"
    assert order.raw["brandNewField"] == {"x": 1}
    assert order.items[0].state == "quantum"
    assert order.items[0].raw["novelty"] is True
    assert (order.items[0].amount, order.items[0].billing_agreement_id) == (Decimal("19.99"), "ba_1")
    assert (order.checkout_id, order.upstream_id, order.total_amount) == ("chk_1", "up_1", Decimal("21.64"))


async def test_list_orders_sends_filters_and_reads_the_envelope(client: DigitalRiverClient, mock: DRMock) -> None:
    urls: list[Any] = []
    mock.get(ORDERS_ANY, callback=lambda url, **kw: urls.append(url) or reply(
        200, {"hasMore": False, "data": [order_json("1"), order_json("2")]}))
    orders = await client.list_orders(checkout_id="chk_1", upstream_ids=["up_1", "up_2"], ids="1")
    assert [o.id for o in orders] == ["1", "2"]
    query = urls[0].query
    assert (query["checkoutId"], query["upstreamIds"], query["ids"], query["limit"]) == (
        "chk_1", "up_1,up_2", "1", "100")


async def test_fulfillment_answer_parses_items(client: DigitalRiverClient, mock: DRMock) -> None:
    mock.post(FULFILLMENTS, status=201, payload={"id": "ful_1", "orderId": "190001", "items": [
        {"itemId": "oi_1", "quantity": 1}, {"itemId": "oi_2", "cancelQuantity": 2}]})
    fulfillment = await client.create_fulfillment({"orderId": "190001", "items": []})
    assert (fulfillment.id, fulfillment.order_id) == ("ful_1", "190001")
    assert [(i.item_id, i.quantity, i.cancel_quantity) for i in fulfillment.items] == [
        ("oi_1", 1, 0), ("oi_2", 0, 2)]


async def test_decimal_amounts_in_a_body_are_sent_as_json_numbers(client: DigitalRiverClient,
                                                                  mock: DRMock) -> None:
    sent: list[Any] = []
    mock.post(CHECKOUTS, callback=lambda url, **kw: sent.append(json.loads(kw["data"])) or reply(
        201, checkout_json()))
    await client.create_checkout({"currency": "USD", "items": [{"skuId": "s", "price": Decimal("19.99"),
                                                                "quantity": 1}]})
    assert sent[0]["items"][0]["price"] == 19.99


# -- malformed answers ------------------------------------------------------------------------------------------


async def test_created_answer_without_id_is_malformed_naming_the_field(client: DigitalRiverClient,
                                                                       mock: DRMock) -> None:
    body = checkout_json()
    del body["id"]
    mock.post(CHECKOUTS, status=201, payload=body)
    with pytest.raises(MalformedResponseError) as caught:
        await client.create_checkout({"currency": "USD"})
    assert caught.value.parameter == "id"
    assert caught.value.kind is ErrorKind.MALFORMED
    assert caught.value.status == 201
    assert "'id'" in str(caught.value)
    assert len(mock.requests[("POST", caught_url(CHECKOUTS))]) == 1  # not retried


async def test_item_without_tax_amount_is_malformed_naming_the_item_field(client: DigitalRiverClient,
                                                                          mock: DRMock) -> None:
    body = order_json()
    del body["items"][0]["tax"]
    mock.post(ORDERS, status=201, payload=body)
    with pytest.raises(MalformedResponseError) as caught:
        await client.create_order("chk_1")
    assert caught.value.parameter == "items[0].tax"
    # An unreadable 201 on POST /orders is an unknown outcome: callers catching TransientError reconcile.
    assert isinstance(caught.value, TransientError)


async def test_success_body_that_is_not_json_is_malformed(client: DigitalRiverClient, mock: DRMock) -> None:
    mock.get(f"{ORDERS}/1", status=200, body="<html>hello</html>", content_type="text/html")
    with pytest.raises(MalformedResponseError) as caught:
        await client.get_order("1")
    assert str(caught.value) == ("GET /orders/1: HTTP 200 malformed_response/not_json: "
                                 "HTTP 200 with a non-JSON body (text/html, 18 bytes)")


async def test_html_error_page_is_classified_by_status_with_a_readable_message(
        make_client: Callable[..., DigitalRiverClient], mock: DRMock) -> None:
    page = "<html><body>Bad Gateway</body></html>"
    mock.post(ORDERS, status=502, body=page, content_type="text/html")
    async with make_client() as c:
        with pytest.raises(TransientError) as caught:
            await c.create_order("chk_1")
    assert type(caught.value) is TransientError
    assert caught.value.status == 502
    assert f"HTTP 502 with a non-JSON body (text/html, {len(page)} bytes)" in str(caught.value)


# -- the error tree ---------------------------------------------------------------------------------------------


async def test_bad_request_carries_type_code_parameter_and_message(client: DigitalRiverClient,
                                                                   mock: DRMock) -> None:
    mock.post(CHECKOUTS, status=400, payload=error_json("bad_request", "invalid_parameter", "Price is wrong.",
                                                          "items[0].price"))
    with pytest.raises(BadRequestError) as caught:
        await client.create_checkout({})
    error = caught.value
    assert (error.status, error.type, error.code, error.parameter, error.message, error.kind) == (
        400, "bad_request", "invalid_parameter", "items[0].price", "Price is wrong.", ErrorKind.BAD_REQUEST)
    assert str(error) == ("POST /checkouts: HTTP 400 bad_request/invalid_parameter [items[0].price]: "
                          "Price is wrong.")


@pytest.mark.parametrize("status", [405, 406, 410, 422])
async def test_other_client_errors_are_bad_requests_and_not_retried(client: DigitalRiverClient, mock: DRMock,
                                                                    status: int) -> None:
    mock.get(f"{ORDERS}/1", status=status, payload=error_json("bad_request", "whatever"), repeat=True)
    with pytest.raises(BadRequestError):
        await client.get_order("1")
    assert len(mock.requests[("GET", caught_url(f"{ORDERS}/1"))]) == 1


async def test_not_found_on_order_creation_is_not_found(client: DigitalRiverClient, mock: DRMock) -> None:
    mock.post(ORDERS, status=404, payload=error_json("not_found", "not_found", parameter="checkoutId"))
    with pytest.raises(NotFoundError) as caught:
        await client.create_order("chk_used")
    assert caught.value.kind is ErrorKind.NOT_FOUND


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_key_is_auth_error_and_not_retried(client: DigitalRiverClient, mock: DRMock,
                                                         status: int) -> None:
    mock.get(f"{ORDERS}/1", status=status, payload=error_json("unauthorized", "unauthorized"), repeat=True)
    with pytest.raises(AuthError) as caught:
        await client.get_order("1")
    assert caught.value.kind is ErrorKind.AUTH
    assert len(mock.requests[("GET", caught_url(f"{ORDERS}/1"))]) == 1


@pytest.mark.parametrize("code", ["insufficient_funds", "do_not_honor", "card_expired", "issuer_unavailable",
                                  "limit_exceeded", "no_response"])
async def test_soft_decline_on_order_creation(client: DigitalRiverClient, mock: DRMock, code: str) -> None:
    mock.post(ORDERS, status=409, payload=error_json("conflict", code))
    with pytest.raises(DeclinedError) as caught:
        await client.create_order("chk_1")
    assert caught.value.soft is True
    assert caught.value.kind is ErrorKind.SOFT_DECLINE
    assert caught.value.code == code


# Digital River's hard codes for merchant-initiated charges (GitBook payments/authorization-declines.md).
DR_HARD_CODES = ["account_closed", "card_type_block", "declined", "fraud", "fraud_block", "invalid_address",
                 "invalid_amount", "invalid_card_bin", "invalid_card_number", "invalid_currency",
                 "invalid_expiration_date", "invalid_pin", "invalid_security_code", "invalid_transaction_type",
                 "issuer_invalid_card", "issuer_not_found", "lost_stolen_card", "restricted_card", "stop_recurring",
                 "voice_authorization_required"]
DR_SOFT_CODES = ["card_expired", "card_limit_exceeded", "card_velocity_exceeded", "do_not_honor",
                 "insufficient_funds", "issuer_unavailable", "limit_exceeded", "mid_limit_exceeded", "no_response",
                 "pin_try_exceeded"]


@pytest.mark.parametrize("code", [*DR_HARD_CODES, "Stop-Recurring"])
async def test_hard_decline_on_order_creation(client: DigitalRiverClient, mock: DRMock, code: str) -> None:
    mock.post(ORDERS, status=409, payload=error_json("conflict", code))
    with pytest.raises(DeclinedError) as caught:
        await client.create_order("chk_1")
    assert caught.value.soft is False
    assert caught.value.kind is ErrorKind.HARD_DECLINE


async def test_unknown_decline_code_is_soft(client: DigitalRiverClient, mock: DRMock) -> None:
    mock.post(ORDERS, status=409, payload=error_json("conflict", "failed-request"))
    with pytest.raises(DeclinedError) as caught:
        await client.create_order("chk_1")
    assert caught.value.soft is True
    assert caught.value.classified is False
    assert decline_is_soft("something_new_from_dr") and decline_is_soft(None)


@pytest.mark.parametrize("code", DR_SOFT_CODES)
async def test_digital_rivers_soft_codes_are_soft_and_classified(client: DigitalRiverClient, mock: DRMock,
                                                                 code: str) -> None:
    mock.post(ORDERS, status=409, payload=error_json("conflict", code))
    with pytest.raises(DeclinedError) as caught:
        await client.create_order("chk_1")
    assert (caught.value.soft, caught.value.classified) == (True, True)


async def test_conflict_outside_order_creation_is_conflict_with_code(client: DigitalRiverClient,
                                                                     mock: DRMock) -> None:
    mock.post(FULFILLMENTS, status=409, payload=error_json("conflict", "item_fulfilled"))
    with pytest.raises(ConflictError) as caught:
        await client.create_fulfillment({"orderId": "1", "items": []})
    assert (caught.value.code, caught.value.kind) == ("item_fulfilled", ErrorKind.CONFLICT)
    assert not isinstance(caught.value, DeclinedError)


# -- retries ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
async def test_transient_status_on_a_get_is_retried_until_it_succeeds(client: DigitalRiverClient, mock: DRMock,
                                                                      status: int) -> None:
    mock.get(f"{ORDERS}/1", status=status, payload=error_json("server_error", "oops"))
    mock.get(f"{ORDERS}/1", status=200, payload=order_json("1"))
    order = await client.get_order("1")
    assert order.id == "1"
    assert client.stats.retries == 1


@pytest.mark.parametrize("call", ["create_checkout", "list_fulfillments", "get_order", "list_orders"])
async def test_safe_calls_retry_up_to_max_retries_then_raise(make_client: Callable[..., DigitalRiverClient],
                                                             mock: DRMock, fake_time: FakeTime, call: str) -> None:
    attempts: list[int] = []
    pattern = re.compile(r"^http://dr\.test/.*$")
    for method in ("GET", "POST"):
        mock.add(pattern, method, callback=lambda url, **kw: attempts.append(1) or reply(503, error_json(
            "service_unavailable", "down")), repeat=True)
    invoke: dict[str, Callable[[DigitalRiverClient], Any]] = {
        "create_checkout": lambda c: c.create_checkout({}),
        "list_fulfillments": lambda c: c.list_fulfillments("1"),
        "get_order": lambda c: c.get_order("1"),
        "list_orders": lambda c: c.list_orders(checkout_id="chk_1"),
    }
    async with make_client(max_retries=3) as c:
        with pytest.raises(TransientError) as caught:
            await invoke[call](c)
    assert len(attempts) == 4
    assert caught.value.attempts == 4
    assert fake_time.sleeps == [0.5, 1.0, 2.0]


async def test_backoff_doubles_with_full_jitter_and_is_capped(make_client: Callable[..., DigitalRiverClient],
                                                              mock: DRMock, fake_time: FakeTime) -> None:
    mock.get(f"{ORDERS}/1", status=500, repeat=True)
    async with make_client(max_retries=4, backoff_base=10.0, backoff_max=25.0) as c:
        with pytest.raises(TransientError):
            await c.get_order("1")
    assert fake_time.sleeps == [10.0, 20.0, 25.0, 25.0]


async def test_jitter_draws_uniformly_below_the_ceiling(make_client: Callable[..., DigitalRiverClient],
                                                        mock: DRMock, fake_time: FakeTime) -> None:
    class Low(random.Random):
        def uniform(self, a: float, b: float) -> float:
            assert a == 0.0
            return b / 4

    mock.get(f"{ORDERS}/1", status=500, repeat=True)
    async with make_client(max_retries=2, rng=Low()) as c:
        with pytest.raises(TransientError):
            await c.get_order("1")
    assert fake_time.sleeps == [0.125, 0.25]


@pytest.mark.parametrize("call", ["create_order", "create_fulfillment"])
@pytest.mark.parametrize("failure", ["503", "timeout", "connection"])
async def test_unsafe_posts_are_never_retried_by_the_client(client: DigitalRiverClient, mock: DRMock,
                                                            fake_time: FakeTime, failure: str, call: str) -> None:
    # Either may have been applied: the caller looks before repeating (orders by checkout, fulfillments by
    # their metadata), so the client itself never sends one twice.
    url = ORDERS if call == "create_order" else FULFILLMENTS
    if failure == "503":
        mock.post(url, status=503, repeat=True)
    elif failure == "timeout":
        mock.post(url, exception=TimeoutError(), repeat=True)
    else:
        mock.post(url, exception=aiohttp.ServerDisconnectedError(), repeat=True)
    with pytest.raises(TransientError) as caught:
        if call == "create_order":
            await client.create_order("chk_1")
        else:
            await client.create_fulfillment({"orderId": "1", "items": []})
    assert len(mock.requests[("POST", caught_url(url))]) == 1
    assert fake_time.sleeps == []
    assert caught.value.kind is ErrorKind.TRANSIENT


async def test_timeout_is_transient_with_code_timeout(client: DigitalRiverClient, mock: DRMock) -> None:
    mock.get(f"{ORDERS}/1", exception=TimeoutError(), repeat=True)
    with pytest.raises(TransientError) as caught:
        await client.get_order("1")
    assert (caught.value.status, caught.value.code) == (None, "timeout")
    assert client.stats.requests[("GET /orders/{id}", "timeout")] == 4


async def test_connection_error_is_retried_then_succeeds(client: DigitalRiverClient, mock: DRMock) -> None:
    mock.post(CHECKOUTS, exception=aiohttp.ClientConnectionError("reset"))
    mock.post(CHECKOUTS, status=201, payload=checkout_json())
    assert (await client.create_checkout({})).id == "chk_1"
    assert client.stats.requests[("POST /checkouts", "connection_error")] == 1


async def test_retry_after_seconds_replaces_the_jittered_wait(client: DigitalRiverClient, mock: DRMock,
                                                              fake_time: FakeTime) -> None:
    mock.get(f"{ORDERS}/1", status=503, headers={"Retry-After": "7"})
    mock.get(f"{ORDERS}/1", status=200, payload=order_json("1"))
    await client.get_order("1")
    assert fake_time.sleeps == [7.0]


async def test_retry_after_http_date_is_honoured(client: DigitalRiverClient, mock: DRMock,
                                                 fake_time: FakeTime) -> None:
    soon = datetime.now(UTC).timestamp() + 12
    mock.get(f"{ORDERS}/1", status=503, headers={"Retry-After": _http_date(soon)})
    mock.get(f"{ORDERS}/1", status=200, payload=order_json("1"))
    await client.get_order("1")
    assert len(fake_time.sleeps) == 1
    assert 9.0 < fake_time.sleeps[0] <= 12.0


async def test_garbage_retry_after_falls_back_to_backoff(client: DigitalRiverClient, mock: DRMock,
                                                         fake_time: FakeTime) -> None:
    mock.get(f"{ORDERS}/1", status=503, headers={"Retry-After": "whenever you like"})
    mock.get(f"{ORDERS}/1", status=200, payload=order_json("1"))
    await client.get_order("1")
    assert fake_time.sleeps == [0.5]


async def test_retry_after_longer_than_backoff_max_gives_up_at_once(client: DigitalRiverClient, mock: DRMock,
                                                                    fake_time: FakeTime) -> None:
    mock.get(f"{ORDERS}/1", status=503, headers={"Retry-After": "600"}, repeat=True)
    with pytest.raises(TransientError) as caught:
        await client.get_order("1")
    assert caught.value.retry_after == 600.0
    assert fake_time.sleeps == []


def test_parse_retry_after_reads_seconds_dates_and_rejects_garbage() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:30 GMT", lambda: now) == 30.0
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", lambda: now) == 0.0
    for garbage in (None, "", "soon", "-5", "nan", "inf"):
        assert parse_retry_after(garbage) is None


# -- 429s and the rate budget -----------------------------------------------------------------------------------


async def test_429_on_a_get_waits_retry_after_then_succeeds(client: DigitalRiverClient, mock: DRMock,
                                                            fake_time: FakeTime) -> None:
    mock.get(f"{ORDERS}/1", status=429, headers={"Retry-After": "2"})
    mock.get(f"{ORDERS}/1", status=200, payload=order_json("1"))
    await client.get_order("1")
    assert fake_time.now >= 2.0
    assert (client.stats.rate_limited, client.stats.retries) == (1, 1)


async def test_429_pauses_every_call_of_the_client_until_retry_after(sink: AppLogSink, mock: DRMock) -> None:
    clock = ManualTime()
    sent_at: list[tuple[str, float]] = []
    mock.post(ORDERS, callback=lambda url, **kw: sent_at.append(("order", clock.now)) or reply(
        429, error_json("too_many_requests", "too_many_requests"), headers={"Retry-After": "5"}))
    mock.get(f"{ORDERS}/1", callback=lambda url, **kw: sent_at.append(("get", clock.now)) or reply(
        200, order_json("1")), repeat=True)
    async with DigitalRiverClient(BASE, KEY, clock=clock.clock, sleep=clock.sleep, app_log=sink,
                                  max_requests_per_second=1000.0) as c:
        with pytest.raises(TransientError) as caught:
            await c.create_order("chk_1")  # never retried, but it still pauses everyone
        assert caught.value.retry_after == 5.0
        getters = [asyncio.create_task(c.get_order("1")) for _ in range(3)]
        await clock.settle()
        assert [what for what, _ in sent_at] == ["order"]  # nobody went out during the pause
        await clock.advance_to(4.9)
        assert not any(t.done() for t in getters)
        await clock.run(*getters)
    get_times = [when for what, when in sent_at if what == "get"]
    assert len(get_times) == 3 and min(get_times) >= 5.0
    assert c.stats.rate_limited == 1
    assert c.stats.rate_limit_wait_seconds >= 3 * 5.0 - 1e-9


async def test_429_without_retry_after_pauses_one_second(client: DigitalRiverClient, mock: DRMock) -> None:
    mock.post(ORDERS, status=429)
    with pytest.raises(TransientError) as caught:
        await client.create_order("chk_1")
    assert caught.value.retry_after == 1.0
    assert client.bucket.paused_until == pytest.approx(1.0)


async def test_token_bucket_spaces_requests_at_the_rate(sink: AppLogSink, mock: DRMock) -> None:
    clock = ManualTime()
    sent_at: list[float] = []
    mock.get(f"{ORDERS}/1", callback=lambda url, **kw: sent_at.append(clock.now) or reply(200, order_json("1")),
             repeat=True)
    async with DigitalRiverClient(BASE, KEY, clock=clock.clock, sleep=clock.sleep, app_log=sink,
                                  max_requests_per_second=10.0) as c:
        tasks = [asyncio.create_task(c.get_order("1")) for _ in range(5)]
        await clock.run(*tasks)
    assert sent_at == pytest.approx([i / (10.0 * RATE_HEADROOM) for i in range(5)])


async def test_set_share_divides_the_cluster_budget_among_live_nodes(sink: AppLogSink, mock: DRMock) -> None:
    clock = ManualTime()
    sent_at: list[float] = []
    mock.get(f"{ORDERS}/1", callback=lambda url, **kw: sent_at.append(clock.now) or reply(200, order_json("1")),
             repeat=True)
    async with DigitalRiverClient(BASE, KEY, clock=clock.clock, sleep=clock.sleep, app_log=sink,
                                  max_requests_per_second=20.0) as c:
        c.set_share(4)
        assert c.bucket.rate == pytest.approx(5.0 * RATE_HEADROOM)
        tasks = [asyncio.create_task(c.get_order("1")) for _ in range(3)]
        await clock.run(*tasks)
        c.set_share(0)  # no live node row yet: the whole budget
        assert c.bucket.rate == pytest.approx(20.0 * RATE_HEADROOM)
    assert sent_at == pytest.approx([i / (5.0 * RATE_HEADROOM) for i in range(3)])


async def test_bucket_voids_a_reserved_slot_when_a_pause_starts_during_the_wait() -> None:
    clock = ManualTime()
    bucket = TokenBucket(10.0, burst_seconds=0.0, clock=clock.clock, sleep=clock.sleep)
    assert await bucket.acquire() == 0.0
    waiter = asyncio.create_task(bucket.acquire())  # slot at 0.1
    await clock.settle()
    bucket.pause(5.0)
    await clock.advance_to(0.1)
    assert not waiter.done()
    await clock.advance_to(5.0)
    assert waiter.done()
    assert waiter.result() == pytest.approx(5.0)


async def test_bucket_sends_evenly_without_a_burst() -> None:
    clock = ManualTime()
    bucket = TokenBucket(100.0, clock=clock.clock, sleep=clock.sleep)
    assert await bucket.acquire() == 0.0
    late = asyncio.create_task(bucket.acquire())
    await clock.settle()
    assert not late.done()
    await clock.advance_to(0.01)
    assert late.done()


async def test_a_stall_of_the_event_loop_never_lets_more_than_the_rate_into_one_second() -> None:
    clock = ManualTime()
    bucket = TokenBucket(10.0, burst_seconds=0.0, clock=clock.clock, sleep=clock.sleep)
    sent: list[float] = []

    async def one() -> None:
        await bucket.acquire()
        sent.append(clock.now)

    tasks = [asyncio.create_task(one()) for _ in range(30)]
    await clock.settle()  # one sent at 0; the others hold slots 0.1, 0.2 … 2.9
    await clock.advance_to(1.55)  # a stall: the loop wakes at 1.55 with fifteen slots past due at once
    await clock.run(*tasks)
    assert len(sent) == 30
    busiest = max(sum(1 for t in sent if start <= t < start + 1.0) for start in sent)
    assert busiest == 10  # the gate spreads the woken ones; without it all fifteen went at 1.55
    assert sent.count(1.55) == 10 and min(t for t in sent if t > 1.55) == pytest.approx(2.55)


async def test_no_one_second_window_exceeds_the_budget(sink: AppLogSink, mock: DRMock) -> None:
    clock = ManualTime()
    sent_at: list[float] = []
    mock.get(f"{ORDERS}/1", callback=lambda url, **kw: sent_at.append(clock.now) or reply(200, order_json("1")),
             repeat=True)
    async with DigitalRiverClient(BASE, KEY, clock=clock.clock, sleep=clock.sleep, app_log=sink,
                                  max_requests_per_second=250.0) as c:
        tasks = [asyncio.create_task(c.get_order("1")) for _ in range(600)]
        await clock.run(*tasks)
    busiest = max(sum(1 for t in sent_at if start <= t < start + 1.0) for start in sent_at)
    assert 240 <= busiest <= 250


# -- logs and secrets -------------------------------------------------------------------------------------------


async def test_failed_call_writes_one_app_log_row_after_its_retries(client: DigitalRiverClient, mock: DRMock,
                                                                   sink: AppLogSink) -> None:
    mock.post(CHECKOUTS, status=503, payload=error_json("service_unavailable", "down", "Try later."), repeat=True)
    structlog.contextvars.bind_contextvars(record_id=42)
    try:
        with pytest.raises(TransientError):
            await client.create_checkout({"currency": "USD", "sourceId": "src_1"})
    finally:
        structlog.contextvars.clear_contextvars()
    [row] = rows(sink)
    assert (row["logging_level"], row["module_name"], row["message"]) == ("ERROR", "digital-river",
                                                                          "dr_request_failed")
    assert row["response_status_code"] == 503
    assert row["record_id"] == "42"
    assert row["exception_type"] == "TransientError"
    assert json.loads(row["request"]) == {"method": "POST", "path": "/checkouts",
                                          "body": {"currency": "USD", "sourceId": "src_1"}}
    assert json.loads(row["response"])["errors"][0]["code"] == "down"


async def test_successful_call_writes_no_app_log_row_and_logs_dr_request_at_debug(
        make_client: Callable[..., DigitalRiverClient], mock: DRMock, sink: AppLogSink) -> None:
    mock.post(CHECKOUTS, status=201, payload=checkout_json())
    saved = structlog.get_config()
    # Other tests may have configured an INFO filter; this one needs DEBUG events to reach the capture.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with structlog.testing.capture_logs() as logs:
            async with make_client() as c:
                await c.create_checkout({})
    finally:
        structlog.configure(**saved)
    assert rows(sink) == []
    assert [(e["event"], e["log_level"], e["method"], e["path"], e["status"]) for e in logs] == [
        ("dr_request", "debug", "POST", "/checkouts", 201)]
    assert isinstance(logs[0]["ms"], float)


async def test_api_key_never_appears_in_errors_or_app_log_rows(client: DigitalRiverClient, mock: DRMock,
                                                               sink: AppLogSink) -> None:
    leaky = error_json("bad_request", "invalid_parameter", f"Header was Authorization: Bearer {KEY}")
    leaky["echo"] = {"Authorization": f"Bearer {KEY}", "apiKey": KEY}
    mock.post(CHECKOUTS, status=400, payload=leaky)
    mock.post(ORDERS, exception=aiohttp.ClientConnectionError(f"proxy said no to {KEY}"))
    mock.get(f"{ORDERS}/1", status=502, body=f"<html>{KEY}</html>", content_type="text/html", repeat=True)
    errors: list[DigitalRiverError] = []
    for call in (client.create_checkout({"apiKey": KEY, "currency": "USD"}), client.create_order("chk_1"),
                 client.get_order("1")):
        with pytest.raises(DigitalRiverError) as caught:
            await call
        errors.append(caught.value)
    logged = rows(sink)
    assert len(logged) == 3
    for error in errors:
        assert KEY not in str(error) and KEY not in repr(error) and KEY not in error.message
        assert error.__cause__ is None
    for row in logged:
        assert KEY not in json.dumps(row)
        assert "Bearer" not in (row["request"] or "")


# -- construction -----------------------------------------------------------------------------------------------


def test_from_settings_sizes_connections_to_the_jobs_concurrency() -> None:
    from engine.settings import StorefrontSettings

    def settings(*concurrency: int) -> Any:
        default = StorefrontSettings("DefaultStore", "https://api.digitalriver.com", KEY, 200.0, None)
        return SimpleNamespace(
            dr_api_version=None, dr_timeout_seconds=12.0, storefronts={"DefaultStore": default},
            jobs={f"job{i}": SimpleNamespace(concurrency=c) for i, c in enumerate(concurrency)})

    big = DigitalRiverClient.from_settings(settings(32, 8, 8, 8, 8))
    assert (big.connection_limit, big.timeout_seconds, big.storefront) == (64, 12.0, "DefaultStore")
    assert big.bucket.rate == pytest.approx(200.0 * RATE_HEADROOM)
    assert DigitalRiverClient.from_settings(settings(1, 1)).connection_limit == 16
    # Another storefront's client: its own key, URL, budget and label.
    eu = DigitalRiverClient.from_settings(settings(1), storefront=StorefrontSettings(
        "EU_STORE", "https://eu.example", "sk_test_eu", 250.0, None))
    assert eu.key_id != big.key_id
    assert (eu.base_url, eu.storefront) == ("https://eu.example", "EU_STORE")
    assert eu.bucket.rate == pytest.approx(250.0 * RATE_HEADROOM)


async def test_calls_before_start_fail_clearly() -> None:
    client = DigitalRiverClient(BASE, KEY)
    with pytest.raises(RuntimeError, match="not started"):
        await client.get_order("1")


async def test_stats_count_requests_by_endpoint_and_status(client: DigitalRiverClient, mock: DRMock) -> None:
    mock.get(f"{ORDERS}/1", status=500)
    mock.get(f"{ORDERS}/1", status=200, payload=order_json("1"))
    await client.get_order("1")
    assert client.stats.requests == {("GET /orders/{id}", "500"): 1, ("GET /orders/{id}", "200"): 1}
    assert client.stats.retries == 1


# -- helpers ----------------------------------------------------------------------------------------------------


def caught_url(url: str) -> URL:
    return URL(url)


def _http_date(timestamp: float) -> str:
    from email.utils import formatdate
    return formatdate(timestamp, usegmt=True)


async def test_attach_source_posts_to_the_checkout_and_answers_the_source_id(client: DigitalRiverClient,
                                                                              mock: DRMock) -> None:
    mock.post(f"{CHECKOUTS}/chk_1/sources/src_new", status=200,
              payload={"id": "src_new", "type": "creditCard", "reusable": True, "state": "chargeable"})
    assert await client.attach_source("chk_1", "src_new") == "src_new"
    assert len(mock.requests[("POST", caught_url(f"{CHECKOUTS}/chk_1/sources/src_new"))]) == 1


async def test_attach_source_to_a_consumed_checkout_is_not_found(client: DigitalRiverClient, mock: DRMock) -> None:
    mock.post(f"{CHECKOUTS}/chk_used/sources/src_new", status=404,
              payload=error_json("not_found", "not_found", parameter="id"))
    with pytest.raises(NotFoundError):
        await client.attach_source("chk_used", "src_new")


async def test_attach_source_answer_without_an_id_is_malformed(client: DigitalRiverClient, mock: DRMock) -> None:
    mock.post(f"{CHECKOUTS}/chk_1/sources/src_new", status=200, payload={"type": "creditCard"}, repeat=True)
    with pytest.raises(MalformedResponseError, match=r"source\.id"):
        await client.attach_source("chk_1", "src_new")
