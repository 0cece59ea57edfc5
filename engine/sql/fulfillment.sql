-- order-fulfillment and line-item-fulfillment: claiming cancelled orders and due lines, writing each outcome.
-- Loaded once by engine/store.py with every other file of engine/sql/; each statement sits under `-- name:`
-- with a one-line purpose. Parameters are $n only. `{table}` appears only in the lease statements and is
-- filled from the fixed list of leased tables in store.py, never from input.
--
-- The lease on a `fulfillments` row is the lock on its Digital River order: order-fulfillment takes it to cancel
-- the order, line-item-fulfillment takes it (as well as the leases of the lines) to send the order's lines. So
-- one order never has two POST /fulfillments in flight, whichever job and process sends them. An order's state
-- is the fulfillments row's `dr_order_state`, or the orders row's when the fulfillments row has none; likewise
-- its Digital River id.

-- fragment: cancelled_order_due
-- order-fulfillment: the rule for a due record `f` of a cancelled order `o`, written once for the claim, drain's
-- count and /metrics.
f.efn_status IN ('Open', 'Pending') AND f.next_attempt_at <= now()
AND coalesce(f.dr_order_state, o.dr_order_state) = 'cancelled'

-- fragment: line_item_due
-- line-item-fulfillment: the rule for a due line `l` (its order must also be sendable: `line_item_order_sendable`).
l.efn_status IN ('Open', 'Pending') AND l.next_attempt_at <= now()

-- fragment: line_item_order_sendable
-- line-item-fulfillment: whether the order (`f`, `o`) of due lines can be sent: Digital River accepted it, or it
-- has no Digital River id or Digital River blocked it (its lines are failed). Lines of orders not accepted yet are
-- waiting, not due; those of a cancelled order are order-fulfillment's.
coalesce(f.dr_order_state, o.dr_order_state) IN ('accepted', 'blocked')
OR (f.ofi_received AND coalesce(f.dr_order_state, o.dr_order_state, '') <> 'cancelled')
OR coalesce(nullif(f.dr_order_id, ''), nullif(o.dr_order_id, '')) IS NULL

-- name: claim_cancelled_orders
-- order-fulfillment: lease due Open/Pending records of cancelled Digital River orders of storefront label $5, oldest
-- due first.
-- `unfinished`: the row still held an earlier claim's token (that claim never wrote an outcome, so it may have
-- sent its request: the job looks before sending).
WITH due AS (
    SELECT f.id, f.lease_token AS prior_token
      FROM fulfillments f
      JOIN orders o ON o.id = f.order_id
     WHERE {{cancelled_order_due}}
       AND drjobs_storefront_label(o.storefront) = $5
       AND (f.locked_until IS NULL OR f.locked_until < now())
       AND f.id <> ALL($4::bigint[])
     ORDER BY f.next_attempt_at, f.id
     LIMIT $2
       FOR UPDATE OF f SKIP LOCKED
)
UPDATE fulfillments t
   SET locked_by = $1, locked_until = clock_timestamp() + make_interval(secs => $3),
       lease_token = nextval('drjobs_lease_tokens')
  FROM due
 WHERE t.id = due.id
RETURNING t.id, t.lease_token, due.prior_token IS NOT NULL AS unfinished;

-- name: count_due_cancelled_orders
-- order-fulfillment: cancelled-order records due now (leased or not) of the storefront labels $1, for drain.
SELECT count(*)
  FROM fulfillments f
  JOIN orders o ON o.id = f.order_id
 WHERE {{cancelled_order_due}} AND drjobs_storefront_label(o.storefront) = ANY($1::text[]);

-- name: cancel_order_details
-- order-fulfillment: the claimed records $1 with their Digital River order id.
SELECT f.id, f.order_id, f.retry_count, coalesce(nullif(f.dr_order_id, ''), nullif(o.dr_order_id, '')) AS dr_order_id
  FROM fulfillments f
  JOIN orders o ON o.id = f.order_id
 WHERE f.id = ANY($1::bigint[]);

-- name: cancel_order_items
-- order-fulfillment: every item of the orders of records $1, its quantity, and how much of it the order's
-- Completed lines already fulfilled or cancelled. The item's Digital River id falls back to one a line carries.
SELECT f.id AS fulfillment_id, oi.id AS order_item_id, oi.quantity,
       coalesce(nullif(oi.dr_order_item_id, ''), line_id.dr_order_item_id) AS dr_item_id,
       coalesce(done.quantity, 0)::int AS done_quantity
  FROM fulfillments f
  JOIN order_items oi ON oi.order_id = f.order_id
  LEFT JOIN LATERAL (
        SELECT sum(l.fulfill_quantity + l.cancel_quantity) AS quantity
          FROM line_item_fulfillments l
         WHERE l.fulfillment_id = f.id AND l.efn_status = 'Completed'
           AND (l.order_item_id = oi.id OR (l.order_item_id IS NULL AND l.dr_order_item_id = oi.dr_order_item_id))
  ) done ON true
  LEFT JOIN LATERAL (
        SELECT l.dr_order_item_id
          FROM line_item_fulfillments l
         WHERE l.order_item_id = oi.id AND nullif(l.dr_order_item_id, '') IS NOT NULL
         LIMIT 1
  ) line_id ON true
 WHERE f.id = ANY($1::bigint[])
 ORDER BY f.id, oi.id;

-- name: finish_fulfillment
-- order-fulfillment: a record's outcome, lease cleared. Only under the claim's lease token; returns nothing
-- otherwise. $1 record, $2 lease token, $3 status, $4 added to retry_count, $5 message, $6 ful_ id (NULL keeps
-- it), $7 next attempt (NULL keeps it)
UPDATE fulfillments
   SET efn_status = $3, retry_count = retry_count + $4, message = $5,
       dr_fulfillment_id = coalesce($6, dr_fulfillment_id), next_attempt_at = coalesce($7, next_attempt_at),
       locked_by = NULL, locked_until = NULL, lease_token = NULL
 WHERE id = $1 AND lease_token = $2 AND efn_status IN ('Open', 'Pending')
RETURNING id;

-- name: fulfillment_settled_by
-- order-fulfillment: how record $1 stands now (after a write-back was refused), for the alarm's log line.
SELECT efn_status AS status, dr_fulfillment_id, locked_by FROM fulfillments WHERE id = $1;

-- name: orders_awaiting_acceptance
-- line-item-fulfillment: up to $1 orders with due lines whose state is pending_payment, in_review or unknown and
-- that had no news (an answer to GET /orders/{id}, or an event) for $2 seconds, least recently touched first:
-- their state is asked of Digital River. Normally `order.accepted` says it first (digital-river-events). Found
-- from the due lines, so the cost follows the backlog, not the history of orders. Only orders of the storefront
-- labels $3 (each is asked with its storefront's key).
SELECT f.id, coalesce(nullif(f.dr_order_id, ''), nullif(o.dr_order_id, '')) AS dr_order_id,
       coalesce(f.dr_order_state, o.dr_order_state) AS dr_order_state, o.storefront
  FROM fulfillments f
  JOIN orders o ON o.id = f.order_id
 WHERE drjobs_storefront_label(o.storefront) = ANY($3::text[])
   AND f.id IN (SELECT l.fulfillment_id FROM line_item_fulfillments l
                 WHERE l.efn_status IN ('Open', 'Pending') AND l.next_attempt_at <= now())
   AND NOT f.ofi_received
   AND coalesce(nullif(f.dr_order_id, ''), nullif(o.dr_order_id, '')) IS NOT NULL
   AND (coalesce(f.dr_order_state, o.dr_order_state) IS NULL
        OR coalesce(f.dr_order_state, o.dr_order_state) IN ('pending_payment', 'in_review'))
   AND coalesce(f.dr_state_checked_at, f.created_at) <= now() - make_interval(secs => $2)
 ORDER BY f.updated_at, f.id
 LIMIT $1;

-- name: save_order_state
-- line-item-fulfillment: the order state Digital River just answered (never moving back past what an event said
-- meanwhile: drjobs_order_state_rank).
UPDATE fulfillments
   SET dr_order_state = CASE WHEN drjobs_order_state_rank($2) > drjobs_order_state_rank(dr_order_state)
                             THEN $2 ELSE dr_order_state END,
       dr_state_checked_at = now()
 WHERE id = $1;

-- name: claim_line_item_orders
-- line-item-fulfillment: lease up to $2 orders that have due, unleased lines and that Digital River accepted
-- (or that have no Digital River id, so their lines can be failed), oldest due line first, as long as their due
-- lines fit in the run's remaining budget of $5 lines; when $6, the first order is taken even if it alone has
-- more (the only order a run splits). Candidates come from walking the due-lines index (the order check is a
-- subquery so the planner keeps that walk and stops early): the cost follows what is claimed, not the backlog.
-- The order's lease is re-checked on each locked row, so two claimers never both get one order. Orders this node
-- still has in flight ($4) are never taken again. Only orders of storefront label $7.
WITH candidates AS (
    SELECT l.fulfillment_id, l.next_attempt_at
      FROM line_item_fulfillments l
     WHERE {{line_item_due}}
       AND (l.locked_until IS NULL OR l.locked_until < now())
       AND (SELECT (f.locked_until IS NULL OR f.locked_until < now()) AND ({{line_item_order_sendable}})
              FROM fulfillments f JOIN orders o ON o.id = f.order_id
             WHERE f.id = l.fulfillment_id AND drjobs_storefront_label(o.storefront) = $7)
     ORDER BY l.next_attempt_at, l.id
     LIMIT $2 * 16
), picked AS (
    SELECT f.id, c.first_due
      FROM (SELECT fulfillment_id, min(next_attempt_at) AS first_due FROM candidates GROUP BY fulfillment_id) c
      JOIN fulfillments f ON f.id = c.fulfillment_id
     WHERE (f.locked_until IS NULL OR f.locked_until < now()) AND f.id <> ALL($4::bigint[])
     ORDER BY c.first_due, f.id
     LIMIT $2
       FOR UPDATE OF f SKIP LOCKED
), fitting AS (
    SELECT p.id, sum(n.lines) OVER w AS running, row_number() OVER w AS position
      FROM picked p
     CROSS JOIN LATERAL (SELECT count(*) AS lines
                           FROM line_item_fulfillments l
                          WHERE l.fulfillment_id = p.id AND l.efn_status IN ('Open', 'Pending')
                            AND l.next_attempt_at <= now()
                            AND (l.locked_until IS NULL OR l.locked_until < now())) n
    WINDOW w AS (ORDER BY p.first_due, p.id)
)
UPDATE fulfillments t
   SET locked_by = $1, locked_until = clock_timestamp() + make_interval(secs => $3),
       lease_token = nextval('drjobs_lease_tokens')
  FROM fitting
 WHERE t.id = fitting.id AND (fitting.running <= $5 OR (fitting.position = 1 AND $6::boolean))
RETURNING t.id, t.lease_token;

-- name: claim_order_lines
-- line-item-fulfillment: lease up to $2 due lines of the orders $5 this node has just leased, whole orders first
-- (never a line still in flight here, $4). `unfinished`: the line still held an earlier claim's token (that
-- claim never wrote an outcome, so it may have sent the line: the job looks before sending).
WITH due AS (
    SELECT l.id, l.lease_token AS prior_token
      FROM line_item_fulfillments l
     WHERE l.fulfillment_id = ANY($5::bigint[])
       AND l.efn_status IN ('Open', 'Pending') AND l.next_attempt_at <= now()
       AND (l.locked_until IS NULL OR l.locked_until < now())
       AND l.id <> ALL($4::bigint[])
     ORDER BY array_position($5::bigint[], l.fulfillment_id), l.id
     LIMIT $2
       FOR UPDATE OF l SKIP LOCKED
)
UPDATE line_item_fulfillments t
   SET locked_by = $1, locked_until = clock_timestamp() + make_interval(secs => $3),
       lease_token = nextval('drjobs_lease_tokens')
  FROM due
 WHERE t.id = due.id
RETURNING t.id, t.fulfillment_id, t.lease_token, due.prior_token IS NOT NULL AS unfinished;

-- name: count_due_line_items
-- line-item-fulfillment: lines due now (leased or not) whose order can be sent or failed, for drain. Lines of
-- orders Digital River has not accepted yet are waiting, not due. Only orders of the storefront labels $1.
SELECT count(*)
  FROM line_item_fulfillments l
  JOIN fulfillments f ON f.id = l.fulfillment_id
  JOIN orders o ON o.id = f.order_id
 WHERE {{line_item_due}} AND ({{line_item_order_sendable}}) AND drjobs_storefront_label(o.storefront) = ANY($1::text[]);

-- name: line_item_details
-- line-item-fulfillment: everything the claimed lines $1 need: their order item (quantity, Digital River id,
-- which order it belongs to) and their order's Digital River id.
SELECT l.id, l.fulfillment_id, l.order_item_id, l.fulfill_quantity, l.cancel_quantity, l.retry_count,
       l.tracking_company, l.tracking_number, l.tracking_url,
       coalesce(nullif(l.dr_order_item_id, ''), nullif(oi.dr_order_item_id, '')) AS dr_item_id,
       oi.id AS item_found, oi.order_id AS item_order_id, oi.quantity AS item_quantity,
       f.order_id, coalesce(nullif(f.dr_order_id, ''), nullif(o.dr_order_id, '')) AS dr_order_id,
       coalesce(f.dr_order_state, o.dr_order_state) AS dr_order_state
  FROM line_item_fulfillments l
  JOIN fulfillments f ON f.id = l.fulfillment_id
  JOIN orders o ON o.id = f.order_id
  LEFT JOIN order_items oi ON oi.id = l.order_item_id
 WHERE l.id = ANY($1::bigint[])
 ORDER BY l.fulfillment_id, l.id;

-- name: finish_line_items
-- line-item-fulfillment: the outcome of each line of one order and the order's lease, cleared in one statement.
-- Only lines still held under their claim's lease token are written; the others are left alone and not returned.
-- $1 fulfillments id, $2 its lease token, then per line: $3 id, $4 lease token, $5 status, $6 added to
-- retry_count, $7 message, $8 ful_ id (NULL keeps it), $9 next attempt (NULL keeps it)
WITH done AS (
    UPDATE line_item_fulfillments l
       SET efn_status = u.status, retry_count = l.retry_count + u.retry_add, message = u.message,
           dr_fulfillment_id = coalesce(u.dr_fulfillment_id, l.dr_fulfillment_id),
           next_attempt_at = coalesce(u.next_attempt_at, l.next_attempt_at), locked_by = NULL, locked_until = NULL,
           lease_token = NULL
      FROM unnest($3::bigint[], $4::bigint[], $5::text[], $6::int[], $7::text[], $8::text[], $9::timestamptz[])
           AS u(id, token, status, retry_add, message, dr_fulfillment_id, next_attempt_at)
     WHERE l.id = u.id AND l.lease_token = u.token AND l.efn_status IN ('Open', 'Pending')
    RETURNING l.id
), released AS (
    UPDATE fulfillments SET locked_by = NULL, locked_until = NULL, lease_token = NULL
     WHERE id = $1 AND lease_token = $2
    RETURNING id
)
SELECT id FROM done;

-- name: line_items_settled_by
-- line-item-fulfillment: how lines $1 stand now (after their write-back was refused), for the alarm's log line.
SELECT id, efn_status AS status, dr_fulfillment_id, locked_by FROM line_item_fulfillments WHERE id = ANY($1::bigint[]);
