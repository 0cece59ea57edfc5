"""How `send_fulfillment` (engine/fulfillment.py) reads Digital River's answers to POST /fulfillments.

Digital River's 409 `item_fulfilled` names its item in the message with `parameter` "itemId" ("Resource '<id>'
is already fulfilled": the answer its Lightning connector is written against); only that line is settled, the
others are sent again. When no line of the request can be told, none is settled. `order_complete` and
`order_cancelled` settle every line.
"""

from __future__ import annotations

import json
from typing import Any

from aioresponses import CallbackResult

from engine.digital_river import DigitalRiverClient
from engine.fulfillment import send_fulfillment
from tests.unit.test_digital_river import (
    FULFILLMENTS,
    DRMock,
    _Response,
    client,
    error_json,
    fake_time,
    make_client,
    mock,
    sink,
)

__all__ = ["client", "fake_time", "make_client", "mock", "sink"]  # fixtures, used by name

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
    results = await send_fulfillment(client, "190001", ENTRIES)
    assert sent == [["item_a", "item_b", "item_c"], ["item_a", "item_c"]]
    assert {key: r.kind for key, r in results.items()} == {1: "sent", 2: "done", 3: "sent"}
    assert results[1].fulfillment_id == "ful_1" and results[2].fulfillment_id is None


async def test_item_fulfilled_naming_no_line_of_the_request_settles_none(client: DigitalRiverClient,
                                                                        mock: DRMock) -> None:
    sent: list[list[str]] = []
    mock.post(FULFILLMENTS, callback=answers(
        (409, error_json("conflict", "item_fulfilled", "Resource 'item_zz'  is already fulfilled", "itemId")),
        sent=sent), repeat=True)
    results = await send_fulfillment(client, "190001", ENTRIES)
    assert sent == [["item_a", "item_b", "item_c"]]
    assert {r.kind for r in results.values()} == {"retry"}


async def test_an_item_id_inside_another_is_not_taken_for_it(client: DigitalRiverClient, mock: DRMock) -> None:
    sent: list[list[str]] = []
    entries = [(1, {"itemId": "12", "quantity": 1}), (2, {"itemId": "123", "quantity": 1})]
    mock.post(FULFILLMENTS, callback=answers(
        (409, error_json("conflict", "item_fulfilled", "Resource '123' is already fulfilled", "itemId")),
        (201, {"id": "ful_2", "orderId": "190001", "items": [{"itemId": "12", "quantity": 1}]}),
        sent=sent), repeat=True)
    results = await send_fulfillment(client, "190001", entries)
    assert {key: r.kind for key, r in results.items()} == {1: "sent", 2: "done"}


async def test_order_complete_settles_every_line(client: DigitalRiverClient, mock: DRMock) -> None:
    sent: list[list[str]] = []
    mock.post(FULFILLMENTS, callback=answers(
        (409, error_json("conflict", "order_complete", "Resource '190001'  is already complete.", "orderId")),
        sent=sent), repeat=True)
    results = await send_fulfillment(client, "190001", ENTRIES)
    assert sent == [["item_a", "item_b", "item_c"]]
    assert {r.kind for r in results.values()} == {"done"}
