-- no-transaction
-- One object belongs to at most one intake; also the exact-match key that
-- signing and row-level security look recordings up by.
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS idx_intakes_recording_object_path
    ON intakes (recording_object_path) WHERE recording_object_path IS NOT NULL;
