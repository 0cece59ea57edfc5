-- drjobs: no-transaction
-- The web console's indexes (schema.sql has the same definitions), built without blocking the engines' writes:
-- the newest Failed records of each kind, the installment records waiting after a decline or an outage, and a
-- record's application_logs rows. Safe to run again from the start: each index is dropped first, so one a failed
-- concurrent build left invalid is built afresh.
DROP INDEX CONCURRENTLY IF EXISTS subscription_process_data_failed;
CREATE INDEX CONCURRENTLY subscription_process_data_failed ON subscription_process_data (updated_at, id)
    INCLUDE (last_error_code) WHERE subscription_job_run_status = 'Failed';
DROP INDEX CONCURRENTLY IF EXISTS subscription_process_data_retrying;
CREATE INDEX CONCURRENTLY subscription_process_data_retrying ON subscription_process_data (next_attempt_at, id)
    INCLUDE (subscription_retry_count, outage_count)
    WHERE subscription_job_run_status = 'Open' AND (subscription_retry_count > 0 OR outage_count > 0);
DROP INDEX CONCURRENTLY IF EXISTS fulfillments_failed;
CREATE INDEX CONCURRENTLY fulfillments_failed ON fulfillments (updated_at, id) WHERE efn_status = 'Failed';
DROP INDEX CONCURRENTLY IF EXISTS line_item_fulfillments_failed;
CREATE INDEX CONCURRENTLY line_item_fulfillments_failed ON line_item_fulfillments (updated_at, id)
    WHERE efn_status = 'Failed';
DROP INDEX CONCURRENTLY IF EXISTS application_logs_record;
CREATE INDEX CONCURRENTLY application_logs_record ON application_logs (record_id, id) WHERE record_id IS NOT NULL;
