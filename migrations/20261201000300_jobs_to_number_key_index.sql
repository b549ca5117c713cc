-- no-transaction
-- Intake matching looks for other recordings of the patient's number
-- (recordings competing for the same intake); without this it would scan
-- every job. CONCURRENTLY keeps the listener's inserts flowing while it
-- builds; one index per migration (CONCURRENTLY cannot share a query).
CREATE INDEX CONCURRENTLY IF NOT EXISTS recording_jobs_to_number_key_idx
    ON recording_relay.recording_jobs (recording_relay.recording_relay_phone_key(to_number))
    WHERE state <> 'duplicate';
