-- A recording stored under `unmatched/` and later matched (a requeue) or
-- attached by an operator is moved into the intake's own folder before it
-- is linked, so the playback API, which signs only that folder, plays it
-- (issue #19). A move is a copy, a check and a delete, three steps a crash
-- can split; each is recorded here, so a retry resumes:
--
-- - `moved_from`: the `unmatched/` object the job's recording was copied
--   from; `object_path` names the copy in the intake's folder from the
--   moment the move is planned, before the copy is made.
-- - `moved_at`: the copy holds the size and SHA-256 the job recorded when
--   it stored the recording. Only then is it linked.
-- - `moved_from_deleted_at`: the `unmatched/` original is gone. A moved,
--   linked job without it left that object behind (logged and counted).
--
-- The relay's own table; nullable columns without defaults rewrite nothing.
-- The CHECKs are NOT VALID: every existing row has NULL in the new columns
-- and passes, so there is nothing to scan while the ALTER holds its lock,
-- and every write from now on is checked.
SET LOCAL lock_timeout = '500ms';

ALTER TABLE recording_relay.recording_jobs
    ADD COLUMN moved_from TEXT,
    ADD COLUMN moved_at TIMESTAMPTZ,
    ADD COLUMN moved_from_deleted_at TIMESTAMPTZ,
    ADD CONSTRAINT recording_jobs_moved_from_unmatched
        CHECK (moved_from IS NULL OR (moved_from LIKE 'unmatched/%' AND object_path IS NOT NULL
                                      AND object_path <> moved_from)) NOT VALID,
    ADD CONSTRAINT recording_jobs_moved_in_order
        CHECK ((moved_at IS NULL OR moved_from IS NOT NULL)
               AND (moved_from_deleted_at IS NULL OR moved_at IS NOT NULL)) NOT VALID,
    ADD CONSTRAINT recording_jobs_linked_after_moved
        CHECK (linked_at IS NULL OR moved_from IS NULL OR moved_at IS NOT NULL) NOT VALID;

COMMENT ON COLUMN recording_relay.recording_jobs.moved_from IS
    'The unmatched/ object this recording was copied from into object_path';
COMMENT ON COLUMN recording_relay.recording_jobs.moved_at IS
    'When the copy at object_path was verified against object_size and object_sha256';
COMMENT ON COLUMN recording_relay.recording_jobs.moved_from_deleted_at IS
    'When the unmatched/ original was deleted after the link';
