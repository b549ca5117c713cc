-- Autovacuum for the job table by churn, not by size.
--
-- PostgreSQL's defaults vacuum a table once a fifth of its rows are dead
-- and analyze it once a tenth changed. The job table is a small hot queue
-- (pending and running jobs, each claim and completion a new row version)
-- inside a large history (finished jobs kept for retention): at 5 million
-- finished jobs the defaults waited for a million dead versions, which the
-- claim's and the lease's partial indexes carry until a vacuum, and kept
-- statistics half a million changes old, from which the planner picks the
-- claim's and the fences' plans. Counts instead: a vacuum after 10,000
-- dead versions (about 5,000 jobs through the queue), an analyze after
-- 10,000 changes, whatever the history holds. A vacuum of the table skips
-- the pages the visibility map marks all-visible (the history, after its
-- first vacuum), and skips its index pass while few pages have dead rows,
-- so a frequent vacuum costs the hot part, not the 6 GB.
--
-- Only these storage parameters change: SHARE UPDATE EXCLUSIVE, which
-- blocks neither the listener's inserts nor the workers' updates.

SET LOCAL lock_timeout = '5s';

ALTER TABLE recording_relay.recording_jobs SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 10000,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 10000
);
