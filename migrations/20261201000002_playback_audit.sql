-- Who listened to what: one row per signed playback URL handed out by the
-- playback API. These are medical recordings; the audit is append-only (no
-- UPDATE, no TRUNCATE; DELETE only through the retention function) and the
-- playback API refuses the URL when this row cannot be written.

SET LOCAL lock_timeout = '5s';

CREATE TABLE recording_relay.playback_audit (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The token's `sub`: the Supabase user.
    user_id      TEXT NOT NULL,
    organization TEXT NOT NULL,
    intake_id    UUID NOT NULL,
    object_path  TEXT NOT NULL,
    -- The connection's peer: the user's address, or a reverse proxy's.
    client_addr  INET,
    user_agent   TEXT,
    expires_at   TIMESTAMPTZ NOT NULL,
    CONSTRAINT playback_audit_expires_after_issue CHECK (expires_at >= at)
);

COMMENT ON TABLE recording_relay.playback_audit IS
    'Append-only record of every signed playback URL handed out: who, which intake and object, from where';

CREATE INDEX playback_audit_intake_idx ON recording_relay.playback_audit (intake_id, at DESC);
CREATE INDEX playback_audit_user_idx ON recording_relay.playback_audit (user_id, at DESC);
-- Retention deletes the oldest rows.
CREATE INDEX playback_audit_at_idx ON recording_relay.playback_audit (at);

CREATE FUNCTION recording_relay.playback_audit_refuse_change() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('recording_relay.audit_retention', true) = 'on' THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'recording_relay.playback_audit is append-only (% refused)', TG_OP
        USING HINT = 'old rows leave only through recording_relay.playback_audit_prune()';
END
$$;

CREATE TRIGGER playback_audit_no_update BEFORE UPDATE OR DELETE ON recording_relay.playback_audit
    FOR EACH ROW EXECUTE FUNCTION recording_relay.playback_audit_refuse_change();
CREATE TRIGGER playback_audit_no_truncate BEFORE TRUNCATE ON recording_relay.playback_audit
    FOR EACH STATEMENT EXECUTE FUNCTION recording_relay.playback_audit_refuse_change();

-- Retention: deletes up to `batch` rows older than `keep_for`; returns how many.
CREATE FUNCTION recording_relay.playback_audit_prune(keep_for INTERVAL, batch INTEGER) RETURNS INTEGER
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    deleted INTEGER;
BEGIN
    PERFORM set_config('recording_relay.audit_retention', 'on', true);
    DELETE FROM recording_relay.playback_audit
    WHERE id IN (SELECT id FROM recording_relay.playback_audit
                 WHERE at < now() - keep_for ORDER BY at LIMIT batch);
    GET DIAGNOSTICS deleted = ROW_COUNT;
    PERFORM set_config('recording_relay.audit_retention', 'off', true);
    RETURN deleted;
END
$$;

-- For DBAs: newest first.
CREATE VIEW recording_relay.playback_audit_log AS
SELECT at, user_id, organization, intake_id, object_path, client_addr, user_agent, expires_at
FROM recording_relay.playback_audit
ORDER BY at DESC, id DESC;

ALTER TABLE recording_relay.playback_audit ENABLE ROW LEVEL SECURITY;

REVOKE ALL ON recording_relay.playback_audit, recording_relay.playback_audit_log FROM PUBLIC;
REVOKE ALL ON FUNCTION recording_relay.playback_audit_refuse_change(),
                       recording_relay.playback_audit_prune(INTERVAL, INTEGER) FROM PUBLIC;
DO $$
DECLARE
    api_role TEXT;
BEGIN
    FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        CONTINUE WHEN to_regrole(api_role) IS NULL;
        EXECUTE format('REVOKE ALL ON recording_relay.playback_audit, recording_relay.playback_audit_log FROM %I', api_role);
        EXECUTE format('REVOKE ALL ON SEQUENCE recording_relay.playback_audit_id_seq FROM %I', api_role);
        EXECUTE format('REVOKE ALL ON FUNCTION recording_relay.playback_audit_refuse_change(), '
                       'recording_relay.playback_audit_prune(INTERVAL, INTEGER) FROM %I', api_role);
    END LOOP;
    IF to_regrole('recording_relay_operator') IS NOT NULL THEN
        GRANT SELECT ON recording_relay.playback_audit, recording_relay.playback_audit_log
            TO recording_relay_operator;
        CREATE POLICY playback_audit_operator_read ON recording_relay.playback_audit
            FOR SELECT TO recording_relay_operator USING (true);
    END IF;
END
$$;
