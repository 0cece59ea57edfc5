-- /metrics and /readyz: the gauges read from the database at scrape time, and the readiness ping.
-- Loaded once by engine/store.py with every other file of engine/sql/; each statement sits under `-- name:`
-- with a one-line purpose. Parameters are $n only. The record counts, expired leases and live nodes reuse
-- `status_counts`, `expired_lease_count` and `live_node_count` of engine.sql.

-- name: health_ping
-- /readyz: the database answers.
SELECT 1;

-- name: metrics_oldest_due
-- /metrics: per job, the age in seconds of its oldest due record (NULL when nothing is due). "Due" is each job's
-- own rule, the fragment its claim and drain count use; a subscription's age runs from midnight UTC of its next
-- run date, and every account zone counts as valid here ($1: the zones the database knows). recurring-payments'
-- is not here: engine/metrics.py walks its claim order a window at a time (`payment_claim_window_end`), so it
-- costs the rows before the first due record, not the backlog.
SELECT 'subscription-installments' AS job,
       extract(epoch FROM now() - (min(s.installment_next_run_date)::timestamp AT TIME ZONE 'UTC'))::float8 AS age
  FROM subscriptions s
  LEFT JOIN accounts a ON a.id = s.account_id
 WHERE {{subscription_due zones=$1}}
UNION ALL
SELECT 'order-fulfillment', extract(epoch FROM now() - min(f.next_attempt_at))::float8
  FROM fulfillments f
  JOIN orders o ON o.id = f.order_id
 WHERE {{cancelled_order_due}}
UNION ALL
SELECT 'line-item-fulfillment', extract(epoch FROM now() - min(l.next_attempt_at))::float8
  FROM line_item_fulfillments l
  JOIN fulfillments f ON f.id = l.fulfillment_id
  JOIN orders o ON o.id = f.order_id
 WHERE {{line_item_due}} AND {{line_item_order_sendable}};

-- name: metrics_last_success
-- /metrics: per job $1, when a run of it last succeeded (Unix seconds; no row for a job that never did), cluster-wide
-- and across restarts. Each job's newest succeeded run, walking the (job, fire_time) index backwards.
SELECT j.job, last.at
  FROM unnest($1::text[]) AS j(job)
  CROSS JOIN LATERAL (SELECT extract(epoch FROM r.finished_at)::float8 AS at FROM job_runs r
                       WHERE r.job = j.job AND r.status = 'succeeded' AND r.finished_at IS NOT NULL
                       ORDER BY r.fire_time DESC LIMIT 1) AS last;

-- name: metrics_paused
-- /metrics: per job $1, 1 when it is paused (`pause JOB`), else 0.
SELECT j.job, coalesce((SELECT c.paused FROM job_controls c WHERE c.job = j.job), false)::int::float8 AS paused
  FROM unnest($1::text[]) AS j(job);

-- name: storefronts_waiting_for_key
-- status, /metrics and the console: records of storefronts whose label is not among $1 (the storefronts with a key),
-- which no job touches: open installment records (counted up to $2 each, by the claim index), open cancellations
-- of cancelled orders and open fulfillment lines (by their order's storefront). One row per (label, kind) with records.
WITH RECURSIVE labels AS {{open_payment_labels}}
SELECT label, 'installments' AS kind,
       (SELECT count(*) FROM (SELECT 1 FROM subscription_process_data p
                               WHERE p.subscription_job_run_status = 'Open' AND NOT p.is_recurring_payment_processed
                                 AND drjobs_storefront_label(p.storefront) = labels.label
                               LIMIT $2) x) AS count
  FROM labels
 WHERE label IS NOT NULL AND label <> ALL($1::text[])
UNION ALL
SELECT drjobs_storefront_label(o.storefront), 'cancellations', count(*)
  FROM fulfillments f JOIN orders o ON o.id = f.order_id
 WHERE f.efn_status IN ('Open', 'Pending') AND coalesce(f.dr_order_state, o.dr_order_state) = 'cancelled'
   AND drjobs_storefront_label(o.storefront) <> ALL($1::text[])
 GROUP BY 1
UNION ALL
SELECT drjobs_storefront_label(o.storefront), 'fulfillment_lines', count(*)
  FROM line_item_fulfillments l JOIN fulfillments f ON f.id = l.fulfillment_id JOIN orders o ON o.id = f.order_id
 WHERE l.efn_status IN ('Open', 'Pending') AND drjobs_storefront_label(o.storefront) <> ALL($1::text[])
 GROUP BY 1
ORDER BY 1, 2;

-- name: subscriptions_waiting_for_key
-- status and the console: Active subscriptions due (run date up to tomorrow, by the due index) of storefronts whose
-- label is not among $1: the installment job makes nothing for them until their storefront has a key. Counted up
-- to $2 each; the walk reads every due subscription, so /metrics, scraped often, does not ask.
SELECT label, 'subscriptions_due' AS kind, count(*) AS count
  FROM (SELECT drjobs_storefront_label(s.storefront) AS label
          FROM subscriptions s
         WHERE s.status = 'Active' AND s.installment_count_remaining > 0
           AND s.installment_next_run_date <= (now() AT TIME ZONE 'UTC')::date + 1
           AND drjobs_storefront_label(s.storefront) <> ALL($1::text[])
         LIMIT $2) due
 GROUP BY label
 ORDER BY label;
