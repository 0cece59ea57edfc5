-- subscription-installments: due subscriptions → carts, cart items and installment records.
-- Loaded once by engine/store.py with every other file of engine/sql/; each statement sits under `-- name:`
-- with a one-line purpose. Parameters are $n only. `{table}` appears only in the lease statements and is
-- filled from the fixed list of leased tables in store.py, never from input.

-- name: account_time_zones
-- subscription-installments: the distinct account time zones PostgreSQL knows (checked once per run).
SELECT DISTINCT a.time_zone FROM accounts a
 WHERE a.time_zone IN (SELECT name FROM pg_timezone_names);

-- name: claim_due_subscriptions
-- subscription-installments: lock up to $1 due subscriptions for this transaction, oldest run date first.
-- Due means the run date is on or before today in the account's zone ($2: the zones known to be valid; any
-- other zone counts as UTC here and the job suspends the subscription with a message).
SELECT s.*, a.time_zone
  FROM subscriptions s
  LEFT JOIN accounts a ON a.id = s.account_id
 WHERE s.status = 'Active' AND s.installment_count_remaining > 0
   AND s.installment_next_run_date <= (now() AT TIME ZONE 'UTC')::date + 1
   AND s.installment_next_run_date <= (now() AT TIME ZONE
           CASE WHEN a.time_zone = ANY($2::text[]) THEN a.time_zone ELSE 'UTC' END)::date
 ORDER BY s.installment_next_run_date, s.id
 LIMIT $1
   FOR UPDATE OF s SKIP LOCKED;

-- name: count_due_subscriptions
-- subscription-installments: how many subscriptions are due now (for drain).
SELECT count(*)
  FROM subscriptions s
  LEFT JOIN accounts a ON a.id = s.account_id
 WHERE s.status = 'Active' AND s.installment_count_remaining > 0
   AND s.installment_next_run_date <= (now() AT TIME ZONE 'UTC')::date + 1
   AND s.installment_next_run_date <= (now() AT TIME ZONE
           CASE WHEN a.time_zone = ANY($1::text[]) THEN a.time_zone ELSE 'UTC' END)::date;

-- name: insert_installment
-- subscription-installments: one installment's cart, cart item and Open process-data record, in one statement.
WITH s AS (
    SELECT s.*, coalesce(s.dr_billing_agreement_id, oi.dr_billing_agreement_id) AS billing_agreement_id
      FROM subscriptions s
      LEFT JOIN order_items oi ON oi.id = s.parent_order_item_id
     WHERE s.id = $1
), cart AS (
    INSERT INTO carts (account_id, subscription_id, status, currency)
    SELECT account_id, id, 'Open-DR', currency FROM s
    RETURNING id
), item AS (
    INSERT INTO cart_items (cart_id, product_id, quantity, unit_price, dr_billing_agreement_id)
    SELECT cart.id, s.product_id, s.quantity, s.unit_price, s.billing_agreement_id FROM s, cart
    RETURNING id, cart_id
)
INSERT INTO subscription_process_data (subscription_id, installment_number, cart_id, cart_item_id, parent_order_id,
                                       stored_payment_id, product_id, account_id, installment_run_date)
SELECT s.id, $2, item.cart_id, item.id, s.parent_order_id, s.stored_payment_id, s.product_id, s.account_id, $3
  FROM s, item
RETURNING id;

-- name: advance_subscription
-- subscription-installments: count $2 installments made and move to the next run date ($3, NULL when none remain).
UPDATE subscriptions
   SET installment_count = installment_count + $2,
       installment_count_remaining = installment_count_remaining - $2,
       installment_next_run_date = coalesce($3, installment_next_run_date),
       status = CASE WHEN installment_count_remaining - $2 = 0 THEN 'Completed' ELSE status END,
       last_error_message = NULL
 WHERE id = $1;

-- name: suspend_subscription
-- subscription-installments: a subscription the job cannot schedule (its message names the field).
UPDATE subscriptions SET status = 'Suspended', last_error_message = $2 WHERE id = $1;

-- name: note_subscription_error
-- subscription-installments: an unexpected database error on one subscription, kept for the operator.
UPDATE subscriptions SET last_error_message = $2 WHERE id = $1;
