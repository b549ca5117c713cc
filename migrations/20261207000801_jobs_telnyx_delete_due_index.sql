-- no-transaction
-- The clean-up sweep's index (migration 20261207000800): every worker looks
-- for owed deletes at Telnyx on each poll, and only the few jobs that owe
-- one are in it. CONCURRENTLY keeps the listener's inserts flowing while it
-- builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS recording_jobs_telnyx_delete_due_idx
    ON recording_relay.recording_jobs (telnyx_delete_due_at)
    WHERE telnyx_delete_due_at IS NOT NULL;
