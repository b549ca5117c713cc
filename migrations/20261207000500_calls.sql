-- The calls Telnyx told us about before their recordings (issue #21).
--
-- ZScribe dials through LiveKit SIP over a Telnyx trunk, not through Call
-- Control, so `client_state` never reaches a recording. What does reach us
-- is `call.initiated` (and `call.answered`): the call session, its numbers
-- and connection, and the custom headers of the SIP INVITE, where the
-- dialer names the intake (`X-Intake-Id` by default). One row per call
-- session, written by the listener before its 200 (a redelivery or a later
-- event of the same session fills in what is missing, never overwrites),
-- read by matching (the exact link, ahead of phone and time) and by the
-- look-up for recordings that never came.
--
-- Phone numbers: health data, like the job table's; closed to the API
-- roles like everything in this schema.

SET LOCAL lock_timeout = '5s';

CREATE TABLE recording_relay.calls (
    call_session_id      TEXT PRIMARY KEY,
    -- The intake the dialer named in the configured SIP header, when its
    -- value is a UUID. Matching still confines it to the right
    -- organization: the header is the dialer's word, not proof.
    intake_id            UUID,
    -- The header's value when it was not a UUID, for the operator (never
    -- used to match).
    intake_header        TEXT,
    call_leg_id          TEXT,
    connection_id        TEXT,
    direction            TEXT,
    from_number          TEXT,
    to_number            TEXT,
    -- Telnyx's `occurred_at` of the first event seen for the session.
    started_at           TIMESTAMPTZ,
    -- The Telnyx event (`data.id`) that created the row, and its type.
    first_event_id       TEXT NOT NULL,
    first_event_type     TEXT NOT NULL,
    received_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The look-up for a recording that never came: when it last asked
    -- Telnyx, and when it gave up and told the operator.
    recording_checked_at TIMESTAMPTZ,
    recording_missing_at TIMESTAMPTZ
);

COMMENT ON TABLE recording_relay.calls IS
    'Calls Telnyx reported (call.initiated/answered): the session, numbers, and the intake named in the SIP INVITE';

-- Retention deletes the oldest; the look-up reads those not yet settled.
CREATE INDEX calls_received_idx ON recording_relay.calls (received_at);

ALTER TABLE recording_relay.calls ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON recording_relay.calls FROM PUBLIC;
DO $$
DECLARE
    api_role TEXT;
BEGIN
    FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        CONTINUE WHEN to_regrole(api_role) IS NULL;
        EXECUTE format('REVOKE ALL ON recording_relay.calls FROM %I', api_role);
    END LOOP;
    IF to_regrole('recording_relay_operator') IS NOT NULL THEN
        GRANT SELECT ON recording_relay.calls TO recording_relay_operator;
        CREATE POLICY calls_operator_read ON recording_relay.calls
            FOR SELECT TO recording_relay_operator USING (true);
    END IF;
END
$$;
