-- A fencing token per claim (issue #10).
--
-- A lease used to be fenced on (id, locked_by, attempts). `jobs cancel`,
-- then `jobs requeue` (attempts back to 0), then a re-claim by the same
-- process recreated that triple: the cancelled task's heartbeats and writes
-- matched again, and two tasks ran one job. Every claim now takes a fresh
-- number from a sequence, which only ever grows; every later write of the
-- claim is fenced on it. `locked_by` stays in the fence too, so a daemon
-- of an older release (which does not set `lease_id`) cannot make a stale
-- lease of a newer one match. The column keeps the last claim's number
-- after the job leaves `running`; the fences also require `running`.
-- Touches only the relay's own table: no lock on `public.intakes`.

SET LOCAL lock_timeout = '500ms';

CREATE SEQUENCE recording_relay.recording_jobs_lease_seq AS BIGINT;
ALTER TABLE recording_relay.recording_jobs ADD COLUMN lease_id BIGINT;
COMMENT ON COLUMN recording_relay.recording_jobs.lease_id IS
    'fencing token of the current (or last) claim, from recording_jobs_lease_seq';

REVOKE ALL ON SEQUENCE recording_relay.recording_jobs_lease_seq FROM PUBLIC;
DO $$
DECLARE
    api_role TEXT;
BEGIN
    FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        CONTINUE WHEN to_regrole(api_role) IS NULL;
        EXECUTE format('REVOKE ALL ON SEQUENCE recording_relay.recording_jobs_lease_seq FROM %I', api_role);
    END LOOP;
END
$$;
