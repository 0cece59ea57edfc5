"""Rows for tests, written with plain SQL the way an outside system would."""

from __future__ import annotations

from datetime import date

from engine.store import Store


async def subscription(store: Store, **columns: object) -> int:
    """An Active monthly subscription with an account, product, stored payment and parent order."""
    async with store.pool.acquire() as conn:
        account = await conn.fetchval(
            "INSERT INTO accounts (name, dr_customer_id, email) VALUES ('Acme', 'cus_1', 'a@example.com') "
            "RETURNING id")
        product = await conn.fetchval(
            "INSERT INTO products (sku, name, dr_sku_id) VALUES ($1, 'Widget', 'sku_1') RETURNING id",
            f"SKU-{account}")
        payment = await conn.fetchval(
            "INSERT INTO stored_payments (account_id, dr_source_id) VALUES ($1, 'src_ok') RETURNING id", account)
        order = await conn.fetchval(
            "INSERT INTO orders (account_id, dr_order_id, currency) VALUES ($1, $2, 'USD') RETURNING id",
            account, f"ord_parent_{account}")
        values = {
            "account_id": account, "product_id": product, "stored_payment_id": payment, "parent_order_id": order,
            "quantity": 1, "unit_price": 10, "currency": "USD", "installment_anchor_date": date(2026, 1, 31),
            "installment_count_remaining": 12, "installment_next_run_date": date(2026, 1, 31),
        } | columns
        names = ", ".join(values)
        params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        return int(await conn.fetchval(f"INSERT INTO subscriptions ({names}) VALUES ({params}) RETURNING id",
                                       *values.values()))


async def process_records(store: Store, subscription_id: int, count: int, **columns: object) -> list[int]:
    """`count` Open installment records (numbers 1..count) of one subscription."""
    ids = []
    for number in range(1, count + 1):
        values = {"subscription_id": subscription_id, "installment_number": number,
                  "installment_run_date": date(2026, 1, number)} | columns
        names = ", ".join(values)
        params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        ids.append(int(await store.pool.fetchval(
            f"INSERT INTO subscription_process_data ({names}) VALUES ({params}) RETURNING id", *values.values())))
    return ids


async def due_subscription(store: Store, *, source: str = "src_card_ok", unit_price: object = 10, months_behind: int = 0,
                           remaining: int = 12, time_zone: str = "UTC", account: dict[str, object] | None = None,
                           product: dict[str, object] | None = None, payment_active: bool = True,
                           **columns: object) -> int:
    """A monthly subscription whose next installment is due today (or `months_behind` months ago), with every
    Digital River id an installment needs; the keyword groups override parts of it."""
    from actors.subscription_installments import add_months

    today = date.today()
    run_date = add_months(today, -months_behind)
    async with store.pool.acquire() as conn:
        acc = {"name": "Acme", "dr_customer_id": "cus_acme", "email": "billing@acme.example", "time_zone": time_zone,
               "bill_to": '{"address": {"country": "US", "postalCode": "55401"}, "name": "Acme"}'} | (account or {})
        account_id = await _insert(conn, "accounts", acc)
        prod = {"sku": f"SKU-{account_id}", "name": "Widget subscription", "dr_sku_id": "sku_widget",
                "tax_code": "4512.1"} | (product or {})
        product_id = await _insert(conn, "products", prod)
        payment_id = await _insert(conn, "stored_payments", {"account_id": account_id, "dr_source_id": source,
                                                             "is_active": payment_active})
        order_id = await _insert(conn, "orders", {
            "account_id": account_id, "dr_order_id": f"ord_parent_{account_id}", "currency": "USD",
            "ship_to": '{"address": {"country": "US", "postalCode": "55401"}, "name": "Acme"}'})
        item_id = await _insert(conn, "order_items", {
            "order_id": order_id, "product_id": product_id, "quantity": 1, "unit_price": unit_price,
            "dr_order_item_id": f"item_parent_{account_id}", "dr_billing_agreement_id": f"ba_{account_id}"})
        values = {
            "account_id": account_id, "product_id": product_id, "stored_payment_id": payment_id,
            "parent_order_id": order_id, "parent_order_item_id": item_id, "quantity": 1, "unit_price": unit_price,
            "currency": "USD", "installment_frequency": "Monthly", "installment_anchor_date": run_date,
            "installment_next_run_date": run_date, "installment_count_remaining": remaining,
        } | columns
        return await _insert(conn, "subscriptions", values)


async def _insert(conn: object, table: str, values: dict[str, object]) -> int:
    names = ", ".join(values)
    params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
    return int(await conn.fetchval(  # type: ignore[attr-defined]
        f"INSERT INTO {table} ({names}) VALUES ({params}) RETURNING id", *values.values()))


async def fulfillment_order(store: Store, *, dr_order_id: str | None, items: list[dict[str, object]],
                            lines: list[dict[str, object]] | None = None, order_state: str | None = None,
                            **fulfillment: object) -> tuple[int, list[int], int, list[int]]:
    """An order with its items, its `fulfillments` row and line-item fulfillments, as an ERP would write them.

    `items` are order_items columns (`quantity`, `dr_order_item_id`, …); each of `lines` is line_item_fulfillments
    columns plus `item`, the index in `items` of its order item (absent or None: no order item). `fulfillment`
    overrides the fulfillments row's columns (by default `dr_order_id` as the order's and `dr_order_state`
    'accepted'). Returns the ids written: (order, [order items], fulfillment, [lines]).
    """
    async with store.pool.acquire() as conn:
        order = await _insert(conn, "orders", {"dr_order_id": dr_order_id, "dr_order_state": order_state,
                                               "currency": "USD"})
        item_ids = [await _insert(conn, "order_items", {"order_id": order, "unit_price": 10} | item) for item in items]
        ful = await _insert(conn, "fulfillments", {"order_id": order, "dr_order_id": dr_order_id,
                                                   "dr_order_state": "accepted"} | fulfillment)
        line_ids = []
        for line in lines or []:
            values = {k: v for k, v in line.items() if k != "item"}
            index = line.get("item")
            if isinstance(index, int):
                values["order_item_id"] = item_ids[index]
            line_ids.append(await _insert(conn, "line_item_fulfillments", {"fulfillment_id": ful} | values))
    return order, item_ids, ful, line_ids
