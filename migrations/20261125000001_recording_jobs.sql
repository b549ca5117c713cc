-- recording-relay's own tables, and the recording columns it adds to ZScribe's
-- `intakes`. The host's `patients`/`intakes` tables are never created or
-- dropped here: this migration fails with a clear message when they are absent.

SET LOCAL lock_timeout = '5s';

DO $$
BEGIN
    IF to_regclass('intakes') IS NULL THEN
        RAISE EXCEPTION 'table "intakes" not found'
            USING HINT = 'recording-relay extends ZScribe''s intakes table: run its migrations '
                         'against the ZScribe database (tests and the demo create a minimal host schema first)';
    END IF;
END
$$;

-- Nullable columns without defaults: adding them rewrites nothing, so the
-- ACCESS EXCLUSIVE lock on the host's table lasts milliseconds. IF NOT EXISTS
-- because the original brief told the backend team to add the same columns.
ALTER TABLE intakes
    ADD COLUMN IF NOT EXISTS recording_id TEXT,
    ADD COLUMN IF NOT EXISTS recording_url TEXT,
    ADD COLUMN IF NOT EXISTS recording_duration INTEGER,
    ADD COLUMN IF NOT EXISTS recording_migrated_at TIMESTAMPTZ,
    ADD COLUMN IF NOT EXISTS recording_object_path TEXT;

COMMENT ON COLUMN intakes.recording_id IS 'Telnyx recording id (set by recording-relay)';
COMMENT ON COLUMN intakes.recording_url IS 'Authenticated Supabase Storage URL of the recording; the bucket is private, so playback needs a signed URL minted from recording_object_path';
COMMENT ON COLUMN intakes.recording_duration IS 'Recording duration in seconds';
COMMENT ON COLUMN intakes.recording_migrated_at IS 'When the recording was stored in Supabase Storage and verified';
COMMENT ON COLUMN intakes.recording_object_path IS 'Object path inside the recordings bucket; the exact key for signing URLs and for RLS';

CREATE TYPE recording_job_state AS ENUM (
    'pending',    -- runnable once next_run_at has passed
    'running',    -- claimed by locked_by until locked_until
    'succeeded',
    'failed',     -- permanent error or attempts exhausted; last_error says why
    'unmatched',  -- stored, but no intake matched; attach it by hand
    'cancelled',  -- stopped by an operator
    'duplicate'   -- another job relays the same recording; last_error names it
);

CREATE TABLE recording_jobs (
    id                    BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Telnyx's data.id: redeliveries carry the same one.
    event_id              TEXT NOT NULL UNIQUE,
    event_type            TEXT NOT NULL,
    occurred_at           TIMESTAMPTZ,
    -- The verified event exactly as parsed; the source of truth for the fields below.
    event                 JSONB NOT NULL,
    recording_id          TEXT,
    call_session_id       TEXT,
    call_control_id       TEXT,
    call_leg_id           TEXT,
    connection_id         TEXT,
    client_state          TEXT,
    from_number           TEXT,
    to_number             TEXT,
    duration_millis       BIGINT,
    channels              TEXT,
    recording_started_at  TIMESTAMPTZ,
    recording_ended_at    TIMESTAMPTZ,

    state                 recording_job_state NOT NULL DEFAULT 'pending',
    attempts              INTEGER NOT NULL DEFAULT 0,
    max_attempts          INTEGER NOT NULL DEFAULT 12,
    last_error            TEXT,
    -- One object per failed attempt: {attempt, at, worker, kind, error}.
    errors                JSONB NOT NULL DEFAULT '[]',
    next_run_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    locked_by             TEXT,
    locked_until          TIMESTAMPTZ,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at           TIMESTAMPTZ,

    CONSTRAINT recording_jobs_attempts_in_range
        CHECK (attempts >= 0 AND max_attempts >= 1 AND attempts <= max_attempts),
    -- A pending job must have an attempt left, so a claim can never push
    -- attempts past max_attempts (a requeue must reset attempts or raise the max).
    CONSTRAINT recording_jobs_pending_has_attempt_left
        CHECK (state <> 'pending' OR attempts < max_attempts),
    CONSTRAINT recording_jobs_lease_iff_running
        CHECK ((state = 'running') = (locked_by IS NOT NULL AND locked_until IS NOT NULL)),
    CONSTRAINT recording_jobs_lease_fields_together
        CHECK ((locked_by IS NULL) = (locked_until IS NULL)),
    CONSTRAINT recording_jobs_finished_iff_final
        CHECK ((state IN ('succeeded', 'failed', 'unmatched', 'cancelled', 'duplicate')) = (finished_at IS NOT NULL)),
    CONSTRAINT recording_jobs_failure_has_reason
        CHECK (state NOT IN ('failed', 'unmatched', 'duplicate') OR last_error IS NOT NULL),
    CONSTRAINT recording_jobs_errors_is_array
        CHECK (jsonb_typeof(errors) = 'array')
);

COMMENT ON TABLE recording_jobs IS 'One row per call.recording.saved webhook; the durable job queue of recording-relay';

-- Matches the claim exactly: WHERE state = 'pending' AND next_run_at <= now()
-- ORDER BY next_run_at, id.
CREATE INDEX recording_jobs_claim_idx ON recording_jobs (next_run_at, id) WHERE state = 'pending';
-- The lease rescuer's scan: running jobs whose lease ran out.
CREATE INDEX recording_jobs_lease_idx ON recording_jobs (locked_until) WHERE state = 'running';
-- One live job per recording: a webhook replayed under a new event id, or a
-- reconcile run racing a late webhook, cannot relay the recording twice.
CREATE UNIQUE INDEX recording_jobs_recording_id_key ON recording_jobs (recording_id)
    WHERE recording_id IS NOT NULL AND state <> 'duplicate';
CREATE INDEX recording_jobs_call_session_idx ON recording_jobs (call_session_id) WHERE call_session_id IS NOT NULL;
CREATE INDEX recording_jobs_state_idx ON recording_jobs (state, updated_at);

-- Verified deliveries that could not be read as a call.recording.saved
-- envelope. Kept byte for byte so nothing Telnyx sent is lost.
-- Telnyx redelivers what we answer 4xx to, so a body is kept once and its
-- redeliveries counted.
CREATE TABLE webhook_quarantine (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_received_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    deliveries        INTEGER NOT NULL DEFAULT 1,
    reason            TEXT NOT NULL,
    signed_at         TIMESTAMPTZ,
    body_sha256       BYTEA NOT NULL UNIQUE,
    raw_body          BYTEA NOT NULL
);

-- Workers LISTEN on this channel. The payload is empty on purpose: identical
-- notifications in one transaction are folded into one by PostgreSQL, so a
-- bulk insert wakes workers once, and workers claim whatever is runnable.
CREATE FUNCTION recording_jobs_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('recording_jobs', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER recording_jobs_notify_insert
    AFTER INSERT ON recording_jobs
    FOR EACH ROW
    WHEN (NEW.state = 'pending' AND NEW.next_run_at <= now())
    EXECUTE FUNCTION recording_jobs_notify();

CREATE TRIGGER recording_jobs_notify_runnable
    AFTER UPDATE OF state, next_run_at ON recording_jobs
    FOR EACH ROW
    WHEN (NEW.state = 'pending' AND NEW.next_run_at <= now()
          AND (OLD.state <> 'pending' OR OLD.next_run_at > now()))
    EXECUTE FUNCTION recording_jobs_notify();
