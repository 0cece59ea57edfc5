-- drjobs store: the whole current schema. Applied by `python run.py migrate` (and by `serve` on start); every
-- statement is idempotent, so applying it again is harmless. Later changes are appended as `ALTER TABLE … ADD
-- COLUMN IF NOT EXISTS`. A change this file cannot make idempotently, or must not make under a long lock (`CREATE
-- INDEX CONCURRENTLY`, a backfill), is also written as a numbered migration in engine/migrations/, which
-- `migrate` runs before this file on an existing database; this file still shows the result, since an empty
-- database gets only this file (docs/operations.md "Schema upgrades").
--
-- Conventions (docs/contract.md): every table has an identity `id`, `created_at` and `updated_at`; money is
-- numeric(18,2) with a char(3) currency beside it; every column beyond the contract's has a default.
-- Columns the engine needs to do its work but that outside systems may leave empty are nullable: the engine
-- fails such a record with a message naming the column instead of the database refusing the row.

CREATE OR REPLACE FUNCTION drjobs_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

-- Which versions of this file (sha256) were applied: `migrate` skips a version already here.
CREATE TABLE IF NOT EXISTS schema_versions (
    version     text PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- Which numbered migrations (engine/migrations/NNNN_name.sql) this database has had, each once, with the sha256 of
-- the file as it was applied: `migrate` refuses a file changed since. A database made from this file has them all.
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS accounts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    name            text NOT NULL DEFAULT '',
    dr_customer_id  text,
    email           text,
    bill_to         jsonb,
    time_zone       text NOT NULL DEFAULT 'UTC'
);

CREATE TABLE IF NOT EXISTS products (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    sku                 text UNIQUE,
    name                text,
    dr_sku_id           text,
    tax_code            text,
    country_of_origin   char(2),
    eccn                text
);

CREATE TABLE IF NOT EXISTS stored_payments (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    account_id      bigint REFERENCES accounts (id),
    dr_source_id    text,
    is_active       boolean NOT NULL DEFAULT true
);

CREATE TABLE IF NOT EXISTS orders (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    account_id          bigint REFERENCES accounts (id),
    parent_order_id     bigint REFERENCES orders (id),
    dr_order_id         text UNIQUE,
    dr_checkout_id      text,
    dr_order_state      text,
    dr_order_source     text NOT NULL DEFAULT 'Standard Checkout'
        CHECK (dr_order_source IN ('Standard Checkout', 'Subscription—Installment', 'Subscription—Renewal')),
    currency            char(3),
    subtotal            numeric(18,2),
    total_tax           numeric(18,2),
    total_amount        numeric(18,2),
    ship_to             jsonb,
    bill_to             jsonb,
    -- Whose Digital River key the order was placed and is fulfilled with (docs/contract.md, Storefronts).
    storefront          text NOT NULL DEFAULT 'DefaultStore'
);

CREATE TABLE IF NOT EXISTS order_items (
    id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    order_id                bigint NOT NULL REFERENCES orders (id),
    product_id              bigint REFERENCES products (id),
    quantity                integer NOT NULL DEFAULT 1 CHECK (quantity >= 0),
    unit_price              numeric(18,2),
    tax_amount              numeric(18,2),
    dr_order_item_id        text UNIQUE,
    dr_order_item_state     text,
    dr_billing_agreement_id text
);
CREATE INDEX IF NOT EXISTS order_items_order_id ON order_items (order_id);

CREATE TABLE IF NOT EXISTS subscriptions (
    id                          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    account_id                  bigint REFERENCES accounts (id),
    product_id                  bigint REFERENCES products (id),
    stored_payment_id           bigint REFERENCES stored_payments (id),
    parent_order_id             bigint REFERENCES orders (id),
    parent_order_item_id        bigint REFERENCES order_items (id),
    status                      text NOT NULL DEFAULT 'Active'
        CHECK (status IN ('Active', 'Suspended', 'Cancelled', 'Completed')),
    quantity                    integer NOT NULL DEFAULT 1 CHECK (quantity >= 0),
    unit_price                  numeric(18,2),
    currency                    char(3),
    installment_frequency       text NOT NULL DEFAULT 'Monthly'
        CHECK (installment_frequency IN ('Daily', 'Weekly', 'Monthly', 'Yearly')),
    installment_interval        integer NOT NULL DEFAULT 1 CHECK (installment_interval > 0),
    installment_anchor_date     date,
    installment_count           integer NOT NULL DEFAULT 0 CHECK (installment_count >= 0),
    installment_count_remaining integer NOT NULL DEFAULT 0 CHECK (installment_count_remaining >= 0),
    installment_next_run_date   date,
    dr_billing_agreement_id     text,
    last_error_message          text,
    -- Charged with this storefront's Digital River key (cc_batch_SubscriptionProcessor('DefaultStore', …)).
    storefront                  text NOT NULL DEFAULT 'DefaultStore'
);
-- Due subscriptions: the installment job's scan.
CREATE INDEX IF NOT EXISTS subscriptions_due ON subscriptions (installment_next_run_date, id)
    WHERE status = 'Active' AND installment_count_remaining > 0;

CREATE TABLE IF NOT EXISTS carts (
    id                          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    account_id                  bigint REFERENCES accounts (id),
    subscription_id             bigint REFERENCES subscriptions (id),
    status                      text NOT NULL DEFAULT 'Open-DR' CHECK (status IN ('Open', 'Open-DR', 'Closed')),
    currency                    char(3),
    dr_checkout_id              text,
    dr_order_id                 text,
    dr_payment_state            text CHECK (dr_payment_state IN ('Successful', 'Declined')),
    dr_payment_failure_reason   text,
    storefront                  text NOT NULL DEFAULT 'DefaultStore'
);

CREATE TABLE IF NOT EXISTS cart_items (
    id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    cart_id                 bigint NOT NULL REFERENCES carts (id),
    product_id              bigint REFERENCES products (id),
    quantity                integer NOT NULL DEFAULT 1 CHECK (quantity >= 0),
    unit_price              numeric(18,2),
    dr_billing_agreement_id text
);
CREATE INDEX IF NOT EXISTS cart_items_cart_id ON cart_items (cart_id);

CREATE TABLE IF NOT EXISTS subscription_process_data (
    id                              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at                      timestamptz NOT NULL DEFAULT now(),
    updated_at                      timestamptz NOT NULL DEFAULT now(),
    subscription_id                 bigint NOT NULL REFERENCES subscriptions (id),
    installment_number              integer NOT NULL CHECK (installment_number > 0),
    cart_id                         bigint REFERENCES carts (id),
    cart_item_id                    bigint REFERENCES cart_items (id),
    parent_order_id                 bigint REFERENCES orders (id),
    stored_payment_id               bigint REFERENCES stored_payments (id),
    product_id                      bigint REFERENCES products (id),
    account_id                      bigint REFERENCES accounts (id),
    installment_run_date            date,
    is_recurring_payment_processed  boolean NOT NULL DEFAULT false,
    subscription_job_run_status     text NOT NULL DEFAULT 'Open'
        CHECK (subscription_job_run_status IN ('Open', 'Pending', 'Successful', 'Failed')),
    subscription_retry_count        integer NOT NULL DEFAULT 0 CHECK (subscription_retry_count >= 0),
    next_attempt_at                 timestamptz NOT NULL DEFAULT now(),
    upstream_id                     text NOT NULL UNIQUE DEFAULT gen_random_uuid()::text,
    dr_checkout_id                  text,
    dr_order_id                     text UNIQUE,
    order_id                        bigint REFERENCES orders (id),
    last_error_code                 text,
    last_error_message              text,
    last_attempt_at                 timestamptz,
    -- Consecutive attempts that ended in an outage (not counted as attempts); drives the outage backoff.
    outage_count                    integer NOT NULL DEFAULT 0 CHECK (outage_count >= 0),
    locked_by                       text,
    locked_until                    timestamptz,
    -- The subscription's storefront, copied when the record is made: charged with that storefront's key.
    storefront                      text NOT NULL DEFAULT 'DefaultStore',
    UNIQUE (subscription_id, installment_number),
    -- A processed record is a successful one, and a successful one has its Digital River order.
    CHECK (is_recurring_payment_processed = (subscription_job_run_status = 'Successful')),
    CHECK (subscription_job_run_status <> 'Successful' OR dr_order_id IS NOT NULL)
);
-- A storefront's name as its settings spell it (engine.settings.storefront_label: `EU Store` → `EU_STORE`, the
-- STORE of DR_API_KEY_EU_STORE; DefaultStore stays itself). Only ASCII letters are upper-cased, as in Python.
CREATE OR REPLACE FUNCTION drjobs_storefront_label(name text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$
    SELECT CASE WHEN name = 'DefaultStore' THEN name
                ELSE regexp_replace(translate(name, 'abcdefghijklmnopqrstuvwxyz', 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'),
                                    '[^A-Z0-9]', '_', 'g') END
$$;
-- Due payment records: the recurring-payments claim of each storefront walks this index in order (oldest
-- installment date first; a record without a date first of all) and stops when it has its rows. Its first column
-- also gives the storefronts with open records by a loose index scan (`payment_storefronts`). Migration 0004
-- builds it concurrently on an existing database (and drops subscription_process_data_claim, which it replaces).
CREATE INDEX IF NOT EXISTS subscription_process_data_storefront_claim
    ON subscription_process_data (drjobs_storefront_label(storefront),
                                  (coalesce(installment_run_date, '-infinity'::date)), id)
    WHERE subscription_job_run_status = 'Open' AND NOT is_recurring_payment_processed;
DROP INDEX IF EXISTS subscription_process_data_due;
CREATE INDEX IF NOT EXISTS subscription_process_data_subscription
    ON subscription_process_data (subscription_id, installment_number);

-- Every counted payment attempt (charged, declined, refused for bad data): the audit trail, and the history
-- behind Digital River's limits on declined merchant-initiated charges (once a day, four in 30 days).
CREATE TABLE IF NOT EXISTS payment_attempts (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    process_data_id     bigint NOT NULL REFERENCES subscription_process_data (id),
    subscription_id     bigint NOT NULL REFERENCES subscriptions (id),
    outcome             text NOT NULL CHECK (outcome IN ('charged', 'soft_decline', 'hard_decline', 'bad_data')),
    code                text,
    message             text,
    dr_checkout_id      text,
    dr_order_id         text,
    amount              numeric(18,2),
    currency            char(3),
    node                text
);
CREATE INDEX IF NOT EXISTS payment_attempts_declines ON payment_attempts (subscription_id, created_at)
    WHERE outcome IN ('soft_decline', 'hard_decline');
CREATE INDEX IF NOT EXISTS payment_attempts_record ON payment_attempts (process_data_id);

CREATE TABLE IF NOT EXISTS fulfillments (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    order_id            bigint NOT NULL UNIQUE REFERENCES orders (id),
    dr_order_id         text,
    dr_order_state      text,
    ofi_received        boolean NOT NULL DEFAULT false,
    ocn_received        boolean NOT NULL DEFAULT false,
    efn_status          text NOT NULL DEFAULT 'Open'
        CHECK (efn_status IN ('Open', 'Pending', 'Completed', 'Failed')),
    retry_count         integer NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    message             text,
    dr_fulfillment_id   text,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    locked_by           text,
    locked_until        timestamptz
);
-- Due order-level records (order-fulfillment claims the cancelled ones).
CREATE INDEX IF NOT EXISTS fulfillments_due ON fulfillments (next_attempt_at, id)
    WHERE efn_status IN ('Open', 'Pending');

CREATE TABLE IF NOT EXISTS line_item_fulfillments (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    fulfillment_id      bigint NOT NULL REFERENCES fulfillments (id),
    order_item_id       bigint REFERENCES order_items (id),
    dr_order_item_id    text,
    fulfill_quantity    integer NOT NULL DEFAULT 0 CHECK (fulfill_quantity >= 0),
    cancel_quantity     integer NOT NULL DEFAULT 0 CHECK (cancel_quantity >= 0),
    efn_status          text NOT NULL DEFAULT 'Open'
        CHECK (efn_status IN ('Open', 'Pending', 'Completed', 'Failed')),
    retry_count         integer NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    message             text,
    dr_fulfillment_id   text,
    tracking_company    text,
    tracking_number     text,
    tracking_url        text,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    locked_by           text,
    locked_until        timestamptz
);
CREATE INDEX IF NOT EXISTS line_item_fulfillments_due ON line_item_fulfillments (next_attempt_at, id)
    WHERE efn_status IN ('Open', 'Pending');
CREATE INDEX IF NOT EXISTS line_item_fulfillments_fulfillment ON line_item_fulfillments (fulfillment_id);

CREATE TABLE IF NOT EXISTS application_logs (
    id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    logging_level           text NOT NULL DEFAULT 'ERROR'
        CHECK (logging_level IN ('ERROR', 'WARN', 'INFO', 'DEBUG')),
    module_name             text,
    message                 text,
    exception_type          text,
    exception_message       text,
    stack_trace             text,
    record_id               text,
    response_status_code    integer,
    request                 jsonb,
    response                jsonb,
    node                    text
);
-- log-cleanup deletes by age.
CREATE INDEX IF NOT EXISTS application_logs_created_at ON application_logs (created_at, id);

CREATE TABLE IF NOT EXISTS job_runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    job         text NOT NULL CHECK (job IN ('subscription-installments', 'recurring-payments',
                                             'order-fulfillment', 'line-item-fulfillment', 'digital-river-events',
                                             'log-cleanup')),
    fire_time   timestamptz NOT NULL,
    trigger     text NOT NULL DEFAULT 'schedule' CHECK (trigger IN ('schedule', 'manual', 'drain', 'message')),
    node        text,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    status      text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'succeeded', 'failed')),
    claimed     integer NOT NULL DEFAULT 0,
    succeeded   integer NOT NULL DEFAULT 0,
    failed      integer NOT NULL DEFAULT 0,
    error       text,
    UNIQUE (job, fire_time)
);
CREATE INDEX IF NOT EXISTS job_runs_running ON job_runs (node) WHERE status = 'running';

-- Operator controls: a paused job claims nothing on any engine process until resumed.
CREATE TABLE IF NOT EXISTS job_controls (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    job         text NOT NULL UNIQUE CHECK (job IN ('subscription-installments', 'recurring-payments',
                                                    'order-fulfillment', 'line-item-fulfillment',
                                                    'digital-river-events', 'log-cleanup')),
    paused      boolean NOT NULL DEFAULT false,
    changed_by  text
);

CREATE TABLE IF NOT EXISTS engine_nodes (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    name            text NOT NULL UNIQUE,
    started_at      timestamptz NOT NULL DEFAULT now(),
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    stopped_at      timestamptz,
    pid             integer,
    host            text,
    version         text
);
-- What the process runs, as it reported it: its jobs' schedules and concurrency (no secrets). `status` reads it.
ALTER TABLE engine_nodes ADD COLUMN IF NOT EXISTS settings jsonb;

-- updated_at follows every UPDATE.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['accounts', 'products', 'stored_payments', 'orders', 'order_items', 'subscriptions',
                             'carts', 'cart_items', 'subscription_process_data', 'payment_attempts', 'fulfillments',
                             'line_item_fulfillments', 'application_logs', 'job_runs', 'job_controls',
                             'engine_nodes']
    LOOP
        EXECUTE format('CREATE OR REPLACE TRIGGER %I BEFORE UPDATE ON %I '
                       'FOR EACH ROW EXECUTE FUNCTION drjobs_touch_updated_at()', t || '_touch', t);
    END LOOP;
END
$$;

-- Fencing (docs/reliability.md): every claim stamps a fresh token on the rows it leases, and every write a job
-- makes under that lease names the token. A worker that outlived its lease (stalled, paused, cut off) holds a
-- token another claim has replaced, so its writes change nothing. Giving a row back, or an operator's retry,
-- clears the token.
CREATE SEQUENCE IF NOT EXISTS drjobs_lease_tokens;
ALTER TABLE subscription_process_data ADD COLUMN IF NOT EXISTS lease_token bigint;
ALTER TABLE fulfillments ADD COLUMN IF NOT EXISTS lease_token bigint;
ALTER TABLE line_item_fulfillments ADD COLUMN IF NOT EXISTS lease_token bigint;
-- Looks for the order of a checkout Digital River no longer knows (POST /orders 404 and no order found by
-- checkout or upstream id): after CHECKOUT_LOOKS of them the record is Failed `checkout_unknown` for an operator.
ALTER TABLE subscription_process_data ADD COLUMN IF NOT EXISTS checkout_looks integer NOT NULL DEFAULT 0;
-- The Digital River source the saved checkout charges (a replaced card is attached to it before it is submitted).
ALTER TABLE subscription_process_data ADD COLUMN IF NOT EXISTS dr_checkout_source_id text;
-- The SKU group of a product sold without a Digital River SKU: Digital River requires `skuGroupId` (with
-- `countryOfOrigin` and `name`) in a checkout item's `productDetails` (GitBook
-- product-management/using-product-details.md); the group carries the tax code and ECCN.
ALTER TABLE products ADD COLUMN IF NOT EXISTS sku_group_id text;
-- The fraud review state and the payment charge's state Digital River answered for an order (Order.fraudState,
-- payment.charges[0].state).
ALTER TABLE orders ADD COLUMN IF NOT EXISTS dr_fraud_state text;
ALTER TABLE orders ADD COLUMN IF NOT EXISTS dr_charge_state text;
-- Installment records an operator should look at (`status_attention`).
CREATE INDEX IF NOT EXISTS subscription_process_data_attention ON subscription_process_data (last_error_code)
    WHERE last_error_code IN ('checkout_unknown', 'subscription_cancelled', 'subscription_suspended')
      AND subscription_job_run_status IN ('Open', 'Failed');
-- A 429 from Digital River, shared by every engine process on this database that uses the same key: Digital
-- River refuses every call with that key until Retry-After has passed. `key_id` is the first 16 hex digits of
-- the key's SHA-256, never the key.
CREATE TABLE IF NOT EXISTS dr_rate_pauses (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    key_id          text NOT NULL UNIQUE,
    paused_until    timestamptz NOT NULL
);
CREATE OR REPLACE TRIGGER dr_rate_pauses_touch BEFORE UPDATE ON dr_rate_pauses
    FOR EACH ROW EXECUTE FUNCTION drjobs_touch_updated_at();

-- Digital River events (issue 13; docs/digital-river.md "Events"). An installment whose order Digital River made
-- but has not confirmed (`pending_payment`, `in_review`) is `Pending`: not claimable and not due, settled by the
-- order's events (digital-river-events) or, with no event for an hour, by a look at the order.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                    WHERE conname = 'subscription_process_data_subscription_job_run_status_check'
                      AND pg_get_constraintdef(oid) LIKE '%Pending%') THEN
        ALTER TABLE subscription_process_data
            DROP CONSTRAINT IF EXISTS subscription_process_data_subscription_job_run_status_check;
        ALTER TABLE subscription_process_data ADD CONSTRAINT subscription_process_data_subscription_job_run_status_check
            CHECK (subscription_job_run_status IN ('Open', 'Pending', 'Successful', 'Failed'));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'job_runs_job_check'
                      AND pg_get_constraintdef(oid) LIKE '%digital-river-events%') THEN
        ALTER TABLE job_runs DROP CONSTRAINT IF EXISTS job_runs_job_check;
        ALTER TABLE job_runs ADD CONSTRAINT job_runs_job_check CHECK (job IN (
            'subscription-installments', 'recurring-payments', 'order-fulfillment', 'line-item-fulfillment',
            'digital-river-events', 'log-cleanup'));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'job_controls_job_check'
                      AND pg_get_constraintdef(oid) LIKE '%digital-river-events%') THEN
        ALTER TABLE job_controls DROP CONSTRAINT IF EXISTS job_controls_job_check;
        ALTER TABLE job_controls ADD CONSTRAINT job_controls_job_check CHECK (job IN (
            'subscription-installments', 'recurring-payments', 'order-fulfillment', 'line-item-fulfillment',
            'digital-river-events', 'log-cleanup'));
    END IF;
END
$$;
-- Orders of this record that failed after they were made (order.charge.failed, order.blocked, order.cancelled on
-- a Pending record): kept as its history, and never adopted by a later attempt's lookups.
ALTER TABLE subscription_process_data ADD COLUMN IF NOT EXISTS dr_failed_order_ids text[] NOT NULL DEFAULT '{}';
-- Pending records, for the events job's look at orders with no event for an hour.
CREATE INDEX IF NOT EXISTS subscription_process_data_pending ON subscription_process_data (next_attempt_at, id)
    WHERE subscription_job_run_status = 'Pending';

-- Order states in the order Digital River moves through them: a state never moves back to a lower rank
-- (`order.accepted` arriving after `order.complete` changes nothing). Unknown states rank 0.
CREATE OR REPLACE FUNCTION drjobs_order_state_rank(state text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE state
        WHEN 'pending_payment' THEN 1 WHEN 'in_review' THEN 1
        WHEN 'accepted' THEN 2
        WHEN 'fulfilled' THEN 3 WHEN 'dispute' THEN 3
        WHEN 'complete' THEN 4 WHEN 'cancelled' THEN 4 WHEN 'blocked' THEN 4
        WHEN 'returned' THEN 5
        ELSE 0 END
$$;

-- Every Digital River event the engine has heard, once (webhooks and GET /events): the event's id is unique, so a
-- delivery seen twice, or heard by a webhook and a poll, is one row. `dr_created_at` is Digital River's
-- createdTime: events are applied in that order.
CREATE TABLE IF NOT EXISTS dr_events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    event_id        text NOT NULL UNIQUE,
    type            text NOT NULL,
    storefront      text NOT NULL DEFAULT 'DefaultStore',
    dr_order_id     text,
    payload         jsonb NOT NULL,
    source          text NOT NULL CHECK (source IN ('webhook', 'poll')),
    status          text NOT NULL DEFAULT 'Pending' CHECK (status IN ('Pending', 'Processed', 'Ignored', 'Failed')),
    message         text,
    dr_created_at   timestamptz NOT NULL DEFAULT now(),
    received_at     timestamptz NOT NULL DEFAULT now(),
    processed_at    timestamptz
);
CREATE INDEX IF NOT EXISTS dr_events_pending ON dr_events (dr_created_at, id) WHERE status = 'Pending';
CREATE INDEX IF NOT EXISTS dr_events_order ON dr_events (dr_order_id);
CREATE OR REPLACE TRIGGER dr_events_touch BEFORE UPDATE ON dr_events
    FOR EACH ROW EXECUTE FUNCTION drjobs_touch_updated_at();
-- Where digital-river-events' GET /events poll reached, per storefront: any process continues from here.
CREATE TABLE IF NOT EXISTS dr_event_cursors (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    storefront      text NOT NULL UNIQUE,
    seen_until      timestamptz NOT NULL,
    last_event_id   text
);
CREATE OR REPLACE TRIGGER dr_event_cursors_touch BEFORE UPDATE ON dr_event_cursors
    FOR EACH ROW EXECUTE FUNCTION drjobs_touch_updated_at();
-- When line-item-fulfillment last asked Digital River (GET /orders/{id}) about an order whose lines wait for it
-- to be accepted, or an event said how it stands: orders are asked about only after an hour without news, since
-- `order.accepted` normally says it first.
ALTER TABLE fulfillments ADD COLUMN IF NOT EXISTS dr_state_checked_at timestamptz;

-- recurring-payments' claim window (engine/sql/payments.sql): the next `size` open installment records in claim
-- order after the cursor. A function of its own so it can plan as it must whatever the statistics say: right
-- after the installment job's bulk insert the planner knows nothing of the new rows and would read every one of
-- them through a bitmap and sort them; with bitmaps, sorts and sequential scans off for this one statement it
-- walks the claim index in order and stops at the limit, so a claim reads a window, never the backlog (issue 14).
-- One storefront's records at a time (its label, issue 17): each storefront is claimed on its own.
DROP FUNCTION IF EXISTS drjobs_payment_claim_window(date, bigint, integer);
CREATE OR REPLACE FUNCTION drjobs_payment_claim_window(after_date date, after_id bigint, size integer, label text)
RETURNS TABLE (id bigint, claim_date date)
LANGUAGE sql STABLE
SET enable_bitmapscan = off SET enable_sort = off SET enable_seqscan = off
AS $$
    SELECT w.id, coalesce(w.installment_run_date, '-infinity'::date)
      FROM subscription_process_data w
     WHERE w.subscription_job_run_status = 'Open' AND NOT w.is_recurring_payment_processed
       AND drjobs_storefront_label(w.storefront) = label
       AND (coalesce(w.installment_run_date, '-infinity'::date), w.id) > (after_date, after_id)
     ORDER BY coalesce(w.installment_run_date, '-infinity'::date), w.id
     LIMIT size
$$;

-- The web console's pages (engine/sql/console.sql): the newest Failed records of each kind, the installment records
-- waiting for a later attempt after a decline or an outage, and a record's application_logs rows. Built
-- concurrently on an existing database by engine/migrations/0002_console_indexes.sql; the definitions must match.
CREATE INDEX IF NOT EXISTS subscription_process_data_failed ON subscription_process_data (updated_at, id)
    INCLUDE (last_error_code) WHERE subscription_job_run_status = 'Failed';
CREATE INDEX IF NOT EXISTS subscription_process_data_retrying ON subscription_process_data (next_attempt_at, id)
    INCLUDE (subscription_retry_count, outage_count)
    WHERE subscription_job_run_status = 'Open' AND (subscription_retry_count > 0 OR outage_count > 0);
CREATE INDEX IF NOT EXISTS fulfillments_failed ON fulfillments (updated_at, id) WHERE efn_status = 'Failed';
CREATE INDEX IF NOT EXISTS line_item_fulfillments_failed ON line_item_fulfillments (updated_at, id)
    WHERE efn_status = 'Failed';
CREATE INDEX IF NOT EXISTS application_logs_record ON application_logs (record_id, id) WHERE record_id IS NOT NULL;

-- The distinct account time zones, read by a loose index scan (`account_time_zones`) instead of a pass over every
-- account. Migration 0003 builds it concurrently on an existing database; this line makes it on a new one.
CREATE INDEX IF NOT EXISTS accounts_time_zone ON accounts (time_zone);
