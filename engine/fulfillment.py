"""One `POST /fulfillments` and what each answer means for what it carried: the mechanics both fulfillment jobs
(order-fulfillment, line-item-fulfillment) share.

- 201 → every entry `sent`, with the `ful_…` id.
- 409 `order_complete` / `order_cancelled` → every entry `done`: the whole order is settled.
- 409 `item_fulfilled` / `item_cancelled` → `done` for the one item it names, and only that one: Digital River
  names it in `parameter` (`items[2].itemId`) or, as it answers in practice, in the message ("Resource '<id>' is
  already fulfilled", with `parameter` `itemId`; Digital River's Lightning connector,
  `DRB2B_FulfillmentService.updateLineItemFulfillmentRecsForFailedFulFulfillment`, matches the item id in the
  message the same way). The other entries are sent again. When no entry can be told, none is settled: every
  entry is `retry` (never `done` for a line Digital River did not capture).
- 409 `quantity_too_large`, 400 and 404 → `failed`.
- Transient failures (after the client's own retries), and conflicts nobody listed → `retry`.
- 401/403 → AuthError is raised with nothing settled: the caller's run stops claiming.

A fulfillment is never sent twice for one record (docs/digital-river.md, "Fulfillment"). Every request carries
our record ids in its `metadata` (`drjobsJob`, the job's own `tag`, and `drjobsIds`: the entries' keys, comma
separated). A request whose outcome is unknown (a timeout, a connection cut, a 5xx or 429: Digital River may or
may not have taken it) is not simply repeated, as a partial fulfillment repeated reports its quantities twice:
first `GET /fulfillments?orderId=` lists the order's fulfillments, and an entry found in one of ours is `sent`
with that fulfillment's id (`Sent.found`); only the others are sent again. The caller asks for the same look
before the first request (`look_first`) when an earlier attempt's outcome was not written (a crash, a lapsed
lease) or was a retry.

Digital River answers one error per request even when several items are wrong, and applies nothing. An error
that names an item (`items[2].itemId`) settles that item alone; the rest is sent again at once, by the same
caller, so one order never has two calls in flight.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from engine.digital_river import (
    AuthError,
    BadRequestError,
    ConflictError,
    DigitalRiverClient,
    DigitalRiverError,
    NotFoundError,
    TransientError,
    dr_message,
)
from engine.failpoints import failpoint

K = TypeVar("K", bound=Hashable)

# 409 codes that mean the change was already made: treated as success. The order codes settle every entry of the
# request; the item codes only the entry they name (DigitalRiver/GitBook fulfillments; Digital River's Lightning
# connector, DRB2B_Constants.Fulfillment FULFILLMENT_ORDER_SUCCESS_CODES / FULFILLMENT_ORDER_ITEM_SUCCESS_CODES).
ORDER_DONE_CODES = frozenset({"order_complete", "order_cancelled"})
ITEM_DONE_CODES = frozenset({"item_fulfilled", "item_cancelled"})
DONE_CODES = ORDER_DONE_CODES | ITEM_DONE_CODES
# 409 codes that no repeat can fix.
HARD_CONFLICT_CODES = frozenset({"quantity_too_large"})
_ITEM_PARAMETER = re.compile(r"^items\[(\d+)\]")
# The metadata key that lists the entries' keys (our record ids) of one request.
IDS_KEY = "drjobsIds"


@dataclass
class Sent:
    """How one entry of a POST /fulfillments ended: `sent`, `done` (already done), `failed`, `retry`, or
    `throttled`: refused for Digital River's rate limit (a 429, or not sent during the key's 429 pause), so nothing
    was done (`throttled_wait`: how long it waits)."""

    kind: str
    message: str | None = None
    fulfillment_id: str | None = None
    error: DigitalRiverError | None = None
    found: bool = False  # `sent` by an earlier request, found in the order's fulfillments by our metadata


def throttled_wait(sent: Sent) -> timedelta:
    """How long a `throttled` entry waits before it is sent again: the 429's Retry-After (1 s when absent, as the
    client's own pause), at most an hour."""
    if not isinstance(sent.error, TransientError):
        return timedelta(seconds=1.0)
    return sent.error.rate_wait(absent=1.0)


def classify(exc: DigitalRiverError) -> str:
    """`done`, `failed` or `retry` for an error of POST /fulfillments (AuthError is the caller's to handle)."""
    if isinstance(exc, ConflictError):
        if exc.code in DONE_CODES:
            return "done"
        return "failed" if exc.code in HARD_CONFLICT_CODES else "retry"
    if isinstance(exc, (BadRequestError, NotFoundError)):
        return "failed"
    return "retry"  # TransientError and anything new


def item_index(exc: DigitalRiverError, item_ids: Sequence[str] = ()) -> int | None:
    """The index of the item an error names: by its parameter (`items[2].quantity` → 2), or else the one entry
    whose Digital River item id (`item_ids`, in request order) stands as a whole word in the message."""
    match = _ITEM_PARAMETER.match(exc.parameter or "")
    if match:
        return int(match.group(1))
    named = [i for i, item_id in enumerate(item_ids)
             if item_id and re.search(rf"(?<![\w-]){re.escape(item_id)}(?![\w-])", exc.message or "")]
    return named[0] if len(named) == 1 else None


def request_metadata(tag: Mapping[str, str], keys: Sequence[Hashable]) -> dict[str, str]:
    """The `metadata` of one request: the job's tag and the entries' keys."""
    return {**tag, IDS_KEY: ",".join(str(key) for key in keys)}


async def find_sent(dr: DigitalRiverClient, order_id: str, tag: Mapping[str, str],
                    keys: Sequence[K]) -> dict[K, str]:
    """Which of `keys` an earlier request of ours already reported: key → `ful_…` id, from every page of
    `GET /fulfillments?orderId=` (a fulfillment is ours when its metadata carries every pair of `tag`)."""
    wanted = {str(key): key for key in keys}
    found: dict[K, str] = {}
    after: str | None = None
    while True:
        page, more = await dr.list_fulfillments(order_id, starting_after=after)
        for fulfillment in page:
            metadata = fulfillment.metadata
            if any(metadata.get(name) != value for name, value in tag.items()):
                continue
            listed = metadata.get(IDS_KEY)
            for name in listed.split(",") if isinstance(listed, str) else ():
                if name in wanted:
                    found.setdefault(wanted[name], fulfillment.id)
        if not more or not page or page[-1].id == after:
            return found
        after = page[-1].id


async def send_fulfillment(dr: DigitalRiverClient, order_id: str, entries: Sequence[tuple[K, dict[str, Any]]],
                           extra: Mapping[str, Any] | None = None, *, tag: Mapping[str, str],
                           look_first: bool = False) -> dict[K, Sent]:
    """POST /fulfillments for `entries` (key, item) of one order; how each ended, by key.

    An error naming one item settles that item and the others are sent again without it; any other answer
    settles every entry still unsent. A request whose outcome is unknown is looked for before it is repeated
    (as often as the client retries a call, with its backoff), and so is the first when `look_first`. AuthError
    is raised with nothing settled.
    """
    results: dict[K, Sent] = {}
    pending = list(entries)
    look = look_first
    unknown = 0  # requests whose outcome is unknown so far
    while pending:
        if look:
            look = False
            try:
                found = await find_sent(dr, order_id, tag, [key for key, _ in pending])
            except AuthError:
                raise
            except DigitalRiverError as exc:
                message = f"not sent: an earlier request may have reported it and the order's fulfillments " \
                          f"could not be listed: {dr_message(exc)}"
                for key, _ in pending:
                    results[key] = Sent("retry", message, error=exc)
                return results
            for key, fulfillment_id in found.items():
                results[key] = Sent("sent", f"already reported in {fulfillment_id} (found by its metadata)",
                                    fulfillment_id=fulfillment_id, found=True)
            pending = [(key, item) for key, item in pending if key not in found]
            if not pending:
                return results
        body = {"orderId": order_id, "items": [item for _, item in pending], **(extra or {}),
                "metadata": request_metadata(tag, [key for key, _ in pending])}
        try:
            fulfillment = await dr.create_fulfillment(body)
        except AuthError:
            raise
        except DigitalRiverError as exc:
            if isinstance(exc, TransientError):
                unknown += 1
                throttled = exc.rate_limited
                if await dr.wait_to_retry(exc, unknown):
                    look = not throttled  # a 429 is refused before anything is done, and a paused call not sent
                    continue
                if throttled:
                    # Nothing was done: not a failed send (no retry_count), just a wait for the key's Retry-After.
                    for key, _ in pending:
                        results[key] = Sent("throttled", dr_message(exc), error=exc)
                    return results
            kind = classify(exc)
            message = dr_message(exc)
            if kind == "done":
                message = f"already done: {message}"
            index = item_index(exc, [str(item.get("itemId") or "") for _, item in pending])
            if index is not None and not 0 <= index < len(pending):
                index = None
            if exc.code in ITEM_DONE_CODES:
                if index is None:
                    # Done for some item we cannot tell: settle none, send them all again (one attempt counted).
                    for key, _ in pending:
                        results[key] = Sent("retry", f"{message} (the item it names is not one of this request's, "
                                                     "so none is settled)", error=exc)
                    return results
                key, _ = pending.pop(index)
                results[key] = Sent("done", message, error=exc)
                continue
            if kind != "retry" and index is not None and len(pending) > 1:
                key, _ = pending.pop(index)
                results[key] = Sent(kind, message, error=exc)
                continue
            for key, _ in pending:
                results[key] = Sent(kind, message, error=exc)
            return results
        failpoint("after_fulfillment_sent")
        for key, _ in pending:
            results[key] = Sent("sent", fulfillment_id=fulfillment.id)
        return results
    return results
