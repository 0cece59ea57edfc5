"""How `send_fulfillment` (engine/fulfillment.py) reads Digital River's answers to POST /fulfillments.

Digital River's 409 `item_fulfilled` names its item in the message with `parameter` "itemId" ("Resource '<id>'
is already fulfilled": the answer its Lightning connector is written against); only that line is settled, the
others are sent again. When no line of the request can be told, none is settled. `order_complete` and
`order_cancelled` settle every line.

Every request carries our ids in its metadata; a request whose outcome is unknown (a timeout, a cut connection,
a 5xx) is looked for in `GET /fulfillments?orderId=` before anything is sent again, and so is the first one when
the caller asks (`look_first`), so no line is reported twice.
"""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp
import pytest
from aioresponses import CallbackResult

from engine.digital_river import DigitalRiverClient
from engine.fulfillment import send_fulfillment
from tests.unit.test_digital_river import (
    FULFILLMENTS,
    DRMock,
    FakeTime,
    _Response,
    client,
    error_json,
    fake_time,
    make_client,
    mock,
    sink,
)

__all__ = ["client", "fake_time", "make_client", "mock", "sink"]  # fixtures, used by name

TAG = {"drjobsJob": "line-item-fulfillment"}
ENTRIES = [(1, {"itemId": "item_a", "quantity": 1}), (2, {"itemId": "item_b", "quantity": 2}),
           (3, {"itemId": "item_c", "quantity": 1})]


def answers(*replies: tuple[int, dict[str, Any]], sent: list[list[str]]) -> Any:
    queue = list(replies)

    def reply(url: Any, **kwargs: Any) -> CallbackResult:
        sent.append([item["itemId"] for item in json.loads(kwargs["data"])["items"]])
        status, payload = queue.pop(0)
        return CallbackResult(status=status, payload=payload, content_type="application/json",
                              response_class=_Response)
    return reply


async def test_item_fulfilled_named_in_the_message_settles_that_line_and_sends_the_others_again(
        client: DigitalRiverClient, mock: DRMock) -> None:
    sent: list[list[str]] = []
    mock.post(FULFILLMENTS, callback=answers(
        (409, error_json("conflict", "item_fulfilled", "Resource 'item_b'  is already fulfilled", "itemId")),
        (201, {"id": "ful_1", "orderId": "190001", "items": [{"itemId": "item_a", "quantity": 1},
                                                               {"itemId": "item_c", "quantity": 1}]}),
        sent=sent), repeat=True)
    results = await send_fulfillment(client, "190001", ENTRIES, tag=TAG)
    assert sent == [["item_a", "item_b", "item_c"], ["item_a", "item_c"]]
    assert {key: r.kind for key, r in results.items()} == {1: "sent", 2: "done", 3: "sent"}
    assert results[1].fulfillment_id == "ful_1" and results[2].fulfillment_id is None


async def test_item_fulfilled_naming_no_line_of_the_request_settles_none(client: DigitalRiverClient,
                                                                        mock: DRMock) -> None:
    sent: list[list[str]] = []
    mock.post(FULFILLMENTS, callback=answers(
        (409, error_json("conflict", "item_fulfilled", "Resource 'item_zz'  is already fulfilled", "itemId")),
        sent=sent), repeat=True)
    results = await send_fulfillment(client, "190001", ENTRIES, tag=TAG)
    assert sent == [["item_a", "item_b", "item_c"]]
    assert {r.kind for r in results.values()} == {"retry"}


async def test_an_item_id_inside_another_is_not_taken_for_it(client: DigitalRiverClient, mock: DRMock) -> None:
    sent: list[list[str]] = []
    entries = [(1, {"itemId": "12", "quantity": 1}), (2, {"itemId": "123", "quantity": 1})]
    mock.post(FULFILLMENTS, callback=answers(
        (409, error_json("conflict", "item_fulfilled", "Resource '123' is already fulfilled", "itemId")),
        (201, {"id": "ful_2", "orderId": "190001", "items": [{"itemId": "12", "quantity": 1}]}),
        sent=sent), repeat=True)
    results = await send_fulfillment(client, "190001", entries, tag=TAG)
    assert {key: r.kind for key, r in results.items()} == {1: "sent", 2: "done"}


async def test_order_complete_settles_every_line(client: DigitalRiverClient, mock: DRMock) -> None:
    sent: list[list[str]] = []
    mock.post(FULFILLMENTS, callback=answers(
        (409, error_json("conflict", "order_complete", "Resource '190001'  is already complete.", "orderId")),
        sent=sent), repeat=True)
    results = await send_fulfillment(client, "190001", ENTRIES, tag=TAG)
    assert sent == [["item_a", "item_b", "item_c"]]
    assert {r.kind for r in results.values()} == {"done"}


# -- metadata, and looking before sending again ---------------------------------------------------------------


def ours(ful_id: str, ids: str, job: str = "line-item-fulfillment") -> dict[str, Any]:
    return {"id": ful_id, "orderId": "190001", "items": [{"itemId": "item_a", "quantity": 1}],
            "metadata": {"drjobsJob": job, "drjobsIds": ids}}


def listing(*pages: dict[str, Any], asked: list[dict[str, str]]) -> Any:
    queue = list(pages)

    def reply(url: Any, **kwargs: Any) -> CallbackResult:
        asked.append({k: v for k, v in url.query.items()})
        return CallbackResult(status=200, payload=queue.pop(0), content_type="application/json",
                              response_class=_Response)
    return reply


def posts(mock: DRMock) -> list[dict[str, Any]]:
    return [json.loads(call.kwargs["data"]) for (method, url), calls in mock.requests.items()
            if method == "POST" and str(url) == FULFILLMENTS for call in calls]


async def test_every_request_carries_the_ids_it_reports_in_its_metadata(client: DigitalRiverClient,
                                                                        mock: DRMock) -> None:
    sent: list[list[str]] = []
    mock.post(FULFILLMENTS, callback=answers(
        (409, error_json("conflict", "item_fulfilled", "Resource 'item_b' is already fulfilled.", "itemId")),
        (201, {"id": "ful_1", "orderId": "190001", "items": []}), sent=sent), repeat=True)
    await send_fulfillment(client, "190001", ENTRIES, {"trackingNumber": "T1"}, tag=TAG)
    bodies = posts(mock)
    assert [b["metadata"] for b in bodies] == [{"drjobsJob": "line-item-fulfillment", "drjobsIds": "1,2,3"},
                                               {"drjobsJob": "line-item-fulfillment", "drjobsIds": "1,3"}]
    assert bodies[1]["trackingNumber"] == "T1"


@pytest.mark.parametrize("failure", ["timeout", "connection", "503"])
async def test_a_request_that_went_through_unanswered_is_found_not_sent_again(
        client: DigitalRiverClient, mock: DRMock, fake_time: FakeTime, failure: str) -> None:
    if failure == "timeout":
        mock.post(FULFILLMENTS, exception=TimeoutError())
    elif failure == "connection":
        mock.post(FULFILLMENTS, exception=aiohttp.ServerDisconnectedError())
    else:
        mock.post(FULFILLMENTS, status=503, payload=error_json("service_unavailable", "down"))
    asked: list[dict[str, str]] = []
    mock.get(f"{FULFILLMENTS}?limit=100&orderId=190001",
             callback=listing({"hasMore": False, "data": [ours("ful_9", "1,2,3")]}, asked=asked))
    results = await send_fulfillment(client, "190001", ENTRIES, tag=TAG)
    assert len(posts(mock)) == 1
    assert asked == [{"orderId": "190001", "limit": "100"}]
    assert {key: (r.kind, r.fulfillment_id, r.found) for key, r in results.items()} == {
        1: ("sent", "ful_9", True), 2: ("sent", "ful_9", True), 3: ("sent", "ful_9", True)}
    assert len(fake_time.sleeps) == 1  # the client's backoff before the look


async def test_a_request_that_did_not_go_through_is_sent_again_after_the_look(
        client: DigitalRiverClient, mock: DRMock) -> None:
    mock.post(FULFILLMENTS, exception=TimeoutError())
    mock.post(FULFILLMENTS, status=201, payload={"id": "ful_2", "orderId": "190001", "items": []})
    asked: list[dict[str, str]] = []
    mock.get(f"{FULFILLMENTS}?limit=100&orderId=190001",
             callback=listing({"hasMore": False, "data": [ours("ful_other", "1,2,3", job="order-fulfillment")]},
                              asked=asked))
    results = await send_fulfillment(client, "190001", ENTRIES, tag=TAG)
    assert len(posts(mock)) == 2 and len(asked) == 1
    assert {r.fulfillment_id for r in results.values()} == {"ful_2"}
    assert not any(r.found for r in results.values())


async def test_look_first_sends_only_the_lines_no_earlier_request_reported(client: DigitalRiverClient,
                                                                          mock: DRMock) -> None:
    asked: list[dict[str, str]] = []
    pattern = re.compile(rf"^{re.escape(FULFILLMENTS)}\?.*$")
    mock.get(pattern, callback=listing(
        {"hasMore": True, "data": [ours("ful_7", "12,2"), {"id": "ful_x", "orderId": "190001", "items": []}]},
        {"hasMore": False, "data": [ours("ful_5", "20")]}, asked=asked), repeat=True)
    mock.post(FULFILLMENTS, status=201, payload={"id": "ful_8", "orderId": "190001", "items": []})
    results = await send_fulfillment(client, "190001", ENTRIES, tag=TAG, look_first=True)
    assert asked == [{"orderId": "190001", "limit": "100"},
                     {"orderId": "190001", "limit": "100", "startingAfter": "ful_x"}]
    assert [[i["itemId"] for i in b["items"]] for b in posts(mock)] == [["item_a", "item_c"]]
    assert posts(mock)[0]["metadata"]["drjobsIds"] == "1,3"
    assert {key: (r.fulfillment_id, r.found) for key, r in results.items()} == {
        1: ("ful_8", False), 2: ("ful_7", True), 3: ("ful_8", False)}


async def test_when_the_fulfillments_cannot_be_listed_nothing_is_sent(client: DigitalRiverClient,
                                                                     mock: DRMock) -> None:
    pattern = re.compile(rf"^{re.escape(FULFILLMENTS)}\?.*$")
    mock.get(pattern, status=503, payload=error_json("service_unavailable", "down"), repeat=True)
    results = await send_fulfillment(client, "190001", ENTRIES, tag=TAG, look_first=True)
    assert posts(mock) == []
    assert {r.kind for r in results.values()} == {"retry"}
    assert all("could not be listed" in (r.message or "") for r in results.values())


async def test_a_429_is_waited_out_and_sent_again_without_a_look(client: DigitalRiverClient, mock: DRMock) -> None:
    mock.post(FULFILLMENTS, status=429, payload=error_json("too_many_requests", "too_many_requests"),
              headers={"Retry-After": "1"})
    mock.post(FULFILLMENTS, status=201, payload={"id": "ful_3", "orderId": "190001", "items": []})
    results = await send_fulfillment(client, "190001", ENTRIES, tag=TAG)
    assert len(posts(mock)) == 2
    assert not any(method == "GET" for method, _ in mock.requests)
    assert {r.fulfillment_id for r in results.values()} == {"ful_3"}


async def test_unknown_outcomes_stop_after_the_clients_retries(client: DigitalRiverClient, mock: DRMock) -> None:
    mock.post(FULFILLMENTS, exception=TimeoutError(), repeat=True)
    pattern = re.compile(rf"^{re.escape(FULFILLMENTS)}\?.*$")
    mock.get(pattern, payload={"hasMore": False, "data": []}, repeat=True)
    results = await send_fulfillment(client, "190001", ENTRIES, tag=TAG)
    assert len(posts(mock)) == client.max_retries + 1
    assert {r.kind for r in results.values()} == {"retry"}
