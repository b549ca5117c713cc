-- no-transaction
-- The same for `pipeline.patient_party = "from"` (patients calling in).
CREATE INDEX CONCURRENTLY IF NOT EXISTS recording_jobs_from_number_key_idx
    ON recording_relay.recording_jobs (recording_relay.recording_relay_phone_key(from_number))
    WHERE state <> 'duplicate';
