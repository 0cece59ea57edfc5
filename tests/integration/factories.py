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
