-- A call event that arrives while a job of its session is running: the
-- listener's wake (`Queue::wake_session`) marks the running job here, and
-- the attempt's retry then runs at once instead of waiting out
-- `pipeline.link_wait`. Both write the job row, so its row lock orders
-- them whichever commits first: a wake can no longer fall between the
-- attempt's look for the event and its retry (a lost wake-up the chaos
-- partition run found). Each claim clears it.
-- Behind a long transaction, give up at once rather than queue every
-- webhook and claim behind the lock (`migrate` retries).
SET LOCAL lock_timeout = '500ms';
ALTER TABLE recording_relay.recording_jobs ADD COLUMN session_woken_at TIMESTAMPTZ;
