-- Autovacuum for the job table by churn, not by size.
--
-- PostgreSQL's defaults vacuum a table once a fifth of its rows are dead
-- and analyze it once a tenth changed. The job table is a small hot queue
-- (pending and running jobs; each claim, pipeline step and completion is a
-- new row version) inside a large history (finished jobs kept for
-- retention): at 5 million finished jobs the defaults waited for a million
-- dead versions, which the claim's and the lease's partial indexes carry
-- until a vacuum removes them or a scan marks them dead. Counts instead: a
-- vacuum after 10,000 dead versions (a thousand or so real jobs, each
-- writing seven to nine versions) and an analyze after 10,000 changes,
-- whatever the history holds. A vacuum skips the pages the visibility map
-- marks all-visible (the history, after its first vacuum), so most of its
-- work is the hot part; its pass over the indexes is skipped while fewer
-- than 2 % of the pages have dead rows, and then a later vacuum catches up.
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
