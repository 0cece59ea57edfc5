-- The engine's own statements: migrations, leases, job runs, nodes, the application log, status.
-- Loaded once by engine/store.py with every other file of engine/sql/; each statement sits under `-- name:`
-- with a one-line purpose. Parameters are $n only. `{table}` appears only in the lease statements and is
-- filled from the fixed list of leased tables in store.py, never from input.

-- name: migrate_try_lock
-- Serialise `migrate` steps (several engines starting at once, `migrate` beside them) for this transaction: false
-- when another process holds the lock, and then `migrate` tries again a little later, outside any transaction (a
-- session waiting inside a statement would deadlock with a concurrent index build of the holder, engine/schema.py).
-- The key is the one release 0.1.0's `migrate` takes.
SELECT pg_try_advisory_xact_lock(7261001);

-- name: migrate_try_session_lock
-- The migration lock for this session, without waiting: a migration run outside a transaction holds it while its
-- statements run one by one (a direct connection only: through a transaction pooler a session is not ours).
SELECT pg_try_advisory_lock(7261001);

-- name: migrate_session_unlock
-- Give the session's migration lock back.
SELECT pg_advisory_unlock(7261001);

-- name: schema_state
-- What `migrate` finds: the numbered migrations' table, schema.sql's versions table, and any drjobs table at all
-- (none: an empty database, which gets schema.sql whole).
SELECT to_regclass('schema_migrations') IS NOT NULL AS migrations,
       to_regclass('schema_versions') IS NOT NULL AS versions,
       (to_regclass('schema_versions') IS NOT NULL OR to_regclass('subscriptions') IS NOT NULL
        OR to_regclass('job_runs') IS NOT NULL) AS populated;

-- name: create_schema_migrations
-- The numbered migrations' table on a database of a release before them (0.1.0); as in schema.sql.
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- name: applied_migrations
-- The numbered migrations applied here, in order, with the sha256 of each file as it was applied.
SELECT version, name, checksum FROM schema_migrations ORDER BY version;

-- name: record_migration
-- Remember that a numbered migration is applied (in its transaction, or after its last statement).
INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3);

-- name: invalid_indexes
-- Indexes of this schema that a failed concurrent build left invalid (a no-transaction migration checks its own).
SELECT c.relname AS name
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
 WHERE NOT i.indisvalid AND c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
 ORDER BY 1;

-- name: schema_version_applied
-- Whether schema.sql with this sha256 was applied already.
SELECT EXISTS (SELECT 1 FROM schema_versions WHERE version = $1);

-- name: record_schema_version
-- Remember that schema.sql with this sha256 is applied.
INSERT INTO schema_versions (version) VALUES ($1) ON CONFLICT (version) DO NOTHING;

-- name: extend_leases
-- Heartbeat: push out the leases this node still holds ($2 ids with their $3 tokens), never one that already ran
-- out (that record may be claimed again at any moment) and never waiting on a row another session has locked
-- (SKIP LOCKED: that row is looked at again next beat). Returns the ids renewed.
WITH mine AS (
    SELECT t.id
      FROM {table} t
      JOIN unnest($2::bigint[], $3::bigint[]) AS u(id, token) ON t.id = u.id
     WHERE t.lease_token = u.token AND t.locked_by = $1 AND t.locked_until > clock_timestamp()
       FOR UPDATE OF t SKIP LOCKED
)
UPDATE {table} t
   SET locked_until = clock_timestamp() + make_interval(secs => $4)
  FROM mine
 WHERE t.id = mine.id
RETURNING t.id;

-- name: lease_states
-- Heartbeat: for ids $1 with tokens $2 that the last beat did not renew, whether each lease is still this
-- claim's and unexpired (a row locked by another session) or gone. A plain read: never waits on a row lock.
SELECT t.id, (t.lease_token = u.token AND t.locked_until > clock_timestamp()) AS held
  FROM {table} t
  JOIN unnest($1::bigint[], $2::bigint[]) AS u(id, token) ON t.id = u.id;

-- name: touch_lease
-- Fence before a call that moves money or goods: the lease of row $1 is still claim $2's and unexpired; pushes it
-- out by $3 seconds for the call. Returns nothing when the lease is gone (the caller must not make the call).
UPDATE {table}
   SET locked_until = clock_timestamp() + make_interval(secs => $3)
 WHERE id = $1 AND lease_token = $2 AND locked_until > clock_timestamp()
RETURNING id;

-- name: release_leases
-- Give rows back unfinished (shutdown, or a record this node will not process now): only those still held under
-- the claim's token ($1 ids, $2 tokens).
UPDATE {table} t
   SET locked_by = NULL, locked_until = NULL, lease_token = NULL
  FROM unnest($1::bigint[], $2::bigint[]) AS u(id, token)
 WHERE t.id = u.id AND t.lease_token = u.token;

-- name: expired_lease_count
-- Rows claimed by someone whose lease ran out (its process died or stalled): claimable again.
SELECT count(*) FROM {table} WHERE locked_by IS NOT NULL AND locked_until < now();

-- name: share_rate_pause
-- A 429 for key $1: Digital River refuses its calls for $2 seconds from now. Keeps the later of this and any
-- pause already known, and tells every listening engine (channel drjobs_dr_pause, payload "<key_id> <seconds>").
WITH kept AS (
    INSERT INTO dr_rate_pauses (key_id, paused_until)
    VALUES ($1, clock_timestamp() + make_interval(secs => $2))
    ON CONFLICT (key_id) DO UPDATE SET paused_until = greatest(dr_rate_pauses.paused_until, EXCLUDED.paused_until)
    RETURNING key_id, paused_until
)
SELECT pg_notify('drjobs_dr_pause',
                 key_id || ' ' || extract(epoch FROM paused_until - clock_timestamp())::float8::text)
  FROM kept;

-- name: rate_pause_left
-- Seconds left of key $1's shared pause (nothing when none is running), by the database's clock so the engines'
-- own clocks do not matter.
SELECT extract(epoch FROM paused_until - clock_timestamp())::float8
  FROM dr_rate_pauses WHERE key_id = $1 AND paused_until > clock_timestamp();

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
-- Announce this process (or refresh its heartbeat) in engine_nodes, with what it runs ($5: its jobs' schedules
-- and concurrency, no secret), so `status` shows the cluster's settings rather than its own shell's.
INSERT INTO engine_nodes (name, started_at, heartbeat_at, pid, host, version, settings)
VALUES ($1, now(), now(), $2, $3, $4, $5::jsonb)
ON CONFLICT (name) DO UPDATE
   SET heartbeat_at = now(), stopped_at = NULL, pid = EXCLUDED.pid, host = EXCLUDED.host,
       version = EXCLUDED.version, settings = EXCLUDED.settings,
       started_at = CASE WHEN engine_nodes.stopped_at IS NOT NULL OR engine_nodes.pid IS DISTINCT FROM EXCLUDED.pid
                         THEN now() ELSE engine_nodes.started_at END;

-- name: node_stopped
-- Mark this process as stopped after a clean shutdown.
UPDATE engine_nodes SET stopped_at = now() WHERE name = $1;

-- name: live_node_count
-- Processes whose heartbeat is younger than $1 seconds: the rate budget is split among them.
SELECT count(*) FROM engine_nodes WHERE stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => $1);

-- name: live_nodes_by_key
-- Live processes (heartbeat younger than $1 seconds) holding each Digital River key (the key_id its storefronts
-- publish in engine_nodes.settings, never the key): a storefront's budget is split among them. A process of a
-- release before storefronts published none and used DR_API_KEY: it counts for the key_id $2 of this one's.
SELECT k.key_id, count(DISTINCT n.name) AS live
  FROM engine_nodes n
 CROSS JOIN LATERAL (
        SELECT s.value ->> 'key_id' AS key_id FROM jsonb_each(coalesce(n.settings -> 'storefronts', '{}')) s
         WHERE jsonb_typeof(s.value) = 'object'
        UNION ALL
        SELECT $2::text WHERE n.settings -> 'storefronts' IS NULL) k
 WHERE n.stopped_at IS NULL AND n.heartbeat_at > now() - make_interval(secs => $1) AND k.key_id IS NOT NULL
 GROUP BY k.key_id;

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
SELECT name, started_at, heartbeat_at, stopped_at, pid, host, version, settings,
       (stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => $1)) AS live
  FROM engine_nodes WHERE heartbeat_at > now() - interval '1 day' ORDER BY heartbeat_at DESC;

-- name: status_attention
-- status and /metrics: installment records an operator should look at, by reason and status: a checkout Digital
-- River does not know (Open while it is looked at again, Failed after every look), and installments not charged
-- because their subscription stopped. Reads the small partial index of these codes, not the table.
SELECT last_error_code AS reason, subscription_job_run_status AS status, count(*) AS count
  FROM subscription_process_data
 WHERE last_error_code IN ('checkout_unknown', 'subscription_cancelled', 'subscription_suspended')
   AND subscription_job_run_status IN ('Open', 'Failed')
 GROUP BY 1, 2
 ORDER BY 1, 2;

-- name: status_failures
-- status: why records failed, per job: the commonest error codes (installments) or messages (fulfillments, cut to
-- their first 60 characters, where the record's own ids come later), $1 per job, with a count and an example.
(SELECT 'recurring-payments' AS job, last_error_code AS reason, count(*) AS count,
        min(last_error_message) AS example
   FROM subscription_process_data
  WHERE subscription_job_run_status = 'Failed'
  GROUP BY 2 ORDER BY 3 DESC, 2 LIMIT $1)
UNION ALL
(SELECT 'order-fulfillment', left(coalesce(message, 'no message'), 60), count(*), min(message)
   FROM fulfillments WHERE efn_status = 'Failed'
  GROUP BY 2 ORDER BY 3 DESC, 2 LIMIT $1)
UNION ALL
(SELECT 'line-item-fulfillment', left(coalesce(message, 'no message'), 60), count(*), min(message)
   FROM line_item_fulfillments WHERE efn_status = 'Failed'
  GROUP BY 2 ORDER BY 3 DESC, 2 LIMIT $1)
UNION ALL
(SELECT 'digital-river-events', left(coalesce(message, 'no message'), 60), count(*), min(message)
   FROM dr_events WHERE status = 'Failed'
  GROUP BY 2 ORDER BY 3 DESC, 2 LIMIT $1);

-- name: schema_present
-- status and forecast: whether this database holds the drjobs schema (they only read; `migrate` makes it).
SELECT to_regclass('job_runs') IS NOT NULL AND to_regclass('engine_nodes') IS NOT NULL
       AND to_regclass('subscription_process_data') IS NOT NULL;

-- name: status_counts
-- status and /metrics: records by status, exactly, for the tables named in $1 (each other branch is a one-time
-- filter that reads nothing). Tables past COUNT_EXACTLY_BELOW rows are estimated instead (`record_count_estimates`).
SELECT 'subscriptions' AS kind, status, count(*) FROM subscriptions WHERE 'subscriptions' = ANY($1::text[])
 GROUP BY status
UNION ALL
SELECT 'subscription_process_data', subscription_job_run_status, count(*) FROM subscription_process_data
 WHERE 'subscription_process_data' = ANY($1::text[]) GROUP BY 2
UNION ALL
SELECT 'fulfillments', efn_status, count(*) FROM fulfillments WHERE 'fulfillments' = ANY($1::text[]) GROUP BY 2
UNION ALL
SELECT 'line_item_fulfillments', efn_status, count(*) FROM line_item_fulfillments
 WHERE 'line_item_fulfillments' = ANY($1::text[]) GROUP BY 2
UNION ALL
SELECT 'application_logs', logging_level, count(*) FROM application_logs WHERE 'application_logs' = ANY($1::text[])
 GROUP BY 2
UNION ALL
SELECT 'dr_events', status, count(*) FROM dr_events WHERE 'dr_events' = ANY($1::text[]) GROUP BY 2
ORDER BY 1, 2;

-- name: record_count_estimates
-- status and /metrics: for each table $1 (its status column $2), the planner's row count (pg_class.reltuples, -1
-- when never analyzed) and the share of each status among its most common values (pg_stats, from the last
-- ANALYZE). Reads the catalog only, whatever the tables' size.
SELECT t.kind, c.reltuples::float8 AS rows, v.status, v.freq::float8 AS freq
  FROM unnest($1::text[], $2::text[]) AS t(kind, col)
  JOIN pg_class c ON c.oid = to_regclass(t.kind)
  LEFT JOIN pg_stats s ON s.schemaname = current_schema() AND s.tablename = t.kind AND s.attname = t.col
  LEFT JOIN LATERAL unnest(s.most_common_vals::text::text[], s.most_common_freqs) AS v(status, freq) ON true
 ORDER BY 1, 3;

-- name: table_size_estimate
-- drain: the planner's estimate of table $1's rows (pg_class.reltuples; -1 when never analyzed), for a log line.
SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1);
