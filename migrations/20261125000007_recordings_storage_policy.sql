-- Row-level security on the recordings bucket, for deployments where the UI
-- signs playback URLs itself (supabase-js `createSignedUrl` with the user's
-- session) instead of asking recording-relay's playback API.
--
-- A signed-in user may read an object when an intake of their organization
-- points at exactly that object. It is an equality on the indexed
-- intakes.recording_object_path (the original brief's
-- `recording_url LIKE '%' || name || '%'` scans every intake and matches
-- other tenants' objects whose names are substrings), limited to the
-- recordings bucket, with the organization taken from app_metadata, which
-- only the service role can write (user_metadata is user-editable).
--
-- storage.objects and auth.jwt() exist only on Supabase. Elsewhere (plain
-- PostgreSQL, the tests) this creates the bucket function and nothing else.

SET LOCAL lock_timeout = '5s';

-- The bucket the policy covers. A deployment with another STORAGE_BUCKET
-- replaces it (migrations are checksummed, so they cannot be edited):
--   CREATE OR REPLACE FUNCTION recording_relay_recordings_bucket()
--   RETURNS text LANGUAGE sql STABLE RETURN 'my-bucket';
CREATE FUNCTION recording_relay_recordings_bucket() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN 'call-recordings';

COMMENT ON FUNCTION recording_relay_recordings_bucket() IS
    'Bucket whose objects the recording_relay_read_own_organization storage policy covers';

DO $$
BEGIN
    IF to_regclass('storage.objects') IS NULL
       OR to_regprocedure('auth.jwt()') IS NULL
       OR to_regrole('authenticated') IS NULL THEN
        RAISE NOTICE 'not a Supabase database (no storage.objects, auth.jwt() or authenticated role): no storage policy created';
        RETURN;
    END IF;

    DROP POLICY IF EXISTS recording_relay_read_own_organization ON storage.objects;
    -- Columns of storage.objects are qualified: inside the subquery a bare
    -- `name` would bind to an intakes column of that name first.
    -- `(SELECT auth.jwt())` is evaluated once per query, not once per row.
    CREATE POLICY recording_relay_read_own_organization ON storage.objects
        FOR SELECT TO authenticated
        USING (
            storage.objects.bucket_id = recording_relay_recordings_bucket()
            AND EXISTS (
                SELECT 1 FROM intakes i
                WHERE i.recording_object_path = storage.objects.name
                  AND i.organization_id::text = ((SELECT auth.jwt()) -> 'app_metadata' ->> 'organization_id')
            )
        );

    IF NOT (SELECT relrowsecurity FROM pg_class WHERE oid = 'storage.objects'::regclass) THEN
        RAISE WARNING 'row-level security is disabled on storage.objects: the recordings policy has no effect until it is enabled';
    END IF;
EXCEPTION WHEN insufficient_privilege THEN
    -- Fails closed: without the policy users simply cannot read objects.
    RAISE WARNING 'not allowed to create the storage policy (%): create it as the postgres role (README, "Playback")', SQLERRM;
END
$$;
