-- /metrics and /readyz: the gauges read from the database at scrape time, and the readiness ping.
-- Loaded once by engine/store.py with every other file of engine/sql/; each statement sits under `-- name:`
-- with a one-line purpose. Parameters are $n only. The record counts, expired leases and live nodes reuse
-- `status_counts`, `expired_lease_count` and `live_node_count` of engine.sql.

-- name: health_ping
-- /readyz: the database answers.
SELECT 1;

-- name: metrics_oldest_due
-- /metrics: per job, the age in seconds of its oldest due record (NULL when nothing is due). "Due" is what the
-- job's drain count calls due; a subscription's age runs from midnight UTC of its next run date.
SELECT 'subscription-installments' AS job,
       extract(epoch FROM now() - (min(installment_next_run_date)::timestamp AT TIME ZONE 'UTC'))::float8 AS age
  FROM subscriptions
 WHERE status = 'Active' AND installment_count_remaining > 0
   AND installment_next_run_date <= (now() AT TIME ZONE 'UTC')::date
UNION ALL
SELECT 'recurring-payments', extract(epoch FROM now() - min(next_attempt_at))::float8
  FROM subscription_process_data
 WHERE subscription_job_run_status = 'Open' AND NOT is_recurring_payment_processed AND next_attempt_at <= now()
UNION ALL
SELECT 'order-fulfillment', extract(epoch FROM now() - min(f.next_attempt_at))::float8
  FROM fulfillments f
  JOIN orders o ON o.id = f.order_id
 WHERE f.efn_status IN ('Open', 'Pending') AND f.next_attempt_at <= now()
   AND coalesce(f.dr_order_state, o.dr_order_state) = 'cancelled'
UNION ALL
SELECT 'line-item-fulfillment', extract(epoch FROM now() - min(l.next_attempt_at))::float8
  FROM line_item_fulfillments l
  JOIN fulfillments f ON f.id = l.fulfillment_id
  JOIN orders o ON o.id = f.order_id
 WHERE l.efn_status IN ('Open', 'Pending') AND l.next_attempt_at <= now()
   AND (coalesce(f.dr_order_state, o.dr_order_state) = 'accepted'
        OR (f.ofi_received AND coalesce(f.dr_order_state, o.dr_order_state, '') <> 'cancelled')
        OR coalesce(nullif(f.dr_order_id, ''), nullif(o.dr_order_id, '')) IS NULL);
