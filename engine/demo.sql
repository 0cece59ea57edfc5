-- `python run.py demo`: a realistic book written the way outside systems would write it, and the summary.
-- Loaded by engine/demo.py, apart from the production statements of engine/sql/; each statement sits under `-- name:`
-- with a one-line purpose. Parameters are $n only. Rows are spread deterministically by their number i.

-- name: demo_products
-- demo: eight products; one is sold as product details (no Digital River SKU, a SKU group instead), one has
-- neither a Digital River SKU nor product details (bad data).
INSERT INTO products (sku, name, dr_sku_id, tax_code, sku_group_id, country_of_origin)
VALUES ('WID-BASIC', 'Widget Basic plan', 'sku_widget_basic', '4512.1', NULL, NULL),
       ('WID-PRO', 'Widget Pro plan', 'sku_widget_pro', '4512.1', NULL, NULL),
       ('GAD-M', 'Gadget monthly box', 'sku_gadget_box', '4512.2', NULL, NULL),
       ('SUP-247', 'Support 24/7', 'sku_support', '4512.3', NULL, NULL),
       ('STO-1T', 'Storage 1 TB', 'sku_storage_1t', '4512.1', NULL, NULL),
       ('LIC-SEAT', 'Licence seat', NULL, '4512.4', 'software-licences', 'US'),
       ('TRN-ANN', 'Training, annual', 'sku_training', '4512.5', NULL, NULL),
       ('LEG-ADD', 'Legacy add-on', NULL, NULL, NULL, NULL);

-- name: demo_accounts
-- demo: $1 accounts over seven time zones; every 97th has no Digital River customer id.
INSERT INTO accounts (name, dr_customer_id, email, time_zone, bill_to)
SELECT 'Customer ' || i,
       CASE WHEN i % 97 = 0 THEN NULL ELSE 'cus_demo_' || i END,
       'billing' || i || '@customer.example',
       (ARRAY['UTC', 'America/New_York', 'Europe/Berlin', 'Asia/Tokyo', 'Australia/Sydney', 'America/Los_Angeles',
              'Europe/London'])[1 + i % 7],
       jsonb_build_object('name', 'Customer ' || i, 'email', 'billing' || i || '@customer.example',
                          'address', jsonb_build_object('line1', i || ' Main St', 'city', 'Springfield',
                                                        'postalCode', '55401',
                                                        'country', (ARRAY['US', 'GB', 'DE', 'FR'])[1 + i % 4]))
  FROM generate_series(1, $1) AS i;

-- name: demo_stored_payments
-- demo: one card per account; a few decline softly or hard, a few are no longer active.
INSERT INTO stored_payments (account_id, dr_source_id, is_active)
SELECT a.id,
       CASE WHEN i % 50 = 0 THEN 'src_soft_decline_insufficient_funds'
            WHEN i % 83 = 0 THEN 'src_hard_decline_fraud'
            ELSE 'src_demo_card_' || i END,
       i % 61 <> 0
  FROM generate_series(1, $1) AS i JOIN accounts a ON a.name = 'Customer ' || i;

-- name: demo_acquisition_orders
-- demo: the acquisition order each subscription came from, placed at the storefronts $2 (text[]) in turn:
-- customer 1 at the first, customer 2 at the second, ….
INSERT INTO orders (account_id, dr_order_id, dr_checkout_id, dr_order_state, currency, subtotal, total_tax,
                    total_amount, ship_to, bill_to, storefront)
SELECT a.id, 'ord_demo_acq_' || i, 'chk_demo_acq_' || i, 'complete', 'USD', 0, 0, 0, a.bill_to, a.bill_to,
       ($2::text[])[1 + (i - 1) % cardinality($2::text[])]
  FROM generate_series(1, $1) AS i JOIN accounts a ON a.name = 'Customer ' || i;

-- name: demo_acquisition_items
-- demo: the acquisition order's line, carrying the billing agreement later installments charge against.
INSERT INTO order_items (order_id, product_id, quantity, unit_price, tax_amount, dr_order_item_id,
                         dr_order_item_state, dr_billing_agreement_id)
SELECT o.id, p.id, 1 + i % 3, (ARRAY[9.99, 19.00, 49.50, 120.00, 5.25, 15.00, 299.00])[1 + i % 7], 0,
       'item_demo_acq_' || i, 'fulfilled', 'ba_demo_' || i
  FROM generate_series(1, $1) AS i
  JOIN orders o ON o.dr_order_id = 'ord_demo_acq_' || i
  JOIN products p ON p.sku = CASE WHEN i % 101 = 0 THEN 'LEG-ADD'
                                  ELSE (ARRAY['WID-BASIC', 'WID-PRO', 'GAD-M', 'SUP-247', 'STO-1T', 'LIC-SEAT',
                                              'TRN-ANN'])[1 + i % 7] END;

-- name: demo_subscriptions
-- demo: one subscription per account, at the storefront of its acquisition order. Most are due today, some are one
-- to three periods behind, some are due later; frequencies are mostly monthly; every 113th has an unknown currency.
INSERT INTO subscriptions (account_id, product_id, stored_payment_id, parent_order_id, parent_order_item_id, status,
                           quantity, unit_price, currency, installment_frequency, installment_interval,
                           installment_anchor_date, installment_count, installment_count_remaining,
                           installment_next_run_date, dr_billing_agreement_id, storefront)
SELECT o.account_id, oi.product_id, sp.id, o.id, oi.id, 'Active', oi.quantity, oi.unit_price,
       CASE WHEN i % 113 = 0 THEN 'XXX' ELSE 'USD' END,
       f.frequency, 1, d.anchor, 0, 12, d.anchor, oi.dr_billing_agreement_id, o.storefront
  FROM generate_series(1, $1) AS i
  JOIN orders o ON o.dr_order_id = 'ord_demo_acq_' || i
  JOIN order_items oi ON oi.order_id = o.id
  JOIN stored_payments sp ON sp.account_id = o.account_id
  CROSS JOIN LATERAL (SELECT CASE WHEN i % 10 < 6 THEN 'Monthly' WHEN i % 10 < 8 THEN 'Weekly'
                                  WHEN i % 10 = 8 THEN 'Daily' ELSE 'Yearly' END AS frequency) f
  CROSS JOIN LATERAL (
        SELECT CASE WHEN i % 20 < 14 THEN current_date - 1
                    WHEN i % 20 < 17 THEN (current_date - 1 - CASE f.frequency
                        WHEN 'Monthly' THEN make_interval(months => i % 3 + 1)
                        WHEN 'Weekly' THEN make_interval(weeks => i % 3 + 1)
                        WHEN 'Daily' THEN make_interval(days => i % 3 + 1)
                        ELSE make_interval(years => 1) END)::date
                    ELSE current_date + 1 + i % 20 END AS anchor) d;

-- name: demo_fulfillment_requests
-- demo: what an ERP writes after the charges: every third installment order is shipped, every tenth cancelled.
INSERT INTO fulfillments (order_id, dr_order_id, dr_order_state, ofi_received)
SELECT o.id, o.dr_order_id, CASE WHEN o.id % 10 = 0 THEN 'cancelled' ELSE o.dr_order_state END, true
  FROM orders o
 WHERE o.dr_order_source = 'Subscription—Installment' AND (o.id % 3 = 0 OR o.id % 10 = 0)
ON CONFLICT (order_id) DO NOTHING;

-- name: demo_line_fulfillment_requests
-- demo: the shipped orders' lines, each fulfilled in full.
INSERT INTO line_item_fulfillments (fulfillment_id, order_item_id, dr_order_item_id, fulfill_quantity)
SELECT f.id, oi.id, oi.dr_order_item_id, oi.quantity
  FROM fulfillments f JOIN order_items oi ON oi.order_id = f.order_id
 WHERE f.dr_order_state <> 'cancelled'
   AND NOT EXISTS (SELECT 1 FROM line_item_fulfillments l WHERE l.order_item_id = oi.id);

-- name: demo_summary_records
-- demo summary: installment records by status, with how many wait for a retry.
SELECT subscription_job_run_status AS status, count(*) AS records,
       count(*) FILTER (WHERE subscription_retry_count > 0) AS retried,
       coalesce(sum(o.total_amount), 0) AS amount
  FROM subscription_process_data p LEFT JOIN orders o ON o.id = p.order_id
 GROUP BY 1 ORDER BY 1;

-- name: demo_summary_failures
-- demo summary: why records failed or wait, by error code (bad data codes name the field), with an example.
SELECT subscription_job_run_status AS status, last_error_code AS code, count(*) AS records,
       min(last_error_message) AS example
  FROM subscription_process_data
 WHERE last_error_code IS NOT NULL
 GROUP BY 1, 2
 ORDER BY 3 DESC, 2;

-- name: demo_summary_fulfillments
-- demo summary: fulfillment records (order level and line level) by status.
SELECT 'order cancellations' AS kind, efn_status AS status, count(*) FROM fulfillments
 WHERE dr_order_state = 'cancelled' GROUP BY 2
UNION ALL
SELECT 'line fulfillments', efn_status, count(*) FROM line_item_fulfillments GROUP BY 2
ORDER BY 1, 2;

-- name: demo_summary_storefronts
-- demo summary, with several storefronts: installment records by storefront and status.
SELECT storefront,
       count(*) FILTER (WHERE subscription_job_run_status = 'Successful') AS charged,
       count(*) FILTER (WHERE subscription_job_run_status = 'Open') AS waiting,
       count(*) FILTER (WHERE subscription_job_run_status = 'Failed') AS failed
  FROM subscription_process_data
 GROUP BY 1;

-- name: demo_summary_storefront_orders
-- demo summary, with several storefronts: each installment order's storefront and Digital River order id, to look
-- up in that storefront's sandbox.
SELECT storefront, dr_order_id FROM orders WHERE dr_order_source = 'Subscription—Installment';
