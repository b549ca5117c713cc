-- Why a job's recording goes under unmatched/, saved together with the
-- object path when that is decided. The attempt that decides may be cut off
-- (a provider fault, a crash) before the upload finishes; the attempt that
-- finishes it ends the job `unmatched` with this reason, not with the fault
-- that interrupted the first one (found by the chaos test).

SET LOCAL lock_timeout = '5s';

-- Nullable, no default: adding it rewrites nothing.
ALTER TABLE recording_jobs ADD COLUMN unmatched_reason TEXT;

COMMENT ON COLUMN recording_jobs.unmatched_reason IS
    'Why no intake matched, saved when the unmatched/ object path was planned';
