-- Whether the store step proved the stored bytes the whole recording (a
-- known source length equal to the bytes stored; for WAV, a header whose
-- sizes agree), and why not when it did not. The recording is deleted at
-- Telnyx only with that proof. Jobs stored before this migration have no
-- proof (false): theirs is kept at Telnyx.
-- The relay's own table; constant default and nullable: adding them
-- rewrites nothing.
SET LOCAL lock_timeout = '500ms';

ALTER TABLE recording_relay.recording_jobs
    ADD COLUMN source_complete BOOLEAN NOT NULL DEFAULT false,
    ADD COLUMN telnyx_kept_reason TEXT;

COMMENT ON COLUMN recording_relay.recording_jobs.source_complete IS
    'The stored object was proven the whole recording; only then is it deleted at Telnyx';
COMMENT ON COLUMN recording_relay.recording_jobs.telnyx_kept_reason IS
    'Why the stored object is not proven the whole recording (it is kept at Telnyx)';
