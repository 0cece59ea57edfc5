"""What the sandbox has seen and done, for tests to assert on (in-process as `Sandbox.ledger`, or as JSON from
`GET /_sandbox/ledger`).

Everything is plain dicts and lists with O(1) appends, so recording costs next to nothing at 1,000+ req/s.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple


class RequestEntry(NamedTuple):
    at: float  # Unix time
    method: str
    path: str
    status: int  # 0: no answer was sent (dropped on purpose, or the client gave up first)


@dataclass(slots=True)
class ItemProgress:
    """Fulfilled and cancelled quantities of one order item."""

    order_id: str
    quantity: int
    fulfilled: int = 0
    cancelled: int = 0

    @property
    def remaining(self) -> int:
        return self.quantity - self.fulfilled - self.cancelled


class Ledger:
    """Every request, checkout, order (by id, by checkout and by upstream id), decline, fulfillment, event and
    webhook delivery attempt."""

    def __init__(self, max_requests: int = 1_000_000) -> None:
        self.requests: deque[RequestEntry] = deque(maxlen=max_requests)
        self.checkouts: dict[str, dict[str, Any]] = {}
        self.orders: dict[str, dict[str, Any]] = {}
        self.orders_by_checkout: dict[str, list[str]] = {}
        self.orders_by_upstream: dict[str, list[str]] = {}
        # Checkout id → the decline code POST /orders answered for it (the checkout is burned).
        self.declines: dict[str, str] = {}
        self.fulfillments: dict[str, dict[str, Any]] = {}
        self.items: dict[str, ItemProgress] = {}
        # Connections dropped on purpose after an order was created (drop_after_order), by order id.
        self.dropped_orders: list[str] = []
        # Connections dropped on purpose after a fulfillment was applied (drop_after_fulfillment), by id.
        self.dropped_fulfillments: list[str] = []
        # Every `digitalriver-version` header seen (None: a request without one), with its count.
        self.api_versions: dict[str | None, int] = {}
        # Every event Digital River would emit (GET /events lists them; webhooks deliver them), in creation
        # order, which is also createdTime order (strictly increasing).
        self.events: list[dict[str, Any]] = []
        self.events_by_id: dict[str, dict[str, Any]] = {}
        self.events_by_order: dict[str, list[str]] = {}
        # Every webhook delivery attempt: eventId, type, attempt (1, 2, ... for retries), status (0: connection
        # error or timeout), durationMs, at (Unix time the attempt started), url.
        self.webhook_deliveries: list[dict[str, Any]] = []
        # Called with each new event (the server schedules its webhook deliveries); kept by `clear()`.
        self.event_listeners: list[Callable[[dict[str, Any]], None]] = []
        self._last_event_ms = 0

    def record_request(self, method: str, path: str, status: int, api_version: str | None = None) -> None:
        self.requests.append(RequestEntry(time.time(), method, path, status))
        self.api_versions[api_version] = self.api_versions.get(api_version, 0) + 1

    def add_checkout(self, checkout: dict[str, Any]) -> None:
        self.checkouts[checkout["id"]] = checkout

    def add_order(self, order: dict[str, Any]) -> None:
        order_id = order["id"]
        self.orders[order_id] = order
        self.orders_by_checkout.setdefault(order["checkoutId"], []).append(order_id)
        if order.get("upstreamId"):
            self.orders_by_upstream.setdefault(order["upstreamId"], []).append(order_id)
        for item in order["items"]:
            self.items[item["id"]] = ItemProgress(order_id, item["quantity"])

    def add_fulfillment(self, fulfillment: dict[str, Any]) -> None:
        self.fulfillments[fulfillment["id"]] = fulfillment

    def next_event_time(self) -> str:
        """An event createdTime (ISO-8601 UTC, milliseconds, Z) later than every earlier one: now, or 1 ms
        after the last when the clock did not move (or went back), so ordering by createdTime is total."""
        now_ms = max(time.time_ns() // 1_000_000, self._last_event_ms + 1)
        self._last_event_ms = now_ms
        seconds, ms = divmod(now_ms, 1000)
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ms:03d}Z"

    def add_event(self, event: dict[str, Any]) -> None:
        """Record an event (its id and createdTime already set) and tell the listeners."""
        self.events.append(event)
        self.events_by_id[event["id"]] = event
        obj = event.get("data", {}).get("object")
        if isinstance(obj, dict) and isinstance(obj.get("id"), str):
            self.events_by_order.setdefault(obj["id"], []).append(event["id"])
        for listener in self.event_listeners:
            listener(event)

    # -- questions tests ask --------------------------------------------------------------------------------

    def orders_for_checkout(self, checkout_id: str) -> list[dict[str, Any]]:
        """Orders created from that checkout (a correct engine leaves at most one)."""
        return [self.orders[i] for i in self.orders_by_checkout.get(checkout_id, ())]

    def orders_for_upstream(self, upstream_id: str) -> list[dict[str, Any]]:
        """Orders whose checkout carried that upstreamId (one per installment record when charged once)."""
        return [self.orders[i] for i in self.orders_by_upstream.get(upstream_id, ())]

    def fulfillments_for_order(self, order_id: str) -> list[dict[str, Any]]:
        return [f for f in self.fulfillments.values() if f["orderId"] == order_id]

    def events_for_order(self, order_id: str) -> list[dict[str, Any]]:
        """The events about that order, oldest first."""
        return [self.events_by_id[i] for i in self.events_by_order.get(order_id, ())]

    def count_requests(self, method: str | None = None, path: str | None = None, status: int | None = None) -> int:
        """Requests matching all given filters; `path` matches exactly, or as a prefix when it ends with '*'."""
        prefix = path[:-1] if path is not None and path.endswith("*") else None
        return sum(
            1 for r in self.requests
            if (method is None or r.method == method)
            and (path is None or (r.path.startswith(prefix) if prefix is not None else r.path == path))
            and (status is None or r.status == status)
        )

    def duplicate_upstream_ids(self) -> dict[str, list[str]]:
        """upstreamIds with more than one order: each one is a double charge."""
        return {u: ids for u, ids in self.orders_by_upstream.items() if len(ids) > 1}

    def snapshot(self, *, include_requests: bool = True) -> dict[str, Any]:
        """The whole ledger as JSON-ready data (what `GET /_sandbox/ledger` answers)."""
        data: dict[str, Any] = {
            "counts": {
                "requests": len(self.requests),
                "checkouts": len(self.checkouts),
                "orders": len(self.orders),
                "declines": len(self.declines),
                "fulfillments": len(self.fulfillments),
                "events": len(self.events),
                "webhookDeliveries": len(self.webhook_deliveries),
            },
            "checkouts": list(self.checkouts.values()),
            "orders": list(self.orders.values()),
            "ordersByCheckout": self.orders_by_checkout,
            "ordersByUpstreamId": self.orders_by_upstream,
            "declines": self.declines,
            "fulfillments": list(self.fulfillments.values()),
            "droppedOrders": self.dropped_orders,
            "droppedFulfillments": self.dropped_fulfillments,
            "apiVersions": {str(k): v for k, v in self.api_versions.items()},
            "events": self.events,
            "webhookDeliveries": self.webhook_deliveries,
        }
        if include_requests:
            data["requests"] = [r._asdict() for r in self.requests]
        return data

    def clear(self) -> None:
        """Forget everything (`POST /_sandbox/reset`)."""
        for container in (self.requests, self.checkouts, self.orders, self.orders_by_checkout,
                          self.orders_by_upstream, self.declines, self.fulfillments, self.items,
                          self.dropped_orders, self.dropped_fulfillments, self.api_versions, self.events,
                          self.events_by_id, self.events_by_order, self.webhook_deliveries):
            container.clear()
