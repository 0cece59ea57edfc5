-- Operator controls: pause, resume, retry. Every change is also written to application_logs with who made it.
-- Loaded once by engine/store.py with every other file of engine/sql/; each statement sits under `-- name:`
-- with a one-line purpose. Parameters are $n only.

-- name: set_job_paused
-- pause/resume: set whether job $1 is paused ($2), by operator $3.
INSERT INTO job_controls (job, paused, changed_by) VALUES ($1, $2, $3)
ON CONFLICT (job) DO UPDATE SET paused = EXCLUDED.paused, changed_by = EXCLUDED.changed_by;

-- name: job_paused
-- Whether job $1 is paused (checked before every claim).
SELECT coalesce((SELECT paused FROM job_controls WHERE job = $1), false);

-- name: paused_jobs
-- status: the paused jobs, who paused them and when.
SELECT job, changed_by, updated_at FROM job_controls WHERE paused;

-- name: audit_operator_action
-- Every operator command, whatever APP_LOG_LEVEL says: who ran what, on which record.
INSERT INTO application_logs (logging_level, module_name, message, record_id, node)
VALUES ('INFO', 'operator', $1, $2, $3);

-- name: retry_process_data
-- retry installment: a Failed record back to Open with its counts reset, unless it is claimed or already has an
-- order. A record Failed `checkout_unknown` (Digital River does not know its checkout and no order was found) also
-- loses that checkout: the operator who retries it has checked that no order exists. Any lease token left by a
-- late worker is cleared, so nothing that worker writes lands. Returns the record's state before the change (no
-- row: it does not exist).
WITH old AS (
    SELECT id, subscription_job_run_status AS status, dr_order_id,
           (locked_by IS NOT NULL AND locked_until > now()) AS claimed
      FROM subscription_process_data WHERE id = $1 FOR UPDATE
), changed AS (
    UPDATE subscription_process_data p
       SET subscription_job_run_status = 'Open', subscription_retry_count = 0, outage_count = 0,
           checkout_looks = 0, next_attempt_at = now(), locked_by = NULL, locked_until = NULL, lease_token = NULL,
           dr_checkout_id = CASE WHEN p.last_error_code = 'checkout_unknown' THEN NULL ELSE p.dr_checkout_id END,
           dr_checkout_source_id = CASE WHEN p.last_error_code = 'checkout_unknown' THEN NULL
                                        ELSE p.dr_checkout_source_id END
      FROM old
     WHERE p.id = old.id AND old.status = 'Failed' AND NOT old.claimed AND old.dr_order_id IS NULL
    RETURNING p.id
)
SELECT old.status, old.dr_order_id, old.claimed, EXISTS (SELECT 1 FROM changed) AS retried FROM old;

-- name: retry_fulfillment
-- retry fulfillment: a Failed order-level fulfillment back to Open with its retry count reset, unless claimed.
WITH old AS (
    SELECT id, efn_status AS status, (locked_by IS NOT NULL AND locked_until > now()) AS claimed
      FROM fulfillments WHERE id = $1 FOR UPDATE
), changed AS (
    UPDATE fulfillments f SET efn_status = 'Open', retry_count = 0, next_attempt_at = now(), locked_by = NULL,
                              locked_until = NULL, lease_token = NULL
      FROM old WHERE f.id = old.id AND old.status = 'Failed' AND NOT old.claimed
    RETURNING f.id
)
SELECT old.status, NULL::text AS dr_order_id, old.claimed, EXISTS (SELECT 1 FROM changed) AS retried FROM old;

-- name: retry_line_item_fulfillment
-- retry line-item: a Failed line back to Open with its retry count reset, unless claimed.
WITH old AS (
    SELECT id, efn_status AS status, (locked_by IS NOT NULL AND locked_until > now()) AS claimed
      FROM line_item_fulfillments WHERE id = $1 FOR UPDATE
), changed AS (
    UPDATE line_item_fulfillments l SET efn_status = 'Open', retry_count = 0, next_attempt_at = now(),
                                        locked_by = NULL, locked_until = NULL, lease_token = NULL
      FROM old WHERE l.id = old.id AND old.status = 'Failed' AND NOT old.claimed
    RETURNING l.id
)
SELECT old.status, NULL::text AS dr_order_id, old.claimed, EXISTS (SELECT 1 FROM changed) AS retried FROM old;
