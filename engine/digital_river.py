"""The Digital River client: typed calls, errors as data, safe retries and the shared rate budget.

One `DigitalRiverClient` per process, on one aiohttp session, shared by every actor. It is built from plain
values (tests build it directly) or with `DigitalRiverClient.from_settings(settings, app_log)`, and opened with
`async with client:` (or `await client.start()` / `await client.close()`).

Calls
    create_checkout(body) -> Checkout        POST /checkouts        retried on transient failures
    create_order(checkout_id) -> Order       POST /orders           NEVER retried: the caller reconciles
    list_orders(checkout_id=, upstream_ids=, ids=, limit=) -> list[Order]
                                             GET /orders            retried
    get_order(order_id) -> Order             GET /orders/{id}       retried
    attach_source(checkout_id, source_id) -> str
                                             POST /checkouts/{id}/sources/{sourceId}
                                                                    retried (attaching twice is the same)
    create_fulfillment(body) -> Fulfillment  POST /fulfillments     NOT retried here: a repeat of a partial
                                                                    fulfillment reports it twice, so the caller
                                                                    (engine/fulfillment.py) looks first
    list_fulfillments(order_id) -> ([Fulfillment], has_more)
                                             GET /fulfillments      retried

Answers are parsed tolerantly into frozen dataclasses that keep the whole answer in `.raw`: unknown fields and
unknown enum values (an order state this code has never seen) pass through untouched. Only a missing or
mistyped field the jobs depend on (an `id`, a total, an item's quantity) makes the answer malformed, and so does
one the store could not keep: an id or state that is not 1-255 printable characters, a currency that is not
three letters, an amount that does not fit numeric(18,2), a quantity outside 0..2^31-1. An optional field
that cannot be used (an object where a string was expected) counts as absent.

Errors: one tree, every class carrying `status`, `type`, `code`, `parameter`, `message` and `kind`
(an `ErrorKind` the jobs switch on). `str(error)` names the call, the status and Digital River's words, on one
printable line of at most 1,000 characters (its message cut to 500, codes to 100), and never the API key or
the Authorization header, whatever Digital River (or a proxy) sent back.

    DigitalRiverError                 base; `kind` says what the caller should do
    ├── DeclinedError                 409 on POST /orders: the payment was declined and the checkout is burned.
    │                                 `.soft` is True for declines that may be retried a day later
    │                                 (insufficient_funds, do_not_honor, …) and False for hard ones (fraud,
    │                                 stop_recurring, …). A decline code in neither list (`failed-request`, a
    │                                 code Digital River adds later) is SOFT: the record is retried a day later,
    │                                 bounded by SUBSCRIPTION_RETRY_COUNT and the 4-in-30-days rule, which is
    │                                 safer than failing a subscription on a code we cannot read.
    ├── BadRequestError               400 and the other non-retryable 4xx (405, 406, 422, …): fix the data
    ├── NotFoundError                 404 (on POST /orders: that checkout already became an order)
    ├── ConflictError                 409 anywhere but POST /orders (fulfillments: item_fulfilled, …)
    ├── AuthError                     401, 403: our key is refused
    └── TransientError                connection errors, timeouts, 408, 429, 5xx; `.retry_after` in seconds
        └── MalformedResponseError    a 2xx whose body is not JSON or lacks a required field. On POST /orders
                                      the order may exist, so it is an unknown outcome like any transient
                                      failure: reconcile. Not retried by the client (a second look would most
                                      likely be just as malformed).

An error body that is not JSON (a proxy's HTML page, or JSON nested too deeply to parse) is classified by its
status like any other, with a message such as "HTTP 502 with a non-JSON body (text/html, 1234 bytes)".

Retries: transient failures of GETs, create_checkout and attach_source are retried up to `max_retries`
times with exponential backoff and full jitter (a uniform wait in [0, min(backoff_max, backoff_base·2^n)]).
A `Retry-After` header (seconds or an HTTP date) replaces the jittered wait; one longer than `backoff_max`
ends the retries at once, so a record does not hold a concurrency slot for minutes (its own backoff takes
over). create_order is never repeated: a second POST could charge twice, so the caller looks the order up;
create_fulfillment neither: engine/fulfillment.py looks for the fulfillment (by our metadata) before a repeat.

Rate: every request, retries included, first takes a token from one bucket shared by all callers of the
client (one client per storefront key, engine/storefronts.py). Its rate is the storefront's
DR_MAX_REQUESTS_PER_SECOND divided by the number of live engine processes holding the key (`set_share`, called
from the node heartbeat). A 429 pauses every request of the client until its whole
`Retry-After` (1 s when absent) has passed, because Digital River refuses every call with that key before that
time (its example is 120 s). The pause is capped only at RETRY_AFTER_CAP_SECONDS (an hour), so a Retry-After of
a year cannot freeze the process for good. A request made while more than `backoff_max` of a pause is left is not
sent and not waited for: it fails at once as a TransientError (code `rate_paused`), so the record holding it goes
back with its outage backoff instead of holding a concurrency slot through the pause. `on_rate_limited(seconds)`
tells the engine, which shares the pause with every other process on the database using the same key
(engine/rate_pauses.py); `pause_for` applies a pause another process met. `Retry-After` is read as delta-seconds
(digits, optionally a fraction) or an HTTP date; anything else ("-1", "1e3", "inf") is absent.

Logging: each failed call writes ONE `application_logs` row after its retries are spent (not one per attempt),
level ERROR, module `digital-river`, message `dr_request_failed`, with the status, the request
(method, path, body; never headers) and the response body, redacted: the parsed body when it is at most
16 KB, nested at most 32 deep and storable as jsonb (no NUL, no lone surrogate, no NaN), else
`{"excerpt": <its first 2,000 characters>, "bytes": <its size>}`. Every attempt logs a structlog DEBUG
event `dr_request` (method, path, status, ms); nothing above DEBUG is logged per request.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import hashlib
import math
import random
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import aiohttp
import orjson
import structlog
from yarl import URL

from engine import __version__
from engine.logs import AppLogSink, redact, redact_text, register_secrets
from engine.money import cents
from engine.settings import DEFAULT_STOREFRONT, DR_API_VERSION_BUILT_FOR

if TYPE_CHECKING:
    from engine.metrics import Metrics
    from engine.settings import Settings, StorefrontSettings

__all__ = [
    "AuthError",
    "BadRequestError",
    "Checkout",
    "CheckoutItem",
    "ClientStats",
    "ConflictError",
    "DeclinedError",
    "DigitalRiverClient",
    "DigitalRiverError",
    "ErrorKind",
    "Fulfillment",
    "FulfillmentItem",
    "MalformedResponseError",
    "NotFoundError",
    "Order",
    "OrderItem",
    "TokenBucket",
    "TransientError",
    "decline_is_classified",
    "decline_is_soft",
    "dr_message",
    "parse_checkout",
    "parse_fulfillment",
    "parse_order",
    "parse_order_list",
    "parse_retry_after",
    "parse_source_id",
]

T = TypeVar("T")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# Digital River's table of decline codes for merchant-initiated charges, exactly as its guide gives it
# (DigitalRiver/GitBook `payments/authorization-declines.md`, "Decline codes for merchant-initiated
# transactions"; docs/digital-river.md). Soft: may be retried, at most once a day and four times in 30 days per
# subscription. Hard: never retried. Any other code is unclassified: treated as soft within the same limits, and
# the record's message names it. Codes are compared after lower-casing and turning '-' into '_', since Digital
# River spells some with hyphens (`failed-request`).
SOFT_DECLINE_CODES = frozenset({
    "card_expired", "card_limit_exceeded", "card_velocity_exceeded", "do_not_honor", "insufficient_funds",
    "issuer_unavailable", "limit_exceeded", "mid_limit_exceeded", "no_response", "pin_try_exceeded",
})
HARD_DECLINE_CODES = frozenset({
    "account_closed", "card_type_block", "declined", "fraud", "fraud_block", "invalid_address", "invalid_amount",
    "invalid_card_bin", "invalid_card_number", "invalid_currency", "invalid_expiration_date", "invalid_pin",
    "invalid_security_code", "invalid_transaction_type", "issuer_invalid_card", "issuer_not_found",
    "lost_stolen_card", "restricted_card", "stop_recurring", "voice_authorization_required",
})

DEFAULT_RETRY_AFTER_429 = 1.0
# The longest pause a 429 imposes: Retry-After is honoured in full up to an hour (Digital River's example is
# 120 s); anything longer is taken as an hour, after which the next 429 pauses again.
RETRY_AFTER_CAP_SECONDS = 3600.0
# What an answer may carry and still be kept. Digital River's words go into error messages, codes and log rows:
# they are kept on one line and cut to these lengths. Ids and states longer than MAX_ID_CHARS are not ids (and
# would not fit a btree index); amounts must fit numeric(18,2) and quantities an integer column.
MAX_MESSAGE_CHARS = 500
MAX_LABEL_CHARS = 100
MAX_STR_CHARS = 1000
MAX_ID_CHARS = 255
MAX_AMOUNT = Decimal("9999999999999999.99")  # numeric(18,2), after PostgreSQL rounds to the cent
MAX_QUANTITY = 2**31 - 1
# An error body larger than this (or nested deeper, or holding what PostgreSQL's jsonb refuses: \u0000 and
# surrogate escapes) is kept for the application log as a text excerpt rather than as the parsed body.
MAX_LOGGED_BODY_BYTES = 16_384
MAX_LOGGED_DEPTH = 32
# Requests are spaced evenly with no burst, at a little under the budget: Digital River counts requests per
# second as they arrive, and sends that leave on time can still arrive bunched when the event loop is busy. At a
# 250/s budget this sends at most 245/s (measured: no 429s against a strict fixed-window limiter).
BURST_SECONDS = 0.0
RATE_HEADROOM = 0.98


def decline_is_soft(code: str | None) -> bool:
    """Whether a 409 decline code on POST /orders may be retried later: every code but Digital River's hard ones
    (unclassified codes too, within the same limits)."""
    if not code:
        return True
    return _normal_code(code) not in HARD_DECLINE_CODES


def decline_is_classified(code: str | None) -> bool:
    """Whether Digital River's table for merchant-initiated charges lists the code (as soft or as hard)."""
    return bool(code) and _normal_code(code or "") in SOFT_DECLINE_CODES | HARD_DECLINE_CODES


def _normal_code(code: str) -> str:
    return code.strip().lower().replace("-", "_")


# ---------------------------------------------------------------------------------------------------------------
# Errors


class ErrorKind(enum.Enum):
    """What a failed call means for the caller."""

    SOFT_DECLINE = "soft_decline"
    HARD_DECLINE = "hard_decline"
    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    AUTH = "auth"
    TRANSIENT = "transient"
    MALFORMED = "malformed"


class DigitalRiverError(Exception):
    """Base of every error the client raises. See the module docstring for the tree."""

    kind: ErrorKind = ErrorKind.TRANSIENT

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        code: str | None = None,
        parameter: str | None = None,
        method: str | None = None,
        path: str | None = None,
        response: Any = None,
    ) -> None:
        # Every text here may come from Digital River (or a proxy in front of it): one line, cut, no secrets.
        self.message = _one_line(message, MAX_MESSAGE_CHARS) or "no message"
        super().__init__(self.message)
        self.status = status
        self.type = _label(error_type)
        self.code = _label(code)
        self.parameter = _label(parameter)
        self.method = method
        self.path = path
        # The parsed error body (or a short text excerpt), for the application log.
        self.response = response
        self.attempts = 1

    def __str__(self) -> str:
        parts = []
        if self.method and self.path:
            parts.append(f"{self.method} {self.path}:")
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        label = "/".join(p for p in (self.type, self.code) if p)
        if label:
            parts.append(label)
        if self.parameter:
            parts.append(f"[{self.parameter}]")
        text = " ".join(parts)
        text = f"{text}: {self.message}" if text else self.message
        if self.attempts > 1:
            text += f" (after {self.attempts} attempts)"
        return _one_line(text, MAX_STR_CHARS)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


def dr_message(exc: DigitalRiverError) -> str:
    """Digital River's words for a failed call, with the status, code and parameter: what a record's message
    says (`Digital River 409 insufficient_funds: …`)."""
    where = f" (parameter {exc.parameter})" if exc.parameter else ""
    status = f" {exc.status}" if exc.status else ""
    return f"Digital River{status} {exc.code or exc.type or 'error'}{where}: {exc.message}"


def _one_line(text: str, limit: int) -> str:
    """`text` redacted, on one printable line, at most `limit` characters."""
    text = redact_text(text)[: limit * 4]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else " " for c in text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _label(value: str | None) -> str | None:
    """A code, type or parameter name as kept on an error: short, one line, None when empty."""
    return (_one_line(value, MAX_LABEL_CHARS) or None) if value else None


class DeclinedError(DigitalRiverError):
    """409 on POST /orders: no order, the checkout is burned. `.soft` says whether a later retry is allowed."""

    kind = ErrorKind.SOFT_DECLINE  # per instance: HARD_DECLINE for the hard codes

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.soft = decline_is_soft(self.code)
        # False for a code Digital River's table does not list: soft within the limits, and said so.
        self.classified = decline_is_classified(self.code)
        self.kind = ErrorKind.SOFT_DECLINE if self.soft else ErrorKind.HARD_DECLINE


class BadRequestError(DigitalRiverError):
    """400 and other 4xx that repeating cannot fix; `parameter` names the field when Digital River does."""

    kind = ErrorKind.BAD_REQUEST


class NotFoundError(DigitalRiverError):
    """404. On POST /orders it means the checkout was already turned into an order."""

    kind = ErrorKind.NOT_FOUND


class ConflictError(DigitalRiverError):
    """409 outside order creation, e.g. `item_fulfilled`, `order_cancelled`, `quantity_too_large`."""

    kind = ErrorKind.CONFLICT


class AuthError(DigitalRiverError):
    """401 or 403: the key is refused. The jobs stop claiming work."""

    kind = ErrorKind.AUTH


class TransientError(DigitalRiverError):
    """Connection error, timeout, 408, 429 or 5xx. On POST /orders the outcome is unknown: reconcile."""

    kind = ErrorKind.TRANSIENT

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after

    @property
    def rate_limited(self) -> bool:
        """Refused for Digital River's rate limit (a 429), or not sent at all because the key waits out a 429's
        pause (`rate_paused`): either way Digital River did nothing, so nothing needs looking up."""
        return self.status == 429 or self.code == "rate_paused"

    def rate_wait(self, absent: float) -> timedelta:
        """How long a caller waits before trying again after this rate-limit refusal: its Retry-After, or `absent`
        seconds without one, from 1 s to RETRY_AFTER_CAP_SECONDS."""
        seconds = absent if self.retry_after is None else self.retry_after
        return timedelta(seconds=min(max(seconds, 1.0), RETRY_AFTER_CAP_SECONDS))


class MalformedResponseError(TransientError):
    """A 2xx answer that is not JSON or lacks a field the jobs need; `parameter` names the field."""

    kind = ErrorKind.MALFORMED


# ---------------------------------------------------------------------------------------------------------------
# Answers


@dataclass(frozen=True, slots=True)
class CheckoutItem:
    id: str
    sku_id: str | None
    quantity: int
    price: Decimal | None
    amount: Decimal | None
    tax_amount: Decimal
    billing_agreement_id: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Checkout:
    id: str
    currency: str
    subtotal: Decimal
    total_tax: Decimal
    total_amount: Decimal
    items: tuple[CheckoutItem, ...]
    payment_session_state: str | None
    upstream_id: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class OrderItem:
    id: str
    sku_id: str | None
    quantity: int
    amount: Decimal
    tax_amount: Decimal
    state: str | None
    billing_agreement_id: str | None
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Order:
    id: str
    state: str
    checkout_id: str | None
    upstream_id: str | None
    customer_id: str | None
    currency: str
    subtotal: Decimal
    total_tax: Decimal
    total_amount: Decimal
    items: tuple[OrderItem, ...]
    raw: dict[str, Any] = field(repr=False, compare=False)
    # The fraud review state (`fraudState`) and the state of the order's first payment charge
    # (`payment.charges[0].state`: pending, capturable, processing, complete, cancelled, failed). Digital River's
    # Order and Charge models (DigitalRiver/digital-river-php docs/Model/Order.md, Charge.md). None when absent.
    fraud_state: str | None = None
    charge_state: str | None = None


@dataclass(frozen=True, slots=True)
class FulfillmentItem:
    item_id: str | None
    sku_id: str | None
    quantity: int
    cancel_quantity: int
    raw: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Fulfillment:
    id: str
    order_id: str
    items: tuple[FulfillmentItem, ...]
    raw: dict[str, Any] = field(repr=False, compare=False)
    # Key-value pairs given with the request (Fulfillment.metadata in DigitalRiver/digital-river-php): the
    # engine's record ids, so a fulfillment can be told as ours after a crash.
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)


def _missing(name: str, what: str = "lacks required field") -> MalformedResponseError:
    return MalformedResponseError(f"response {what} {name!r}", error_type="malformed_response",
                                  code="missing_field", parameter=name)


def _invalid(name: str, why: str) -> MalformedResponseError:
    return MalformedResponseError(f"response field {name!r} {why}", error_type="malformed_response",
                                  code="invalid_field", parameter=name)


def _id_text(value: Any) -> str | None:
    """An id, state or code as text: a non-empty string of printable characters (or a whole number), not too
    long to store and index. None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):  # an id sent as a number is still an id
        value = str(value)
    if isinstance(value, str) and value and len(value) <= MAX_ID_CHARS and value.isprintable():
        return value
    return None


def _obj(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _missing(name, "has no object at")
    return value


def _req_str(obj: Mapping[str, Any], key: str, name: str) -> str:
    value = obj.get(key)
    text = _id_text(value)
    if text is not None:
        return text
    if value is None or value == "":
        raise _missing(name)
    raise _invalid(name, f"is not an id of at most {MAX_ID_CHARS} printable characters")


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    """An optional id or state of an answer; a value that cannot be one (an object, a control character, a
    megabyte of text) counts as absent rather than making the whole answer malformed."""
    return _id_text(obj.get(key))


def _req_currency(obj: Mapping[str, Any], key: str, name: str) -> str:
    value = _req_str(obj, key, name)
    if len(value) != 3 or not value.isascii() or not value.isalpha():
        raise _invalid(name, "is not a three-letter currency code")
    return value


def _to_decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, str)):
        try:
            result = Decimal(str(value))  # str() of a float is its shortest repr: 10.99, not 10.9900000001
        except (InvalidOperation, ValueError):
            return None
        if not result.is_finite() or abs(result) >= 10**16 or \
                abs(cents(result)) > MAX_AMOUNT:
            return None
        exponent = result.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -6:  # 1E-999999 is a number PostgreSQL will not read
            result = result.quantize(Decimal("1e-6"))
        return result
    return None


def _req_money(obj: Mapping[str, Any], key: str, name: str) -> Decimal:
    raw = obj.get(key)
    value = _to_decimal(raw)
    if value is None:
        if raw is None:
            raise _missing(name)
        raise _invalid(name, f"is not an amount of at most {MAX_AMOUNT}")
    return value


def _opt_money(obj: Mapping[str, Any], key: str) -> Decimal | None:
    return _to_decimal(obj.get(key))


def _to_quantity(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 0 <= value <= MAX_QUANTITY:
        return value
    return None


def _req_int(obj: Mapping[str, Any], key: str, name: str) -> int:
    raw = obj.get(key)
    value = _to_quantity(raw)
    if value is None:
        if raw is None:
            raise _missing(name)
        raise _invalid(name, f"is not a whole number from 0 to {MAX_QUANTITY}")
    return value


def _opt_int(obj: Mapping[str, Any], key: str) -> int:
    return _to_quantity(obj.get(key)) or 0


def _tax_amount(item: Mapping[str, Any], name: str) -> Decimal:
    return _req_money(_obj(item.get("tax"), f"{name}.tax"), "amount", f"{name}.tax.amount")


def _billing_agreement(item: Mapping[str, Any]) -> str | None:
    info = item.get("subscriptionInfo")
    return _opt_str(info, "billingAgreementId") if isinstance(info, dict) else None


def _items(body: Mapping[str, Any]) -> list[Any]:
    items = body.get("items", [])
    if not isinstance(items, list):
        raise _missing("items", "has no list at")
    return items


def parse_checkout(body: Any) -> Checkout:
    """A `Checkout` from a checkout answer; raises `MalformedResponseError` naming a missing field."""
    body = _obj(body, "checkout")
    items = []
    for i, raw_item in enumerate(_items(body)):
        name = f"items[{i}]"
        item = _obj(raw_item, name)
        items.append(CheckoutItem(
            id=_req_str(item, "id", f"{name}.id"),
            sku_id=_opt_str(item, "skuId"),
            quantity=_req_int(item, "quantity", f"{name}.quantity"),
            price=_opt_money(item, "price"),
            amount=_opt_money(item, "amount"),
            tax_amount=_tax_amount(item, name),
            billing_agreement_id=_billing_agreement(item),
            raw=item,
        ))
    payment = body.get("payment")
    session = payment.get("session") if isinstance(payment, dict) else None
    return Checkout(
        id=_req_str(body, "id", "id"),
        currency=_req_currency(body, "currency", "currency"),
        subtotal=_req_money(body, "subtotal", "subtotal"),
        total_tax=_req_money(body, "totalTax", "totalTax"),
        total_amount=_req_money(body, "totalAmount", "totalAmount"),
        items=tuple(items),
        payment_session_state=_opt_str(session, "state") if isinstance(session, dict) else None,
        upstream_id=_opt_str(body, "upstreamId"),
        raw=body,
    )


def parse_order(body: Any, where: str = "") -> Order:
    """An `Order` from an order answer (or one element of a list, `where` naming it)."""
    body = _obj(body, where or "order")
    items = []
    for i, raw_item in enumerate(_items(body)):
        name = f"{where}items[{i}]"
        item = _obj(raw_item, name)
        items.append(OrderItem(
            id=_req_str(item, "id", f"{name}.id"),
            sku_id=_opt_str(item, "skuId"),
            quantity=_req_int(item, "quantity", f"{name}.quantity"),
            amount=_req_money(item, "amount", f"{name}.amount"),
            tax_amount=_tax_amount(item, name),
            state=_opt_str(item, "state"),
            billing_agreement_id=_billing_agreement(item),
            raw=item,
        ))
    return Order(
        id=_req_str(body, "id", f"{where}id"),
        state=_req_str(body, "state", f"{where}state"),
        checkout_id=_opt_str(body, "checkoutId"),
        upstream_id=_opt_str(body, "upstreamId"),
        customer_id=_opt_str(body, "customerId"),
        currency=_req_currency(body, "currency", f"{where}currency"),
        subtotal=_req_money(body, "subtotal", f"{where}subtotal"),
        total_tax=_req_money(body, "totalTax", f"{where}totalTax"),
        total_amount=_req_money(body, "totalAmount", f"{where}totalAmount"),
        items=tuple(items),
        raw=body,
        fraud_state=_opt_str(body, "fraudState"),
        charge_state=_first_charge_state(body),
    )


def _first_charge_state(body: Mapping[str, Any]) -> str | None:
    payment = body.get("payment")
    charges = payment.get("charges") if isinstance(payment, dict) else None
    if isinstance(charges, list) and charges and isinstance(charges[0], dict):
        return _opt_str(charges[0], "state")
    return None


def parse_source_id(body: Any) -> str:
    """The `id` of a source answer; raises `MalformedResponseError` without one."""
    return _req_str(_obj(body, "source"), "id", "source.id")


def parse_order_list(body: Any) -> list[Order]:
    """The orders of a `{hasMore, data}` list envelope."""
    return _list_page(body, parse_order)[0]


def parse_fulfillment(body: Any, where: str = "") -> Fulfillment:
    """A `Fulfillment` from a fulfillment answer (or one element of a list, `where` naming it)."""
    body = _obj(body, where or "fulfillment")
    items = []
    for i, raw_item in enumerate(_items(body)):
        item = _obj(raw_item, f"{where}items[{i}]")
        items.append(FulfillmentItem(
            item_id=_opt_str(item, "itemId"),
            sku_id=_opt_str(item, "skuId"),
            quantity=_opt_int(item, "quantity"),
            cancel_quantity=_opt_int(item, "cancelQuantity"),
            raw=item,
        ))
    metadata = body.get("metadata")
    return Fulfillment(
        id=_req_str(body, "id", f"{where}id"),
        order_id=_req_str(body, "orderId", f"{where}orderId"),
        items=tuple(items),
        raw=body,
        metadata=metadata if isinstance(metadata, dict) else {},
    )


@dataclass(frozen=True, slots=True)
class Event:
    """A Digital River event (Event in DigitalRiver/digital-river-php: id, type, data.object, createdTime)."""

    id: str
    type: str
    created_time: datetime | None
    object: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False, compare=False)


def parse_event(body: Any, where: str = "") -> Event:
    """An `Event` from an event (a webhook's body, or one element of GET /events); MalformedResponseError names
    what is missing. `createdTime` that cannot be read counts as absent."""
    body = _obj(body, where or "event")
    data = body.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    return Event(id=_req_str(body, "id", f"{where}id"), type=_req_str(body, "type", f"{where}type"),
                 created_time=_opt_time(body.get("createdTime")), object=obj if isinstance(obj, dict) else None,
                 raw=body)


def _opt_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not 10 <= len(value) <= 40:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _list_page(body: Any, parse: Callable[[Any, str], T]) -> tuple[list[T], bool]:
    """The elements of a `{hasMore, data}` list envelope, each parsed with `parse`, and `hasMore`."""
    envelope = _obj(body, "list")
    data = envelope.get("data")
    if not isinstance(data, list):
        raise _missing("data")
    return [parse(element, f"data[{i}].") for i, element in enumerate(data)], envelope.get("hasMore") is True


def parse_event_list(body: Any) -> tuple[list[Event], bool]:
    """The events of a `{hasMore, data}` list envelope (ListEventsResponse), and `hasMore`."""
    return _list_page(body, parse_event)


def parse_fulfillment_list(body: Any) -> tuple[list[Fulfillment], bool]:
    """The fulfillments of a `{hasMore, data}` list envelope (ListFulfillmentsResponse), and `hasMore`."""
    return _list_page(body, parse_fulfillment)


# ---------------------------------------------------------------------------------------------------------------
# Rate budget


class TokenBucket:
    """A token bucket shared by every caller, fair in arrival order, with a pause for 429s.

    Implemented as a virtual schedule (GCRA): each `acquire` reserves the next free slot at once and sleeps
    until it, so callers are served in order without a lock and the fast path does not await anything.

    The schedule spaces reservations, not sends: a stall of the event loop (a garbage collection, a busy CPU) wakes
    every caller whose slot fell due during it at once. So a second gate counts the sends themselves: at most
    `rate` (rounded down) in any one second by this clock (the times of the last ones, in a ring). Evenly spaced
    sends never meet it; after a 50 ms stall at 245/s it spreads the dozen callers woken together over the next
    second instead of letting them all into the second Digital River is counting (issue 17's benchmark: the
    bursts after the engine's collections were its 429s).
    """

    def __init__(self, rate: float, *, burst_seconds: float = BURST_SECONDS, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self._burst_seconds = burst_seconds
        self._tat = clock()  # theoretical arrival time of the next request
        self._paused_until = 0.0
        self.rate = rate
        self._interval = 0.0
        self._tolerance = 0.0
        self._sent: deque[float] = deque(maxlen=1)
        self.set_rate(rate)

    def set_rate(self, rate: float) -> None:
        """Change the rate (requests per second) from now on."""
        if not rate > 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = rate
        self._interval = 1.0 / rate
        burst = max(1.0, rate * self._burst_seconds)
        self._tolerance = (burst - 1.0) * self._interval
        per_second = max(1, int(rate * (1.0 + self._burst_seconds)))
        if self._sent.maxlen != per_second:
            self._sent = deque(self._sent, maxlen=per_second)

    def pause(self, seconds: float) -> None:
        """Refuse every token until `seconds` from now; after it, tokens resume at the rate without a burst."""
        until = self._clock() + max(0.0, seconds)
        if until > self._paused_until:
            self._paused_until = until
            self._tat = max(self._tat, until + self._tolerance)

    @property
    def paused_until(self) -> float:
        return self._paused_until

    def now(self) -> float:
        """The bucket's clock, the one `paused_until` is on."""
        return self._clock()

    async def acquire(self) -> float:
        """Wait for a token; return the seconds spent waiting."""
        waited = 0.0
        while True:
            now = self._clock()
            if now < self._paused_until:
                delay = self._paused_until - now
                waited += delay
                await self._sleep(delay)
                continue
            tat = self._tat if self._tat > now else now
            self._tat = tat + self._interval
            delay = tat - self._tolerance - now
            if delay > 0:
                waited += delay
                await self._sleep(delay)
                if self._clock() < self._paused_until:
                    # A 429 paused the client while this caller slept: its slot is void, take a new one after it.
                    continue
            gated = await self._send_gate()
            if gated is None:
                continue  # paused by a 429 while it waited at the gate
            return waited + gated

    async def _send_gate(self) -> float | None:
        """Wait until fewer than the per-second cap were sent in the last second, and count this send; None when a
        429 pause began meanwhile (the caller takes a new slot after it)."""
        waited = 0.0
        sent = self._sent
        while True:
            now = self._clock()
            if now < self._paused_until:
                return None
            if len(sent) == sent.maxlen and now - sent[0] < 1.0 - 1e-6:  # a microsecond's slack for float sums
                delay = sent[0] + 1.0 - now
                waited += delay
                await self._sleep(delay)
                continue
            sent.append(now)
            return waited


@dataclass
class ClientStats:
    """Counters for /metrics. `requests` is keyed by (endpoint, status), status being the HTTP status as text
    or `timeout` / `connection_error` when no answer came."""

    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    retries: int = 0
    rate_limit_wait_seconds: float = 0.0
    rate_limited: int = 0  # 429 answers


# ---------------------------------------------------------------------------------------------------------------
# The client


# HTTP's delta-seconds (digits), plus a fraction, which the sandbox sends for fast tests. "-1", "1e3", "inf",
# "nan" and "1_000" are garbage, not numbers.
_DELTA_SECONDS = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")


def parse_retry_after(value: str | None, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta seconds or an HTTP date); None when absent or garbage."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - now()).total_seconds())
    except (TypeError, ValueError, IndexError, OverflowError):  # OverflowError: year 99999999999
        return None


class DigitalRiverClient:
    """The Digital River API client. See the module docstring for calls, errors, retries and rate."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        api_version: str | None = DR_API_VERSION_BUILT_FOR,
        timeout_seconds: float = 30.0,
        max_requests_per_second: float = 20.0,
        connection_limit: int = 100,
        app_log: AppLogSink | None = None,
        app_version: str = __version__,
        max_retries: int = 3,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("a Digital River API key is required")
        register_secrets([api_key])
        self.base_url = base_url.rstrip("/")
        self.api_version = api_version
        self.timeout_seconds = timeout_seconds
        self.max_requests_per_second = max_requests_per_second
        self.connection_limit = connection_limit
        self.app_log = app_log
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.bucket = TokenBucket(max_requests_per_second * RATE_HEADROOM, clock=clock, sleep=sleep)
        self.stats = ClientStats()
        self._headers = {
            "Authorization": f"Bearer {api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "upstream-application-id": f"drjobs/{app_version}",
        }
        if api_version:
            self._headers["digitalriver-version"] = api_version
        self._urls: dict[str, URL] = {}
        self._session: aiohttp.ClientSession | None = None
        # The engine's Metrics (engine.metrics), when it has one: every answer's endpoint, status and latency.
        self.metrics: Metrics | None = None
        # Whether the last answer was a 401/403: /readyz reports it; any 2xx clears it (a rotated key recovers).
        self.key_refused = False
        self._log: Any = None
        # Called with the pause in seconds whenever Digital River answers 429 (the engine shares it).
        self.on_rate_limited: Callable[[float], Any] | None = None
        # Names the key in a shared pause without being the key: the first 16 hex digits of its SHA-256.
        self.key_id = hashlib.sha256(api_key.encode()).hexdigest()[:16]
        # The storefront (label, engine/storefronts.py) whose key this is: in its failure logs and pauses.
        self.storefront = DEFAULT_STOREFRONT

    @classmethod
    def from_settings(cls, settings: Settings, app_log: AppLogSink | None = None,
                      storefront: StorefrontSettings | None = None) -> DigitalRiverClient:
        """The client of `storefront` (default: DefaultStore's, DR_API_KEY and its siblings): connections enough
        for every job's concurrency (at least 16)."""
        config = storefront or settings.storefronts.get(DEFAULT_STOREFRONT)
        if config is None or not config.api_key:
            raise ValueError("a Digital River API key is required to talk to Digital River")
        connections = max(16, sum(job.concurrency for job in settings.jobs.values()))
        client = cls(
            config.api_url,
            config.api_key,
            api_version=settings.dr_api_version,
            timeout_seconds=settings.dr_timeout_seconds,
            max_requests_per_second=config.max_requests_per_second,
            connection_limit=connections,
            app_log=app_log,
        )
        client.storefront = config.label
        return client

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP session (idempotent)."""
        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(limit=self.connection_limit, limit_per_host=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout_seconds),
            # Keep the wire small and the per-request work smaller: no cookies to parse or store.
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )
        # A concrete logger now, so a filtered-out DEBUG call costs one no-op method call per request.
        self._log = structlog.get_logger("digital-river").bind()

    async def close(self) -> None:
        """Close the HTTP session; in-flight calls fail."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> DigitalRiverClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def pause_for(self, seconds: float) -> None:
        """Hold every request for `seconds` (a 429 another process met with this key), at most an hour."""
        self.bucket.pause(min(max(0.0, seconds), RETRY_AFTER_CAP_SECONDS))

    def paused_for(self) -> float:
        """Seconds left of a 429 pause (0 when none): a storefront paused this long does not claim records."""
        return max(0.0, self.bucket.paused_until - self.bucket.now())

    def set_share(self, live_nodes: int) -> None:
        """Use 1/`live_nodes` of the cluster's DR_MAX_REQUESTS_PER_SECOND (called from the node heartbeat)."""
        self.bucket.set_rate(self.max_requests_per_second * RATE_HEADROOM / max(1, live_nodes))

    # -- typed calls ------------------------------------------------------------------------------------------

    async def create_checkout(self, body: Mapping[str, Any]) -> Checkout:
        """POST /checkouts. Retried on transient failures (an extra checkout costs nothing)."""
        return await self._call("POST", "/checkouts", "POST /checkouts", parse_checkout, body=body, retry=True)

    async def create_order(self, checkout_id: str) -> Order:
        """POST /orders {checkoutId}. Never retried: on TransientError the outcome is unknown; look it up."""
        return await self._call("POST", "/orders", "POST /orders", parse_order,
                                body={"checkoutId": checkout_id}, retry=False)

    async def list_orders(
        self,
        *,
        checkout_id: str | None = None,
        upstream_ids: str | Sequence[str] | None = None,
        ids: str | Sequence[str] | None = None,
        limit: int = 100,
    ) -> list[Order]:
        """GET /orders filtered by checkout id, upstream ids and/or order ids: the first page (up to `limit`)."""
        if not 1 <= limit <= 100:
            raise ValueError(f"limit must be 1..100, got {limit}")
        params = {"limit": str(limit)}
        if checkout_id is not None:
            params["checkoutId"] = checkout_id
        if upstream_ids is not None:
            params["upstreamIds"] = _csv(upstream_ids)
        if ids is not None:
            params["ids"] = _csv(ids)
        return await self._call("GET", "/orders", "GET /orders", parse_order_list, params=params, retry=True)

    async def attach_source(self, checkout_id: str, source_id: str) -> str:
        """POST /checkouts/{id}/sources/{sourceId}: charge this source when the checkout is submitted; the source's
        id as answered. Digital River's Checkouts API (`attachSourceToCheckout` in DigitalRiver/digital-river-php,
        "Attaching sources to checkouts" in the DigitalRiver/GitBook guides). 404: the checkout is unknown or
        already became an order."""
        path = f"/checkouts/{quote(checkout_id, safe='')}/sources/{quote(source_id, safe='')}"
        return await self._call("POST", path, "POST /checkouts/{id}/sources/{sourceId}", parse_source_id,
                                retry=True)

    async def get_order(self, order_id: str) -> Order:
        """GET /orders/{id}."""
        return await self._call("GET", "/orders/" + quote(order_id, safe=""), "GET /orders/{id}", parse_order,
                                retry=True)

    async def create_fulfillment(self, body: Mapping[str, Any]) -> Fulfillment:
        """POST /fulfillments. Never retried here: a repeat of a partial fulfillment that went through reports its
        quantities twice (nothing answers 409 while quantity is left), so after a TransientError the outcome is
        unknown; engine/fulfillment.py looks for it (`list_fulfillments`) before it sends again."""
        return await self._call("POST", "/fulfillments", "POST /fulfillments", parse_fulfillment, body=body,
                                retry=False)

    async def list_fulfillments(self, order_id: str, *, starting_after: str | None = None,
                                limit: int = 100) -> tuple[list[Fulfillment], bool]:
        """GET /fulfillments?orderId=: one page of the order's fulfillments (up to `limit`) and whether more follow
        (`startingAfter` the last id). Digital River's `listFulfillments` (DigitalRiver/digital-river-php,
        docs/Api/FulfillmentsApi.md)."""
        if not 1 <= limit <= 100:
            raise ValueError(f"limit must be 1..100, got {limit}")
        params = {"orderId": order_id, "limit": str(limit)}
        if starting_after is not None:
            params["startingAfter"] = starting_after
        return await self._call("GET", "/fulfillments", "GET /fulfillments", parse_fulfillment_list, params=params,
                                retry=True)

    async def list_events(self, *, created_since: datetime, types: Sequence[str] = (),
                          starting_after: str | None = None, limit: int = 100) -> tuple[list[Event], bool]:
        """GET /events: one page (newest first) of the events created at or after `created_since`, of `types`
        when given, and whether more follow (`startingAfter` the last id). Digital River's `listEvents`
        (DigitalRiver/digital-river-php, docs/Api/EventsApi.md: `createdTime[gte]`, `types`, cursors)."""
        if not 1 <= limit <= 100:
            raise ValueError(f"limit must be 1..100, got {limit}")
        since = created_since.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        params = {"createdTime[gte]": since, "limit": str(limit)}
        if types:
            params["types"] = ",".join(types)
        if starting_after is not None:
            params["startingAfter"] = starting_after
        return await self._call("GET", "/events", "GET /events", parse_event_list, params=params, retry=True)

    async def wait_to_retry(self, exc: DigitalRiverError, attempt: int) -> bool:
        """For a caller that repeats a call itself: wait as this client waits before attempt `attempt + 1` after
        `exc`, and True; or False at once when the client would give up (not transient, or retries spent)."""
        delay = self._retry_delay(exc, attempt)
        if delay is None:
            return False
        self.stats.retries += 1
        await self._sleep(delay)
        return True

    # -- mechanics --------------------------------------------------------------------------------------------

    def _url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = URL(self.base_url + path)
            if len(self._urls) < 64:  # fixed paths only in practice; ids make the rest one-offs
                self._urls[path] = url
        return url

    async def _call(
        self,
        method: str,
        path: str,
        endpoint: str,
        parse: Callable[[Any], T],
        *,
        body: Mapping[str, Any] | None = None,
        params: dict[str, str] | None = None,
        retry: bool,
    ) -> T:
        data = None if body is None else orjson.dumps(body, default=_json_default)
        attempt = 0
        while True:
            attempt += 1
            try:
                status, answer, raw = await self._attempt(method, path, endpoint, data, params,
                                                          create_order=endpoint == "POST /orders")
                try:
                    return parse(answer)
                except MalformedResponseError as exc:
                    exc.status, exc.response = status, _loggable(answer, raw)
                    raise
            except DigitalRiverError as exc:
                exc.method, exc.attempts = method, attempt
                if exc.path is None:
                    exc.path = path
                delay = self._retry_delay(exc, attempt) if retry else None
                if delay is None:
                    self._log_failure(exc, method, path, body, params)
                    raise
                self.stats.retries += 1
                await self._sleep(delay)

    def _retry_delay(self, exc: DigitalRiverError, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None to give up."""
        if not isinstance(exc, TransientError) or isinstance(exc, MalformedResponseError):
            return None
        if attempt > self.max_retries:
            return None
        if exc.retry_after is not None:
            return exc.retry_after if exc.retry_after <= self.backoff_max else None
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        return self._rng.uniform(0.0, ceiling)

    async def _attempt(self, method: str, path: str, endpoint: str, data: bytes | None,
                       params: dict[str, str] | None, *, create_order: bool) -> tuple[int, Any, bytes]:
        """One request: its status, decoded JSON body and raw body, or the classified error."""
        session = self._session
        if session is None:
            raise RuntimeError("DigitalRiverClient is not started: use `async with client:` or `await start()`")
        paused = self.paused_for()
        if paused > self.backoff_max:
            # A 429 told us Digital River refuses this key for a while: nothing is sent, and the caller (a record
            # holding a concurrency slot) hears it now instead of waiting out the whole pause (issue 17).
            raise TransientError(f"not sent: Digital River asked this key to wait {paused:.0f} s more (429 "
                                 "Retry-After)", code="rate_paused", path=path, retry_after=paused)
        waited = await self.bucket.acquire()
        if waited:
            self.stats.rate_limit_wait_seconds += waited
            if self.metrics is not None:
                self.metrics.rate_limit_wait(waited)
        headers = self._headers.copy()
        headers["upstream-id"] = str(uuid.uuid4())
        started = time.perf_counter()
        try:
            async with session.request(method, self._url(path), data=data, params=params, headers=headers,
                                       allow_redirects=False) as response:
                status = response.status
                raw = await response.read()
                retry_after_header = response.headers.get("Retry-After")
                content_type = response.content_type
        except TimeoutError:
            self.stats.requests[(endpoint, "timeout")] += 1
            if self.metrics is not None:
                self.metrics.dr_request(endpoint, None, time.perf_counter() - started, self.storefront)
            self._log.debug("dr_request", method=method, path=path, status=None, error="timeout",
                            ms=_ms(started))
            raise TransientError(f"no answer within {self.timeout_seconds:g} s", code="timeout",
                                 path=path) from None
        except aiohttp.ClientError as exc:
            self.stats.requests[(endpoint, "connection_error")] += 1
            if self.metrics is not None:
                self.metrics.dr_request(endpoint, None, time.perf_counter() - started, self.storefront)
            self._log.debug("dr_request", method=method, path=path, status=None, error="connection_error",
                            ms=_ms(started))
            # `from None`: some aiohttp errors carry the request's headers, Authorization included.
            raise TransientError(f"connection failed: {type(exc).__name__}: {exc}", code="connection_error",
                                 path=path) from None
        self.stats.requests[(endpoint, str(status))] += 1
        if self.metrics is not None:
            self.metrics.dr_request(endpoint, status, time.perf_counter() - started, self.storefront)
        self._log.debug("dr_request", method=method, path=path, status=status, ms=_ms(started))
        if 200 <= status < 300:
            self.key_refused = False
            if not raw:
                raise MalformedResponseError(f"HTTP {status} with an empty body", status=status, path=path,
                                             error_type="malformed_response", code="empty_body")
            try:
                return status, _decode(raw), raw
            except ValueError:
                raise MalformedResponseError(_non_json(status, content_type, raw), status=status, path=path,
                                             error_type="malformed_response", code="not_json",
                                             response=_excerpt(raw)) from None
        raise self._error(status, raw, content_type, retry_after_header, path, create_order=create_order)

    def _error(self, status: int, raw: bytes, content_type: str, retry_after_header: str | None, path: str,
               *, create_order: bool) -> DigitalRiverError:
        """The exception for a non-2xx answer, classified by status (and on 409, by the call)."""
        error_type = code = parameter = None
        response: Any
        try:
            response = _decode(raw) if raw else None
        except ValueError:
            response = None
        if isinstance(response, dict):
            error_type = _text(response, "type")
            errors = response.get("errors")
            first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
            code = _text(first, "code")
            parameter = _text(first, "parameter")
            message = _text(first, "message") or _text(response, "message") or f"HTTP {status}"
            response = _loggable(response, raw)
        elif raw and response is None:
            message = _non_json(status, content_type, raw)
            response = _excerpt(raw)
        else:
            message = f"HTTP {status}" + ("" if raw else " with an empty body")
            # A JSON answer that is not an object (a number, NaN, a list) is kept only as the log can store it.
            response = None if response is None else _loggable(response, raw)
        kwargs: dict[str, Any] = {"status": status, "error_type": error_type, "code": code,
                                  "parameter": parameter, "path": path, "response": response}
        if status == 429:
            retry_after = parse_retry_after(retry_after_header)
            pause = DEFAULT_RETRY_AFTER_429 if retry_after is None else retry_after
            self.stats.rate_limited += 1
            if self.metrics is not None:
                self.metrics.rate_limited(self.storefront)
            # Every caller of every process on this key waits out the whole pause (Digital River refuses all of
            # their calls until then), capped only at an hour. A call whose wait would pass backoff_max is not
            # retried: its record's own backoff takes over.
            pause = min(pause, RETRY_AFTER_CAP_SECONDS)
            self.bucket.pause(pause)
            if self.on_rate_limited is not None:
                self.on_rate_limited(pause)
            return TransientError(message, retry_after=pause, **kwargs)
        if status == 408 or status >= 500:
            return TransientError(message, retry_after=parse_retry_after(retry_after_header), **kwargs)
        if status in (401, 403):
            self.key_refused = True
            return AuthError(message, **kwargs)
        if status == 404:
            return NotFoundError(message, **kwargs)
        if status == 409:
            return DeclinedError(message, **kwargs) if create_order else ConflictError(message, **kwargs)
        if 400 <= status < 500:
            return BadRequestError(message, **kwargs)
        # 1xx/3xx: nothing Digital River answers; treat as an outage rather than guess.
        return MalformedResponseError(f"unexpected HTTP {status}", **kwargs)

    def _log_failure(self, exc: DigitalRiverError, method: str, path: str, body: Mapping[str, Any] | None,
                     params: dict[str, str] | None) -> None:
        if self.app_log is None:
            return
        record_id = structlog.contextvars.get_contextvars().get("record_id")
        request: dict[str, Any] = {"method": method, "path": path, "body": redact(dict(body)) if body else None}
        if params:
            request["query"] = params
        self.app_log.write("ERROR", "digital-river", "dr_request_failed", record_id=record_id, status=exc.status,
                           request=request, response=exc.response, exc=exc)


def _json_default(value: Any) -> Any:
    # Money arrives as Decimal from the store; Digital River wants JSON numbers, and two-decimal amounts
    # survive the trip through float exactly (orjson, like json, writes the shortest repr).
    if isinstance(value, Decimal):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _csv(values: str | Iterable[str]) -> str:
    return values if isinstance(values, str) else ",".join(values)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


def _non_json(status: int, content_type: str, raw: bytes) -> str:
    return f"HTTP {status} with a non-JSON body ({content_type or 'no content type'}, {len(raw)} bytes)"


def _decode(raw: bytes) -> Any:
    """JSON from a body; ValueError for anything that is not. orjson refuses what is not strict JSON (NaN, lone
    surrogates, numbers beyond a double) and nesting past 1,024 levels, each as a ValueError."""
    return orjson.loads(raw)


def _text(obj: Mapping[str, Any], key: str) -> str | None:
    """A field of an error body as text (DigitalRiverError makes it one short line); None unless a scalar."""
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    return str(value)


# What PostgreSQL's jsonb refuses: NUL and lone surrogates in strings, and their escapes in a JSON text (pairs
# of surrogate escapes are replaced too, which costs an excerpt an emoji at worst).
_UNSTORABLE_CHARS = re.compile("[\x00\ud800-\udfff]")
_UNSTORABLE_ESCAPE = re.compile(r"\\u(0000|[dD][89a-fA-F][0-9a-fA-F]{2})")


def _loggable(value: Any, raw: bytes) -> Any:
    """A body as the application log keeps it: the parsed value when it is small, shallow and storable, else a
    text excerpt of the raw body."""
    if len(raw) <= MAX_LOGGED_BODY_BYTES and _storable(value):
        return value
    return _excerpt(raw)


def _storable(value: Any) -> bool:
    """Whether `value` nests no deeper than MAX_LOGGED_DEPTH (redaction and jsonb both walk it recursively) and
    holds nothing PostgreSQL's jsonb refuses."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _UNSTORABLE_CHARS.search(item):
                return False
        elif isinstance(item, float):
            if not math.isfinite(item):  # NaN and Infinity: Python reads them, JSON (and jsonb) has no such thing
                return False
        elif depth >= MAX_LOGGED_DEPTH:
            if isinstance(item, (dict, list)):
                return False
        elif isinstance(item, dict):
            stack.extend((k, depth + 1) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


def _excerpt(raw: bytes, limit: int = 2000) -> dict[str, Any]:
    """The start of a body that is not kept whole, as `{"excerpt": text, "bytes": size}`: an object rather than
    the bare text, so nothing downstream takes a prefix of a JSON text for JSON and parses it."""
    text = raw[:limit].decode("utf-8", "replace").replace("\x00", " ")
    return {"excerpt": redact_text(_UNSTORABLE_ESCAPE.sub(r"\\ufffd", text)), "bytes": len(raw)}
