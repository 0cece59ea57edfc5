-- recurring-payments: claiming installment records and writing each charge's outcome.
-- Loaded once by engine/store.py with every other file of engine/sql/; each statement sits under `-- name:`
-- with a one-line purpose. Parameters are $n only. `{table}` appears only in the lease statements and is
-- filled from the fixed list of leased tables in store.py, never from input.

-- fragment: payment_record_due
-- recurring-payments: the rule for a due installment record `p`, written once for the claim, drain's check and
-- /metrics: Open, unprocessed, its next attempt has come, and no earlier installment of its subscription is Open
-- or Pending (installments of one subscription are charged one after another; a Pending one may still fail).
-- The earlier-installment test is a scalar subquery, not NOT EXISTS: the planner cannot turn it into an anti-join
-- over every open record, so a claim walks the claim index in order and stops as soon as it has its rows,
-- whatever the statistics say (issue 14; the plan is checked by tests/integration/test_claim_plans.py).
p.subscription_job_run_status = 'Open' AND NOT p.is_recurring_payment_processed AND p.next_attempt_at <= now()
AND (SELECT e.id FROM subscription_process_data e
      WHERE e.subscription_id = p.subscription_id AND e.installment_number < p.installment_number
        AND e.subscription_job_run_status IN ('Open', 'Pending')
      LIMIT 1) IS NULL

-- name: claim_payment_records
-- recurring-payments: lease up to $2 due records of the claim window (`drjobs_payment_claim_window` in schema.sql:
-- the next $7 open records of storefront label $8 in claim order, oldest installment date first, after the run's
-- cursor $5/$6), in claim
-- order. The window always walks the claim index and stops at its limit, so a claim reads at most $7 rows whatever
-- the backlog and the planner's statistics (issue 14). Only the lowest Open installment of each subscription
-- is eligible, so two installments of one subscription are never in flight at once. Rows this node still has in
-- flight ($4) are never taken again, even when their lease ran out under it. Each claimed row gets a fresh lease
-- token: every later write names it, so a worker that outlived its lease changes nothing. A window with nothing
-- due claims nothing: the job moves its cursor to the window's end (`payment_claim_window_end`) and goes on.
WITH win AS MATERIALIZED (
    SELECT id, claim_date FROM drjobs_payment_claim_window($5, $6, $7, $8)
), due AS (
    -- Each window row looked up by its id (a nested loop: the window is all that is read).
    SELECT p.id
      FROM win
      JOIN subscription_process_data p ON p.id = win.id AND p.id = (SELECT win.id OFFSET 0)
     WHERE {{payment_record_due}}
       AND (p.locked_until IS NULL OR p.locked_until < now())
       AND p.id <> ALL($4::bigint[])
     ORDER BY win.claim_date, win.id
     LIMIT $2
       FOR UPDATE OF p SKIP LOCKED
)
UPDATE subscription_process_data t
   SET locked_by = $1, locked_until = clock_timestamp() + make_interval(secs => $3),
       lease_token = nextval('drjobs_lease_tokens')
  FROM due
 WHERE t.id = due.id
RETURNING t.*, coalesce(t.installment_run_date, '-infinity'::date) AS claim_date;

-- name: payment_claim_window_end
-- recurring-payments: where storefront label $4's claim window after ($1 date, $2 id) of $3 rows ends, how many of
-- its rows are due
-- now (leased or not) and the first due one's next_attempt_at; no row when the window is empty (the claim order
-- is exhausted). Drain's check and /metrics' oldest due walk the claim order with it, a window at a time.
WITH win AS MATERIALIZED (
    SELECT id, claim_date FROM drjobs_payment_claim_window($1, $2, $3, $4)
)
SELECT last.claim_date, last.id, first_due.due, first_due.next_attempt_at AS first_due_at
  FROM (SELECT claim_date, id FROM win ORDER BY claim_date DESC, id DESC LIMIT 1) last
 CROSS JOIN LATERAL (
        SELECT count(*) AS due,
               (array_agg(p.next_attempt_at ORDER BY win.claim_date, win.id))[1] AS next_attempt_at
          FROM win JOIN subscription_process_data p ON p.id = win.id AND p.id = (SELECT win.id OFFSET 0)
         WHERE {{payment_record_due}}) first_due;

-- fragment: open_payment_labels
-- The body of the recursive CTE `labels`: the labels (drjobs_storefront_label) of the storefronts with open
-- installment records, by a loose index scan of the claim index: one probe per storefront, whatever the backlog.
-- Used as `WITH RECURSIVE labels AS {{open_payment_labels}}`; the last row is NULL.
    (SELECT drjobs_storefront_label(storefront) AS label
       FROM subscription_process_data
      WHERE subscription_job_run_status = 'Open' AND NOT is_recurring_payment_processed
      ORDER BY 1 LIMIT 1)
    UNION ALL
    SELECT (SELECT drjobs_storefront_label(p.storefront)
              FROM subscription_process_data p
             WHERE p.subscription_job_run_status = 'Open' AND NOT p.is_recurring_payment_processed
               AND drjobs_storefront_label(p.storefront) > labels.label
             ORDER BY 1 LIMIT 1)
      FROM labels
     WHERE labels.label IS NOT NULL

-- name: payment_storefronts
-- recurring-payments, status, /metrics: the labels of the storefronts with open installment records.
WITH RECURSIVE labels AS {{open_payment_labels}}
SELECT label FROM labels WHERE label IS NOT NULL;

-- name: count_due_payment_records
-- recurring-payments: records due now (leased or not): the same rule as the claim, so a record waiting behind an
-- earlier installment of its subscription is not due. A count reads every due row: for status and the demo.
SELECT count(*) FROM subscription_process_data p WHERE {{payment_record_due}};

-- name: payment_record_details
-- recurring-payments: everything one charge needs for the claimed records $1, with the subscription's recent
-- declines (Digital River's once-a-day and four-in-30-days limits) and its status now. Cart and cart item first,
-- the subscription's own fields where a record was written without them. The stored payment is the
-- subscription's current one (a card replaced after the record was made is the one charged), the record's own
-- only when the subscription has none.
SELECT p.id, p.subscription_id, p.installment_number, p.installment_run_date, p.upstream_id,
       p.dr_failed_order_ids, p.dr_checkout_id, p.dr_checkout_source_id, p.checkout_looks, p.dr_order_id, p.subscription_retry_count,
       p.outage_count, p.cart_id, p.parent_order_id, p.product_id, s.status AS subscription_status,
       coalesce(s.stored_payment_id, p.stored_payment_id) AS stored_payment_id,
       coalesce(c.currency, s.currency) AS currency,
       coalesce(ci.quantity, s.quantity) AS quantity,
       coalesce(ci.unit_price, s.unit_price) AS unit_price,
       coalesce(ci.dr_billing_agreement_id, s.dr_billing_agreement_id) AS billing_agreement_id,
       a.id AS account_id, a.dr_customer_id, a.email, a.bill_to AS account_bill_to,
       pr.id AS product_found, pr.sku, pr.name AS product_name, pr.dr_sku_id, pr.sku_group_id,
       pr.country_of_origin,
       sp.id AS payment_found, sp.dr_source_id, sp.is_active AS payment_active,
       po.ship_to, po.bill_to AS order_bill_to,
       d.last_decline_at, d.declines_30d, d.oldest_decline_30d
  FROM subscription_process_data p
  JOIN subscriptions s ON s.id = p.subscription_id
  LEFT JOIN carts c ON c.id = p.cart_id
  LEFT JOIN cart_items ci ON ci.id = p.cart_item_id
  LEFT JOIN accounts a ON a.id = coalesce(p.account_id, s.account_id)
  LEFT JOIN products pr ON pr.id = coalesce(p.product_id, s.product_id)
  LEFT JOIN stored_payments sp ON sp.id = coalesce(s.stored_payment_id, p.stored_payment_id)
  LEFT JOIN orders po ON po.id = coalesce(p.parent_order_id, s.parent_order_id)
  LEFT JOIN LATERAL (
        SELECT max(pa.created_at) AS last_decline_at, count(*) AS declines_30d,
               min(pa.created_at) AS oldest_decline_30d
          FROM payment_attempts pa
         WHERE pa.subscription_id = p.subscription_id
           AND pa.outcome IN ('soft_decline', 'hard_decline')
           AND pa.created_at > now() - interval '30 days'
  ) d ON true
 WHERE p.id = ANY($1::bigint[]);

-- name: save_checkouts
-- recurring-payments: commit each checkout id on its record and cart BEFORE the order is submitted, as a
-- compare-and-set: only where the record has no checkout yet (what the task read), the claim's lease token
-- still holds and has not run out. The lease is pushed out for the order call. Never waits on a row another
-- session has locked. $1 records, $2 tokens, $3 checkout ids, $4 the Digital River source each checkout charges,
-- $5 lease seconds. One row per input: `saved`, `busy` (locked by another session), `lease_lost`, or
-- `checkout_taken` (another worker saved a checkout first). Only `saved` may submit an order.
WITH input AS (
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[])
                  AS u(record_id, token, checkout_id, source_id)
), locked AS (
    SELECT p.id, p.lease_token, p.locked_until > clock_timestamp() AS unexpired, p.dr_checkout_id, p.dr_order_id
      FROM subscription_process_data p
     WHERE p.id IN (SELECT record_id FROM input)
       FOR UPDATE OF p SKIP LOCKED
), rec AS (
    UPDATE subscription_process_data p
       SET dr_checkout_id = input.checkout_id, dr_checkout_source_id = input.source_id, last_attempt_at = now(),
           checkout_looks = 0, locked_until = clock_timestamp() + make_interval(secs => $5)
      FROM input JOIN locked ON locked.id = input.record_id
     WHERE p.id = input.record_id AND locked.lease_token = input.token AND locked.unexpired
       AND locked.dr_checkout_id IS NULL AND locked.dr_order_id IS NULL
    RETURNING p.id, p.cart_id, p.dr_checkout_id
), cart AS (
    UPDATE carts c SET dr_checkout_id = rec.dr_checkout_id FROM rec WHERE c.id = rec.cart_id RETURNING c.id
)
SELECT input.record_id AS id,
       CASE WHEN rec.id IS NOT NULL THEN 'saved'
            WHEN locked.id IS NULL THEN 'busy'
            WHEN locked.lease_token IS DISTINCT FROM input.token OR NOT locked.unexpired THEN 'lease_lost'
            ELSE 'checkout_taken' END AS result
  FROM input
  LEFT JOIN locked ON locked.id = input.record_id
  LEFT JOIN rec ON rec.id = input.record_id;

-- name: fence_checkout
-- recurring-payments: before an existing checkout is submitted (or a source attached to it), check that record
-- $1 still holds claim $2's unexpired lease and still carries checkout $3, and push the lease out by $4
-- seconds for the call. Returns nothing otherwise: the call must not be made.
UPDATE subscription_process_data
   SET locked_until = clock_timestamp() + make_interval(secs => $4)
 WHERE id = $1 AND lease_token = $2 AND locked_until > clock_timestamp() AND dr_checkout_id = $3
   AND dr_order_id IS NULL
RETURNING id;

-- name: save_checkout_source
-- recurring-payments: the source now attached to record $1's checkout $3, under claim $2.
UPDATE subscription_process_data SET dr_checkout_source_id = $4
 WHERE id = $1 AND lease_token = $2 AND dr_checkout_id = $3
RETURNING id;

-- name: finish_charged
-- recurring-payments: for each charged record in $2 (jsonb [{record_id, token, dr_order_id, dr_checkout_id,
-- state, fraud_state, charge_state, currency, subtotal, total_tax, total_amount, items: [{dr_item_id, quantity, unit_price, tax_amount,
-- state, billing_agreement_id}]}]), in one transaction: the installment's order and items, the cart closed, the
-- attempt, and the record Successful and processed (Pending when the order's payment is not confirmed yet), only
-- under the claim's lease token (fencing) and never on
-- a record already processed. Never waits on a row another session has locked. $1 is this node, for the attempt
-- row. One row per input: `result` is `written` (with `order_id`), `busy`, `lease_lost`, or `settled` (already
-- processed, with the order it was settled with in `settled_dr_order_id`).
WITH input AS (
    SELECT *
      FROM jsonb_to_recordset($2::jsonb) AS u(record_id bigint, token bigint, dr_order_id text, dr_checkout_id text,
                                              state text, fraud_state text, charge_state text, currency text,
                                              subtotal numeric, total_tax numeric, total_amount numeric,
                                              items jsonb)
), locked AS (
    SELECT p.id, p.lease_token, p.is_recurring_payment_processed AS processed, p.dr_order_id
      FROM subscription_process_data p
     WHERE p.id IN (SELECT record_id FROM input)
       FOR UPDATE OF p SKIP LOCKED
), rec AS (
    SELECT p.id, p.subscription_id, p.cart_id, p.product_id, coalesce(p.account_id, s.account_id) AS account_id,
           p.storefront,
           coalesce(p.parent_order_id, s.parent_order_id) AS parent_order_id, input.*
      FROM input
      JOIN locked ON locked.id = input.record_id AND locked.lease_token = input.token AND NOT locked.processed
      JOIN subscription_process_data p ON p.id = input.record_id
      JOIN subscriptions s ON s.id = p.subscription_id
), ord AS (
    INSERT INTO orders (account_id, parent_order_id, dr_order_id, dr_checkout_id, dr_order_state, dr_fraud_state,
                        dr_charge_state, dr_order_source, currency, subtotal, total_tax, total_amount, ship_to,
                        bill_to, storefront)
    SELECT rec.account_id, rec.parent_order_id, rec.dr_order_id, rec.dr_checkout_id, rec.state, rec.fraud_state,
           rec.charge_state, 'Subscription—Installment', rec.currency, rec.subtotal, rec.total_tax, rec.total_amount,
           po.ship_to, po.bill_to, rec.storefront
      FROM rec LEFT JOIN orders po ON po.id = rec.parent_order_id
    ON CONFLICT (dr_order_id) DO UPDATE SET dr_order_state = EXCLUDED.dr_order_state,
                                            dr_fraud_state = EXCLUDED.dr_fraud_state,
                                            dr_charge_state = EXCLUDED.dr_charge_state
    RETURNING id, dr_order_id
), items AS (
    INSERT INTO order_items (order_id, product_id, quantity, unit_price, tax_amount, dr_order_item_id,
                             dr_order_item_state, dr_billing_agreement_id)
    SELECT ord.id, rec.product_id, i.quantity, i.unit_price, i.tax_amount, i.dr_item_id, i.state,
           i.billing_agreement_id
      FROM rec
      JOIN ord ON ord.dr_order_id = rec.dr_order_id
     CROSS JOIN LATERAL jsonb_to_recordset(rec.items) AS i(dr_item_id text, quantity int, unit_price numeric,
                                                         tax_amount numeric, state text, billing_agreement_id text)
    ON CONFLICT (dr_order_item_id) DO NOTHING
    RETURNING id
), cart AS (
    UPDATE carts c
       SET status = 'Closed', dr_order_id = rec.dr_order_id, dr_checkout_id = coalesce(rec.dr_checkout_id,
           c.dr_checkout_id), dr_payment_failure_reason = NULL,
           -- Paid only once Digital River confirms it (a Pending record's cart waits for its events).
           dr_payment_state = CASE WHEN rec.state IN ('pending_payment', 'in_review') THEN NULL ELSE 'Successful' END
      FROM rec WHERE c.id = rec.cart_id
    RETURNING c.id
), attempt AS (
    INSERT INTO payment_attempts (process_data_id, subscription_id, outcome, dr_checkout_id, dr_order_id, amount,
                                  currency, node)
    SELECT rec.id, rec.subscription_id, 'charged', rec.dr_checkout_id, rec.dr_order_id, rec.total_amount,
           rec.currency, $1
      FROM rec
     WHERE rec.state NOT IN ('pending_payment', 'in_review')
    RETURNING id
), done AS (
    -- An order whose payment Digital River has not confirmed (pending_payment, in_review) leaves the record
    -- Pending, settled later by its events, or looked at after an hour without one (digital-river-events).
    UPDATE subscription_process_data p
       SET subscription_job_run_status = CASE WHEN rec.state IN ('pending_payment', 'in_review') THEN 'Pending'
                                              ELSE 'Successful' END,
           is_recurring_payment_processed = rec.state NOT IN ('pending_payment', 'in_review'),
           next_attempt_at = CASE WHEN rec.state IN ('pending_payment', 'in_review')
                                  THEN now() + interval '1 hour' ELSE p.next_attempt_at END,
           dr_order_id = rec.dr_order_id, dr_checkout_id = coalesce(rec.dr_checkout_id, p.dr_checkout_id),
           order_id = ord.id, last_error_code = NULL, last_error_message = NULL, outage_count = 0,
           checkout_looks = 0, locked_by = NULL, locked_until = NULL, lease_token = NULL
      FROM rec JOIN ord ON ord.dr_order_id = rec.dr_order_id
     WHERE p.id = rec.id
    RETURNING p.id, p.order_id, p.subscription_job_run_status AS status
)
SELECT input.record_id AS id, done.order_id, done.status,
       CASE WHEN done.id IS NOT NULL THEN 'written'
            WHEN locked.id IS NULL THEN 'busy'
            WHEN locked.processed THEN 'settled'
            ELSE 'lease_lost' END AS result,
       locked.dr_order_id AS settled_dr_order_id
  FROM input
  LEFT JOIN locked ON locked.id = input.record_id
  LEFT JOIN done ON done.id = input.record_id;

-- name: finish_failed_attempt
-- recurring-payments: a counted attempt without an order (decline, bad data): count it, set the status and next
-- attempt, keep the reason on the record and its cart, write the attempt. Only under the claim's lease token;
-- returns nothing otherwise. $1 record, $2 lease token, $3 status, $4 next attempt, $5 code, $6 message,
-- $7 outcome, $8 clear the checkout, $9 the cart's payment state (NULL keeps it), $10 amount, $11 currency,
-- $12 node, $13 the Digital River order that failed (kept in the record's failed orders, never adopted; NULL: none)
WITH old AS (
    SELECT dr_checkout_id FROM subscription_process_data WHERE id = $1
), rec AS (
    UPDATE subscription_process_data p
       SET subscription_job_run_status = $3, subscription_retry_count = subscription_retry_count + 1,
           next_attempt_at = $4, last_error_code = $5, last_error_message = $6, last_attempt_at = now(),
           dr_checkout_id = CASE WHEN $8 THEN NULL ELSE p.dr_checkout_id END,
           dr_checkout_source_id = CASE WHEN $8 THEN NULL ELSE p.dr_checkout_source_id END, outage_count = 0,
           dr_failed_order_ids = CASE WHEN $13::text IS NULL OR $13::text = ANY(p.dr_failed_order_ids)
                                      THEN p.dr_failed_order_ids ELSE p.dr_failed_order_ids || $13::text END,
           dr_order_id = CASE WHEN p.dr_order_id = $13::text THEN NULL ELSE p.dr_order_id END,
           checkout_looks = 0, locked_by = NULL, locked_until = NULL, lease_token = NULL
     WHERE p.id = $1 AND p.lease_token = $2 AND NOT p.is_recurring_payment_processed
    RETURNING p.id, p.subscription_id, p.cart_id, p.subscription_retry_count
), cart AS (
    UPDATE carts c
       SET dr_payment_state = coalesce($9, c.dr_payment_state), dr_payment_failure_reason = $6,
           dr_checkout_id = CASE WHEN $8 THEN NULL ELSE c.dr_checkout_id END
      FROM rec WHERE c.id = rec.cart_id
    RETURNING c.id
), attempt AS (
    INSERT INTO payment_attempts (process_data_id, subscription_id, outcome, code, message, dr_checkout_id, amount,
                                  currency, node, dr_order_id)
    SELECT rec.id, rec.subscription_id, $7, $5, $6, (SELECT dr_checkout_id FROM old), $10, $11, $12, $13 FROM rec
     -- One decline of a checkout is one attempt, however many workers heard it (a late worker's
     -- record_decline_without_lease may have stored it already).
     WHERE NOT ($7 IN ('soft_decline', 'hard_decline') AND EXISTS (
               SELECT 1 FROM payment_attempts pa
                WHERE pa.subscription_id = rec.subscription_id AND pa.outcome IN ('soft_decline', 'hard_decline')
                  AND pa.dr_checkout_id = (SELECT dr_checkout_id FROM old)))
    RETURNING id
)
SELECT subscription_retry_count FROM rec;

-- name: record_decline_without_lease
-- recurring-payments: Digital River declined a charge for record $1 (checkout $2) but the worker had lost its
-- lease, so the record was not changed. The decline still happened: it is kept as an attempt ($3 outcome, $4 code,
-- $5 message, $6 node) so Digital River's once-a-day and four-in-30-days limits see it.
-- A decline of that checkout already stored (by the worker that holds the record now) is not stored again.
INSERT INTO payment_attempts (process_data_id, subscription_id, outcome, code, message, dr_checkout_id, node)
SELECT p.id, p.subscription_id, $3, $4, $5, $2, $6 FROM subscription_process_data p
 WHERE p.id = $1
   AND NOT EXISTS (SELECT 1 FROM payment_attempts pa
                    WHERE pa.subscription_id = p.subscription_id AND pa.outcome IN ('soft_decline', 'hard_decline')
                      AND pa.dr_checkout_id = $2)
RETURNING id;

-- name: postpone_record
-- recurring-payments: no attempt was made or its outcome is unknown (outage, unknown, a decline limit): try again
-- at $3, checkout kept. $1 record, $2 lease token (returns nothing without it), $4 code, $5 message, $6 added to
-- the outage count, $7 added to the looks for the order of a checkout Digital River does not know.
UPDATE subscription_process_data
   SET next_attempt_at = $3, last_error_code = $4, last_error_message = $5, outage_count = outage_count + $6,
       checkout_looks = checkout_looks + $7, locked_by = NULL, locked_until = NULL, lease_token = NULL
 WHERE id = $1 AND lease_token = $2 AND NOT is_recurring_payment_processed
RETURNING id;

-- name: fail_record_uncounted
-- recurring-payments: record $1 ends Failed without a counted attempt (its subscription is no longer Active, or
-- Digital River does not know its checkout and no order was found after every look): code $3, message $4. The
-- checkout stays on the record so an operator can look it up. Only under the claim's lease token ($2).
UPDATE subscription_process_data
   SET subscription_job_run_status = 'Failed', last_error_code = $3, last_error_message = $4,
       locked_by = NULL, locked_until = NULL, lease_token = NULL
 WHERE id = $1 AND lease_token = $2 AND NOT is_recurring_payment_processed
RETURNING id;
