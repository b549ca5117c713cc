-- no-transaction
-- The alert sweep's index (migration 20261207000100): every worker looks
-- for owed alerts on each poll, and only the few jobs whose alert is owed
-- or being sent are in it. CONCURRENTLY keeps the listener's inserts
-- flowing while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS recording_jobs_alert_due_idx
    ON recording_relay.recording_jobs (alert_due_at)
    WHERE alert_due_at IS NOT NULL;
