"""What an installment checkout sends and what its order keeps.

A product without a Digital River SKU is sent as productDetails the way Digital River requires them (GitBook
product-management/using-product-details.md): our id, skuGroupId, name and countryOfOrigin, and none of the
SKU-only fields (taxCode, eccn). The order's fraud state and charge state are kept on `orders`."""

from __future__ import annotations

from engine.store import Store
from sandbox.server import Sandbox
from tests.integration.engines import drain
from tests.integration.factories import due_subscription
from tests.support import sandbox_fixture

sandbox = sandbox_fixture(seed=17)


async def test_a_sku_less_product_is_charged_with_its_sku_group_and_country(store: Store, sandbox: Sandbox) -> None:
    sub = await due_subscription(store, product={"dr_sku_id": None, "sku": "LIC-SEAT", "name": "Licence seat",
                                                 "sku_group_id": "software-licences", "country_of_origin": "DE",
                                                 "tax_code": "4512.4", "eccn": "5D992"})
    assert await drain(store, sandbox) == 0
    status = await store.pool.fetchval(
        "SELECT subscription_job_run_status FROM subscription_process_data WHERE subscription_id = $1", sub)
    assert status == "Successful"
    [checkout] = sandbox.ledger.checkouts.values()
    assert checkout["items"][0]["productDetails"] == {
        "id": "LIC-SEAT", "skuGroupId": "software-licences", "name": "Licence seat", "countryOfOrigin": "DE"}
    assert len(sandbox.ledger.orders) == 1


async def test_an_installment_order_keeps_its_fraud_and_charge_states(store: Store, sandbox: Sandbox) -> None:
    sub = await due_subscription(store)
    assert await drain(store, sandbox) == 0
    [order] = sandbox.ledger.orders.values()
    row = await store.pool.fetchrow(
        "SELECT o.dr_fraud_state, o.dr_charge_state FROM orders o JOIN subscription_process_data p "
        "ON p.order_id = o.id WHERE p.subscription_id = $1", sub)
    assert (row["dr_fraud_state"], row["dr_charge_state"]) == (order["fraudState"],
                                                                order["payment"]["charges"][0]["state"])
    assert (row["dr_fraud_state"], row["dr_charge_state"]) == ("passed", "capturable")
