-- Room on each page for the new version of a row a worker updates, so that
-- an update that changes no indexed column stays on its page as a HOT
-- update, with no new index entries. Applies to pages written from now on.
-- Behind a long transaction, give up at once rather than queue every
-- webhook and claim behind the lock (`migrate` retries).
SET LOCAL lock_timeout = '500ms';
ALTER TABLE recording_relay.recording_jobs SET (fillfactor = 85);
