-- no-transaction
-- Replaced by `recording_jobs_by_state_idx` (migration 20261208000100).
DROP INDEX CONCURRENTLY IF EXISTS recording_relay.recording_jobs_state_idx;
