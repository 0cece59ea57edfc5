-- drjobs: no-transaction
-- Storefronts (issue 17): orders, subscriptions, their carts and installment records carry their storefront
-- (`DefaultStore` unless the outside system says otherwise), and recurring-payments claims each storefront's
-- records on their own, walking one index per storefront label in claim order. Adding a column with a constant
-- default rewrites nothing (PostgreSQL 11 and later); the index is built concurrently, so the engines and the
-- outside systems are not blocked. schema.sql has the same definitions. Safe to run again from the start: every
-- statement is a no-op the second time, and an index a failed concurrent build left invalid is dropped first.
CREATE OR REPLACE FUNCTION drjobs_storefront_label(name text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT CASE WHEN name = 'DefaultStore' THEN name
                ELSE regexp_replace(translate(name, 'abcdefghijklmnopqrstuvwxyz', 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'),
                                    '[^A-Z0-9]', '_', 'g') END
$$;
ALTER TABLE orders ADD COLUMN IF NOT EXISTS storefront text NOT NULL DEFAULT 'DefaultStore';
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS storefront text NOT NULL DEFAULT 'DefaultStore';
ALTER TABLE carts ADD COLUMN IF NOT EXISTS storefront text NOT NULL DEFAULT 'DefaultStore';
ALTER TABLE subscription_process_data ADD COLUMN IF NOT EXISTS storefront text NOT NULL DEFAULT 'DefaultStore';
DROP INDEX CONCURRENTLY IF EXISTS subscription_process_data_storefront_claim;
CREATE INDEX CONCURRENTLY subscription_process_data_storefront_claim
    ON subscription_process_data (drjobs_storefront_label(storefront),
                                  (coalesce(installment_run_date, '-infinity'::date)), id)
    WHERE subscription_job_run_status = 'Open' AND NOT is_recurring_payment_processed;
DROP INDEX CONCURRENTLY IF EXISTS subscription_process_data_claim;
