-- Issue #21: the intake named in the SIP INVITE links a recording exactly,
-- and Telnyx's `call.recording.error` is heard.
--
-- - `match_method` may say `sip_header`: the intake came from the call's
--   `recording_relay.calls` row (the header the dialer set), not from
--   `client_state` nor from phone and time.
-- - `calls.intake_conflict`: two events of one session named different
--   intakes (or one event named two). Then neither is the session's exact
--   link: `intake_id` is cleared and stays cleared, whatever a later
--   redelivery says, and the values that disagreed are kept here for the
--   operator. Fail closed: a wrong chart is worse than an unmatched one.
-- - `recording_relay.recording_errors`: the DBA view of the recordings
--   Telnyx could not make, newest first. Closed to the API roles and
--   readable by the operator role, like the other views.
--
-- The relay's own tables; a nullable column without a default rewrites
-- nothing. The CHECK is replaced NOT VALID: it only widens what is allowed,
-- so every existing row passes and nothing is scanned under the lock.
SET LOCAL lock_timeout = '500ms';

ALTER TABLE recording_relay.recording_jobs
    DROP CONSTRAINT recording_jobs_match_method_known,
    ADD CONSTRAINT recording_jobs_match_method_known
        CHECK (match_method IN ('client_state', 'sip_header', 'phone_and_time', 'manual')) NOT VALID;

ALTER TABLE recording_relay.calls
    ADD COLUMN intake_conflict TEXT;

COMMENT ON COLUMN recording_relay.calls.intake_conflict IS
    'The intake header values that disagreed within the session; while set, the session links no intake';

CREATE VIEW recording_relay.recording_errors AS
SELECT id, event_id, call_session_id, connection_id, intake_id, match_method,
       event #>> '{data,payload,reason}' AS reason, last_error, state,
       occurred_at, created_at, finished_at
FROM recording_relay.recording_jobs
WHERE event_type = 'call.recording.error'
ORDER BY created_at DESC, id DESC;

COMMENT ON VIEW recording_relay.recording_errors IS
    'call.recording.error events: calls Telnyx could not record, with its reason and the intake';

REVOKE ALL ON recording_relay.recording_errors FROM PUBLIC;
DO $$
DECLARE
    api_role TEXT;
BEGIN
    FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        CONTINUE WHEN to_regrole(api_role) IS NULL;
        EXECUTE format('REVOKE ALL ON recording_relay.recording_errors FROM %I', api_role);
    END LOOP;
    IF to_regrole('recording_relay_operator') IS NOT NULL THEN
        GRANT SELECT ON recording_relay.recording_errors TO recording_relay_operator;
    END IF;
END
$$;
