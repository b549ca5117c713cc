-- The look-up for recordings that never came (issue #21) needs to know
-- which calls are settled. A call whose recording arrived has a job for
-- its session, but only until retention prunes that job (30 days by
-- default, configurable down to hours): after that the call would look
-- recordless again, and be reported missing by mistake. So the look-up
-- writes down when it saw the job, once, and never asks about the call
-- again. Unsettled calls are those with neither this nor
-- `recording_missing_at`.

SET LOCAL lock_timeout = '5s';

ALTER TABLE recording_relay.calls
    ADD COLUMN recording_found_at TIMESTAMPTZ;

COMMENT ON COLUMN recording_relay.calls.recording_found_at IS
    'When the look-up for missing recordings saw a job for this call session (settled; never asked about again)';
