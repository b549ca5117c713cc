-- How far each job got, so a retry resumes at the first unfinished step:
-- resolved (recording known) -> matched (intake known) -> stored (object
-- verified in the bucket) -> linked (intake points at it) -> deleted at Telnyx.

SET LOCAL lock_timeout = '5s';

ALTER TABLE recording_jobs
    ADD COLUMN resolved_at        TIMESTAMPTZ,
    ADD COLUMN intake_id          UUID,
    ADD COLUMN match_method       TEXT,
    ADD COLUMN matched_at         TIMESTAMPTZ,
    -- Set before the first upload starts, so a retry knows where an upload
    -- that completed unobserved would be.
    ADD COLUMN object_path        TEXT,
    ADD COLUMN tus_upload_url     TEXT,
    ADD COLUMN content_type       TEXT,
    ADD COLUMN object_sha256      TEXT,
    ADD COLUMN object_size        BIGINT,
    ADD COLUMN stored_at          TIMESTAMPTZ,
    ADD COLUMN linked_at          TIMESTAMPTZ,
    ADD COLUMN telnyx_deleted_at  TIMESTAMPTZ,
    ADD CONSTRAINT recording_jobs_match_method_known
        CHECK (match_method IN ('client_state', 'phone_and_time', 'manual')),
    ADD CONSTRAINT recording_jobs_matched_has_intake
        CHECK ((matched_at IS NULL) = (intake_id IS NULL) AND (matched_at IS NULL) = (match_method IS NULL)),
    ADD CONSTRAINT recording_jobs_stored_is_complete
        CHECK (stored_at IS NULL OR (object_path IS NOT NULL AND object_sha256 IS NOT NULL
                                     AND object_size IS NOT NULL AND content_type IS NOT NULL)),
    ADD CONSTRAINT recording_jobs_sha256_is_hex
        CHECK (object_sha256 ~ '^[0-9a-f]{64}$'),
    ADD CONSTRAINT recording_jobs_linked_after_stored
        CHECK (linked_at IS NULL OR (stored_at IS NOT NULL AND intake_id IS NOT NULL)),
    ADD CONSTRAINT recording_jobs_deleted_after_stored
        CHECK (telnyx_deleted_at IS NULL OR stored_at IS NOT NULL);

-- One job owns one object: a second job for the same recording (a replayed
-- webhook with a new id, a reconcile run) cannot store it again.
CREATE UNIQUE INDEX recording_jobs_object_path_key ON recording_jobs (object_path)
    WHERE object_path IS NOT NULL;
CREATE INDEX recording_jobs_intake_idx ON recording_jobs (intake_id) WHERE intake_id IS NOT NULL;

-- Host systems store phone numbers in free formats ("(971) 265-6795",
-- "+1 971 265 6795"). The last ten digits identify a number well enough
-- within the matching time window, and ignore a missing or present
-- country prefix.
CREATE FUNCTION recording_relay_phone_key(phone TEXT) RETURNS TEXT
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT
RETURN nullif(right(regexp_replace(phone, '\D', '', 'g'), 10), '');

COMMENT ON FUNCTION recording_relay_phone_key(TEXT) IS
    'Comparable key of a free-format phone number (last ten digits), used to match recordings to patients';
