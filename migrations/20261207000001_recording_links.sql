-- The relay's own record of what it linked (issue #19).
--
-- The playback API used to sign whatever `intakes.recording_object_path`
-- held. That column is the host's: ZScribe's users may update their
-- organization's intakes, and a path like `x/../intakes/<another org's
-- intake>/<recording>.wav` got a signed URL for another tenant's recording.
-- Now a path is signed only when it equals what the relay recorded here for
-- that intake, which only the relay writes (the API roles cannot reach this
-- schema), and has exactly the form of the intake's own folder. A host that
-- clears or changes its column can only lose access.
--
-- The jobs table is not enough: retention prunes succeeded jobs after 30
-- days, and their intakes keep playing. The link step writes a row here in
-- its own transaction; this migration fills it from linked jobs, and, for
-- intakes whose jobs are gone, from intakes whose column has exactly the
-- own-folder form with the intake's own recording id (the file name the
-- pipeline makes of it), which grants nothing outside that intake's folder.

SET LOCAL lock_timeout = '5s';

CREATE TABLE recording_relay.recording_links (
    intake_id    UUID PRIMARY KEY,
    recording_id TEXT NOT NULL,
    object_path  TEXT NOT NULL,
    -- NULL for rows taken from the intakes table by this migration.
    job_id       BIGINT,
    linked_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- The intake's own folder, a file name of the pipeline's alphabet and
    -- the format's extension: no dot segment, no other folder.
    CONSTRAINT recording_links_own_folder CHECK (
        object_path ~ ('^intakes/' || intake_id::text || '/[A-Za-z0-9_-]+\.(wav|mp3)$')
    ),
    -- One intake per object, and the opt-in storage policy looks up by it.
    CONSTRAINT recording_links_object_path_key UNIQUE (object_path)
);

COMMENT ON TABLE recording_relay.recording_links IS
    'What the relay linked each intake to: the only object paths the playback API signs';

INSERT INTO recording_relay.recording_links (intake_id, recording_id, object_path, job_id, linked_at)
SELECT DISTINCT ON (j.intake_id) j.intake_id, j.recording_id, j.object_path, j.id, j.linked_at
FROM recording_relay.recording_jobs j
WHERE j.linked_at IS NOT NULL AND j.intake_id IS NOT NULL AND j.recording_id IS NOT NULL
  AND j.object_path ~ ('^intakes/' || j.intake_id::text || '/[A-Za-z0-9_-]+\.(wav|mp3)$')
ORDER BY j.intake_id, j.linked_at DESC, j.id DESC
ON CONFLICT DO NOTHING;

INSERT INTO recording_relay.recording_links (intake_id, recording_id, object_path, linked_at)
SELECT i.id, i.recording_id, i.recording_object_path, coalesce(i.recording_migrated_at, now())
FROM public.intakes i
WHERE i.recording_id IS NOT NULL
  AND i.recording_object_path IN (
      'intakes/' || i.id::text || '/' || regexp_replace(i.recording_id, '[^A-Za-z0-9_-]', '_', 'g') || '.wav',
      'intakes/' || i.id::text || '/' || regexp_replace(i.recording_id, '[^A-Za-z0-9_-]', '_', 'g') || '.mp3')
  AND i.recording_object_path ~ ('^intakes/' || i.id::text || '/[A-Za-z0-9_-]+\.(wav|mp3)$')
ON CONFLICT DO NOTHING;

-- Closed like everything else in the schema (20261201000001).
ALTER TABLE recording_relay.recording_links ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON recording_relay.recording_links FROM PUBLIC;
DO $$
DECLARE
    api_role TEXT;
BEGIN
    FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        CONTINUE WHEN to_regrole(api_role) IS NULL;
        EXECUTE format('REVOKE ALL ON recording_relay.recording_links FROM %I', api_role);
    END LOOP;
    IF to_regrole('recording_relay_operator') IS NOT NULL THEN
        GRANT SELECT ON recording_relay.recording_links TO recording_relay_operator;
        CREATE POLICY recording_links_operator_read ON recording_relay.recording_links
            FOR SELECT TO recording_relay_operator USING (true);
    END IF;
END
$$;
