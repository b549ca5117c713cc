-- "Relayed, clean-up failed" is not "failed" (issue #21 item 6).
--
-- A job whose recording is stored, verified and linked, and whose delete at
-- Telnyx failed, used to end `failed`, with an alert that read as if the
-- recording were missing. Now such a job ends `succeeded` (the recording
-- plays) and owes a clean-up, which every worker's poll retries apart from
-- the job queue, with backoff:
--
-- - `telnyx_delete_due_at`: a delete at Telnyx is owed from then; NULL
--   when none is (deleted, or never to be deleted). While a worker tries,
--   when another may try (the claim, like `alert_due_at`).
-- - `telnyx_delete_attempts`, `telnyx_delete_error`: the failed tries and
--   the last error.
-- - `telnyx_cleanup_alerted_at`: the clean-up alert (a kind of its own,
--   which says the recording is safe and plays) went out.
--
-- Retention keeps a succeeded job while its clean-up is owed: it is the only
-- pointer to the copy at Telnyx.
--
-- Nullable columns and a constant default rewrite nothing; the CHECK is NOT
-- VALID (every row passes: the new columns are NULL) so nothing is scanned
-- under the lock. The sweep's index is the next migration (CONCURRENTLY).
SET LOCAL lock_timeout = '500ms';

ALTER TABLE recording_relay.recording_jobs
    ADD COLUMN telnyx_delete_due_at TIMESTAMPTZ,
    ADD COLUMN telnyx_delete_attempts INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN telnyx_delete_error TEXT,
    ADD COLUMN telnyx_cleanup_alerted_at TIMESTAMPTZ,
    ADD CONSTRAINT recording_jobs_telnyx_cleanup_after_link
        CHECK (telnyx_delete_due_at IS NULL
               OR (linked_at IS NOT NULL AND telnyx_deleted_at IS NULL)) NOT VALID;

COMMENT ON COLUMN recording_relay.recording_jobs.telnyx_delete_due_at IS
    'A delete at Telnyx of this stored and linked recording is owed from then (NULL: none owed)';
COMMENT ON COLUMN recording_relay.recording_jobs.telnyx_delete_attempts IS
    'Failed tries of the owed delete at Telnyx';
COMMENT ON COLUMN recording_relay.recording_jobs.telnyx_delete_error IS
    'Why the last try of the owed delete at Telnyx failed';
COMMENT ON COLUMN recording_relay.recording_jobs.telnyx_cleanup_alerted_at IS
    'When the clean-up alert (the recording plays; its copy at Telnyx is not deleted) went out';

-- What is left to clean up, for a DBA: recordings that play from the bucket
-- and are still at Telnyx because the delete keeps failing, and `unmatched/`
-- originals of moved recordings that could not be deleted (orphans; the job
-- is kept by retention while it names one).
CREATE VIEW recording_relay.recording_cleanups_pending AS
SELECT j.id, 'telnyx_delete'::text AS cleanup, j.recording_id, j.intake_id,
       j.object_path, NULL::text AS orphan_path,
       j.telnyx_delete_attempts AS attempts, j.telnyx_delete_error AS last_error,
       j.telnyx_delete_due_at AS next_try_at, j.finished_at
FROM recording_relay.recording_jobs j
WHERE j.telnyx_delete_due_at IS NOT NULL
UNION ALL
SELECT j.id, 'unmatched_original', j.recording_id, j.intake_id,
       j.object_path, j.moved_from, NULL, NULL, NULL, j.finished_at
FROM recording_relay.recording_jobs j
WHERE j.state = 'succeeded' AND j.moved_from IS NOT NULL AND j.moved_from_deleted_at IS NULL;

COMMENT ON VIEW recording_relay.recording_cleanups_pending IS
    'Recordings that play but left a copy behind: at Telnyx (delete failing) or under unmatched/ (orphan)';

-- Closed like everything else in the schema (20261201000001).
REVOKE ALL ON recording_relay.recording_cleanups_pending FROM PUBLIC;
DO $$
DECLARE
    api_role TEXT;
BEGIN
    FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        CONTINUE WHEN to_regrole(api_role) IS NULL;
        EXECUTE format('REVOKE ALL ON recording_relay.recording_cleanups_pending FROM %I', api_role);
    END LOOP;
    IF to_regrole('recording_relay_operator') IS NOT NULL THEN
        GRANT SELECT ON recording_relay.recording_cleanups_pending TO recording_relay_operator;
    END IF;
END
$$;
