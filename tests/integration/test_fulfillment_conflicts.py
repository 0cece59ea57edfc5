"""A 409 `item_fulfilled` settles only the line whose item it names (Digital River names it in the message, with
`parameter` "itemId"); the order's other lines are still reported, never marked Completed without a capture."""

from __future__ import annotations

from engine.store import Store
from sandbox.server import Sandbox
from tests.integration.engines import drain
from tests.integration.test_fulfillment import done_in_dr, dr_item, dr_order, lines_of, posts, seed
from tests.support import sandbox_fixture

sandbox = sandbox_fixture(seed=19)


async def test_one_item_already_fulfilled_completes_that_line_and_the_others_are_captured(
        store: Store, sandbox: Sandbox) -> None:
    order = dr_order(sandbox, 2, 1, 3)
    done_in_dr(sandbox, order, 1, quantity=1)  # the second item was captured earlier, elsewhere
    ful, line_ids = await seed(store, order, [{"item": 0, "fulfill_quantity": 2}, {"item": 1, "fulfill_quantity": 1},
                                              {"item": 2, "fulfill_quantity": 3}])
    assert await drain(store, sandbox) == 0
    lines = {line["id"]: line for line in await lines_of(store, ful)}
    first, second, third = (lines[i] for i in line_ids)
    assert second["efn_status"] == "Completed" and second["message"].startswith("already done:")
    assert second["dr_fulfillment_id"] is None
    # The other two went in a second request, which Digital River took: each captured exactly once.
    assert posts(sandbox, 409) == 1 and posts(sandbox, 201) == 1
    [taken] = [f for f in sandbox.ledger.fulfillments.values() if f.get("id") == first["dr_fulfillment_id"]]
    assert sorted((i["itemId"], i["quantity"]) for i in taken["items"]) == sorted(
        [(dr_item(order, 0), 2), (dr_item(order, 2), 3)])
    assert first["efn_status"] == third["efn_status"] == "Completed"
    assert first["dr_fulfillment_id"] == third["dr_fulfillment_id"] == taken["id"]
    for index in (0, 2):
        assert sandbox.ledger.items[dr_item(order, index)].remaining == 0
