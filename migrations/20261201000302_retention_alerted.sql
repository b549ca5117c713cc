-- When retention told an operator that this job (the only pointer to a
-- recording: unmatched, or failed with the recording possibly still at
-- Telnyx) will be deleted with its object. Deletion waits until an alert has
-- gone out at least `retention.unresolved_alert_before` earlier.
-- The relay's own table; nullable, no default: adding it rewrites nothing.
SET LOCAL lock_timeout = '500ms';

ALTER TABLE recording_relay.recording_jobs ADD COLUMN retention_alerted_at TIMESTAMPTZ;

COMMENT ON COLUMN recording_relay.recording_jobs.retention_alerted_at IS
    'When the alert that retention will delete this job and its object was sent';
