-- Issue #19: alerts that do not depend on who ended the job.
--
-- 1. `alert_due_at`: the alert that a job ended `failed` or `unmatched` is
--    owed. Only the worker that wrote such a result itself used to alert,
--    from memory, after the fact: a last attempt ended by the lease rescuer,
--    a job ended by a process that died before alerting, and one whose
--    commit reached the server while the worker saw an error never alerted.
--    Now the state change itself sets the column, whoever makes it, in the
--    same transaction; a sweep in every worker sends the alert and clears
--    it. While a sweep sends, the column holds when another may try (the
--    sender died): at least once, not once per process.
-- 2. `retention_alerted_at` is about one ending of a job: an operator who
--    was told "this job will be deleted" and requeued it to keep it had it
--    deleted when it ended again, with no fresh alert. Any change of state
--    now forgets it (requeue, attach, cancel).
-- One BEFORE trigger does both, for every writer (the worker, the rescuer,
-- the operator functions, a DBA's UPDATE). Its WHEN clause lets the common
-- changes (claim, retry, success) through without calling it.
--
-- Rows already failed or unmatched get NULL, not owed: upgrading alerts
-- nothing that was alerted before. Nullable, no default: adding the column
-- rewrites nothing. The sweep's index is the next migration (CONCURRENTLY).

SET LOCAL lock_timeout = '500ms';

ALTER TABLE recording_relay.recording_jobs ADD COLUMN alert_due_at TIMESTAMPTZ;

COMMENT ON COLUMN recording_relay.recording_jobs.alert_due_at IS
    'Set when the job ends failed or unmatched: its alert is owed from then; NULL once sent. While a worker sends it, when another may try';

CREATE FUNCTION recording_relay.recording_jobs_alert_on_state() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    NEW.alert_due_at := CASE WHEN NEW.state IN ('failed', 'unmatched') THEN now() END;
    NEW.retention_alerted_at := NULL;
    RETURN NEW;
END
$$;

CREATE TRIGGER recording_jobs_alert_on_state
    BEFORE UPDATE OF state ON recording_relay.recording_jobs
    FOR EACH ROW
    WHEN (OLD.state IS DISTINCT FROM NEW.state
          AND (NEW.state IN ('failed', 'unmatched') OR OLD.state IN ('failed', 'unmatched')
               OR OLD.retention_alerted_at IS NOT NULL))
    EXECUTE FUNCTION recording_relay.recording_jobs_alert_on_state();

-- PUBLIC may execute new functions by default.
REVOKE ALL ON FUNCTION recording_relay.recording_jobs_alert_on_state() FROM PUBLIC;
DO $$
DECLARE
    api_role TEXT;
BEGIN
    FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        CONTINUE WHEN to_regrole(api_role) IS NULL;
        EXECUTE format('REVOKE ALL ON FUNCTION recording_relay.recording_jobs_alert_on_state() FROM %I', api_role);
    END LOOP;
END
$$;
