-- digital-river-events: storing Digital River's events once, applying them in the order Digital River created
-- them, and looking at Pending installments no event has settled. Loaded once by engine/store.py with every
-- other file of engine/sql/; each statement sits under `-- name:` with a one-line purpose. Parameters are $n only.

-- name: store_events
-- webhooks and the GET /events poll: store events once (a delivery seen twice, or heard by both, is one row).
-- $1 jsonb [{event_id, type, storefront, dr_order_id, payload, dr_created_at}], $2 source. Returns the new rows.
INSERT INTO dr_events (event_id, type, storefront, dr_order_id, payload, source, dr_created_at)
SELECT e.event_id, e.type, coalesce(e.storefront, 'DefaultStore'), e.dr_order_id, e.payload, $2,
       coalesce(e.dr_created_at, now())
  FROM jsonb_to_recordset($1::jsonb) AS e(event_id text, type text, storefront text, dr_order_id text, payload jsonb,
                                          dr_created_at timestamptz)
ON CONFLICT (event_id) DO NOTHING
RETURNING id;

-- name: event_cursor
-- digital-river-events: where the GET /events poll of storefront $1 reached (no row: never polled).
SELECT seen_until, last_event_id FROM dr_event_cursors WHERE storefront = $1;

-- name: save_event_cursor
-- digital-river-events: the poll of storefront $1 saw everything created up to $2 (never moves back).
INSERT INTO dr_event_cursors (storefront, seen_until, last_event_id) VALUES ($1, $2, $3)
ON CONFLICT (storefront) DO UPDATE
   SET seen_until = greatest(dr_event_cursors.seen_until, EXCLUDED.seen_until),
       last_event_id = CASE WHEN EXCLUDED.seen_until >= dr_event_cursors.seen_until
                            THEN EXCLUDED.last_event_id ELSE dr_event_cursors.last_event_id END;

-- name: pending_event_ids
-- digital-river-events: up to $1 stored events still to apply, in the order Digital River created them.
SELECT id FROM dr_events WHERE status = 'Pending' ORDER BY dr_created_at, id LIMIT $1;

-- name: count_pending_events
-- digital-river-events: stored events still to apply (drain, status, /metrics).
SELECT count(*) FROM dr_events WHERE status = 'Pending';

-- name: lock_event
-- digital-river-events: event $1, locked for this transaction, if it is still to apply and nobody else holds it.
SELECT id, event_id, type, dr_order_id, payload, storefront FROM dr_events
 WHERE id = $1 AND status = 'Pending'
   FOR UPDATE SKIP LOCKED;

-- name: finish_event
-- digital-river-events: event $1 applied ($2 Processed, Ignored or Failed, $3 what it did); its type.
UPDATE dr_events SET status = $2, message = $3, processed_at = now() WHERE id = $1
RETURNING type;

-- name: order_storefront
-- digital-river-events: the storefront label of Digital River order $1 if it is one of ours (an orders or
-- fulfillments row, or an installment record's order); NULL when it is not.
SELECT coalesce(
    (SELECT drjobs_storefront_label(storefront) FROM orders WHERE dr_order_id = $1),
    (SELECT drjobs_storefront_label(o.storefront) FROM fulfillments f JOIN orders o ON o.id = f.order_id
      WHERE f.dr_order_id = $1 LIMIT 1),
    (SELECT drjobs_storefront_label(storefront) FROM subscription_process_data WHERE dr_order_id = $1));

-- name: advance_order_state
-- digital-river-events: Digital River order $1 is now in state $2 (never moving back: drjobs_order_state_rank),
-- its charge state $3 when known; on `orders` and `fulfillments`. $4: set ofi_received (order.accepted) and
-- create the fulfillments row of a known order that has none; $5: set ocn_received (order.complete). Returns
-- how many rows changed.
WITH o AS (
    UPDATE orders
       SET dr_order_state = CASE WHEN drjobs_order_state_rank($2) > drjobs_order_state_rank(dr_order_state)
                                 THEN $2 ELSE dr_order_state END,
           dr_charge_state = coalesce($3, dr_charge_state)
     WHERE dr_order_id = $1
    RETURNING id
), f AS (
    UPDATE fulfillments
       SET dr_order_state = CASE WHEN drjobs_order_state_rank($2) > drjobs_order_state_rank(dr_order_state)
                                 THEN $2 ELSE dr_order_state END,
           ofi_received = ofi_received OR $4, ocn_received = ocn_received OR $5, dr_state_checked_at = now()
     WHERE dr_order_id = $1 OR order_id IN (SELECT id FROM o)
    RETURNING id
), created AS (
    INSERT INTO fulfillments (order_id, dr_order_id, dr_order_state, ofi_received, ocn_received)
    SELECT o.id, $1, $2, $4, $5 FROM o
     WHERE $4 AND NOT EXISTS (SELECT 1 FROM f) AND NOT EXISTS (SELECT 1 FROM fulfillments x WHERE x.order_id = o.id)
    ON CONFLICT (order_id) DO NOTHING
    RETURNING id
)
SELECT (SELECT count(*) FROM o) + (SELECT count(*) FROM f) + (SELECT count(*) FROM created);

-- name: accept_pending_record
-- digital-river-events: the installment record Pending on Digital River order $1 is paid: Successful and
-- processed, with its `charged` attempt ($2 node). Returns the record, or nothing when none was Pending on it.
WITH rec AS (
    SELECT p.id, p.subscription_id, p.dr_checkout_id, p.cart_id
      FROM subscription_process_data p
     WHERE p.dr_order_id = $1 AND p.subscription_job_run_status = 'Pending'
       FOR UPDATE
), cart AS (
    UPDATE carts c SET dr_payment_state = 'Successful' FROM rec WHERE c.id = rec.cart_id
    RETURNING c.id
), done AS (
    UPDATE subscription_process_data p
       SET subscription_job_run_status = 'Successful', is_recurring_payment_processed = true,
           last_error_code = NULL, last_error_message = NULL, locked_by = NULL, locked_until = NULL,
           lease_token = NULL
      FROM rec WHERE p.id = rec.id
    RETURNING p.id
), attempt AS (
    INSERT INTO payment_attempts (process_data_id, subscription_id, outcome, dr_checkout_id, dr_order_id, amount,
                                  currency, node)
    SELECT rec.id, rec.subscription_id, 'charged', rec.dr_checkout_id, $1, o.total_amount, o.currency, $2
      FROM rec LEFT JOIN orders o ON o.dr_order_id = $1
    RETURNING id
)
SELECT id FROM done;

-- name: fail_pending_record
-- digital-river-events: the order $1 of a Pending installment record failed after it was made: a counted attempt
-- (billing-rules.md). $2 hard (Failed at once) or soft (Open, no charge for 24 hours, Failed past $3 =
-- SUBSCRIPTION_RETRY_COUNT), $4 code, $5 message, $6 node. The order moves to the record's failed orders (never
-- adopted again), the checkout is cleared (the next attempt makes a new one), the cart reopens. Returns the record
-- with its new status, or nothing when none was Pending on that order.
WITH rec AS (
    SELECT p.id, p.subscription_id, p.cart_id, p.subscription_retry_count + 1 AS attempts, p.dr_checkout_id
      FROM subscription_process_data p
     WHERE p.dr_order_id = $1 AND p.subscription_job_run_status = 'Pending'
       FOR UPDATE
), done AS (
    UPDATE subscription_process_data p
       SET subscription_job_run_status = CASE WHEN $2 OR rec.attempts > $3 THEN 'Failed' ELSE 'Open' END,
           subscription_retry_count = rec.attempts, next_attempt_at = now() + interval '24 hours',
           last_error_code = $4, last_error_message = $5, last_attempt_at = now(),
           dr_failed_order_ids = p.dr_failed_order_ids || $1::text, dr_order_id = NULL, order_id = NULL,
           dr_checkout_id = NULL, dr_checkout_source_id = NULL, outage_count = 0, checkout_looks = 0,
           locked_by = NULL, locked_until = NULL, lease_token = NULL
      FROM rec WHERE p.id = rec.id
    RETURNING p.id, p.subscription_job_run_status AS status, p.subscription_retry_count AS retry_count
), cart AS (
    UPDATE carts c
       SET status = 'Open-DR', dr_order_id = NULL, dr_checkout_id = NULL, dr_payment_state = 'Declined',
           dr_payment_failure_reason = $5
      FROM rec WHERE c.id = rec.cart_id
    RETURNING c.id
), attempt AS (
    INSERT INTO payment_attempts (process_data_id, subscription_id, outcome, code, message, dr_checkout_id,
                                  dr_order_id, node)
    SELECT rec.id, rec.subscription_id, CASE WHEN $2 THEN 'hard_decline' ELSE 'soft_decline' END, $4, $5,
           rec.dr_checkout_id, $1, $6
      FROM rec
    RETURNING id
)
SELECT id, status, retry_count FROM done;

-- name: note_capture_failed
-- digital-river-events: Digital River could not capture the payment of order $1: say so on its fulfillments row.
UPDATE fulfillments SET message = $2 WHERE dr_order_id = $1 OR order_id IN (SELECT id FROM orders WHERE dr_order_id = $1)
RETURNING id;

-- name: claim_pending_records
-- digital-river-events: lease installment records Pending with no event for an hour (their next_attempt_at has
-- come), oldest first, to look at their order: those of storefront label $5.
WITH due AS (
    SELECT p.id
      FROM subscription_process_data p
     WHERE p.subscription_job_run_status = 'Pending' AND p.next_attempt_at <= now()
       AND drjobs_storefront_label(p.storefront) = $5
       AND (p.locked_until IS NULL OR p.locked_until < now())
       AND p.id <> ALL($4::bigint[])
     ORDER BY p.next_attempt_at, p.id
     LIMIT $2
       FOR UPDATE OF p SKIP LOCKED
)
UPDATE subscription_process_data t
   SET locked_by = $1, locked_until = clock_timestamp() + make_interval(secs => $3),
       lease_token = nextval('drjobs_lease_tokens')
  FROM due
 WHERE t.id = due.id
RETURNING t.id, t.lease_token, t.dr_order_id;

-- name: count_pending_records_due
-- digital-river-events: Pending installment records of the storefront labels $1 whose look at their order is due.
SELECT count(*) FROM subscription_process_data
 WHERE subscription_job_run_status = 'Pending' AND next_attempt_at <= now()
   AND drjobs_storefront_label(storefront) = ANY($1::text[]);

-- name: still_pending
-- digital-river-events: record $1 (lease token $2) is still Pending at Digital River: look again at $3.
UPDATE subscription_process_data
   SET next_attempt_at = $3, locked_by = NULL, locked_until = NULL, lease_token = NULL
 WHERE id = $1 AND lease_token = $2 AND subscription_job_run_status = 'Pending'
RETURNING id;

-- name: events_status
-- status and /metrics: the events still to apply, and the newest event heard.
SELECT (SELECT count(*) FROM dr_events WHERE status = 'Pending') AS backlog,
       (SELECT received_at FROM dr_events ORDER BY id DESC LIMIT 1) AS last_received_at,
       (SELECT count(*) FROM subscription_process_data WHERE subscription_job_run_status = 'Pending') AS pending_installments;
