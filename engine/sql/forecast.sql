-- forecast: the charges the schedules will make over the next days. Read only, in one REPEATABLE READ READ ONLY
-- transaction (engine/forecast.py), both statements read through a server-side cursor.
-- Loaded once by engine/store.py with every other file of engine/sql/; each statement sits under `-- name:`
-- with a one-line purpose. Parameters are $n only.

-- name: forecast_schedule_groups
-- forecast: Active subscriptions with installments left whose next run date is on or before $1 (the day after the
-- forecast's last day: no account's "today" or last day is later), grouped by everything their installment dates
-- and their row depend on, so Python steps each group's dates once with the installment job's own functions.
-- The remaining count is cut to a bound on how many schedule dates fit between the next run date and $1 (the
-- next run date itself, then at most one per interval), which changes no series and merges the groups.
-- `amount_valid`: quantity and unit price are ones recurring-payments charges ($2 the largest charge it refuses;
-- the currency is checked once per group, in Python); the others are only counted. `unusable`: a date Python cannot hold (before the year
-- 1, after 9999, infinite), which the job cannot schedule either: only counted, its dates left out. `amount` is
-- the group's sum of quantity × unit price.
SELECT CASE WHEN NOT g.unusable THEN g.installment_anchor_date END AS installment_anchor_date,
       CASE WHEN NOT g.unusable THEN g.installment_next_run_date END AS installment_next_run_date,
       g.installment_frequency, g.installment_interval, 0 AS installment_count, g.installment_count_remaining,
       g.time_zone, g.currency, g.amount_valid, g.unusable, count(*) AS subscriptions, sum(g.amount) AS amount
  FROM (SELECT s.installment_anchor_date, s.installment_next_run_date, s.installment_frequency,
               s.installment_interval, a.time_zone, upper(btrim(s.currency)) AS currency,
               s.quantity * s.unit_price AS amount,
               (s.installment_next_run_date < '0001-01-01'
                OR coalesce(s.installment_anchor_date NOT BETWEEN '0001-01-01' AND '9999-12-31', false)) AS unusable,
               coalesce(s.quantity >= 1 AND s.unit_price > 0 AND s.quantity * s.unit_price < $2::numeric,
                        false) AS amount_valid,
               CASE WHEN s.installment_next_run_date < '0001-01-01' THEN 1  -- unusable: no arithmetic on it
               ELSE least(s.installment_count_remaining::bigint,
                     CASE s.installment_frequency
                          WHEN 'Daily' THEN ($1::date - s.installment_next_run_date)::bigint / s.installment_interval
                          WHEN 'Weekly' THEN ($1::date - s.installment_next_run_date)::bigint
                                             / (7::bigint * s.installment_interval)
                          ELSE ((extract(year FROM $1::date)::bigint * 12 + extract(month FROM $1::date)::bigint)
                                - (extract(year FROM s.installment_next_run_date)::bigint * 12
                                   + extract(month FROM s.installment_next_run_date)::bigint))
                               / (CASE s.installment_frequency WHEN 'Yearly' THEN 12 ELSE 1 END
                                  * s.installment_interval::bigint)
                     END + 2) END AS installment_count_remaining
          FROM subscriptions s
          LEFT JOIN accounts a ON a.id = s.account_id
         WHERE s.status = 'Active' AND s.installment_count_remaining > 0
           AND s.installment_next_run_date <= $1::date) g
 GROUP BY g.installment_anchor_date, g.installment_next_run_date, g.installment_frequency, g.installment_interval,
          g.installment_count_remaining, g.time_zone, g.currency, g.amount_valid, g.unusable;

-- name: forecast_installment_records
-- forecast: installment records made and not charged yet, by what the forecast does with them: `open` ones whose
-- next attempt is before $2 (the end of the last day) by day ($1 the first day: the next attempt's UTC date, day 0
-- when it has come), currency and whether their quantity and unit price are ones recurring-payments charges ($3
-- the largest charge it refuses; the currency is checked in Python). Only counted: `pending` ones (Digital River
-- made the order and is confirming its payment) and `inactive` ones, of a Suspended or Cancelled subscription
-- (recurring-payments fails them without a charge). Quantity, price and currency are the cart's, else the
-- subscription's, as recurring-payments reads them (`payment_record_details`).
SELECT r.kind, CASE WHEN r.kind = 'open' THEN r.day END AS day,
       CASE WHEN r.kind = 'open' THEN r.currency END AS currency,
       CASE WHEN r.kind = 'open' THEN r.amount_valid END AS amount_valid,
       count(*) AS installments, sum(CASE WHEN r.kind = 'open' THEN r.amount END) AS amount
  FROM (SELECT CASE WHEN p.subscription_job_run_status = 'Pending' THEN 'pending'
                    WHEN s.status IN ('Suspended', 'Cancelled') THEN 'inactive'
                    ELSE 'open' END AS kind,
               CASE WHEN p.next_attempt_at < ($1::date::timestamp AT TIME ZONE 'UTC') THEN 0
                    ELSE (p.next_attempt_at AT TIME ZONE 'UTC')::date - $1::date END AS day,
               upper(btrim(coalesce(c.currency, s.currency))) AS currency,
               coalesce(coalesce(ci.quantity, s.quantity) >= 1 AND coalesce(ci.unit_price, s.unit_price) > 0
                        AND coalesce(ci.quantity, s.quantity) * coalesce(ci.unit_price, s.unit_price) < $3::numeric,
                        false) AS amount_valid,
               coalesce(ci.quantity, s.quantity) * coalesce(ci.unit_price, s.unit_price) AS amount
          FROM subscription_process_data p
          JOIN subscriptions s ON s.id = p.subscription_id
          LEFT JOIN carts c ON c.id = p.cart_id
          LEFT JOIN cart_items ci ON ci.id = p.cart_item_id
         WHERE NOT p.is_recurring_payment_processed
           AND (p.subscription_job_run_status = 'Pending'
                OR (p.subscription_job_run_status = 'Open' AND p.next_attempt_at < $2::timestamptz))) r
 GROUP BY 1, 2, 3, 4;
