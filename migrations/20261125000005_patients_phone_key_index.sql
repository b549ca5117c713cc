-- no-transaction
-- Lets intake matching find a patient by number without scanning the host's
-- patients table; CONCURRENTLY keeps the table writable while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_patients_recording_relay_phone_key
    ON patients (recording_relay_phone_key(phone));
