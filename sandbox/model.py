"""Digital River's rules as the sandbox plays them: validation, tax, the scripted outcomes, fulfillment quantities.

Pure functions of the request and the ledger (no HTTP here), raising `ApiError` for every answer that is not
a success. Money is computed in Decimal and written as JSON numbers, as Digital River does.
"""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from sandbox.config import SETTLE_OUTCOMES
from sandbox.ledger import ItemProgress, Ledger

CENT = Decimal("0.01")
# Tax by ship-to (else bill-to) country, applied per item to its amount and rounded half-up to the cent.
TAX_RATES: dict[str, Decimal] = {
    "US": Decimal("0.0825"),
    "GB": Decimal("0.20"),
    "DE": Decimal("0.19"),
    "FR": Decimal("0.20"),
}
DEFAULT_TAX_RATE = Decimal("0.10")
CURRENCIES = frozenset({
    "USD", "EUR", "GBP", "CAD", "AUD", "NZD", "JPY", "CHF", "SEK", "NOK", "DKK", "PLN", "CZK", "HUF", "MXN",
    "BRL", "INR", "SGD", "HKD", "KRW", "CNY", "ZAR", "TRY", "ILS", "AED", "SAR",
})
CHARGE_TYPES = ("customer_initiated", "merchant_initiated", "moto")
CUSTOMER_TYPES = ("individual", "business")
CHECKOUT_FIELDS = frozenset({
    "id", "customerId", "sourceId", "currency", "email", "locale", "applicationId", "browserIp", "creditAmount",
    "shipFrom", "shipTo", "billTo", "shippingChoice", "discount", "items", "shippingDiscount", "taxInclusive",
    "chargeType", "customerType", "metadata", "purchaseLocation", "upstreamId", "taxIdentifiers",
    "organizationId",
})
ITEM_FIELDS = frozenset({
    "skuId", "productDetails", "subscriptionInfo", "price", "aggregatePrice", "quantity", "discount", "shipFrom",
    "metadata", "fees",
})
SUBSCRIPTION_INFO_FIELDS = frozenset({
    "subscriptionId", "billingAgreementId", "terms", "autoRenewal", "freeTrial", "startTime", "endTime", "planId",
})
FULFILLMENT_FIELDS = frozenset({"orderId", "items", "metadata", "trackingCompany", "trackingNumber", "trackingUrl"})
FULFILLMENT_ITEM_FIELDS = frozenset({"itemId", "skuId", "quantity", "cancelQuantity"})

# Scripted outcomes of POST /orders chosen by the checkout's sourceId (prefixes; see docs/sandbox.md).
DECLINE_PREFIXES = ("src_soft_decline_", "src_hard_decline_", "src_decline_")
STATE_PREFIXES = {"src_pending_payment": "pending_payment", "src_in_review": "in_review",
                  # Orders that settle by themselves (`settle_after_seconds`, else 1 s) to the outcome named.
                  "src_settle_accept": "pending_payment", "src_settle_fail": "pending_payment",
                  "src_settle_block": "pending_payment"}
SETTLE_PREFIXES = {"src_settle_accept": "accepted", "src_settle_fail": "charge_failed",
                   "src_settle_block": "blocked"}
SETTLING_STATES = frozenset({"pending_payment", "in_review"})
SUBMIT_FAILED_PREFIX = "src_order_submit_failed"
# ... and by the cents of an item's unit price, when `amount_rules` is on.
AMOUNT_RULES: dict[Decimal, tuple[str, str]] = {
    Decimal("0.91"): ("decline", "insufficient_funds"),
    Decimal("0.92"): ("decline", "fraud"),
    Decimal("0.93"): ("state", "pending_payment"),
    Decimal("0.94"): ("state", "in_review"),
}
INVALID_CUSTOMER_PREFIX = "cus_invalid"
INVALID_SKU_PREFIX = "sku_invalid"


class ApiError(Exception):
    """A Digital River error answer: status and the `{type, errors: [{code, parameter, message}]}` envelope."""

    def __init__(self, status: int, error_type: str, code: str, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.code = code
        self.message = message
        self.parameter = parameter

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.parameter is not None:
            error["parameter"] = self.parameter
        return {"type": self.error_type, "errors": [error]}


def bad_request(code: str, parameter: str | None, message: str) -> ApiError:
    return ApiError(400, "bad_request", code, message, parameter)


def not_found(message: str, parameter: str | None = None) -> ApiError:
    return ApiError(404, "not_found", "not_found", message, parameter)


def conflict(code: str, message: str, parameter: str | None = None) -> ApiError:
    return ApiError(409, "conflict", code, message, parameter)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def new_numeric_id() -> str:
    """Order and order-item ids look like Digital River's: opaque numeric strings."""
    return str(100_000_000_000_000 + uuid.uuid4().int % 900_000_000_000_000)


def money(value: Decimal) -> float | int:
    """A JSON number for an amount (10.5, 12, 0.99)."""
    return int(value) if value == value.to_integral_value() else float(value)


# -- validation helpers ----------------------------------------------------------------------------------------


def _object(body: Any, name: str | None) -> dict[str, Any]:
    if not isinstance(body, dict):
        if name is None:
            raise bad_request("invalid_request", None, "The request body must be a JSON object.")
        raise bad_request("invalid_parameter", name, f"'{name}' must be an object.")
    return body


def _known(obj: dict[str, Any], allowed: frozenset[str], prefix: str = "") -> None:
    for key in obj:
        if key not in allowed:
            raise bad_request("unknown_parameter", prefix + key, f"'{prefix}{key}' is not a valid parameter.")


def _metadata(obj: dict[str, Any], name: str) -> None:
    """`metadata`: key-value pairs whose values are strings, booleans or integers (Digital River's Metadata,
    `map[string,AnyType]` "Value can be string, boolean or integer types", DigitalRiver/digital-river-php)."""
    value = obj.get("metadata")
    if value is None:
        return
    if not isinstance(value, dict):
        raise bad_request("invalid_parameter", name, f"'{name}' must be an object.")
    for key, item in value.items():
        if not isinstance(item, (str, bool, int)) or isinstance(item, float):
            raise bad_request("invalid_parameter", f"{name}.{key}",
                              f"'{name}.{key}' must be a string, a boolean or an integer.")


def _string(obj: dict[str, Any], key: str, name: str, *, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise bad_request("missing_parameter", name, f"'{name}' is required.")
        return None
    if not isinstance(value, str) or not value:
        raise bad_request("invalid_parameter", name, f"'{name}' must be a non-empty string.")
    return value


def _number(value: Any, name: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request("invalid_parameter", name, f"'{name}' must be a number.")
    try:
        result = Decimal(str(value))
    except InvalidOperation:
        raise bad_request("invalid_parameter", name, f"'{name}' must be a number.") from None
    if result < 0:
        raise bad_request("invalid_parameter", name, f"'{name}' must not be negative.")
    return result


def _positive_int(value: Any, name: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        floor = "zero or more" if allow_zero else "greater than zero"
        raise bad_request("invalid_parameter", name, f"'{name}' must be a whole number {floor}.")
    return value


def _country(body: dict[str, Any], key: str) -> str | None:
    party = body.get(key)
    if party is None:
        return None
    party = _object(party, key)
    address = party.get("address")
    if address is None:
        if key == "billTo":
            # Billing.address is required (DigitalRiver/digital-river-php docs/Model/Billing.md); Shipping's is not.
            raise bad_request("missing_parameter", "billTo.address", "'billTo.address' is required.")
        return None
    address = _object(address, f"{key}.address")
    country = _string(address, "country", f"{key}.address.country")
    if country is not None and (len(country) != 2 or not country.isalpha() or not country.isupper()):
        raise bad_request("invalid_parameter", f"{key}.address.country",
                          f"'{key}.address.country' must be an ISO 3166-1 alpha-2 code.")
    return country


def tax_rate_for(country: str | None) -> Decimal:
    return TAX_RATES.get(country or "", DEFAULT_TAX_RATE)


# -- checkouts ------------------------------------------------------------------------------------------------


def build_checkout(body: Any) -> dict[str, Any]:
    """Validate a POST /checkouts body like Digital River and return the checkout it creates (tax included)."""
    body = _object(body, None)
    _known(body, CHECKOUT_FIELDS)
    currency = _string(body, "currency", "currency", required=True)
    if currency not in CURRENCIES:
        raise bad_request("invalid_parameter", "currency", f"'{currency}' is not a supported currency.")
    for key in ("customerId", "sourceId", "email", "locale", "upstreamId", "applicationId", "browserIp", "id"):
        _string(body, key, key)
    customer_id = body.get("customerId")
    if isinstance(customer_id, str) and customer_id.startswith(INVALID_CUSTOMER_PREFIX):
        raise bad_request("invalid_parameter", "customerId", f"Customer '{customer_id}' not found.")
    charge_type = body.get("chargeType")
    if charge_type is not None and charge_type not in CHARGE_TYPES:
        raise bad_request("invalid_parameter", "chargeType",
                          f"'chargeType' must be one of {', '.join(CHARGE_TYPES)}.")
    customer_type = body.get("customerType")
    if customer_type is not None and customer_type not in CUSTOMER_TYPES:
        raise bad_request("invalid_parameter", "customerType",
                          f"'customerType' must be one of {', '.join(CUSTOMER_TYPES)}.")
    _metadata(body, "metadata")
    if body.get("taxInclusive") not in (None, False):
        raise bad_request("invalid_parameter", "taxInclusive", "The sandbox supports tax-exclusive prices only.")
    ship_country, bill_country = _country(body, "shipTo"), _country(body, "billTo")
    rate = tax_rate_for(ship_country or bill_country)

    raw_items = body.get("items")
    if raw_items is None:
        raise bad_request("missing_parameter", "items", "'items' is required.")
    if not isinstance(raw_items, list) or not raw_items:
        raise bad_request("invalid_parameter", "items", "'items' must be a non-empty list.")
    items = []
    subtotal = total_tax = Decimal(0)
    for i, raw in enumerate(raw_items):
        items.append(_checkout_item(raw, f"items[{i}]", rate))
        subtotal += items[-1]["_amount"]
        total_tax += items[-1]["_tax"]
    for item in items:
        item["amount"] = money(item.pop("_amount"))
        item["tax"]["amount"] = money(item.pop("_tax"))

    source_id = body.get("sourceId")
    total = subtotal + total_tax
    session_state = "requires_confirmation" if source_id or total == 0 else "requires_source"
    created = now_iso()
    checkout: dict[str, Any] = {
        "id": body.get("id") or new_id("chk_"),
        "createdTime": created,
        "updatedTime": created,
        "currency": currency,
        "items": items,
        "subtotal": money(subtotal),
        "totalTax": money(total_tax),
        "totalFees": 0,
        "totalDuty": 0,
        "totalDiscount": 0,
        "totalShipping": 0,
        "totalAmount": money(total),
        "payment": {
            "sources": [{"id": source_id, "type": "creditCard", "amount": money(total)}] if source_id else [],
            "session": {
                "id": new_id("ses_"),
                "state": session_state,
                "amountContributed": money(total) if source_id else 0,
                "amountRemainingToBeContributed": 0 if source_id else money(total),
            },
        },
        "sellingEntity": {"id": "DR_INC-ENTITY", "name": "Digital River Inc."},
        "liveMode": False,
    }
    for key in ("customerId", "email", "locale", "upstreamId", "chargeType", "customerType", "shipTo", "billTo",
                "metadata", "taxIdentifiers", "applicationId"):
        if body.get(key) is not None:
            checkout[key] = body[key]
    if source_id:
        checkout["sourceId"] = source_id
    return checkout


# What Digital River takes in an item's productDetails (GitBook product-management/using-product-details.md).
# taxCode, eccn and hsCode are SKU fields, not product-details fields: the SKU group carries them.
PRODUCT_DETAILS_FIELDS = frozenset({
    "id", "skuGroupId", "name", "description", "url", "countryOfOrigin", "image", "weight", "weightUnit",
    "partNumber", "itemBreadcrumb",
})


def _product_details(details: dict[str, Any], name: str) -> None:
    """Refuse productDetails as Digital River does: skuGroupId and countryOfOrigin missing are 400
    missing_parameter (with Digital River's own messages), a country that is not alpha-2 is invalid, name is
    required, and SKU-only fields are not product-details fields."""
    _known(details, PRODUCT_DETAILS_FIELDS, f"{name}.")
    if details.get("skuGroupId") is None:
        raise bad_request("missing_parameter", "skuGroupId", "An item of type sku is missing a skuGroupId parameter.")
    _string(details, "skuGroupId", f"{name}.skuGroupId", required=True)
    if details.get("countryOfOrigin") is None:
        raise bad_request("missing_parameter", "countryOfOrigin", "must not be null")
    country = details["countryOfOrigin"]
    if not isinstance(country, str) or len(country) != 2 or not country.isascii() or not country.isupper():
        raise bad_request("invalid_parameter", "countryOfOrigin", f"'{country}' is not a valid Country of Origin.")
    _string(details, "name", f"{name}.name", required=True)


def _checkout_item(raw: Any, name: str, rate: Decimal) -> dict[str, Any]:
    item = _object(raw, name)
    _known(item, ITEM_FIELDS, f"{name}.")
    sku_id = _string(item, "skuId", f"{name}.skuId")
    details = item.get("productDetails")
    if sku_id is None and details is None:
        raise bad_request("missing_parameter", f"{name}.skuId", f"'{name}.skuId' or '{name}.productDetails' "
                          "is required.")
    if details is not None:
        _product_details(_object(details, f"{name}.productDetails"), f"{name}.productDetails")
    if sku_id is not None and sku_id.startswith(INVALID_SKU_PREFIX):
        raise bad_request("invalid_parameter", f"{name}.skuId", f"SKU '{sku_id}' not found.")
    if "quantity" not in item:
        raise bad_request("missing_parameter", f"{name}.quantity", f"'{name}.quantity' is required.")
    quantity = _positive_int(item["quantity"], f"{name}.quantity")
    has_price, has_aggregate = item.get("price") is not None, item.get("aggregatePrice") is not None
    if has_price == has_aggregate:
        raise bad_request("missing_parameter" if not has_price else "invalid_parameter", f"{name}.price",
                          f"Exactly one of '{name}.price' and '{name}.aggregatePrice' is required.")
    if has_price:
        price = _number(item["price"], f"{name}.price")
        amount = (price * quantity).quantize(CENT, ROUND_HALF_UP)
    else:
        amount = _number(item["aggregatePrice"], f"{name}.aggregatePrice").quantize(CENT, ROUND_HALF_UP)
        price = (amount / quantity).quantize(CENT, ROUND_HALF_UP)
    info = item.get("subscriptionInfo")
    if info is not None:
        info = _object(info, f"{name}.subscriptionInfo")
        _known(info, SUBSCRIPTION_INFO_FIELDS, f"{name}.subscriptionInfo.")
        for key in ("subscriptionId", "billingAgreementId", "planId"):
            _string(info, key, f"{name}.subscriptionInfo.{key}")
        if info.get("autoRenewal") is not None and not isinstance(info["autoRenewal"], bool):
            raise bad_request("invalid_parameter", f"{name}.subscriptionInfo.autoRenewal",
                              f"'{name}.subscriptionInfo.autoRenewal' must be true or false.")
    _metadata(item, f"{name}.metadata")
    tax = (amount * rate).quantize(CENT, ROUND_HALF_UP)
    result: dict[str, Any] = {"id": new_numeric_id(), "quantity": quantity, "price": money(price),
                              "_amount": amount, "_tax": tax, "tax": {"rate": float(rate)}}
    if has_aggregate:
        result["aggregatePrice"] = money(amount)
    for key in ("skuId", "productDetails", "subscriptionInfo", "metadata"):
        if item.get(key) is not None:
            result[key] = item[key]
    return result


# -- orders ---------------------------------------------------------------------------------------------------


def scripted_outcome(checkout: dict[str, Any], amount_rules: bool) -> tuple[str, str]:
    """What POST /orders does with this checkout: ("decline", code), ("submit_failed", ""), or ("state", s)."""
    source_id = checkout.get("sourceId") or ""
    for prefix in DECLINE_PREFIXES:
        if source_id.startswith(prefix) and len(source_id) > len(prefix):
            return "decline", source_id[len(prefix):]
    if source_id.startswith(SUBMIT_FAILED_PREFIX):
        return "submit_failed", ""
    for prefix, state in STATE_PREFIXES.items():
        if source_id.startswith(prefix):
            return "state", state
    if amount_rules:
        for item in checkout["items"]:
            cents = Decimal(str(item["price"])) % 1
            rule = AMOUNT_RULES.get(cents)
            if rule is not None:
                return rule
    return "state", "accepted"


def build_order(checkout: dict[str, Any], state: str) -> dict[str, Any]:
    """The order a checkout becomes: its totals and items (new ids), ids carried, billing agreements set."""
    created = now_iso()
    items = []
    for source in checkout["items"]:
        item = {k: v for k, v in source.items() if k != "id"}
        item["id"] = new_numeric_id()
        item["state"] = "created"
        info = item.get("subscriptionInfo")
        if info is not None and not info.get("billingAgreementId"):
            # An acquisition order creates the billing agreement that renewals then quote.
            item["subscriptionInfo"] = {**info, "billingAgreementId": str(uuid.uuid4())}
        items.append(item)
    order = {k: v for k, v in checkout.items() if k not in ("id", "items", "createdTime", "updatedTime", "sourceId")}
    order.update({
        "id": new_numeric_id(),
        "checkoutId": checkout["id"],
        "createdTime": created,
        "updatedTime": created,
        "state": state,
        "stateTransitions": {state: created},
        "fraudState": "in_review" if state == "in_review" else "passed",
        "items": items,
        # One charge on the checkout's source (Digital River's Payments/Charge models): capturable once the order
        # is accepted, pending before. The sandbox does not move it on captures.
        "payment": {"sources": checkout.get("payment", {}).get("sources", []), "charges": [{
            "id": new_id("chg_"), "createdTime": created, "currency": checkout["currency"],
            "amount": checkout["totalAmount"], "state": "capturable" if state == "accepted" else "pending",
            "orderId": None, "sourceId": checkout.get("sourceId"), "captured": False, "refunded": False,
            "type": checkout.get("chargeType", "customer_initiated"), "liveMode": False}]},
    })
    order["payment"]["charges"][0]["orderId"] = order["id"]
    return order


# -- fulfillments ---------------------------------------------------------------------------------------------


def apply_fulfillment(body: Any, ledger: Ledger) -> dict[str, Any]:
    """Validate a POST /fulfillments body against the order's remaining quantities, apply it, return the answer.

    All-or-nothing: the first problem found is the one error entry answered, and nothing is changed.
    """
    body = _object(body, None)
    _known(body, FULFILLMENT_FIELDS)
    _metadata(body, "metadata")
    order_id = _string(body, "orderId", "orderId", required=True)
    assert order_id is not None
    for key in ("trackingCompany", "trackingNumber", "trackingUrl"):
        _string(body, key, key)
    raw_items = body.get("items")
    if raw_items is None:
        raise bad_request("missing_parameter", "items", "'items' is required.")
    if not isinstance(raw_items, list) or not raw_items:
        raise bad_request("invalid_parameter", "items", "'items' must be a non-empty list.")
    order = ledger.orders.get(order_id)
    if order is None:
        raise not_found(f"Order '{order_id}' not found.", "orderId")
    if order["state"] == "complete":
        # Digital River's words and parameter (as its Lightning connector's tests record them).
        raise conflict("order_complete", f"Resource '{order_id}' is already complete.", "orderId")
    if order["state"] == "cancelled":
        raise conflict("order_cancelled", f"Resource '{order_id}' is already cancelled.", "orderId")

    by_sku = {item.get("skuId"): item["id"] for item in order["items"] if item.get("skuId")}
    wanted: dict[str, list[int]] = {}  # item id → [quantity, cancelQuantity], summed over repeated entries
    answer_items = []
    for i, raw in enumerate(raw_items):
        name = f"items[{i}]"
        item = _object(raw, name)
        _known(item, FULFILLMENT_ITEM_FIELDS, f"{name}.")
        item_id = _string(item, "itemId", f"{name}.itemId")
        sku_id = _string(item, "skuId", f"{name}.skuId")
        if item_id is None:
            if sku_id is None:
                raise bad_request("missing_parameter", f"{name}.itemId", f"'{name}.itemId' is required.")
            item_id = by_sku.get(sku_id)
            if item_id is None:
                raise bad_request("invalid_parameter", f"{name}.skuId", f"Order has no item with SKU '{sku_id}'.")
        progress = ledger.items.get(item_id)
        if progress is None or progress.order_id != order_id:
            raise bad_request("invalid_parameter", f"{name}.itemId", f"Order has no item '{item_id}'.")
        quantity = _positive_int(item.get("quantity", 0), f"{name}.quantity", allow_zero=True)
        cancel = _positive_int(item.get("cancelQuantity", 0), f"{name}.cancelQuantity", allow_zero=True)
        if quantity == 0 and cancel == 0:
            raise bad_request("missing_parameter", f"{name}.quantity",
                              f"'{name}.quantity' or '{name}.cancelQuantity' must be greater than zero.")
        if quantity and order["state"] != "accepted":
            raise conflict("order_not_accepted", f"Order '{order_id}' is {order['state']}; only accepted orders "
                           "can be fulfilled.", f"{name}.quantity")
        totals = wanted.setdefault(item_id, [0, 0])
        totals[0] += quantity
        totals[1] += cancel
        _check_quantities(progress, item_id, totals[0] + totals[1], name)
        entry: dict[str, Any] = {"itemId": item_id}
        if quantity:
            entry["quantity"] = quantity
        if cancel:
            entry["cancelQuantity"] = cancel
        source = next(o for o in order["items"] if o["id"] == item_id)
        if source.get("skuId"):
            entry["skuId"] = source["skuId"]
        answer_items.append(entry)

    for item_id, (quantity, cancel) in wanted.items():
        progress = ledger.items[item_id]
        progress.fulfilled += quantity
        progress.cancelled += cancel
    _update_states(order, ledger)
    fulfillment: dict[str, Any] = {"id": new_id("ful_"), "orderId": order_id, "items": answer_items,
                                   "createdTime": now_iso(), "liveMode": False}
    for key in ("trackingCompany", "trackingNumber", "trackingUrl", "metadata"):
        if body.get(key) is not None:
            fulfillment[key] = body[key]
    return fulfillment


def _check_quantities(progress: ItemProgress, item_id: str, requested: int, name: str) -> None:
    if progress.remaining == 0:
        if progress.cancelled == progress.quantity:
            raise conflict("item_cancelled", f"Resource '{item_id}' is already cancelled.", "itemId")
        # Digital River names the item in the message, with `parameter` "itemId" (not its index in the request):
        # the answer Digital River's Lightning connector is written against (DRB2B_FulfillmentServiceTest).
        raise conflict("item_fulfilled", f"Resource '{item_id}' is already fulfilled.", "itemId")
    if requested > progress.remaining:
        raise conflict("quantity_too_large", f"Item '{item_id}' has {progress.remaining} left; {requested} "
                       "requested.", f"{name}.quantity")


def _update_states(order: dict[str, Any], ledger: Ledger) -> None:
    """Item states from their quantities; the order is `complete` or `cancelled` once nothing is left."""
    done = True
    all_cancelled = True
    for item in order["items"]:
        progress = ledger.items[item["id"]]
        if progress.remaining == 0:
            item["state"] = "cancelled" if progress.cancelled == progress.quantity else "fulfilled"
        else:
            done = False
        if progress.cancelled != progress.quantity:
            all_cancelled = False
    if done:
        state = "cancelled" if all_cancelled else "complete"
        if order.get("state") != state:
            set_order_state(order, state, ledger)


def scripted_settlement(checkout: dict[str, Any]) -> str | None:
    """The outcome an order from this checkout settles to by itself when its source scripts one
    (`src_settle_accept`, `src_settle_fail`, `src_settle_block`), else None (then `settle_to` applies)."""
    source_id = checkout.get("sourceId") or ""
    for prefix, outcome in SETTLE_PREFIXES.items():
        if source_id.startswith(prefix):
            return outcome
    return None


def set_order_state(order: dict[str, Any], state: str, ledger: Ledger | None = None) -> None:
    """Move the order to `state`. A pending charge moves with it (capturable when accepted, cancelled when the
    order is cancelled or blocked); a blocked order's fraudState is blocked, an in_review order accepted has
    passed. With a `ledger`, the state's event is emitted (ORDER_STATE_EVENTS; a state without one, none)."""
    stamp = now_iso()
    previous = order.get("state")
    order["state"] = state
    order["updatedTime"] = stamp
    order.setdefault("stateTransitions", {})[state] = stamp
    charges = order.get("payment", {}).get("charges") or []
    if charges and charges[0].get("state") == "pending":
        if state == "accepted":
            charges[0]["state"] = "capturable"
        elif state in ("cancelled", "blocked"):
            charges[0]["state"] = "cancelled"
    if state == "blocked":
        order["fraudState"] = "blocked"
    elif state == "accepted" and previous == "in_review":
        order["fraudState"] = "passed"
    if ledger is not None and state in ORDER_STATE_EVENTS:
        emit_order_event(ledger, ORDER_STATE_EVENTS[state], order)


# The charge can fail while the order is still open; not once it is complete, fulfilled or cancelled.
CHARGE_FAILABLE_STATES = frozenset({"pending_payment", "in_review", "accepted"})


def fail_charge(order: dict[str, Any], ledger: Ledger) -> None:
    """The order's charge fails: `payment.charges[0].state` becomes failed (event `order.charge.failed`), then
    the order is cancelled (`order.cancelled`). Which state Digital River gives an order after a failed charge
    is the sandbox's choice (docs/sandbox.md). Raises ValueError for an order that is no longer open."""
    if order.get("state") not in CHARGE_FAILABLE_STATES:
        raise ValueError(f"order {order.get('id')} is {order.get('state')}: its charge can no longer fail")
    charges = order.setdefault("payment", {}).setdefault("charges", [])
    if not charges:
        charges.append({"id": new_id("chg_"), "orderId": order.get("id"), "liveMode": False})
    charges[0]["state"] = "failed"
    order["updatedTime"] = now_iso()
    emit_order_event(ledger, "order.charge.failed", order)
    set_order_state(order, "cancelled", ledger)


def settle(order: dict[str, Any], outcome: str, ledger: Ledger) -> bool:
    """Settle a pending_payment or in_review order to `outcome` (one of SETTLE_OUTCOMES: accepted, charge_failed,
    blocked), emitting its events. False (and nothing done) when the order already left those states."""
    if outcome not in SETTLE_OUTCOMES:
        raise ValueError(f"unknown settle outcome {outcome!r}")
    if order.get("state") not in SETTLING_STATES:
        return False
    if outcome == "charge_failed":
        fail_charge(order, ledger)
    else:
        set_order_state(order, outcome, ledger)
    return True


# -- events ---------------------------------------------------------------------------------------------------

# The event each order state emits, when an order is created in it or moved to it.
ORDER_STATE_EVENTS = {
    "accepted": "order.accepted",
    "pending_payment": "order.pending_payment",
    "in_review": "order.review_opened",
    "cancelled": "order.cancelled",
    "blocked": "order.blocked",
    "complete": "order.complete",
    "fulfilled": "order.fulfilled",
}


def new_event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


def emit_order_event(ledger: Ledger, event_type: str, order: dict[str, Any]) -> dict[str, Any]:
    """Record an event about the order as it is now (a deep copy: later changes do not alter it), in Digital
    River's Event shape (DigitalRiver/digital-river-php docs/Model/Event.md, EventData.md)."""
    event: dict[str, Any] = {
        "id": new_event_id(),
        "type": event_type,
        "createdTime": ledger.next_event_time(),
        "data": {"object": json.loads(json.dumps(order))},
        "liveMode": False,
    }
    ledger.add_event(event)
    return event
