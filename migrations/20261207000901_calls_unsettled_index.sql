-- no-transaction
-- The look-up for recordings that never came (migration
-- 20261207000900) runs every minute in every worker and reads only the
-- unsettled calls, oldest first: the few of the last hour or two, not
-- every call ever made. CONCURRENTLY keeps the listener's inserts
-- flowing while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS calls_unsettled_idx
    ON recording_relay.calls (received_at)
    WHERE recording_found_at IS NULL AND recording_missing_at IS NULL;
