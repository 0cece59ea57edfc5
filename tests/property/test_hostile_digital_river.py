"""Hostile Digital River: the real client, and the recurring-payments job through it, against a server that
answers anything at all.

Each test starts one tiny aiohttp server on 127.0.0.1 (`HostileServer`) and scripts, per hypothesis example,
what each endpoint answers: malformed and truncated JSON, HTML error pages, empty and multi-megabyte bodies,
every field the parser reads with a wrong type, unknown enum values, `Retry-After` in legal and illegal forms,
the API key echoed back, bodies dripped a byte at a time past the client's timeout. The properties:

- a call ends in a parsed answer the store can hold, or in one `DigitalRiverError` subclass chosen by the
  status, whose `str()` is one short printable line without the API key; never another exception, never a hang;
- what the client hands the application log is storable and holds no key;
- a record charged through such a server ends as docs/billing-rules.md allows (Open and waiting, Failed with a
  readable message, or Successful with exactly one order), and the drain finishes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.app import Engine
from engine.digital_river import (
    RETRY_AFTER_CAP_SECONDS,
    AuthError,
    BadRequestError,
    Checkout,
    ConflictError,
    DeclinedError,
    DigitalRiverClient,
    DigitalRiverError,
    Fulfillment,
    MalformedResponseError,
    NotFoundError,
    Order,
    TransientError,
    parse_order,
    parse_order_list,
    parse_retry_after,
)
from engine.log_writer import LogWriter
from engine.logs import AppLogSink
from engine.store import Store
from sandbox import model
from tests.integration.engines import engine_on
from tests.integration.factories import due_subscription

KEY = "sk_test_CANARY_hostile_5f3a9c0e7b21"
CANARY = "CANARY_hostile"
# Small and fast on purpose: the properties hold whatever the numbers, and the file has a minute at most.
TIMEOUT = 0.5
MAX_RETRIES = 2
BACKOFF_MAX = 0.05

HYPOTHESIS: dict[str, Any] = {
    "deadline": None,
    "derandomize": True,  # the same examples every run: a CI failure reproduces locally
    "database": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                              HealthCheck.data_too_large],
}


# -- the hostile server -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One scripted answer. `delivery`: "whole"; "drip" (a byte at a time, `pause` apart); "silent" (nothing
    for `pause` seconds); "cut" (half of the promised bytes, then the connection is dropped)."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    delivery: str = "whole"
    pause: float = 0.0
    echo_key: bool = False  # every b"{AUTH}" in the body becomes the request's Authorization header

    def render(self, request: web.Request) -> bytes:
        if not self.echo_key:
            return self.body
        return self.body.replace(b"{AUTH}", request.headers.get("Authorization", "").encode())


Route = Answer | Callable[[web.Request, bytes], Answer]


def endpoint_of(method: str, path: str) -> str:
    """`GET /orders/123` → `GET /orders/{id}`, as the client names its endpoints."""
    parts = path.rstrip("/").split("/")
    if len(parts) > 2:
        path = "/".join([*parts[:2], "{id}"])
    return f"{method} {path}"


class HostileServer:
    """Answers each request with what `routes` scripts for its endpoint (else `default`)."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.default: Route = Answer(404, b'{"type":"not_found","errors":[{"code":"not_found"}]}')
        self.seen: list[str] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    def script(self, routes: dict[str, Route], default: Route | None = None) -> None:
        self.routes = dict(routes)
        if default is not None:
            self.default = default
        self.seen.clear()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        endpoint = endpoint_of(request.method, request.path)
        self.seen.append(endpoint)
        body = await request.read()
        route = self.routes.get(endpoint, self.default)
        answer = route(request, body) if callable(route) else route
        payload = answer.render(request)
        if answer.delivery == "silent":
            await asyncio.sleep(answer.pause)  # the client gives up first, which cancels this handler
        if answer.delivery == "whole" or answer.delivery == "silent":
            response = web.Response(status=answer.status, body=payload, headers=dict(answer.headers))
            if answer.content_type:
                response.content_type = answer.content_type
            return response
        stream = web.StreamResponse(status=answer.status, headers=dict(answer.headers))
        if answer.content_type:
            stream.content_type = answer.content_type
        stream.content_length = len(payload)
        await stream.prepare(request)
        if answer.delivery == "cut":
            await stream.write(payload[: len(payload) // 2])
            if request.transport is not None:
                request.transport.abort()
            return stream
        for i in range(len(payload)):
            await stream.write(payload[i:i + 1])
            await asyncio.sleep(answer.pause)
        await stream.write_eof()
        return stream

    async def __aenter__(self) -> HostileServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[HostileServer]:
    """One server per test, re-scripted by every hypothesis example."""
    async with HostileServer() as s:
        yield s


class VirtualTime:
    """The client's clock and sleep: sleeping moves a virtual clock on at once and is added up, so waits are
    measured exactly and cost no real time."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return time.monotonic() + self.offset

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.offset += max(0.0, seconds)
        await asyncio.sleep(0)


@asynccontextmanager
async def hostile_client(server: HostileServer, *, timeout: float = TIMEOUT,
                         max_retries: int = MAX_RETRIES) -> AsyncIterator[tuple[DigitalRiverClient, VirtualTime,
                                                                                AppLogSink]]:
    """A fresh client per example, so no pause or budget carries over from the one before."""
    vt = VirtualTime()
    sink = AppLogSink("DEBUG")
    client = DigitalRiverClient(server.url, KEY, timeout_seconds=timeout, max_requests_per_second=1000.0,
                                app_log=sink, max_retries=max_retries, backoff_base=0.01, backoff_max=BACKOFF_MAX,
                                clock=vt.clock, sleep=vt.sleep)
    async with client:
        yield client, vt, sink


# -- well-formed answers and the calls that read them ------------------------------------------------------------


def order_doc(order_id: str = "190296100336", state: str = "accepted") -> dict[str, Any]:
    return {
        "id": order_id, "state": state, "checkoutId": "chk_1", "upstreamId": "up_1", "customerId": "cus_1",
        "currency": "USD", "subtotal": 10, "totalTax": 0.83, "totalAmount": 10.83,
        "items": [{"id": "item_1", "skuId": "sku_1", "quantity": 1, "amount": 10, "tax": {"amount": 0.83},
                   "state": "created", "subscriptionInfo": {"billingAgreementId": "ba_1"}}],
    }


def checkout_doc() -> dict[str, Any]:
    return {
        "id": "chk_1", "currency": "USD", "subtotal": 10, "totalTax": 0.83, "totalAmount": 10.83,
        "upstreamId": "up_1", "payment": {"session": {"state": "requires_confirmation"}},
        "items": [{"id": "citem_1", "skuId": "sku_1", "quantity": 1, "price": 10, "amount": 10,
                   "tax": {"amount": 0.83}, "subscriptionInfo": {"billingAgreementId": "ba_1"}}],
    }


def order_list_doc() -> dict[str, Any]:
    return {"hasMore": False, "data": [order_doc()]}


def fulfillment_doc() -> dict[str, Any]:
    return {"id": "ful_1", "orderId": "190296100336",
            "items": [{"itemId": "item_1", "skuId": "sku_1", "quantity": 1, "cancelQuantity": 0}]}


@dataclass(frozen=True)
class Call:
    name: str
    endpoint: str
    invoke: Callable[[DigitalRiverClient], Awaitable[Any]]
    well_formed: Callable[[], dict[str, Any]]
    answer_type: type | None
    retried: bool


CALLS = {
    call.name: call for call in (
        Call("create_checkout", "POST /checkouts",
             lambda c: c.create_checkout({"currency": "USD", "items": [{"skuId": "sku_1", "quantity": 1}]}),
             checkout_doc, Checkout, True),
        Call("create_order", "POST /orders", lambda c: c.create_order("chk_1"), order_doc, Order, False),
        Call("list_orders", "GET /orders", lambda c: c.list_orders(checkout_id="chk_1"), order_list_doc, None,
             True),
        Call("get_order", "GET /orders/{id}", lambda c: c.get_order("190296100336"), order_doc, Order, True),
        # Not retried by the client: engine/fulfillment.py looks for it (GET /fulfillments) before a repeat.
        Call("create_fulfillment", "POST /fulfillments",
             lambda c: c.create_fulfillment({"orderId": "190296100336", "items": []}), fulfillment_doc,
             Fulfillment, False),
    )
}


def field_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every field of a well-formed answer (objects and list elements included): the fields the parser reads."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield (*prefix, key)
            yield from field_paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield (*prefix, i)
            yield from field_paths(value, (*prefix, i))


DELETE = object()


def with_field(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of `doc` with the field at `path` set to `value` (or removed, for DELETE)."""
    doc = json.loads(json.dumps(doc))
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if value is DELETE:
        if isinstance(parent, dict):
            parent.pop(last, None)
        else:
            parent.pop(last)
    else:
        parent[last] = value
    return doc


# -- strategies ---------------------------------------------------------------------------------------------------

NASTY_TEXT = [
    "", " ", "\x00", "nul\x00inside", "\ud800", "a\udfffb", "line\nbreak", "tab\tand\rreturn", "\u202eevil",
    "\u200b", "x" * 300, "9" * 400, "teleported", "1e999999", "-1", "NaN", "Infinity", "12.345678901234567890",
    "'; DROP TABLE orders; --", "<script>alert(1)</script>", "{AUTH}", "ÜSD", "US", "USDX", "1E-999999",
]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(),
    st.sampled_from([-1, 0, 2**31, -(2**31) - 1, 2**63, 10**16, 10**30, 10**4000, 1e300, -0.0, 0.5, 1.5]),
    st.text(max_size=20), st.sampled_from(NASTY_TEXT),
)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10)
WRONG_VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=5), SCALARS,
                                                                                    max_size=3), st.just(DELETE))

STATUSES = [200, 201, 202, 204, 205, 206, 299, 301, 302, 304, 307, 400, 401, 403, 404, 405, 406, 408, 409, 410,
            418, 422, 429, 451, 499, 500, 501, 502, 503, 504, 520, 599]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "application/problem+json", "text/html",
                 "text/plain", "application/octet-stream", "application/json; charset=utf-16", "x", None]

HTML_PAGE = (b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>\n<body>\n<h1>Bad Gateway</h1>\n"
             b"<p>The proxy could not reach upstream for request {AUTH}</p>\n</body></html>\n")
BROKEN_JSON = [b"{", b"}", b"{'id': 'x'}", b'{"id": "x",}', b'{"id": "x"', b"nul\x00", b"\xff\xfe\x00\x00garbage",
               b'{"id": "\xc3\x28"}', b"\xef\xbb\xbf{\"id\": 1}", b"undefined", b"[1, 2", b'"just a string"',
               b"Infinity", b"-", b" \n\t ", b'{"a": 1}{"b": 2}', b"\xed\xa0\x80"]
ECHO_ERROR = json.dumps({
    "type": "bad_request{AUTH}",
    "errors": [{"code": "key\n{AUTH}", "parameter": "{AUTH}", "message": "refused key {AUTH}\r\nretry\x00 " * 3}],
}).encode()

HTTP_NOW = datetime.now(UTC)
RETRY_AFTER = st.one_of(
    st.integers(0, 10**13).map(str),
    st.floats(0, 1e6, allow_nan=False).map(lambda f: f"{f:.3f}"),
    st.sampled_from(["0", "1", "0.01", "30", "31", "120", "-1", "-0.5", "NaN", "nan", "inf", "-inf", "1e309",
                     "1e3", "1_000", "+5", " 5 ", "5s", "0x10", "", " ", "soon", "never", "99999999999999999999",
                     "Mon, 32 Jan 2000 25:61:00 GMT", "Fri, 31 Dec 9999 23:59:59 GMT",
                     "Mon, 01 Jan 99999999999 00:00:00 GMT", "Thu, 01 Jan 1970 00:00:00 GMT",
                     "Mon, 01 Jan 2000 00:00:00 +9999", "Tue, 01 Jan 0000 00:00:00 GMT", "01 Jan 1 0:0:0 GMT"]),
    st.integers(-10**9, 10**9).map(lambda s: format_datetime(HTTP_NOW + timedelta(seconds=s), usegmt=True)),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
)


@st.composite
def bodies(draw: st.DrawFn, call: Call) -> tuple[str, bytes, str | None]:
    """(kind, body, content type) of an answer to `call`: well-formed or hostile in one of many ways."""
    kind = draw(st.sampled_from(["well_formed", "unknown_enum", "wrong_types", "wrong_types", "wrong_types",
                                 "random_json", "broken", "truncated", "html", "empty", "huge", "deep", "echo"]))
    doc = call.well_formed()
    content_type = draw(st.sampled_from(CONTENT_TYPES)) if kind in ("broken", "random_json") else "application/json"
    if kind == "well_formed":
        body = json.dumps(doc).encode()
    elif kind == "unknown_enum":
        state = draw(st.sampled_from(["teleported", "Accepted", "complete", "in_review", "🚀", "x" * 200]))
        if "data" in doc:
            doc["data"][0]["state"] = state
        elif "state" in doc:
            doc["state"] = state
        else:
            doc["items"][0]["state"] = state
        body = json.dumps(doc).encode()
    elif kind == "wrong_types":
        paths = draw(st.lists(st.sampled_from(list(field_paths(doc))), min_size=1, max_size=3, unique=True))
        for path in sorted(paths, key=len, reverse=True):
            try:
                doc = with_field(doc, path, draw(WRONG_VALUES))
            except (KeyError, IndexError, TypeError):
                continue  # an earlier change replaced this field's parent
        body = json.dumps(doc).encode()
    elif kind == "random_json":
        body = json.dumps(draw(JSON_VALUES)).encode()
    elif kind == "broken":
        body = draw(st.sampled_from(BROKEN_JSON))
    elif kind == "truncated":
        whole = json.dumps(doc).encode()
        body = whole[: draw(st.integers(1, len(whole) - 1))]
    elif kind == "html":
        body, content_type = HTML_PAGE * draw(st.sampled_from([1, 40])), "text/html"
    elif kind == "empty":
        body = b""
    elif kind == "huge":
        size = draw(st.sampled_from([1, 3, 6])) * 1024 * 1024
        if draw(st.booleans()):
            doc["padding"] = "x" * size
            body = json.dumps(doc).encode()
        else:
            body = b"<html>" + b"y" * size
    elif kind == "deep":
        depth = draw(st.sampled_from([40, 500, 5_000, 100_000]))
        body = b'{"a":' * depth + b"1" + b"}" * depth if draw(st.booleans()) else b"[" * depth
    else:  # echo: the API key sent back inside an error body
        body = ECHO_ERROR
    return kind, body, content_type


@st.composite
def answers(draw: st.DrawFn, call: Call) -> tuple[str, Answer]:
    kind, body, content_type = draw(bodies(call))
    status = draw(st.sampled_from(STATUSES))
    headers: list[tuple[str, str]] = []
    if draw(st.booleans()):
        headers.append(("Retry-After", draw(RETRY_AFTER)))
    if draw(st.integers(0, 9)) == 0:
        headers.append(("Content-Encoding", "gzip"))  # a lie: the body is not compressed
        kind = "lying_encoding"
    return kind, Answer(status, body, content_type, tuple(headers), echo_key=True)


# -- what every outcome must satisfy ------------------------------------------------------------------------------


def expected_error(status: int, call: Call) -> type[DigitalRiverError]:
    """The one class an error answer with this status must raise (classified by status, then by call)."""
    if 200 <= status < 300:
        return MalformedResponseError
    if status == 408 or status == 429 or status >= 500:
        return TransientError
    if status in (401, 403):
        return AuthError
    if status == 404:
        return NotFoundError
    if status == 409:
        return DeclinedError if call.name == "create_order" else ConflictError
    if 400 <= status < 500:
        return BadRequestError
    return MalformedResponseError


def assert_readable_error(exc: BaseException) -> None:
    """One DigitalRiverError whose text is a short printable line without the key."""
    assert isinstance(exc, DigitalRiverError), f"{type(exc).__name__} escaped the client: {exc!r}"
    text = str(exc)
    assert text and text.isprintable() and len(text) <= 1000, repr(text)
    for part in (text, repr(exc), exc.message, exc.code or "", exc.type or "", exc.parameter or ""):
        assert CANARY not in part and KEY not in part
        assert part.isprintable(), repr(part)


def assert_storable(value: Any, where: str = "answer") -> None:
    """A parsed answer holds only what the store can keep: ids a btree can index, three-letter currencies,
    amounts that fit numeric(18,2), quantities that fit an integer, and no NUL or lone surrogate anywhere."""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            assert_storable(v, f"{where}[{i}]")
        return
    for name in ("id", "state", "checkout_id", "upstream_id", "customer_id", "sku_id", "billing_agreement_id",
                 "order_id", "item_id", "payment_session_state"):
        text = getattr(value, name, None)
        if text is not None:
            assert isinstance(text, str) and 0 < len(text) <= 255 and text.isprintable(), (where, name, text)
    currency = getattr(value, "currency", None)
    if currency is not None:
        assert len(currency) == 3 and currency.isascii() and currency.isalpha(), (where, currency)
    for name in ("subtotal", "total_tax", "total_amount", "amount", "tax_amount", "price"):
        amount = getattr(value, name, None)
        if amount is not None:
            assert isinstance(amount, Decimal) and amount.is_finite() and abs(amount) < Decimal("1e16"), (where,
                                                                                                        name, amount)
            exponent = amount.as_tuple().exponent
            assert isinstance(exponent, int) and exponent >= -6, (where, name, amount)  # PostgreSQL reads it
    for name in ("quantity", "cancel_quantity"):
        quantity = getattr(value, name, None)
        if quantity is not None:
            assert isinstance(quantity, int) and 0 <= quantity < 2**31, (where, name, quantity)
    for item in getattr(value, "items", ()):
        assert_storable(item, f"{where}.items")


async def assert_logged_rows_are_storable(store: Store, sink: AppLogSink) -> None:
    """What the client wrote for the application log goes into the real table, and holds no key."""
    queued = sink.queue.qsize()
    written = await LogWriter(store, sink).flush()
    assert written == queued and sink.queue.empty() and sink.dropped == 0
    for row in await store.pool.fetch("SELECT * FROM application_logs"):
        text = json.dumps(dict(row), default=str)
        assert CANARY not in text and "Bearer" not in str(row["request"])
        assert len(row["response"] or "") <= 64_000
    await store.pool.execute("DELETE FROM application_logs")


async def call_bounded(call: Call, client: DigitalRiverClient, attempts: int, per_attempt: float) -> tuple[Any, Any]:
    """(answer, None) or (None, exception); fails the test if the call outlasts its attempts' timeouts."""
    started = time.monotonic()
    try:
        result = await asyncio.wait_for(call.invoke(client), timeout=attempts * per_attempt + 3.0)
    except TimeoutError as exc:
        if time.monotonic() - started >= attempts * per_attempt + 3.0:
            raise AssertionError(f"{call.name} hung past every timeout of the client") from exc
        return None, exc
    except BaseException as exc:  # anything at all: the property says which kinds are allowed
        return None, exc
    return result, None


# -- the client, one call at a time ---------------------------------------------------------------------------------


@settings(max_examples=300, **HYPOTHESIS)
@given(data=st.data())
async def test_every_answer_ends_in_a_parsed_answer_or_one_readable_digital_river_error(
        server: HostileServer, store: Store, data: st.DataObject) -> None:
    call = CALLS[data.draw(st.sampled_from(sorted(CALLS)), label="call")]
    kind, answer = data.draw(answers(call), label="answer")
    server.script({call.endpoint: answer})
    async with hostile_client(server) as (client, vt, sink):
        result, error = await call_bounded(call, client, MAX_RETRIES + 1, TIMEOUT)
        # A following call of the same client is held back by nothing but a 429's pause, which is Digital River's
        # Retry-After in full (every call with the key is refused until then) up to the client's cap of an hour:
        # a Retry-After of a year does not freeze it for good.
        pause_left = max(0.0, client.bucket.paused_until - vt.clock())
        assert pause_left <= RETRY_AFTER_CAP_SECONDS + 1e-6
        follow = CALLS["get_order"] if call.name != "get_order" else CALLS["create_order"]
        server.script({follow.endpoint: Answer(200, json.dumps(follow.well_formed()).encode())})
        slept_before = sum(vt.slept)
        followed, follow_error = await call_bounded(follow, client, 1, TIMEOUT)
        if isinstance(follow_error, TransientError) and follow_error.code == "rate_paused":
            # More of the pause was left than the client waits: the call was not sent and said so at once (a record
            # does not hold its slot through the pause); once the pause is over, it goes through.
            assert pause_left > BACKOFF_MAX - 0.5 and sum(vt.slept) == slept_before, (pause_left, vt.slept)
            await vt.sleep(client.bucket.paused_until - vt.clock())
            pause_left, slept_before = 0.0, sum(vt.slept)
            followed, follow_error = await call_bounded(follow, client, 1, TIMEOUT)
        elif pause_left > BACKOFF_MAX + 0.5:
            raise AssertionError(f"a call {pause_left:.1f} s into a pause was sent or waited for: {follow_error!r}")
        assert follow_error is None, follow_error
        assert isinstance(followed, Order)
        assert sum(vt.slept) - slept_before <= pause_left + BACKOFF_MAX + 1e-6
    # Waiting is bounded too: each attempt waits at most one backoff, and at most one hour-long 429 pause.
    assert all(s >= 0 for s in vt.slept)
    assert slept_before <= (MAX_RETRIES + 1) * (BACKOFF_MAX + RETRY_AFTER_CAP_SECONDS) + 1e-6, vt.slept
    if error is None:
        assert 200 <= answer.status < 300, f"HTTP {answer.status} was taken for an answer"
        assert_storable(result)
        if call.answer_type is not None:
            assert isinstance(result, call.answer_type)
        else:
            assert isinstance(result, list) and all(isinstance(o, Order) for o in result)
    else:
        assert_readable_error(error)
        if kind == "lying_encoding":  # the body fails to inflate (an outage), or is empty and the status speaks
            assert isinstance(error, (TransientError, expected_error(answer.status, call))), error
        else:
            assert type(error) is expected_error(answer.status, call), (answer.status, type(error), str(error))
    read_whole = 200 <= answer.status < 300 and answer.status not in (204, 205)  # those two carry no body
    if read_whole and (kind in ("well_formed", "unknown_enum") or (kind == "huge" and answer.body[:1] == b"{")):
        # Whatever else it carries, a well-formed answer is read: unknown enum values and megabytes included.
        assert error is None, error
        first = result[0] if isinstance(result, list) else result
        assert first.id in ("190296100336", "chk_1", "ful_1")
        if isinstance(first, Order):
            doc = json.loads(answer.body)
            assert first.state == (doc["data"][0] if "data" in doc else doc)["state"]
    await assert_logged_rows_are_storable(store, sink)


@settings(max_examples=60, **HYPOTHESIS)
@given(retry_after=RETRY_AFTER, status=st.sampled_from([408, 429, 500, 502, 503, 504]),
       call_name=st.sampled_from(sorted(CALLS)))
async def test_any_retry_after_is_honoured_only_within_bounds(server: HostileServer, store: Store, retry_after: str,
                                                             status: int, call_name: str) -> None:
    call = CALLS[call_name]
    server.script({call.endpoint: Answer(status, b'{"type":"busy"}', headers=(("Retry-After", retry_after),))})
    async with hostile_client(server) as (client, vt, sink):
        result, error = await call_bounded(call, client, MAX_RETRIES + 1, TIMEOUT)
        assert result is None and isinstance(error, TransientError), error
        assert_readable_error(error)
        # Retries follow Retry-After when it is a sane wait no longer than the backoff, else the jittered backoff
        # or none at all; nothing is ever negative, and nothing waits longer than the client's bound.
        parsed = parse_retry_after(retry_after)
        assert all(0 <= s <= BACKOFF_MAX for s in vt.slept), vt.slept
        if call.retried and parsed is not None and parsed <= BACKOFF_MAX:
            assert error.attempts == MAX_RETRIES + 1
        if not call.retried:
            assert error.attempts == 1
        if status == 429:
            # The whole Retry-After (1 s when absent), capped only at an hour.
            paused_for = client.bucket.paused_until - vt.clock()
            assert paused_for <= RETRY_AFTER_CAP_SECONDS + 1e-6
    await assert_logged_rows_are_storable(store, sink)


@settings(max_examples=300, **HYPOTHESIS)
@given(value=st.one_of(RETRY_AFTER, st.text(), st.none()))
def test_parse_retry_after_never_raises_and_never_answers_a_negative_or_infinite_wait(value: str | None) -> None:
    seconds = parse_retry_after(value)
    assert seconds is None or (isinstance(seconds, float) and 0 <= seconds < float("inf"))


@settings(max_examples=6, **HYPOTHESIS)
@given(delivery=st.sampled_from(["drip", "silent", "cut", "informational"]), status=st.sampled_from([200, 201, 500]),
       call_name=st.sampled_from(["create_order", "get_order"]))
async def test_slow_drips_and_dropped_bodies_end_in_a_transient_error_within_the_timeout(
        server: HostileServer, delivery: str, status: int, call_name: str) -> None:
    call = CALLS[call_name]
    body = json.dumps(call.well_formed()).encode()
    if delivery == "informational":
        answer = Answer(100 if status == 200 else 199, body)  # never a final status: the client waits for one
    else:
        # 40 bytes a second: the whole answer would take several times the client's timeout.
        answer = Answer(status, body, delivery=delivery, pause=0.025 if delivery == "drip" else 3 * TIMEOUT)
    server.script({call.endpoint: answer})
    timeout = 0.3
    async with hostile_client(server, timeout=timeout, max_retries=1) as (client, _, _):
        started = time.monotonic()
        result, error = await call_bounded(call, client, 2, timeout)
        elapsed = time.monotonic() - started
    assert result is None and isinstance(error, TransientError), (result, error)
    assert_readable_error(error)
    assert error.code in ("timeout", "connection_error"), str(error)
    attempts = 1 if call_name == "create_order" else 2
    assert error.attempts == attempts
    assert elapsed < attempts * (timeout + BACKOFF_MAX) + 0.5


# -- the recurring-payments job through a hostile POST /orders ------------------------------------------------------


@dataclass
class FakeDigitalRiver:
    """POST /checkouts answered properly (the sandbox's model), POST /orders with the example's garbage, and
    GET /orders honestly or with more garbage. An order exists when the answer was 2xx, or when the example says
    the connection was lost after the order was made (an outage or a malformed answer)."""

    order_answer: Answer
    order_made: bool
    lookup: Answer | None  # None: honest lookups
    order_state: str = "accepted"
    checkouts: dict[str, dict[str, Any]] = field(default_factory=dict)
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)  # by checkout id
    order_posts: int = 0

    def routes(self) -> dict[str, Route]:
        return {"POST /checkouts": self.create_checkout, "POST /orders": self.create_order,
                "GET /orders": self.list_orders, "GET /orders/{id}": self.get_order}

    def create_checkout(self, request: web.Request, body: bytes) -> Answer:
        checkout = model.build_checkout(json.loads(body))
        self.checkouts[checkout["id"]] = checkout
        return Answer(201, json.dumps(checkout).encode())

    def create_order(self, request: web.Request, body: bytes) -> Answer:
        self.order_posts += 1
        checkout_id = json.loads(body)["checkoutId"]
        if checkout_id in self.orders:  # a checkout becomes an order once; later submits are not found
            return Answer(404, json.dumps(model.not_found("Checkout not found.", "checkoutId").body()).encode())
        if not self.order_made:
            return self.order_answer
        checkout = self.checkouts[checkout_id]
        order = parsed_order(self.order_answer.body)
        if order is None:  # the answer is garbage (or lost): the order made is the checkout's own
            order = model.build_order(checkout, self.order_state)
        else:  # the answer reads as an order, whatever else it carries: it is the one made, for this checkout
            order |= {"checkoutId": checkout_id, "upstreamId": checkout["upstreamId"]}
        self.orders[checkout_id] = order
        if self.order_answer.body == b"{ORDER}" or parsed_order(self.order_answer.body) is not None:
            return replace(self.order_answer, body=json.dumps(order).encode())
        return self.order_answer

    def list_orders(self, request: web.Request, body: bytes) -> Answer:
        if self.lookup is not None:
            return self.lookup
        wanted = request.query.get("checkoutId")
        upstream = request.query.get("upstreamIds")
        found = [o for c, o in self.orders.items() if c == wanted or o.get("upstreamId") == upstream]
        return Answer(200, json.dumps({"hasMore": False, "data": found}).encode())

    def get_order(self, request: web.Request, body: bytes) -> Answer:
        for order in self.orders.values():
            if order["id"] == request.path.rsplit("/", 1)[-1]:
                return Answer(200, json.dumps(order).encode())
        return Answer(404, b'{"type":"not_found","errors":[{"code":"not_found"}]}')


def parsed_order(body: bytes) -> dict[str, Any] | None:
    """The order a 2xx answer claims, when the client would read it as one (so the fake's ledger agrees)."""
    try:
        doc = json.loads(body)
        parse_order(doc)
    except (ValueError, RecursionError, DigitalRiverError):
        return None
    return doc if isinstance(doc, dict) else None


def lists_an_order(body: bytes) -> bool:
    try:
        return bool(parse_order_list(json.loads(body)))
    except (ValueError, RecursionError, DigitalRiverError):
        return False


ORDER_CALL = CALLS["create_order"]
# The key refused is its own test below: the job stops claiming and leaves the record as it was.
ENGINE_STATUSES = [s for s in STATUSES if s not in (401, 403)]
# Lookups answer, fail as outages, or find nothing; a lookup refused with a 4xx is its own (xfail) test below.
LOOKUP_STATUSES = [s for s in ENGINE_STATUSES if s == 404 or not 400 <= s < 500]


@st.composite
def fake_digital_rivers(draw: st.DrawFn) -> FakeDigitalRiver:
    _, answer = draw(answers(ORDER_CALL))
    status = draw(st.sampled_from(ENGINE_STATUSES))
    shape = draw(st.sampled_from(["garbage", "garbage", "real_order", "unknown_state", "hard_decline",
                                  "soft_decline", "silent"]))
    if shape == "real_order":
        answer, status = replace(answer, body=b"{ORDER}"), draw(st.sampled_from([200, 201]))
    elif shape == "unknown_state":
        answer, status = replace(answer, body=b"{ORDER}"), 201
    elif shape in ("hard_decline", "soft_decline"):
        code = draw(st.sampled_from(["fraud", "stop_recurring"] if shape == "hard_decline" else
                                    ["insufficient_funds", "failed-request", "teleported", "\x00", "x" * 500]))
        answer = replace(answer, body=json.dumps(model.conflict(code, f"declined ({code})\n").body()).encode())
        status = 409
    elif shape == "silent":
        answer = replace(answer, delivery="silent", pause=1.0)
    answer = replace(answer, status=status)
    # An order is made with every 2xx; after an outage or a lost answer, maybe; never with a refusal (4xx).
    lost = shape == "silent" or status in (408, 429) or status >= 500 or 300 <= status < 400
    made = 200 <= status < 300 or (lost and draw(st.booleans()))
    lookup = None
    if draw(st.integers(0, 3)) == 0:
        _, lookup = draw(answers(CALLS["list_orders"]))
        lookup = replace(lookup, status=draw(st.sampled_from(LOOKUP_STATUSES + [200] * 4)))
        if 200 <= lookup.status < 300 and lists_an_order(lookup.body):
            # A lookup that lists an order of another record is its own (xfail) test below.
            lookup = replace(lookup, status=503)
    state = draw(st.sampled_from(["teleported", "Accepted", "in_review", "x" * 40])) if shape == "unknown_state" \
        else "accepted"
    return FakeDigitalRiver(answer, made, lookup, state)


async def empty_tables(store: Store) -> None:
    """Every table emptied: each example starts from nothing, as if on a fresh database (and much faster)."""
    tables = [r["tablename"] for r in await store.pool.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename NOT IN ('schema_versions', 'schema_migrations')")]
    await store.pool.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")


def engine_against(store: Store, url: str, **env: str) -> AbstractAsyncContextManager[Engine]:
    # Retries in milliseconds, not seconds.
    return engine_on(store, url, key=KEY, retry_backoff=(0.005, 0.02), DR_TIMEOUT_SECONDS="0.3", **env)


def assert_readable_message(message: str | None) -> None:
    assert message and message.isprintable() and len(message) <= 2000, repr(message)
    assert CANARY not in message


@settings(max_examples=40, **HYPOTHESIS)
@given(fake=fake_digital_rivers())
async def test_a_hostile_order_answer_leaves_the_record_as_the_billing_rules_allow(
        server: HostileServer, store: Store, fake: FakeDigitalRiver) -> None:
    server.script(fake.routes())
    await empty_tables(store)
    sub = await due_subscription(store)
    async with engine_against(store, server.url) as engine:
        code = await asyncio.wait_for(engine.drain(pause_seconds=0.05), timeout=30)
    assert code == 0  # every run finished; the engine kept going
    runs = await store.pool.fetch("SELECT status, error FROM job_runs WHERE status <> 'succeeded'")
    assert runs == [], runs
    rec = await store.pool.fetchrow("SELECT * FROM subscription_process_data WHERE subscription_id = $1", sub)
    assert rec is not None and rec["locked_by"] is None
    status = rec["subscription_job_run_status"]
    event(f"record {status}" + (" (order made)" if fake.orders else ""))
    local_orders = await store.pool.fetch(
        "SELECT * FROM orders WHERE dr_order_source = 'Subscription—Installment' AND id = $1", rec["order_id"])
    made = list(fake.orders.values())
    if status == "Successful":
        [order] = local_orders
        assert rec["is_recurring_payment_processed"] and len(made) == 1
        assert order["dr_order_id"] == rec["dr_order_id"] == made[0]["id"]
    elif status == "Pending":
        # Digital River made the order but has not confirmed its payment: its events settle the record later.
        [order] = local_orders
        assert not rec["is_recurring_payment_processed"] and len(made) == 1
        assert order["dr_order_state"] in ("pending_payment", "in_review")
        assert rec["next_attempt_at"] > datetime.now(UTC)
    elif status == "Open":
        assert not rec["is_recurring_payment_processed"] and local_orders == []
        assert rec["next_attempt_at"] > datetime.now(UTC), "an Open record left due would be taken again at once"
        assert_readable_message(rec["last_error_message"])
        if made:  # the outcome is unknown: the checkout is kept so the next attempt looks for its order first
            assert rec["dr_checkout_id"] == made[0]["checkoutId"]
    else:
        assert status == "Failed", status
        assert_readable_message(rec["last_error_message"])
        assert made == [], "a record was failed although Digital River made its order"
    assert fake.order_posts == 1  # one attempt per drain: whatever the answer, the record is not taken again


async def test_refused_key_on_a_hostile_server_ends_the_drain_instead_of_spinning(
        server: HostileServer, store: Store) -> None:
    """401 on POST /orders: the run stops claiming and leaves the record as it was (docs/billing-rules.md). drain
    must then return (1, a crashed run), not take the same record again and again."""
    fake = FakeDigitalRiver(Answer(401, b'{"type":"unauthorized","errors":[{"code":"unauthorized"}]}'), False, None)
    server.script(fake.routes())
    sub = await due_subscription(store)
    async with engine_against(store, server.url) as engine:
        try:
            code = await asyncio.wait_for(engine.drain(pause_seconds=0.05), timeout=3)
        except TimeoutError:
            code = None
    rec = await store.pool.fetchrow("SELECT * FROM subscription_process_data WHERE subscription_id = $1", sub)
    assert rec["subscription_job_run_status"] == "Open" and rec["subscription_retry_count"] == 0
    assert fake.order_posts >= 1
    assert code == 1, f"drain kept retrying a refused key ({fake.order_posts} POST /orders in 3 s)"


@pytest.mark.parametrize("lookup_status", [400, 409, 422])
async def test_an_order_lookup_refused_after_a_lost_answer_keeps_the_record_open(
        server: HostileServer, store: Store, lookup_status: int) -> None:
    """POST /orders made the order but its answer was lost (a 502), and the lookup that follows is refused with
    a 4xx: the outcome is unknown, so the record stays Open with its checkout (docs/billing-rules.md, "unknown"),
    never Failed while Digital River holds its order."""
    lookup = Answer(lookup_status, b'{"type":"bad_request","errors":[{"code":"invalid_parameter"}]}')
    fake = FakeDigitalRiver(Answer(502, b"<html>Bad Gateway</html>", "text/html"), True, lookup)
    server.script(fake.routes())
    sub = await due_subscription(store)
    async with engine_against(store, server.url) as engine:
        assert await asyncio.wait_for(engine.drain(pause_seconds=0.05), timeout=30) == 0
    rec = await store.pool.fetchrow("SELECT * FROM subscription_process_data WHERE subscription_id = $1", sub)
    [made] = fake.orders.values()
    assert rec["subscription_job_run_status"] == "Open", rec["last_error_message"]
    assert rec["dr_checkout_id"] == made["checkoutId"] and rec["subscription_retry_count"] == 0


def foreign_order_list() -> Answer:
    """A lookup that lists an order of some other checkout and record (a filter ignored on the way)."""
    order = order_doc("190296100999") | {"checkoutId": "chk_someone_else", "upstreamId": "someone-else"}
    return Answer(200, json.dumps({"hasMore": False, "data": [order]}).encode())


async def test_a_lookup_listing_another_records_order_is_not_adopted(server: HostileServer, store: Store) -> None:
    fake = FakeDigitalRiver(Answer(503, b'{"type":"unavailable"}'), False, foreign_order_list())
    server.script(fake.routes())
    sub = await due_subscription(store)
    async with engine_against(store, server.url) as engine:
        assert await asyncio.wait_for(engine.drain(pause_seconds=0.05), timeout=30) == 0
    rec = await store.pool.fetchrow("SELECT * FROM subscription_process_data WHERE subscription_id = $1", sub)
    assert rec["dr_order_id"] is None and rec["subscription_job_run_status"] == "Open"


async def test_a_record_that_crashes_is_put_back_with_a_backoff_and_the_drain_returns(
        server: HostileServer, store: Store) -> None:
    """Digital River answers two different checkouts with the same order id (a hostile answer the client
    cannot tell apart): the second record cannot be written. It must come back later, not hold the drain."""
    same_order = json.dumps(order_doc("190296100777")).encode()
    server.script({
        "POST /checkouts": lambda request, body: Answer(201, json.dumps(
            model.build_checkout(json.loads(body))).encode()),
        "POST /orders": Answer(201, same_order),
    })
    first, second = await due_subscription(store), await due_subscription(store)
    async with engine_against(store, server.url, LEASE_SECONDS="30") as engine:
        try:
            code = await asyncio.wait_for(engine.drain(pause_seconds=0.05), timeout=5)
        except TimeoutError:
            code = None
    recs = {r["subscription_id"]: r for r in await store.pool.fetch("SELECT * FROM subscription_process_data")}
    charged = [r for r in recs.values() if r["subscription_job_run_status"] == "Successful"]
    assert len(charged) == 1 and {first, second} == set(recs)
    [other] = [r for r in recs.values() if r["subscription_job_run_status"] != "Successful"]
    assert code is not None, "drain waited on a record left claimed after its processing crashed"
    assert other["subscription_job_run_status"] == "Open" and other["next_attempt_at"] > datetime.now(UTC)
    assert other["locked_by"] is None and other["last_error_message"]
