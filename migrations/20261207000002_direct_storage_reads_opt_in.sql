-- Every listen is audited, by default (issue #19).
--
-- The `recording_relay_read_own_organization` policy (20261125000007) let
-- any signed-in user create signed URLs or download with their own token,
-- and no audit row was written for those; it also granted whatever object
-- an intake of their organization pointed at, `unmatched/` or another
-- organization's folder included (the column is the host's to write). It is
-- dropped: by default only the playback API, whose audit fails closed,
-- hands out URLs.
--
-- Direct reads become an explicit, unaudited opt-in that a DBA makes as the
-- postgres role (README, "Playback"):
--   SELECT recording_relay.direct_storage_reads_allow();
--   SELECT recording_relay.direct_storage_reads_refuse();  -- undoes it
-- Its policy grants an object only when the relay recorded it, in its
-- link record, for an intake of the user's organization whose column still
-- names it; the record's CHECK keeps it to that intake's own folder, so
-- never `unmatched/` and never a dot segment.
--
-- Fails closed: when the old policy exists and cannot be dropped (this role
-- does not own storage.objects), the migration stops rather than leave it.

SET LOCAL lock_timeout = '5s';

DO $$
BEGIN
    IF to_regclass('storage.objects') IS NOT NULL AND EXISTS (
        SELECT 1 FROM pg_policies
        WHERE schemaname = 'storage' AND tablename = 'objects'
          AND policyname = 'recording_relay_read_own_organization'
    ) THEN
        BEGIN
            DROP POLICY recording_relay_read_own_organization ON storage.objects;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE EXCEPTION 'cannot drop the storage policy recording_relay_read_own_organization (%): it lets users read recordings unaudited and across organizations', SQLERRM
                USING HINT = 'as the postgres role: DROP POLICY recording_relay_read_own_organization ON storage.objects; then start the daemon again';
        END;
    END IF;
END
$$;

-- The policy's test, for the signed-in user's own organization (from
-- app_metadata, which only the service role writes). SECURITY DEFINER
-- because the link record lives in a schema the API roles cannot reach; it
-- answers only for the caller's organization, and only yes or no. plpgsql,
-- so that auth.jwt() is resolved when it runs (it exists only on Supabase).
-- EXECUTE is granted to `authenticated` only by the opt-in.
CREATE FUNCTION recording_relay.recording_relay_linked_for_my_organization(object_name TEXT)
RETURNS BOOLEAN
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN EXISTS (
        SELECT 1
        FROM recording_relay.recording_links l
        JOIN public.intakes i ON i.id = l.intake_id
        WHERE l.object_path = object_name
          AND i.recording_object_path = object_name
          AND object_name ~ ('^intakes/' || l.intake_id::text || '/[A-Za-z0-9_-]+\.(wav|mp3)$')
          AND i.organization_id::text = (auth.jwt() -> 'app_metadata' ->> 'organization_id')
    );
END
$$;

COMMENT ON FUNCTION recording_relay.recording_relay_linked_for_my_organization(TEXT) IS
    'Whether the relay linked this object to an intake of the signed-in user''s organization (opt-in storage policy)';

-- The opt-in. Not SECURITY DEFINER: whoever runs it needs the rights to
-- create a policy on storage.objects (the postgres role on Supabase).
CREATE FUNCTION recording_relay.direct_storage_reads_allow() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF to_regclass('storage.objects') IS NULL OR to_regrole('authenticated') IS NULL THEN
        RAISE EXCEPTION 'not a Supabase database (no storage.objects or authenticated role)';
    END IF;
    GRANT EXECUTE ON FUNCTION recording_relay.recording_relay_linked_for_my_organization(TEXT)
        TO authenticated;
    DROP POLICY IF EXISTS recording_relay_read_linked_recordings ON storage.objects;
    -- Columns of storage.objects are qualified, as in 20261125000007.
    CREATE POLICY recording_relay_read_linked_recordings ON storage.objects
        FOR SELECT TO authenticated
        USING (
            storage.objects.bucket_id = recording_relay.recording_relay_recordings_bucket()
            AND storage.objects.name LIKE 'intakes/%'
            AND recording_relay.recording_relay_linked_for_my_organization(storage.objects.name)
        );
    COMMENT ON POLICY recording_relay_read_linked_recordings ON storage.objects IS
        'UNAUDITED direct reads of recordings the relay linked to the user''s organization (opt-in)';
    RAISE WARNING 'direct storage reads are on: signed-in users may sign and download their organization''s recordings without an audit row';
END
$$;

CREATE FUNCTION recording_relay.direct_storage_reads_refuse() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF to_regclass('storage.objects') IS NOT NULL THEN
        DROP POLICY IF EXISTS recording_relay_read_linked_recordings ON storage.objects;
    END IF;
    IF to_regrole('authenticated') IS NOT NULL THEN
        REVOKE EXECUTE ON FUNCTION recording_relay.recording_relay_linked_for_my_organization(TEXT)
            FROM authenticated;
    END IF;
END
$$;

REVOKE ALL ON FUNCTION recording_relay.recording_relay_linked_for_my_organization(TEXT),
                       recording_relay.direct_storage_reads_allow(),
                       recording_relay.direct_storage_reads_refuse() FROM PUBLIC;
DO $$
DECLARE
    api_role TEXT;
BEGIN
    FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        CONTINUE WHEN to_regrole(api_role) IS NULL;
        EXECUTE format('REVOKE ALL ON FUNCTION '
                       'recording_relay.recording_relay_linked_for_my_organization(TEXT), '
                       'recording_relay.direct_storage_reads_allow(), '
                       'recording_relay.direct_storage_reads_refuse() FROM %I', api_role);
    END LOOP;
END
$$;
