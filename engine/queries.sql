-- Every SQL statement of the engine, each under `-- name:` with a one-line purpose.
-- Loaded once by engine/store.py. Parameters are $n only. `{table}` appears only in the lease statements and
-- is filled from the fixed list of leased tables in store.py, never from input.

-- name: migrate_lock
-- Serialise concurrent `migrate` runs (several engines starting at once) for this transaction.
SELECT pg_advisory_xact_lock(7261001);

-- name: extend_leases
-- Heartbeat: push out the lease of rows this node still works on; returns the ids it still holds.
UPDATE {table}
   SET locked_until = now() + make_interval(secs => $3)
 WHERE id = ANY($2::bigint[]) AND locked_by = $1
RETURNING id;

-- name: release_leases
-- Give rows back unfinished (shutdown, or a record this node will not process now).
UPDATE {table}
   SET locked_by = NULL, locked_until = NULL
 WHERE id = ANY($2::bigint[]) AND locked_by = $1;

-- name: expired_lease_count
-- Rows claimed by someone whose lease ran out (its process died or stalled): claimable again.
SELECT count(*) FROM {table} WHERE locked_by IS NOT NULL AND locked_until < now();

-- name: insert_job_run
-- Take one tick of a job: exactly one process gets the row for (job, fire_time); the others get nothing.
INSERT INTO job_runs (job, fire_time, trigger, node)
VALUES ($1, $2, $3, $4)
ON CONFLICT (job, fire_time) DO NOTHING
RETURNING id;

-- name: finish_job_run
-- Record how a run ended.
UPDATE job_runs
   SET finished_at = now(), status = $2, claimed = $3, succeeded = $4, failed = $5, error = $6
 WHERE id = $1;

-- name: last_scheduled_fire_time
-- The latest scheduled tick of a job that any process took: the scheduler's starting point after downtime.
SELECT max(fire_time) FROM job_runs WHERE job = $1 AND trigger = 'schedule';

-- name: node_heartbeat
-- Announce this process (or refresh its heartbeat) in engine_nodes.
INSERT INTO engine_nodes (name, started_at, heartbeat_at, pid, host, version)
VALUES ($1, now(), now(), $2, $3, $4)
ON CONFLICT (name) DO UPDATE
   SET heartbeat_at = now(), stopped_at = NULL, pid = EXCLUDED.pid, host = EXCLUDED.host,
       version = EXCLUDED.version,
       started_at = CASE WHEN engine_nodes.stopped_at IS NOT NULL OR engine_nodes.pid IS DISTINCT FROM EXCLUDED.pid
                         THEN now() ELSE engine_nodes.started_at END;

-- name: node_stopped
-- Mark this process as stopped after a clean shutdown.
UPDATE engine_nodes SET stopped_at = now() WHERE name = $1;

-- name: live_node_count
-- Processes whose heartbeat is younger than $1 seconds: the rate budget is split among them.
SELECT count(*) FROM engine_nodes WHERE stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => $1);

-- name: fail_runs_of_lost_nodes
-- Runs left `running` by a process that stopped heartbeating (killed) or by this node's previous life.
UPDATE job_runs r
   SET status = 'failed', finished_at = now(), error = 'the engine process running it stopped (' || r.node || ')'
  FROM engine_nodes n
 WHERE r.status = 'running' AND r.node = n.name
   AND (n.stopped_at IS NOT NULL OR n.heartbeat_at < now() - make_interval(secs => $1)
        OR (n.name = $2 AND r.started_at < $3))
RETURNING r.id, r.job, r.node;

-- name: insert_application_logs
-- The log writer's batch insert into application_logs.
INSERT INTO application_logs (logging_level, module_name, message, exception_type, exception_message,
                              stack_trace, record_id, response_status_code, request, response, node)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                     $8::int[], $9::jsonb[], $10::jsonb[], $11::text[]);

-- name: delete_old_application_logs
-- log-cleanup: one small batch of rows older than the cutoff; short transactions, no long locks.
DELETE FROM application_logs
 WHERE id IN (SELECT id FROM application_logs WHERE created_at < $1 ORDER BY created_at, id LIMIT $2
              FOR UPDATE SKIP LOCKED);

-- name: count_old_application_logs
-- log-cleanup: rows older than the cutoff (what a run has to do).
SELECT count(*) FROM application_logs WHERE created_at < $1;

-- name: status_last_runs
-- status: the latest run of each job.
SELECT DISTINCT ON (job) job, fire_time, trigger, node, started_at, finished_at, status, claimed, succeeded, failed,
       error
  FROM job_runs ORDER BY job, started_at DESC, id DESC;

-- name: status_nodes
-- status: engine processes seen in the last day, newest first; `live` when heartbeating within $1 seconds.
SELECT name, started_at, heartbeat_at, stopped_at, pid, host, version,
       (stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => $1)) AS live
  FROM engine_nodes WHERE heartbeat_at > now() - interval '1 day' ORDER BY heartbeat_at DESC;

-- name: status_counts
-- status: records by status, for every table a job works on.
SELECT 'subscriptions' AS kind, status, count(*) FROM subscriptions GROUP BY status
UNION ALL
SELECT 'subscription_process_data', subscription_job_run_status, count(*) FROM subscription_process_data GROUP BY 2
UNION ALL
SELECT 'fulfillments', efn_status, count(*) FROM fulfillments GROUP BY 2
UNION ALL
SELECT 'line_item_fulfillments', efn_status, count(*) FROM line_item_fulfillments GROUP BY 2
UNION ALL
SELECT 'application_logs', logging_level, count(*) FROM application_logs GROUP BY 2
ORDER BY 1, 2;

-- name: claim_payment_records
-- recurring-payments: lease due Open records, oldest installment date first. Only the lowest Open installment
-- of each subscription is eligible, so two installments of one subscription are never in flight at once.
WITH due AS (
    SELECT p.id
      FROM subscription_process_data p
     WHERE p.subscription_job_run_status = 'Open'
       AND NOT p.is_recurring_payment_processed
       AND p.next_attempt_at <= now()
       AND (p.locked_until IS NULL OR p.locked_until < now())
       AND NOT EXISTS (SELECT 1 FROM subscription_process_data e
                        WHERE e.subscription_id = p.subscription_id
                          AND e.subscription_job_run_status = 'Open'
                          AND e.installment_number < p.installment_number)
     ORDER BY p.installment_run_date, p.id
     LIMIT $2
       FOR UPDATE OF p SKIP LOCKED
)
UPDATE subscription_process_data t
   SET locked_by = $1, locked_until = now() + make_interval(secs => $3)
  FROM due
 WHERE t.id = due.id
RETURNING t.*;

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

-- name: count_due_payment_records
-- recurring-payments: records due now (leased or not), for drain.
SELECT count(*) FROM subscription_process_data
 WHERE subscription_job_run_status = 'Open' AND NOT is_recurring_payment_processed AND next_attempt_at <= now();

-- name: payment_record_details
-- recurring-payments: everything one charge needs for the claimed records $1, with the subscription's recent
-- declines (Digital River's once-a-day and four-in-30-days limits). Cart and cart item first, the
-- subscription's own fields where a record was written without them.
SELECT p.id, p.subscription_id, p.installment_number, p.installment_run_date, p.upstream_id, p.dr_checkout_id,
       p.dr_order_id, p.subscription_retry_count, p.outage_count, p.cart_id, p.parent_order_id, p.product_id,
       p.stored_payment_id,
       coalesce(c.currency, s.currency) AS currency,
       coalesce(ci.quantity, s.quantity) AS quantity,
       coalesce(ci.unit_price, s.unit_price) AS unit_price,
       coalesce(ci.dr_billing_agreement_id, s.dr_billing_agreement_id) AS billing_agreement_id,
       a.id AS account_id, a.dr_customer_id, a.email, a.bill_to AS account_bill_to,
       pr.id AS product_found, pr.sku, pr.name AS product_name, pr.dr_sku_id, pr.tax_code, pr.country_of_origin,
       pr.eccn,
       sp.id AS payment_found, sp.dr_source_id, sp.is_active AS payment_active,
       po.ship_to, po.bill_to AS order_bill_to,
       d.last_decline_at, d.declines_30d, d.oldest_decline_30d
  FROM subscription_process_data p
  JOIN subscriptions s ON s.id = p.subscription_id
  LEFT JOIN carts c ON c.id = p.cart_id
  LEFT JOIN cart_items ci ON ci.id = p.cart_item_id
  LEFT JOIN accounts a ON a.id = coalesce(p.account_id, s.account_id)
  LEFT JOIN products pr ON pr.id = coalesce(p.product_id, s.product_id)
  LEFT JOIN stored_payments sp ON sp.id = coalesce(p.stored_payment_id, s.stored_payment_id)
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

-- name: save_checkout
-- recurring-payments: commit the checkout id on the record (and its cart) BEFORE the order is submitted.
-- Counts 0 when this node no longer holds the lease: then no order may be submitted.
WITH rec AS (
    UPDATE subscription_process_data
       SET dr_checkout_id = $3, last_attempt_at = now()
     WHERE id = $1 AND locked_by = $2 AND dr_order_id IS NULL
    RETURNING id, cart_id
), cart AS (
    UPDATE carts c SET dr_checkout_id = $3 FROM rec WHERE c.id = rec.cart_id RETURNING c.id
)
SELECT count(*) FROM rec;

-- name: finish_charged
-- recurring-payments: in one transaction, the installment's order and items, the cart closed, the attempt, and
-- the record Successful and processed. Idempotent: a record already processed changes nothing (no row back).
-- $1 record, $2 node, $3 dr order id, $4 dr checkout id, $5 order state, $6 currency, $7 subtotal,
-- $8 total tax, $9 total amount, $10 items as jsonb [{dr_item_id, quantity, unit_price, tax_amount, state,
-- billing_agreement_id}]
WITH rec AS (
    SELECT p.id, p.subscription_id, p.cart_id, p.product_id, coalesce(p.account_id, s.account_id) AS account_id,
           coalesce(p.parent_order_id, s.parent_order_id) AS parent_order_id
      FROM subscription_process_data p
      JOIN subscriptions s ON s.id = p.subscription_id
     WHERE p.id = $1 AND NOT p.is_recurring_payment_processed
       FOR UPDATE OF p
), ord AS (
    INSERT INTO orders (account_id, parent_order_id, dr_order_id, dr_checkout_id, dr_order_state, dr_order_source,
                        currency, subtotal, total_tax, total_amount, ship_to, bill_to)
    SELECT rec.account_id, rec.parent_order_id, $3, $4, $5, 'Subscription—Installment', $6, $7, $8, $9,
           po.ship_to, po.bill_to
      FROM rec LEFT JOIN orders po ON po.id = rec.parent_order_id
    ON CONFLICT (dr_order_id) DO UPDATE SET dr_order_state = EXCLUDED.dr_order_state
    RETURNING id
), items AS (
    INSERT INTO order_items (order_id, product_id, quantity, unit_price, tax_amount, dr_order_item_id,
                             dr_order_item_state, dr_billing_agreement_id)
    SELECT ord.id, rec.product_id, i.quantity, i.unit_price, i.tax_amount, i.dr_item_id, i.state,
           i.billing_agreement_id
      FROM ord, rec,
           jsonb_to_recordset($10::jsonb) AS i(dr_item_id text, quantity int, unit_price numeric,
                                               tax_amount numeric, state text, billing_agreement_id text)
    ON CONFLICT (dr_order_item_id) DO NOTHING
    RETURNING id
), cart AS (
    UPDATE carts c
       SET status = 'Closed', dr_order_id = $3, dr_checkout_id = coalesce($4, c.dr_checkout_id),
           dr_payment_state = 'Successful', dr_payment_failure_reason = NULL
      FROM rec WHERE c.id = rec.cart_id
    RETURNING c.id
), attempt AS (
    INSERT INTO payment_attempts (process_data_id, subscription_id, outcome, dr_checkout_id, dr_order_id, amount,
                                  currency, node)
    SELECT rec.id, rec.subscription_id, 'charged', $4, $3, $9, $6, $2 FROM rec
    RETURNING id
)
UPDATE subscription_process_data p
   SET subscription_job_run_status = 'Successful', is_recurring_payment_processed = true, dr_order_id = $3,
       dr_checkout_id = coalesce($4, p.dr_checkout_id), order_id = (SELECT id FROM ord), last_error_code = NULL,
       last_error_message = NULL, outage_count = 0, locked_by = NULL, locked_until = NULL
  FROM rec
 WHERE p.id = rec.id
RETURNING p.order_id;

-- name: finish_failed_attempt
-- recurring-payments: a counted attempt without an order (decline, bad data): count it, set the status and next
-- attempt, keep the reason on the record and its cart, write the attempt. Returns nothing without the lease.
-- $1 record, $2 node, $3 status, $4 next attempt, $5 code, $6 message, $7 outcome, $8 clear the checkout,
-- $9 the cart's payment state (NULL keeps it), $10 amount, $11 currency
WITH rec AS (
    UPDATE subscription_process_data p
       SET subscription_job_run_status = $3, subscription_retry_count = subscription_retry_count + 1,
           next_attempt_at = $4, last_error_code = $5, last_error_message = $6, last_attempt_at = now(),
           dr_checkout_id = CASE WHEN $8 THEN NULL ELSE p.dr_checkout_id END, outage_count = 0,
           locked_by = NULL, locked_until = NULL
     WHERE p.id = $1 AND p.locked_by = $2 AND NOT p.is_recurring_payment_processed
    RETURNING p.id, p.subscription_id, p.cart_id, p.subscription_retry_count
), old AS (
    SELECT dr_checkout_id FROM subscription_process_data WHERE id = $1
), cart AS (
    UPDATE carts c
       SET dr_payment_state = coalesce($9, c.dr_payment_state), dr_payment_failure_reason = $6,
           dr_checkout_id = CASE WHEN $8 THEN NULL ELSE c.dr_checkout_id END
      FROM rec WHERE c.id = rec.cart_id
    RETURNING c.id
), attempt AS (
    INSERT INTO payment_attempts (process_data_id, subscription_id, outcome, code, message, dr_checkout_id, amount,
                                  currency, node)
    SELECT rec.id, rec.subscription_id, $7, $5, $6, (SELECT dr_checkout_id FROM old), $10, $11, $2 FROM rec
    RETURNING id
)
SELECT subscription_retry_count FROM rec;

-- name: postpone_record
-- recurring-payments: no attempt was made or its outcome is unknown (outage, unknown, a decline limit): try again
-- at $3, checkout kept. $6 adds to the outage count. Returns nothing without the lease.
UPDATE subscription_process_data
   SET next_attempt_at = $3, last_error_code = $4, last_error_message = $5, outage_count = outage_count + $6,
       locked_by = NULL, locked_until = NULL
 WHERE id = $1 AND locked_by = $2 AND NOT is_recurring_payment_processed
RETURNING id;
