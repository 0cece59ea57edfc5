"""The fulfillment jobs against the local Digital River sandbox and a real PostgreSQL.

order-fulfillment cancels what is left of cancelled orders; line-item-fulfillment reports lines, one
POST /fulfillments per order. Orders are put straight into the sandbox's ledger (as if Digital River had taken
them earlier) and written to the store with `factories.fulfillment_order`, as an ERP would write them.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest

from actors.line_item_fulfillment import LineItemFulfillment
from actors.order_fulfillment import OrderFulfillment
from engine.settings import DR_API_VERSION_BUILT_FOR
from engine.store import Store
from sandbox import model
from sandbox.server import Sandbox
from tests.db import open_store
from tests.integration import engines
from tests.integration.factories import fulfillment_order
from tests.support import run_command, sandbox_env, sandbox_fixture

LINES = "line-item-fulfillment"
ORDERS = "order-fulfillment"


sandbox = sandbox_fixture(seed=5)

# The client still retries transient failures, without the waits.
QUICK_RETRIES = (0.001, 30.0)
engine_on = partial(engines.engine_on, retry_backoff=QUICK_RETRIES)
drain = partial(engines.drain, retry_backoff=QUICK_RETRIES)
run_job = partial(engines.run_job, retry_backoff=QUICK_RETRIES)


def dr_order(sandbox: Sandbox, *quantities: int, state: str = "accepted") -> dict[str, Any]:
    """An order Digital River already has, one item per quantity."""
    checkout = model.build_checkout({"currency": "USD", "sourceId": "src_card_ok", "items": [
        {"skuId": f"sku_{i}", "price": 10, "quantity": q} for i, q in enumerate(quantities)]})
    order = model.build_order(checkout, state)
    sandbox.ledger.add_checkout(checkout)
    sandbox.ledger.add_order(order)
    return order


def dr_item(order: dict[str, Any], index: int) -> str:
    return str(order["items"][index]["id"])


def done_in_dr(sandbox: Sandbox, order: dict[str, Any], index: int, *, quantity: int = 0, cancel: int = 0) -> None:
    """Fulfil or cancel an item in Digital River behind the engine's back (an earlier call, another system)."""
    entry: dict[str, Any] = {"itemId": dr_item(order, index)}
    if quantity:
        entry["quantity"] = quantity
    if cancel:
        entry["cancelQuantity"] = cancel
    sandbox.ledger.add_fulfillment(model.apply_fulfillment({"orderId": order["id"], "items": [entry]},
                                                           sandbox.ledger))


async def seed(store: Store, order: dict[str, Any], lines: list[dict[str, object]],
               **fulfillment: object) -> tuple[int, list[int]]:
    """The order's rows in the store: its items with their Digital River ids, the fulfillment, the lines."""
    items: list[dict[str, object]] = [{"quantity": i["quantity"], "dr_order_item_id": i["id"]} for i in order["items"]]
    _, _, ful, line_ids = await fulfillment_order(store, dr_order_id=order["id"], items=items, lines=lines,
                                                  **fulfillment)
    return ful, line_ids


async def lines_of(store: Store, fulfillment_id: int) -> list[dict[str, Any]]:
    rows = await store.pool.fetch("SELECT * FROM line_item_fulfillments WHERE fulfillment_id = $1 ORDER BY id",
                                  fulfillment_id)
    return [dict(r) for r in rows]


async def fulfillment_row(store: Store, fulfillment_id: int) -> dict[str, Any]:
    return dict(await store.pool.fetchrow("SELECT * FROM fulfillments WHERE id = $1", fulfillment_id))


async def app_logs(store: Store, job: str, record_id: int) -> list[str]:
    """Levels of the job's application_logs rows for one record (not the client's `dr_request_failed` rows, nor
    the copies of outcome log lines that the structlog forwarder makes when a process configured it)."""
    rows = await store.pool.fetch("SELECT logging_level, message FROM application_logs WHERE module_name = $1 "
                                  "AND record_id = $2 ORDER BY id", job, str(record_id))
    events = (*LineItemFulfillment.outcomes, *OrderFulfillment.outcomes)
    return [r["logging_level"] for r in rows if r["message"].split(" ", 1)[0] not in events]


def posts(sandbox: Sandbox, status: int | None = None) -> int:
    return sandbox.ledger.count_requests("POST", "/fulfillments", status)


def entries(fulfillment: dict[str, Any]) -> list[tuple[str, int | None, int | None]]:
    return [(i["itemId"], i.get("quantity"), i.get("cancelQuantity")) for i in fulfillment["items"]]


# -- line-item-fulfillment ----------------------------------------------------------------------------------------


async def test_full_fulfillment_is_one_request_that_completes_every_line(store: Store, sandbox: Sandbox) -> None:
    order = dr_order(sandbox, 2, 1, 3)
    ful, _ = await seed(store, order, [{"item": i, "fulfill_quantity": q} for i, q in enumerate((2, 1, 3))])
    assert await drain(store, sandbox) == 0

    [sent] = sandbox.ledger.fulfillments_for_order(order["id"])
    assert entries(sent) == [(dr_item(order, 0), 2, None), (dr_item(order, 1), 1, None), (dr_item(order, 2), 3, None)]
    assert posts(sandbox) == 1
    lines = await lines_of(store, ful)
    assert [(r["efn_status"], r["dr_fulfillment_id"], r["retry_count"], r["message"], r["locked_by"]) for r in lines] \
        == [("Completed", sent["id"], 0, None, None)] * 3
    assert sent["id"].startswith("ful_")
    assert (await fulfillment_row(store, ful))["locked_by"] is None
    assert sandbox.ledger.orders[order["id"]]["state"] == "complete"


async def test_partial_fulfillment_completes_the_line_and_a_later_line_finishes_the_item(store: Store,
                                                                                       sandbox: Sandbox) -> None:
    order = dr_order(sandbox, 5)
    ful, _ = await seed(store, order, [{"item": 0, "fulfill_quantity": 2}])
    assert await drain(store, sandbox) == 0
    [line] = await lines_of(store, ful)
    assert line["efn_status"] == "Completed"
    progress = sandbox.ledger.items[dr_item(order, 0)]
    assert (progress.fulfilled, progress.remaining) == (2, 3)
    assert sandbox.ledger.orders[order["id"]]["state"] == "accepted"

    item_id = await store.pool.fetchval("SELECT order_item_id FROM line_item_fulfillments WHERE id = $1", line["id"])
    await store.pool.execute("INSERT INTO line_item_fulfillments (fulfillment_id, order_item_id, fulfill_quantity) "
                             "VALUES ($1, $2, 3)", ful, item_id)
    assert await drain(store, sandbox) == 0
    assert [r["efn_status"] for r in await lines_of(store, ful)] == ["Completed", "Completed"]
    assert len(sandbox.ledger.fulfillments_for_order(order["id"])) == 2
    assert sandbox.ledger.orders[order["id"]]["state"] == "complete"


async def test_line_cancellation_sends_cancel_quantity(store: Store, sandbox: Sandbox) -> None:
    order = dr_order(sandbox, 4, 1)
    ful, _ = await seed(store, order, [{"item": 0, "cancel_quantity": 4}, {"item": 1, "cancel_quantity": 1}])
    assert await drain(store, sandbox) == 0
    [sent] = sandbox.ledger.fulfillments_for_order(order["id"])
    assert entries(sent) == [(dr_item(order, 0), None, 4), (dr_item(order, 1), None, 1)]
    assert [r["efn_status"] for r in await lines_of(store, ful)] == ["Completed", "Completed"]
    assert sandbox.ledger.orders[order["id"]]["state"] == "cancelled"


async def test_mixed_fulfil_and_cancel_in_one_order_is_one_request(store: Store, sandbox: Sandbox) -> None:
    order = dr_order(sandbox, 2, 1, 2)
    ful, _ = await seed(store, order, [{"item": 0, "fulfill_quantity": 2}, {"item": 1, "cancel_quantity": 1},
                                       {"item": 2, "fulfill_quantity": 1, "cancel_quantity": 1}])
    assert await drain(store, sandbox) == 0
    assert posts(sandbox) == 1
    [sent] = sandbox.ledger.fulfillments_for_order(order["id"])
    assert entries(sent) == [(dr_item(order, 0), 2, None), (dr_item(order, 1), None, 1), (dr_item(order, 2), 1, 1)]
    assert {(r["efn_status"], r["dr_fulfillment_id"]) for r in await lines_of(store, ful)} == {("Completed", sent["id"])}


@pytest.mark.parametrize("code", ["item_fulfilled", "item_cancelled", "order_complete", "order_cancelled"])
async def test_already_done_answer_completes_the_line(store: Store, sandbox: Sandbox, code: str) -> None:
    order = dr_order(sandbox, 2, 1)
    if code == "item_fulfilled":
        done_in_dr(sandbox, order, 0, quantity=2)
    elif code == "item_cancelled":
        done_in_dr(sandbox, order, 0, cancel=2)
    else:
        model.set_order_state(sandbox.ledger.orders[order["id"]], code.removeprefix("order_"))
    ful, [line_id] = await seed(store, order, [{"item": 0, "fulfill_quantity": 2}])
    before = len(sandbox.ledger.fulfillments)
    assert await drain(store, sandbox) == 0
    [line] = await lines_of(store, ful)
    assert line["efn_status"] == "Completed" and line["dr_fulfillment_id"] is None and line["retry_count"] == 0
    assert line["message"].startswith("already done:") and code in line["message"]
    assert posts(sandbox, 409) == posts(sandbox) == 1
    assert len(sandbox.ledger.fulfillments) == before
    assert await app_logs(store, LINES, line_id) == []  # not a failure


async def test_quantity_too_large_fails_the_line_with_digital_rivers_message_and_sends_the_rest(
        store: Store, sandbox: Sandbox) -> None:
    order = dr_order(sandbox, 3, 1)
    done_in_dr(sandbox, order, 0, quantity=2)
    ful, [too_many, good] = await seed(store, order, [{"item": 0, "fulfill_quantity": 2},
                                                      {"item": 1, "fulfill_quantity": 1}])
    assert await drain(store, sandbox) == 0
    bad_line, good_line = await lines_of(store, ful)
    assert bad_line["efn_status"] == "Failed" and bad_line["retry_count"] == 1
    assert "409 quantity_too_large" in bad_line["message"] and "has 1 left" in bad_line["message"]
    [sent] = [f for f in sandbox.ledger.fulfillments_for_order(order["id"]) if f["id"] == good_line["dr_fulfillment_id"]]
    assert good_line["efn_status"] == "Completed" and entries(sent) == [(dr_item(order, 1), 1, None)]
    assert (posts(sandbox, 409), posts(sandbox, 201)) == (1, 1)
    assert await app_logs(store, LINES, too_many) == ["ERROR"]
    assert await app_logs(store, LINES, good) == []


async def test_digital_river_400_fails_the_line_with_its_message_and_sends_the_rest(store: Store,
                                                                                   sandbox: Sandbox) -> None:
    order = dr_order(sandbox, 1, 1)
    ful, _ = await seed(store, order, [{"item": 0, "fulfill_quantity": 1, "dr_order_item_id": "999000111"},
                                       {"item": 1, "fulfill_quantity": 1}])
    assert await drain(store, sandbox) == 0
    bad_line, good_line = await lines_of(store, ful)
    assert bad_line["efn_status"] == "Failed"
    assert "Digital River 400 invalid_parameter (parameter items[0].itemId)" in bad_line["message"]
    assert "999000111" in bad_line["message"]
    assert good_line["efn_status"] == "Completed" and good_line["dr_fulfillment_id"].startswith("ful_")


async def test_a_cut_connection_after_digital_river_took_the_lines_is_found_not_sent_again(
        store: Store, sandbox: Sandbox) -> None:
    # 1 of 3 and 2 of 4: a repeat would be taken (no 409) and report the quantities twice.
    order = dr_order(sandbox, 3, 4)
    ful, line_ids = await seed(store, order, [{"item": 0, "fulfill_quantity": 1}, {"item": 1, "fulfill_quantity": 2}])
    sandbox.configure(drop_after_fulfillment_rate=1.0, fault_endpoints=["POST /fulfillments"])
    assert await drain(store, sandbox, retry_backoff=(0.001, 0.01)) == 0
    [sent] = sandbox.ledger.fulfillments_for_order(order["id"])
    assert sandbox.ledger.dropped_fulfillments == [sent["id"]]
    assert posts(sandbox) == 1 and sandbox.ledger.count_requests("GET", "/fulfillments") == 1
    assert sandbox.ledger.items[dr_item(order, 0)].fulfilled == 1 and sandbox.ledger.items[dr_item(order, 1)].fulfilled == 2
    assert [(r["efn_status"], r["dr_fulfillment_id"], r["retry_count"]) for r in await lines_of(store, ful)] \
        == [("Completed", sent["id"], 0)] * 2
    assert sent["metadata"] == {"drjobsJob": LINES, "drjobsIds": ",".join(map(str, line_ids))}


async def test_a_retried_line_looks_first_and_a_line_already_reported_is_not_sent_again(
        store: Store, sandbox: Sandbox) -> None:
    order = dr_order(sandbox, 3, 3)
    ful, (reported, fresh) = await seed(store, order, [{"item": 0, "fulfill_quantity": 1},
                                                       {"item": 1, "fulfill_quantity": 1}])
    # An earlier attempt reached Digital River (its answer lost), and the line was left Pending to retry.
    earlier = model.apply_fulfillment({"orderId": order["id"], "items": [{"itemId": dr_item(order, 0), "quantity": 1}],
                                       "metadata": {"drjobsJob": LINES, "drjobsIds": str(reported)}}, sandbox.ledger)
    sandbox.ledger.add_fulfillment(earlier)
    await store.pool.execute("UPDATE line_item_fulfillments SET efn_status = 'Pending', retry_count = 1 "
                             "WHERE id = $1", reported)
    assert await drain(store, sandbox) == 0
    assert sandbox.ledger.items[dr_item(order, 0)].fulfilled == 1  # not 2
    [second] = [f for f in sandbox.ledger.fulfillments_for_order(order["id"]) if f["id"] != earlier["id"]]
    assert entries(second) == [(dr_item(order, 1), 1, None)]
    assert second["metadata"]["drjobsIds"] == str(fresh)
    by_id = {r["id"]: r for r in await lines_of(store, ful)}
    assert (by_id[reported]["efn_status"], by_id[reported]["dr_fulfillment_id"]) == ("Completed", earlier["id"])
    assert (by_id[fresh]["efn_status"], by_id[fresh]["dr_fulfillment_id"]) == ("Completed", second["id"])


async def test_the_api_version_is_sent_and_dr_api_version_overrides_it(store: Store, sandbox: Sandbox) -> None:
    await seed(store, dr_order(sandbox, 1), [{"item": 0, "fulfill_quantity": 1}])
    assert await drain(store, sandbox) == 0
    assert set(sandbox.ledger.api_versions) == {DR_API_VERSION_BUILT_FOR}
    await seed(store, dr_order(sandbox, 1), [{"item": 0, "fulfill_quantity": 1}])
    sandbox.ledger.api_versions.clear()
    assert await drain(store, sandbox, DR_API_VERSION="2024-08-21") == 0
    assert set(sandbox.ledger.api_versions) == {"2024-08-21"}


async def test_transient_failures_back_off_and_fail_past_the_retry_limit(store: Store, sandbox: Sandbox) -> None:
    order = dr_order(sandbox, 1)
    ful, [line_id] = await seed(store, order, [{"item": 0, "fulfill_quantity": 1}])
    sandbox.configure(error_rate=1.0, fault_endpoints=["POST /fulfillments"])
    for attempt, minutes in ((1, 1), (2, 2)):
        before = datetime.now(UTC)
        assert await run_job(store, sandbox, LINES, FULFILLMENT_RETRY_LIMIT="2") == 0
        [line] = await lines_of(store, ful)
        assert (line["efn_status"], line["retry_count"], line["locked_by"]) == ("Pending", attempt, None)
        assert "500 internal_server_error" in line["message"]
        wait = line["next_attempt_at"] - before
        assert timedelta(minutes=minutes) <= wait < timedelta(minutes=minutes, seconds=30)
        await store.pool.execute("UPDATE line_item_fulfillments SET next_attempt_at = now()")
    assert await run_job(store, sandbox, LINES, FULFILLMENT_RETRY_LIMIT="2") == 0
    [line] = await lines_of(store, ful)
    assert (line["efn_status"], line["retry_count"]) == ("Failed", 3)
    assert "FULFILLMENT_RETRY_LIMIT is 2" in line["message"]
    assert await app_logs(store, LINES, line_id) == ["WARN", "WARN", "ERROR"]
    assert len(sandbox.ledger.fulfillments) == 0


async def test_orders_not_yet_accepted_are_asked_about_after_an_hour_without_news_and_sent_once_accepted(
        store: Store, sandbox: Sandbox) -> None:
    waiting = dr_order(sandbox, 1, 1, state="pending_payment")
    ful, _ = await seed(store, waiting, [{"item": 0, "fulfill_quantity": 1}, {"item": 1, "fulfill_quantity": 1}],
                        dr_order_state="pending_payment")
    reviewed = dr_order(sandbox, 1, state="in_review")
    other, _ = await seed(store, reviewed, [{"item": 0, "fulfill_quantity": 1}], dr_order_state=None,
                          order_state="in_review")

    def gets(order: dict[str, Any]) -> int:
        return sandbox.ledger.count_requests("GET", f"/orders/{order['id']}")

    async def an_hour_passes() -> None:
        await store.pool.execute("UPDATE fulfillments SET created_at = created_at - interval '61 minutes', "
                                 "dr_state_checked_at = dr_state_checked_at - interval '61 minutes'")

    async with engine_on(store, sandbox) as engine:
        assert await engine.run_job(LINES) == 0
        assert (gets(waiting), gets(reviewed), posts(sandbox)) == (0, 0, 0)  # order.accepted normally says it
        await an_hour_passes()
        assert await engine.run_job(LINES) == 0
        assert await engine.run_job(LINES) == 0
        assert (gets(waiting), gets(reviewed), posts(sandbox)) == (1, 1, 0)  # once in the hour, not every run
        lines = await lines_of(store, ful)
        assert [(r["efn_status"], r["retry_count"], r["locked_by"]) for r in lines] == [("Open", 0, None)] * 2
        assert (await fulfillment_row(store, other))["dr_order_state"] == "in_review"
        assert await engine.jobs[LINES].due_count() == 0  # waiting, not due: drain does not spin on them

        model.set_order_state(sandbox.ledger.orders[waiting["id"]], "accepted")
        await an_hour_passes()
        assert await engine.run_job(LINES) == 0
    assert (gets(waiting), gets(reviewed), posts(sandbox)) == (2, 2, 1)
    assert (await fulfillment_row(store, ful))["dr_order_state"] == "accepted"
    assert [r["efn_status"] for r in await lines_of(store, ful)] == ["Completed", "Completed"]
    assert [r["efn_status"] for r in await lines_of(store, other)] == ["Open"]
    assert await drain(store, sandbox) == 0
    assert gets(reviewed) == 2


@pytest.mark.parametrize(("line", "field"), [
    ({"item": 0, "fulfill_quantity": 0, "cancel_quantity": 0}, "fulfill_quantity and cancel_quantity are both 0"),
    ({"item": 0, "fulfill_quantity": 3, "cancel_quantity": 1}, "exceed order_items.quantity (3)"),
    ({"item": 2, "fulfill_quantity": 1}, "line_item_fulfillments.dr_order_item_id is empty and so is order_items"),
    ({"item": None, "fulfill_quantity": 1}, "line_item_fulfillments.dr_order_item_id is empty and so is order_item_id"),
    ({"foreign_item": True, "fulfill_quantity": 1}, "belongs to order"),
])
async def test_bad_line_fails_naming_the_field_while_its_neighbours_go(store: Store, sandbox: Sandbox,
                                                                      line: dict[str, object], field: str) -> None:
    order = dr_order(sandbox, 3, 1)
    items: list[dict[str, object]] = [{"quantity": i["quantity"], "dr_order_item_id": i["id"]} for i in order["items"]]
    items.append({"quantity": 1, "dr_order_item_id": None})  # an item the ERP never got a Digital River id for
    if line.pop("foreign_item", False):
        _, [foreign], _, _ = await fulfillment_order(store, dr_order_id=None, items=[{"quantity": 5}])
        line["order_item_id"] = foreign
    _, _, ful, [bad_id, good_id] = await fulfillment_order(
        store, dr_order_id=order["id"], items=items, lines=[line, {"item": 1, "fulfill_quantity": 1}])
    assert await drain(store, sandbox) == 0
    bad, good = await lines_of(store, ful)
    assert bad["efn_status"] == "Failed" and field in bad["message"]
    assert bad["retry_count"] == 0 and bad["dr_fulfillment_id"] is None  # never sent
    assert good["efn_status"] == "Completed"
    [sent] = sandbox.ledger.fulfillments_for_order(order["id"])
    assert entries(sent) == [(dr_item(order, 1), 1, None)]
    assert posts(sandbox) == 1
    assert await app_logs(store, LINES, bad_id) == ["ERROR"]
    assert await app_logs(store, LINES, good_id) == []


async def test_order_without_a_digital_river_id_fails_its_lines_and_its_cancellation_without_a_call(
        store: Store, sandbox: Sandbox) -> None:
    _, _, lines_ful, _ = await fulfillment_order(
        store, dr_order_id=None, items=[{"quantity": 1, "dr_order_item_id": "111"}],
        lines=[{"item": 0, "fulfill_quantity": 1}, {"item": 0, "cancel_quantity": 0, "fulfill_quantity": 1}],
        dr_order_state=None)
    _, _, cancel_ful, _ = await fulfillment_order(store, dr_order_id=None, items=[{"quantity": 1}],
                                                  dr_order_state="cancelled")
    assert await drain(store, sandbox) == 0
    for line in await lines_of(store, lines_ful):
        assert line["efn_status"] == "Failed" and "fulfillments.dr_order_id is empty" in line["message"]
    cancel = await fulfillment_row(store, cancel_ful)
    assert cancel["efn_status"] == "Failed" and "fulfillments.dr_order_id is empty" in cancel["message"]
    assert sandbox.ledger.count_requests() == 0


async def test_lines_with_different_tracking_go_in_one_request_per_tracking(store: Store, sandbox: Sandbox) -> None:
    order = dr_order(sandbox, 1, 1, 1)
    ups = {"tracking_company": "UPS", "tracking_number": "1Z001"}
    ful, _ = await seed(store, order, [{"item": 0, "fulfill_quantity": 1, **ups},
                                       {"item": 1, "fulfill_quantity": 1, "tracking_company": "UPS",
                                        "tracking_number": "1Z002"},
                                       {"item": 2, "fulfill_quantity": 1, **ups}])
    assert await drain(store, sandbox) == 0
    sent = sorted(sandbox.ledger.fulfillments_for_order(order["id"]), key=lambda f: str(f["trackingNumber"]))
    assert [(f["trackingNumber"], len(f["items"])) for f in sent] == [("1Z001", 2), ("1Z002", 1)]
    assert [r["dr_fulfillment_id"] for r in await lines_of(store, ful)] == [sent[0]["id"], sent[1]["id"], sent[0]["id"]]


async def run_limited(store: Store, sandbox: Sandbox, runs: int, limit: int) -> tuple[list[int], list[int]]:
    """`runs` runs of line-item-fulfillment with FULFILLMENT_QUERY_LIMIT=`limit`: lines Completed after each, and
    lines claimed by each."""
    completed = []
    async with engine_on(store, sandbox, FULFILLMENT_QUERY_LIMIT=str(limit)) as engine:
        for _ in range(runs):
            assert await engine.run_job(LINES) == 0
            completed.append(await store.pool.fetchval(
                "SELECT count(*) FROM line_item_fulfillments WHERE efn_status = 'Completed'"))
    claimed = [r["claimed"] for r in await store.pool.fetch(
        "SELECT claimed FROM job_runs WHERE job = $1 ORDER BY id", LINES)]
    return completed, claimed


async def test_query_limit_bounds_a_run_and_keeps_orders_whole(store: Store, sandbox: Sandbox) -> None:
    orders = [dr_order(sandbox, 1, 1, 1) for _ in range(3)]
    for order in orders:
        await seed(store, order, [{"item": i, "fulfill_quantity": 1} for i in range(3)])
    # 4 lines a run: one whole order fits, the next order's 3 lines do not and wait for the next run.
    assert await run_limited(store, sandbox, 3, 4) == ([3, 6, 9], [3, 3, 3])
    assert [len(sandbox.ledger.fulfillments_for_order(o["id"])) for o in orders] == [1, 1, 1]


async def test_order_with_more_lines_than_the_limit_is_split_over_runs(store: Store, sandbox: Sandbox) -> None:
    order = dr_order(sandbox, 1, 1, 1, 1, 1)
    await seed(store, order, [{"item": i, "fulfill_quantity": 1} for i in range(5)])
    assert await run_limited(store, sandbox, 2, 4) == ([4, 5], [4, 1])
    assert [len(f["items"]) for f in sandbox.ledger.fulfillments_for_order(order["id"])] == [4, 1]


# -- order-fulfillment ---------------------------------------------------------------------------------------------


async def test_cancelled_order_cancels_what_is_left_of_every_line(store: Store, sandbox: Sandbox) -> None:
    order = dr_order(sandbox, 3, 2, 1)
    done_in_dr(sandbox, order, 0, quantity=1)
    ful, _ = await seed(store, order, [{"item": 0, "fulfill_quantity": 1, "efn_status": "Completed"}],
                        dr_order_state="cancelled")
    assert await drain(store, sandbox) == 0
    assert posts(sandbox) == 1
    [_, sent] = sandbox.ledger.fulfillments_for_order(order["id"])
    assert entries(sent) == [(dr_item(order, 0), None, 2), (dr_item(order, 1), None, 2), (dr_item(order, 2), None, 1)]
    row = await fulfillment_row(store, ful)
    assert (row["efn_status"], row["dr_fulfillment_id"], row["retry_count"], row["locked_by"]) == \
        ("Completed", sent["id"], 0, None)
    assert all(sandbox.ledger.items[dr_item(order, i)].remaining == 0 for i in range(3))


async def test_cancelled_order_with_nothing_left_completes_without_a_call(store: Store, sandbox: Sandbox) -> None:
    order = dr_order(sandbox, 1)
    done_in_dr(sandbox, order, 0, quantity=1)
    ful, _ = await seed(store, order, [{"item": 0, "fulfill_quantity": 1, "efn_status": "Completed"}],
                        dr_order_state="cancelled")
    assert await drain(store, sandbox) == 0
    row = await fulfillment_row(store, ful)
    assert row["efn_status"] == "Completed" and row["message"].startswith("nothing left to cancel")
    assert sandbox.ledger.count_requests() == 0


@pytest.mark.parametrize("code", ["item_fulfilled", "item_cancelled", "order_complete", "order_cancelled"])
async def test_already_done_answer_completes_the_cancellation(store: Store, sandbox: Sandbox, code: str) -> None:
    order = dr_order(sandbox, 2, 1)
    if code == "item_fulfilled":
        done_in_dr(sandbox, order, 0, quantity=2)
    elif code == "item_cancelled":
        done_in_dr(sandbox, order, 0, cancel=2)
    else:
        model.set_order_state(sandbox.ledger.orders[order["id"]], code.removeprefix("order_"))
    ful, _ = await seed(store, order, [], dr_order_state="cancelled")
    assert await drain(store, sandbox) == 0
    row = await fulfillment_row(store, ful)
    assert row["efn_status"] == "Completed" and row["retry_count"] == 0
    assert row["message"].startswith("already done:") and code in row["message"]
    assert posts(sandbox, 409) == 1
    if code.startswith("item_"):  # the other item was still open: it went in a second request
        assert posts(sandbox, 201) == 1 and row["dr_fulfillment_id"].startswith("ful_")
        assert sandbox.ledger.items[dr_item(order, 1)].cancelled == 1
    else:
        assert posts(sandbox) == 1 and row["dr_fulfillment_id"] is None


async def test_cancellation_outage_backs_off_and_fails_past_the_retry_limit(store: Store, sandbox: Sandbox) -> None:
    order = dr_order(sandbox, 1)
    ful, _ = await seed(store, order, [], dr_order_state="cancelled")
    sandbox.configure(error_rate=1.0, fault_endpoints=["POST /fulfillments"])
    before = datetime.now(UTC)
    assert await run_job(store, sandbox, ORDERS, FULFILLMENT_RETRY_LIMIT="1") == 0
    row = await fulfillment_row(store, ful)
    assert (row["efn_status"], row["retry_count"], row["locked_by"]) == ("Pending", 1, None)
    assert timedelta(minutes=1) <= row["next_attempt_at"] - before < timedelta(minutes=1, seconds=30)
    await store.pool.execute("UPDATE fulfillments SET next_attempt_at = now()")
    assert await run_job(store, sandbox, ORDERS, FULFILLMENT_RETRY_LIMIT="1") == 0
    row = await fulfillment_row(store, ful)
    assert (row["efn_status"], row["retry_count"]) == ("Failed", 2)
    assert await app_logs(store, ORDERS, ful) == ["WARN", "ERROR"]


# -- both ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("job", [ORDERS, LINES])
async def test_refused_key_stops_the_run_and_leaves_the_records_untouched(store: Store, sandbox: Sandbox,
                                                                         job: str) -> None:
    order = dr_order(sandbox, 1)
    ful, _ = await seed(store, order, [{"item": 0, "fulfill_quantity": 1}],
                        dr_order_state="cancelled" if job == ORDERS else "accepted")
    sandbox.configure(api_key="sk_test_the_only_good_key")
    assert await run_job(store, sandbox, job) == 1
    row = await fulfillment_row(store, ful)
    assert (row["efn_status"], row["retry_count"], row["locked_by"]) == ("Open", 0, None)
    [line] = await lines_of(store, ful)
    assert (line["efn_status"], line["retry_count"], line["locked_by"]) == ("Open", 0, None)
    run = await store.pool.fetchrow("SELECT status, error FROM job_runs WHERE job = $1", job)
    assert run["status"] == "failed" and "refused the API key" in run["error"]


async def test_two_engines_on_one_backlog_send_each_order_once(database_url: str, store: Store,
                                                              sandbox: Sandbox) -> None:
    orders = [dr_order(sandbox, 1, 2, 3) for _ in range(30)]
    for order in orders:
        await seed(store, order, [{"item": i, "fulfill_quantity": 1, "cancel_quantity": i} for i in range(3)])
    cancelled = [dr_order(sandbox, 2, 2) for _ in range(10)]
    for order in cancelled:
        await seed(store, order, [], dr_order_state="cancelled")
    sandbox.configure(latency_ms=20)
    async with open_store(database_url, "engine-a") as a, open_store(database_url, "engine-b") as b:
        codes = await asyncio.gather(drain(a, sandbox), drain(b, sandbox))
    assert codes == [0, 0]
    assert posts(sandbox) == posts(sandbox, 201) == len(orders) + len(cancelled)
    for order in orders + cancelled:
        assert len(sandbox.ledger.fulfillments_for_order(order["id"])) == 1
    sent_items = Counter(i["itemId"] for f in sandbox.ledger.fulfillments.values() for i in f["items"])
    assert set(sent_items.values()) == {1}  # no line (and no item) sent twice
    statuses = await store.pool.fetch("SELECT efn_status, count(*) FROM line_item_fulfillments GROUP BY 1")
    assert {r["efn_status"]: r["count"] for r in statuses} == {"Completed": 90}
    assert await store.pool.fetchval("SELECT count(*) FROM fulfillments WHERE dr_order_state = 'cancelled' "
                                     "AND efn_status = 'Completed'") == len(cancelled)
    runs = await store.pool.fetch("SELECT node, sum(claimed) AS claimed FROM job_runs WHERE job = $1 GROUP BY node",
                                  LINES)
    assert sum(r["claimed"] for r in runs) == 90  # every line claimed once across both engines


@pytest.mark.parametrize("job", [LINES, ORDERS])
async def test_kill_between_the_call_and_the_write_then_drain_reports_every_line_once(
        database_url: str, store: Store, sandbox: Sandbox, job: str) -> None:
    # Partial quantities on purpose: 1 of 3 and 2 of 4 leave something to fulfil, so Digital River would take a
    # repeat (no 409) and report them twice. The repeat is prevented by looking at GET /fulfillments?orderId=
    # for our ids in the metadata before sending the lines of a claim that never wrote its outcome.
    order = dr_order(sandbox, 3, 4)
    if job == LINES:
        ful, line_ids = await seed(store, order, [{"item": 0, "fulfill_quantity": 1},
                                                  {"item": 1, "fulfill_quantity": 2}])
    else:
        ful, line_ids = await seed(store, order, [], dr_order_state="cancelled")
    env = sandbox_env(database_url, sandbox)
    code, _, err = await run_command(["run", job], env | {"DRJOBS_FAILPOINTS": "after_fulfillment_sent"}, timeout=90)
    assert code == -signal.SIGKILL, f"the failpoint was never reached: {err}"
    assert posts(sandbox, 201) == 1
    (first,) = sandbox.ledger.fulfillments_for_order(order["id"])
    row = await fulfillment_row(store, ful)
    assert row["locked_by"] is not None and row["efn_status"] == "Open"

    while await store.pool.fetchval(
            "SELECT count(*) FROM (SELECT locked_until FROM fulfillments UNION ALL "
            "SELECT locked_until FROM line_item_fulfillments) t WHERE locked_until >= now()"):
        await asyncio.sleep(0.25)  # the dead process's leases lapse after LEASE_SECONDS
    code, _, err = await run_command(["drain"], env, timeout=90)
    assert code == 0, err

    # Nothing sent again: one fulfillment in Digital River, each quantity reported once.
    assert posts(sandbox) == 1 and sandbox.ledger.fulfillments_for_order(order["id"]) == [first]
    assert sandbox.ledger.count_requests("GET", "/fulfillments") == 1
    reported = {item["itemId"]: (item.get("quantity", 0), item.get("cancelQuantity", 0)) for item in first["items"]}
    if job == LINES:
        assert reported == {dr_item(order, 0): (1, 0), dr_item(order, 1): (2, 0)}
        assert first["metadata"] == {"drjobsJob": LINES, "drjobsIds": ",".join(map(str, line_ids))}
        records = await lines_of(store, ful)
    else:
        assert reported == {dr_item(order, 0): (0, 3), dr_item(order, 1): (0, 4)}
        assert first["metadata"]["drjobsJob"] == ORDERS and first["metadata"]["drjobsRecord"] == str(ful)
        records = [await fulfillment_row(store, ful)]
    assert records and all(r["efn_status"] == "Completed" and r["dr_fulfillment_id"] == first["id"]
                           for r in records)
    assert all(r["message"] == f"already reported in {first['id']} (found by its metadata)" for r in records)
