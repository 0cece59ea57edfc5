-- subscription-installments: due subscriptions → carts, cart items and installment records.
-- Loaded once by engine/store.py with every other file of engine/sql/; each statement sits under `-- name:`
-- with a one-line purpose. Parameters are $n only. `{table}` appears only in the lease statements and is
-- filled from the fixed list of leased tables in store.py, never from input.

-- name: account_time_zones
-- subscription-installments (once per run), status and /metrics: the distinct account time zones PostgreSQL knows.
-- A loose index scan of `accounts_time_zone`: one index probe per distinct zone, not a pass over every account
-- (600 ms at 1,000,000 accounts as SELECT DISTINCT; issue 14).
WITH RECURSIVE zone AS (
    (SELECT time_zone FROM accounts WHERE time_zone IS NOT NULL ORDER BY time_zone LIMIT 1)
    UNION ALL
    SELECT (SELECT a.time_zone FROM accounts a WHERE a.time_zone > zone.time_zone ORDER BY a.time_zone LIMIT 1)
      FROM zone WHERE zone.time_zone IS NOT NULL
)
SELECT time_zone FROM zone
 WHERE time_zone IS NOT NULL AND time_zone IN (SELECT name FROM pg_timezone_names);

-- fragment: subscription_due
-- subscription-installments: the rule for a due subscription `s` (with its account `a`), written once for the
-- claim, drain's count and /metrics: Active, installments left, and its run date on or before today in the
-- account's zone (`:zones`: the zones known to be valid; any other zone counts as UTC here and the job suspends
-- the subscription with a message). The first date test lets an index range scan do the work.
s.status = 'Active' AND s.installment_count_remaining > 0
AND s.installment_next_run_date <= (now() AT TIME ZONE 'UTC')::date + 1
AND s.installment_next_run_date <= (now() AT TIME ZONE
        CASE WHEN a.time_zone = ANY(:zones::text[]) THEN a.time_zone ELSE 'UTC' END)::date

-- name: claim_due_subscriptions
-- subscription-installments: lock up to $1 due subscriptions for this transaction, oldest run date first, after
-- the run's cursor ($3 run date, $4 id: where its last batch stopped), so each batch walks the due index from
-- there and its cost does not grow with what is left. A subscription this run took that is still due after its
-- batch (far behind: one batch makes at most MAX_CATCH_UP of its installments) is in $5 and waits for the next
-- run, so it cannot take every batch from those due today. $2: the valid zones (`subscription_due`). Only the
-- subscriptions of the storefront labels $6 (those with a key): as the Salesforce job, run per storefront, a
-- storefront's subscriptions are not touched while the engine cannot charge them.
SELECT s.*, a.time_zone
  FROM subscriptions s
  LEFT JOIN accounts a ON a.id = s.account_id
 WHERE {{subscription_due zones=$2}}
   AND drjobs_storefront_label(s.storefront) = ANY($6::text[])
   AND (s.installment_next_run_date, s.id) > ($3::date, $4::bigint)
   AND s.id <> ALL($5::bigint[])
 ORDER BY s.installment_next_run_date, s.id
 LIMIT $1
   FOR UPDATE OF s SKIP LOCKED;

-- name: any_due_subscription
-- subscription-installments: whether any subscription of the storefront labels $2 is due now (drain): the first in
-- the due index's order.
SELECT (SELECT s.id
          FROM subscriptions s
          LEFT JOIN accounts a ON a.id = s.account_id
         WHERE {{subscription_due zones=$1}} AND drjobs_storefront_label(s.storefront) = ANY($2::text[])
         ORDER BY s.installment_next_run_date, s.id
         LIMIT 1) IS NOT NULL;

-- name: count_due_subscriptions
-- subscription-installments: how many subscriptions of the storefront labels $2 are due now (for drain). $1: the
-- valid zones.
SELECT count(*)
  FROM subscriptions s
  LEFT JOIN accounts a ON a.id = s.account_id
 WHERE {{subscription_due zones=$1}} AND drjobs_storefront_label(s.storefront) = ANY($2::text[]);

-- name: insert_installments
-- subscription-installments: for each ($1 subscription, $2 installment number, $3 run date) one Open-DR cart, its
-- cart item (price, quantity and billing agreement from the subscription) and an Open process-data record, all
-- three of the subscription's storefront, in one
-- statement. Cart and item ids are drawn first so the three inserts can refer to each other.
WITH input AS MATERIALIZED (
    SELECT u.subscription_id, u.installment_number, u.run_date,
           nextval(pg_get_serial_sequence('carts', 'id')) AS cart_id,
           nextval(pg_get_serial_sequence('cart_items', 'id')) AS cart_item_id
      FROM unnest($1::bigint[], $2::int[], $3::date[]) AS u(subscription_id, installment_number, run_date)
), s AS (
    SELECT i.*, s.account_id, s.currency, s.product_id, s.quantity, s.unit_price, s.parent_order_id,
           s.stored_payment_id, coalesce(s.dr_billing_agreement_id, oi.dr_billing_agreement_id) AS billing_agreement,
           s.storefront
      FROM input i
      JOIN subscriptions s ON s.id = i.subscription_id
      LEFT JOIN order_items oi ON oi.id = s.parent_order_item_id
), cart AS (
    INSERT INTO carts (id, account_id, subscription_id, status, currency, storefront) OVERRIDING SYSTEM VALUE
    SELECT cart_id, account_id, subscription_id, 'Open-DR', currency, storefront FROM s
), item AS (
    INSERT INTO cart_items (id, cart_id, product_id, quantity, unit_price, dr_billing_agreement_id)
    OVERRIDING SYSTEM VALUE
    SELECT cart_item_id, cart_id, product_id, quantity, unit_price, billing_agreement FROM s
)
INSERT INTO subscription_process_data (subscription_id, installment_number, cart_id, cart_item_id, parent_order_id,
                                       stored_payment_id, product_id, account_id, installment_run_date, storefront)
SELECT subscription_id, installment_number, cart_id, cart_item_id, parent_order_id, stored_payment_id, product_id,
       account_id, run_date, storefront
  FROM s
 -- Ids in installment order: a subscription's catch-up is numbered oldest first (the join above may reorder).
 ORDER BY subscription_id, installment_number
RETURNING id, subscription_id, installment_number;

-- name: advance_subscriptions
-- subscription-installments: for each ($1 subscription, $2 installments made, $3 next run date or NULL when none
-- remain) count the installments and move the date; Completed when none remain.
UPDATE subscriptions s
   SET installment_count = s.installment_count + u.made,
       installment_count_remaining = s.installment_count_remaining - u.made,
       installment_next_run_date = coalesce(u.next_run, s.installment_next_run_date),
       status = CASE WHEN s.installment_count_remaining - u.made = 0 THEN 'Completed' ELSE s.status END,
       last_error_message = NULL
  FROM unnest($1::bigint[], $2::int[], $3::date[]) AS u(id, made, next_run)
 WHERE s.id = u.id;

-- name: suspend_subscription
-- subscription-installments: a subscription the job cannot schedule (its message names the field).
UPDATE subscriptions SET status = 'Suspended', last_error_message = $2 WHERE id = $1;

-- name: note_subscription_error
-- subscription-installments: an unexpected database error on one subscription, kept for the operator.
UPDATE subscriptions SET last_error_message = $2 WHERE id = $1;
