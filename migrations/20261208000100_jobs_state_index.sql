-- no-transaction
-- The per-state index without `updated_at`. Every step a worker records
-- sets `updated_at`, and a column in any index makes an UPDATE write a new
-- entry into every index of the row (no HOT update): with `updated_at` in
-- `recording_jobs_state_idx`, recording that an object was stored or linked
-- cost eleven index entries. The gauges count each state along this index;
-- none reads `updated_at` from it (`bench dbcost`, BENCHMARKS.md).
CREATE INDEX CONCURRENTLY IF NOT EXISTS recording_jobs_by_state_idx
    ON recording_relay.recording_jobs (state);
