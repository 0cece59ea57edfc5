-- The web console's pages (engine/console): it only reads here; its actions are engine/controls.py's.
-- Loaded once by engine/store.py with every other file of engine/sql/; each statement sits under `-- name:`
-- with a one-line purpose. Parameters are $n only. Every statement reads counts or the newest rows through an
-- index, with a LIMIT: a page costs the same on a store of a thousand records and of millions (bench/console.py).

-- name: console_recent_runs
-- Jobs page: the last $2 runs of each job of $1, newest first (the (job, fire_time) unique index, backwards).
SELECT j.job, r.fire_time, r.trigger, r.node, r.started_at, r.finished_at, r.status, r.claimed, r.succeeded,
       r.failed, r.error
  FROM unnest($1::text[]) AS j(job)
 CROSS JOIN LATERAL (
        SELECT * FROM job_runs WHERE job = j.job ORDER BY fire_time DESC LIMIT $2
       ) r
 ORDER BY j.job, r.fire_time DESC;

-- name: console_installments_waiting
-- Backlog page: Open installment records waiting for a later attempt after a soft decline or after an outage (the
-- small partial index of records that were declined or met an outage), and the Pending ones, whose order Digital
-- River made without confirming its payment yet (their partial index): for each, a count up to $2 + 1, the next
-- (or oldest) and the first $1 ids.
SELECT 'decline_retry' AS why,
       (SELECT count(*) FROM (SELECT 1 FROM subscription_process_data
         WHERE subscription_job_run_status = 'Open' AND (subscription_retry_count > 0 OR outage_count > 0)
           AND outage_count = 0 AND next_attempt_at > now() LIMIT $2::int + 1) x) AS count,
       w.next_at, NULL::timestamptz AS oldest_at, w.ids
  FROM (SELECT min(next_attempt_at) AS next_at, array_agg(id ORDER BY next_attempt_at, id) AS ids
          FROM (SELECT id, next_attempt_at FROM subscription_process_data
                 WHERE subscription_job_run_status = 'Open' AND (subscription_retry_count > 0 OR outage_count > 0)
                   AND outage_count = 0 AND next_attempt_at > now()
                 ORDER BY next_attempt_at, id LIMIT $1) first) w
UNION ALL
SELECT 'outage',
       (SELECT count(*) FROM (SELECT 1 FROM subscription_process_data
         WHERE subscription_job_run_status = 'Open' AND (subscription_retry_count > 0 OR outage_count > 0)
           AND outage_count > 0 AND next_attempt_at > now() LIMIT $2::int + 1) x),
       w.next_at, NULL, w.ids
  FROM (SELECT min(next_attempt_at) AS next_at, array_agg(id ORDER BY next_attempt_at, id) AS ids
          FROM (SELECT id, next_attempt_at FROM subscription_process_data
                 WHERE subscription_job_run_status = 'Open' AND (subscription_retry_count > 0 OR outage_count > 0)
                   AND outage_count > 0 AND next_attempt_at > now()
                 ORDER BY next_attempt_at, id LIMIT $1) first) w
UNION ALL
SELECT 'pending_payment',
       (SELECT count(*) FROM (SELECT 1 FROM subscription_process_data
         WHERE subscription_job_run_status = 'Pending' LIMIT $2::int + 1) x),
       NULL, w.oldest_at, w.ids
  FROM (SELECT min(next_attempt_at) AS oldest_at, array_agg(id ORDER BY next_attempt_at, id) AS ids
          FROM (SELECT id, next_attempt_at FROM subscription_process_data
                 WHERE subscription_job_run_status = 'Pending'
                 ORDER BY next_attempt_at, id LIMIT $1) first) w;

-- name: console_lines_waiting
-- Backlog page: line-item fulfillments refused for now, waiting for their next send (the due index, from now on): a
-- count up to $2 + 1, the next one and the first $1 ids.
SELECT (SELECT count(*) FROM (SELECT 1 FROM line_item_fulfillments
         WHERE efn_status IN ('Open', 'Pending') AND next_attempt_at > now() LIMIT $2::int + 1) x) AS count,
       min(next_attempt_at) AS next_at, array_agg(id ORDER BY next_attempt_at, id) AS ids
  FROM (SELECT id, next_attempt_at FROM line_item_fulfillments
         WHERE efn_status IN ('Open', 'Pending') AND next_attempt_at > now()
         ORDER BY next_attempt_at, id LIMIT $1) first;

-- name: console_lines_awaiting_acceptance
-- Backlog page: of the first $1 due line items (oldest due first, the due index), those whose order Digital River
-- has not accepted yet (line-item-fulfillment sends only accepted orders), and how many due lines were looked at.
WITH due AS MATERIALIZED (
    SELECT l.id, l.fulfillment_id, l.next_attempt_at
      FROM line_item_fulfillments l
     WHERE {{line_item_due}}
     ORDER BY l.next_attempt_at, l.id
     LIMIT $1
)
SELECT (SELECT count(*) FROM due) AS examined, count(*) AS count, min(due.next_attempt_at) AS oldest_at
  FROM due
  JOIN fulfillments f ON f.id = due.fulfillment_id
  JOIN orders o ON o.id = f.order_id
 WHERE NOT {{line_item_order_sendable}};

-- name: console_failures
-- Failures page: the newest Failed records of the kinds in $1 (installment, fulfillment, line-item), with the code
-- $2 when not NULL (an installment's last_error_code; a fulfillment's reason as `status` shows it: its message's
-- first 60 characters), rows $3 + 1 to $3 + $4 of all of them newest first. Each kind reads its partial index of
-- Failed rows newest first and stops at $3 + $4.
SELECT kind, id, updated_at, code, message, dr_order_id
  FROM (
        (SELECT 'installment' AS kind, id, updated_at, last_error_code AS code, last_error_message AS message,
                dr_order_id
           FROM subscription_process_data
          WHERE 'installment' = ANY($1::text[]) AND subscription_job_run_status = 'Failed'
            AND ($2::text IS NULL OR last_error_code = $2)
          ORDER BY updated_at DESC, id DESC
          LIMIT $3::int + $4::int)
        UNION ALL
        (SELECT 'fulfillment', id, updated_at, left(coalesce(message, 'no message'), 60), message, dr_order_id
           FROM fulfillments
          WHERE 'fulfillment' = ANY($1::text[]) AND efn_status = 'Failed'
            AND ($2::text IS NULL OR left(coalesce(message, 'no message'), 60) = $2)
          ORDER BY updated_at DESC, id DESC
          LIMIT $3::int + $4::int)
        UNION ALL
        (SELECT 'line-item', l.id, l.updated_at, left(coalesce(l.message, 'no message'), 60), l.message,
                (SELECT f.dr_order_id FROM fulfillments f WHERE f.id = l.fulfillment_id)
           FROM line_item_fulfillments l
          WHERE 'line-item' = ANY($1::text[]) AND l.efn_status = 'Failed'
            AND ($2::text IS NULL OR left(coalesce(l.message, 'no message'), 60) = $2)
          ORDER BY l.updated_at DESC, l.id DESC
          LIMIT $3::int + $4::int)
       ) failed
 ORDER BY updated_at DESC, kind, id DESC
OFFSET $3 LIMIT $4;

-- name: console_failure_codes
-- Failures page: the codes the $3 newest Failed records of each kind in $1 carry, commonest first, $2 per kind at
-- most, with a count (installments: last_error_code; fulfillments and line items: the message's first 60
-- characters, as `status` shows them). Reads the partial indexes of Failed rows newest first, $3 rows at most.
(SELECT 'installment' AS kind, coalesce(code, 'no code') AS code, count(*) AS count
   FROM (SELECT last_error_code AS code FROM subscription_process_data
          WHERE 'installment' = ANY($1::text[]) AND subscription_job_run_status = 'Failed'
          ORDER BY updated_at DESC, id DESC LIMIT $3) newest
  GROUP BY 2 ORDER BY 3 DESC, 2 LIMIT $2)
UNION ALL
(SELECT 'fulfillment', code, count(*)
   FROM (SELECT left(coalesce(message, 'no message'), 60) AS code FROM fulfillments
          WHERE 'fulfillment' = ANY($1::text[]) AND efn_status = 'Failed'
          ORDER BY updated_at DESC, id DESC LIMIT $3) newest
  GROUP BY 2 ORDER BY 3 DESC, 2 LIMIT $2)
UNION ALL
(SELECT 'line-item', code, count(*)
   FROM (SELECT left(coalesce(message, 'no message'), 60) AS code FROM line_item_fulfillments
          WHERE 'line-item' = ANY($1::text[]) AND efn_status = 'Failed'
          ORDER BY updated_at DESC, id DESC LIMIT $3) newest
  GROUP BY 2 ORDER BY 3 DESC, 2 LIMIT $2);

-- name: console_installment
-- Record page: one installment record, every column, with its subscription's status and its account's name.
SELECT p.*, s.status AS subscription_status, a.name AS account_name
  FROM subscription_process_data p
  LEFT JOIN subscriptions s ON s.id = p.subscription_id
  LEFT JOIN accounts a ON a.id = p.account_id
 WHERE p.id = $1;

-- name: console_installment_attempts
-- Record page: the counted payment attempts of installment record $1, newest first (at most $2).
SELECT id, created_at, outcome, code, message, dr_checkout_id, dr_order_id, amount, currency, node
  FROM payment_attempts WHERE process_data_id = $1 ORDER BY id DESC LIMIT $2;

-- name: console_fulfillment
-- Record page: one order-level fulfillment record, every column.
SELECT * FROM fulfillments WHERE id = $1;

-- name: console_fulfillment_lines
-- Record page: the line items of fulfillment $1 (at most $2).
SELECT id, efn_status, fulfill_quantity, cancel_quantity, retry_count, dr_order_item_id, dr_fulfillment_id, message,
       updated_at
  FROM line_item_fulfillments WHERE fulfillment_id = $1 ORDER BY id LIMIT $2;

-- name: console_line_item
-- Record page: one line-item fulfillment record, every column, with its fulfillment's Digital River order.
SELECT l.*, f.dr_order_id, f.dr_order_state, f.efn_status AS fulfillment_status
  FROM line_item_fulfillments l
  LEFT JOIN fulfillments f ON f.id = l.fulfillment_id
 WHERE l.id = $1;

-- name: console_record_logs
-- Record page: the newest $4 application_logs rows about record $1 (application_logs.record_id, its index):
-- those of the modules in $2 that write about this kind of record, and the operators' commands on it (module
-- `operator`, messages starting with $3, "installment 12 ").
SELECT id, created_at, logging_level, module_name, message, exception_type, exception_message,
       response_status_code, request, response, node
  FROM application_logs
 WHERE record_id = $1
   AND (module_name = ANY($2::text[]) OR (module_name = 'operator' AND starts_with(message, $3)))
 ORDER BY id DESC
 LIMIT $4;

-- name: console_oldest_waiting
-- Backlog page: per job, the first record of its queue (the first entry of the index its claim walks), cheap at any
-- size: subscription-installments' oldest next run date on or before today (UTC) of an Active subscription with
-- installments left; recurring-payments' first Open record in claim order (oldest installment date; it may wait
-- for a later attempt or behind an earlier installment); the fulfillment jobs' oldest due record by their own rules
-- among their first $1 due Open/Pending records (none there: nothing is shown).
SELECT 'subscription-installments' AS job, s.id, (s.installment_next_run_date::timestamp AT TIME ZONE 'UTC') AS due_at,
       NULL::timestamptz AS next_attempt_at
  FROM (SELECT id, installment_next_run_date FROM subscriptions
         WHERE status = 'Active' AND installment_count_remaining > 0
           AND installment_next_run_date <= (now() AT TIME ZONE 'UTC')::date
         ORDER BY installment_next_run_date, id LIMIT 1) s
UNION ALL
SELECT 'recurring-payments', p.id, (p.installment_run_date::timestamp AT TIME ZONE 'UTC'), p.next_attempt_at
  FROM (SELECT id, installment_run_date, next_attempt_at FROM subscription_process_data
         WHERE subscription_job_run_status = 'Open' AND NOT is_recurring_payment_processed
         ORDER BY coalesce(installment_run_date, '-infinity'::date), id LIMIT 1) p
UNION ALL
SELECT 'order-fulfillment', d.id, d.next_attempt_at, d.next_attempt_at
  FROM (SELECT f.id, f.next_attempt_at
          FROM (SELECT id, order_id, efn_status, next_attempt_at, dr_order_state FROM fulfillments
                 WHERE efn_status IN ('Open', 'Pending') AND next_attempt_at <= now()
                 ORDER BY next_attempt_at, id LIMIT $1) f
          JOIN orders o ON o.id = f.order_id
         WHERE {{cancelled_order_due}}
         ORDER BY f.next_attempt_at, f.id LIMIT 1) d
UNION ALL
SELECT 'line-item-fulfillment', d.id, d.next_attempt_at, d.next_attempt_at
  FROM (SELECT l.id, l.next_attempt_at
          FROM (SELECT id, fulfillment_id, efn_status, next_attempt_at FROM line_item_fulfillments
                 WHERE efn_status IN ('Open', 'Pending') AND next_attempt_at <= now()
                 ORDER BY next_attempt_at, id LIMIT $1) l
          JOIN fulfillments f ON f.id = l.fulfillment_id
          JOIN orders o ON o.id = f.order_id
         WHERE {{line_item_due}} AND {{line_item_order_sendable}}
         ORDER BY l.next_attempt_at, l.id LIMIT 1) d;

-- name: console_counts_to_do
-- Backlog page: the records still to be worked on or looked at (Open, Pending, Failed) of the large tables,
-- counted exactly up to $1 + 1 through their partial indexes (a count above $1 is shown as the estimate).
SELECT 'subscription_process_data' AS kind, 'Open' AS status, (SELECT count(*) FROM (
        SELECT 1 FROM subscription_process_data
         WHERE subscription_job_run_status = 'Open' AND NOT is_recurring_payment_processed LIMIT $1::int + 1) x) AS count
UNION ALL
SELECT 'subscription_process_data', 'Pending', (SELECT count(*) FROM (
        SELECT 1 FROM subscription_process_data WHERE subscription_job_run_status = 'Pending' LIMIT $1::int + 1) x)
UNION ALL
SELECT 'subscription_process_data', 'Failed', (SELECT count(*) FROM (
        SELECT 1 FROM subscription_process_data WHERE subscription_job_run_status = 'Failed' LIMIT $1::int + 1) x)
UNION ALL
SELECT 'fulfillments', 'Open', (SELECT count(*) FROM (
        SELECT 1 FROM fulfillments WHERE efn_status IN ('Open', 'Pending') AND efn_status = 'Open'
         LIMIT $1::int + 1) x)
UNION ALL
SELECT 'fulfillments', 'Pending', (SELECT count(*) FROM (
        SELECT 1 FROM fulfillments WHERE efn_status IN ('Open', 'Pending') AND efn_status = 'Pending'
         LIMIT $1::int + 1) x)
UNION ALL
SELECT 'fulfillments', 'Failed', (SELECT count(*) FROM (
        SELECT 1 FROM fulfillments WHERE efn_status = 'Failed' LIMIT $1::int + 1) x)
UNION ALL
SELECT 'line_item_fulfillments', 'Open', (SELECT count(*) FROM (
        SELECT 1 FROM line_item_fulfillments WHERE efn_status IN ('Open', 'Pending') AND efn_status = 'Open'
         LIMIT $1::int + 1) x)
UNION ALL
SELECT 'line_item_fulfillments', 'Pending', (SELECT count(*) FROM (
        SELECT 1 FROM line_item_fulfillments WHERE efn_status IN ('Open', 'Pending') AND efn_status = 'Pending'
         LIMIT $1::int + 1) x)
UNION ALL
SELECT 'line_item_fulfillments', 'Failed', (SELECT count(*) FROM (
        SELECT 1 FROM line_item_fulfillments WHERE efn_status = 'Failed' LIMIT $1::int + 1) x)
UNION ALL
SELECT 'dr_events', 'Pending', (SELECT count(*) FROM (
        SELECT 1 FROM dr_events WHERE status = 'Pending' LIMIT $1::int + 1) x);
