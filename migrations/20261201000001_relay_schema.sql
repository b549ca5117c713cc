-- Moves every object of recording-relay out of `public` into a schema of its
-- own, closed to Supabase's API roles.
--
-- On Supabase, PostgREST serves `public` to anyone holding the project's
-- public anon key, and the project's default privileges grant ALL on every
-- new table, view, sequence and function in `public` to `anon`,
-- `authenticated` and `service_role`. The first migrations created the job
-- table (phone numbers, event bodies with presigned URLs), the views and the
-- operator functions there: anyone with the anon key could read them or
-- cancel every job. The landed migrations stay as they are (they are
-- checksummed); this one moves what they made and closes it.
--
-- Walls, from the outside in:
-- 1. The schema is not exposed by PostgREST (it is not in its `db-schemas`)
--    and PUBLIC, anon, authenticated and service_role have no USAGE on it,
--    so no name inside it can be resolved by those roles.
-- 2. Every object in it is revoked from those roles as well (the grants that
--    Supabase's defaults gave in `public` move with the objects).
-- 3. Row-level security is on for the relay's tables, with no policy for the
--    API roles: a grant added by mistake later still shows no row.
-- New objects: per-schema default privileges can only add grants, never
-- remove the global ones (EXECUTE on functions for PUBLIC), so later
-- migrations REVOKE what they create, and a test fails on any object of this
-- schema that an API role can reach.

SET LOCAL lock_timeout = '5s';

-- Usually made already by the migrator, whose history table lives here.
CREATE SCHEMA IF NOT EXISTS recording_relay;
COMMENT ON SCHEMA recording_relay IS
    'recording-relay''s job queue and operator tools; not exposed through the Supabase API';

ALTER TYPE public.recording_job_state SET SCHEMA recording_relay;
-- A table takes its indexes, constraints, identity sequence and triggers along.
ALTER TABLE public.recording_jobs SET SCHEMA recording_relay;
ALTER TABLE public.webhook_quarantine SET SCHEMA recording_relay;
ALTER VIEW public.recording_jobs_failed SET SCHEMA recording_relay;
ALTER VIEW public.recording_jobs_unmatched SET SCHEMA recording_relay;
ALTER VIEW public.recording_jobs_stuck SET SCHEMA recording_relay;
ALTER VIEW public.recording_jobs_queue SET SCHEMA recording_relay;
ALTER FUNCTION public.recording_jobs_notify() SET SCHEMA recording_relay;
ALTER FUNCTION public.recording_jobs_requeue(BIGINT) SET SCHEMA recording_relay;
ALTER FUNCTION public.recording_jobs_requeue_failed() SET SCHEMA recording_relay;
ALTER FUNCTION public.recording_jobs_cancel(BIGINT) SET SCHEMA recording_relay;
ALTER FUNCTION public.recording_jobs_attach(BIGINT, UUID) SET SCHEMA recording_relay;
-- Referenced by OID from the index on patients and from the storage policy,
-- which keep working after the move.
ALTER FUNCTION public.recording_relay_phone_key(TEXT) SET SCHEMA recording_relay;
ALTER FUNCTION public.recording_relay_recordings_bucket() SET SCHEMA recording_relay;

-- The operator functions resolved names through the caller's search_path;
-- now they name everything in full, and run as their owner (SECURITY
-- DEFINER) so that an operator role needs EXECUTE on them and nothing on the
-- tables. `session_user` names who ran them (inside, `current_user` is the
-- owner). Only the owner and the operator role may execute them (below).

CREATE OR REPLACE FUNCTION recording_relay.recording_jobs_requeue(job_id BIGINT) RETURNS BIGINT
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    requeued BIGINT;
BEGIN
    UPDATE recording_relay.recording_jobs
    SET state = 'pending', attempts = 0, next_run_at = now(), finished_at = NULL,
        locked_by = NULL, locked_until = NULL, updated_at = now(),
        errors = errors || jsonb_build_array(jsonb_build_object(
            'at', now(), 'kind', 'requeued', 'error', 'requeued by ' || session_user))
    WHERE id = job_id AND state IN ('failed', 'cancelled', 'unmatched', 'pending')
    RETURNING id INTO requeued;
    IF requeued IS NULL THEN
        RAISE EXCEPTION 'job % not found, running or succeeded: nothing to requeue', job_id;
    END IF;
    RETURN requeued;
END
$$;

CREATE OR REPLACE FUNCTION recording_relay.recording_jobs_requeue_failed() RETURNS INTEGER
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT count(recording_relay.recording_jobs_requeue(id))::integer
    FROM (SELECT id FROM recording_relay.recording_jobs
          WHERE state = 'failed' ORDER BY id FOR UPDATE) failed;
$$;

CREATE OR REPLACE FUNCTION recording_relay.recording_jobs_cancel(job_id BIGINT) RETURNS BIGINT
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cancelled BIGINT;
BEGIN
    UPDATE recording_relay.recording_jobs
    SET state = 'cancelled', finished_at = now(), locked_by = NULL, locked_until = NULL,
        updated_at = now(), last_error = 'cancelled by ' || session_user,
        errors = errors || jsonb_build_array(jsonb_build_object(
            'at', now(), 'kind', 'cancelled', 'error', 'cancelled by ' || session_user))
    WHERE id = job_id AND state IN ('pending', 'running', 'failed', 'unmatched')
    RETURNING id INTO cancelled;
    IF cancelled IS NULL THEN
        RAISE EXCEPTION 'job % not found or already finished: nothing to cancel', job_id;
    END IF;
    RETURN cancelled;
END
$$;

CREATE OR REPLACE FUNCTION recording_relay.recording_jobs_attach(job_id BIGINT, target_intake UUID) RETURNS BIGINT
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    job recording_relay.recording_jobs%ROWTYPE;
    other TEXT;
BEGIN
    SELECT * INTO job FROM recording_relay.recording_jobs WHERE id = job_id FOR UPDATE;
    IF NOT FOUND OR job.state <> 'unmatched' THEN
        RAISE EXCEPTION 'job % not found or not unmatched', job_id;
    END IF;
    SELECT recording_id INTO other FROM public.intakes WHERE id = target_intake FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'intake % not found', target_intake;
    END IF;
    IF other IS NOT NULL AND other IS DISTINCT FROM job.recording_id THEN
        RAISE EXCEPTION 'intake % already holds recording %', target_intake, other;
    END IF;
    UPDATE recording_relay.recording_jobs
    SET intake_id = target_intake, match_method = 'manual', matched_at = now(),
        state = 'pending', attempts = 0, next_run_at = now(), finished_at = NULL,
        updated_at = now(),
        errors = errors || jsonb_build_array(jsonb_build_object(
            'at', now(), 'kind', 'attached',
            'error', format('attached to intake %s by %s', target_intake, session_user)))
    WHERE id = job_id;
    RETURN job_id;
END
$$;

-- The second wall. The daemon connects as the tables' owner, which RLS does
-- not restrict (no FORCE); the operator role gets read policies below.
ALTER TABLE recording_relay.recording_jobs ENABLE ROW LEVEL SECURITY;
ALTER TABLE recording_relay.webhook_quarantine ENABLE ROW LEVEL SECURITY;

REVOKE ALL ON SCHEMA recording_relay FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA recording_relay FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA recording_relay FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA recording_relay FROM PUBLIC;
REVOKE ALL ON TYPE recording_relay.recording_job_state FROM PUBLIC;

DO $$
DECLARE
    api_role TEXT;
BEGIN
    FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        CONTINUE WHEN to_regrole(api_role) IS NULL;
        EXECUTE format('REVOKE ALL ON SCHEMA recording_relay FROM %I', api_role);
        EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA recording_relay FROM %I', api_role);
        EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA recording_relay FROM %I', api_role);
        EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA recording_relay FROM %I', api_role);
        EXECUTE format('REVOKE ALL ON TYPE recording_relay.recording_job_state FROM %I', api_role);
    END LOOP;
END
$$;

-- Two functions are called on behalf of ZScribe's own users, whose
-- privileges PostgreSQL checks when it runs them (no USAGE on the schema is
-- needed: the callers hold them by OID, not by name):
-- - the phone key, by the index on `patients`, whenever any role writes a
--   patient; without EXECUTE, ZScribe could no longer insert patients;
-- - the bucket name, by the storage policy, for signed-in users.
-- Both are pure and reveal nothing.
GRANT EXECUTE ON FUNCTION recording_relay.recording_relay_phone_key(TEXT) TO PUBLIC;
DO $$
BEGIN
    IF to_regrole('authenticated') IS NOT NULL THEN
        GRANT EXECUTE ON FUNCTION recording_relay.recording_relay_recordings_bucket() TO authenticated;
    END IF;
END
$$;

-- The operator role: read everything in the schema, change jobs only
-- through the functions above. A NOLOGIN group role; DBAs are made members
-- (`GRANT recording_relay_operator TO alice`). Roles are cluster-wide, so a
-- concurrent migration of another database may create it first.
DO $$
BEGIN
    IF to_regrole('recording_relay_operator') IS NULL THEN
        BEGIN
            CREATE ROLE recording_relay_operator NOLOGIN;
        EXCEPTION
            WHEN duplicate_object OR unique_violation THEN NULL;
            WHEN insufficient_privilege THEN
                RAISE WARNING 'cannot create role recording_relay_operator (%): operators must use the owner role (README, "The job table, for DBAs")', SQLERRM;
                RETURN;
        END;
    END IF;
    GRANT USAGE ON SCHEMA recording_relay TO recording_relay_operator;
    GRANT SELECT ON ALL TABLES IN SCHEMA recording_relay TO recording_relay_operator;
    GRANT EXECUTE ON FUNCTION
        recording_relay.recording_jobs_requeue(BIGINT),
        recording_relay.recording_jobs_requeue_failed(),
        recording_relay.recording_jobs_cancel(BIGINT),
        recording_relay.recording_jobs_attach(BIGINT, UUID)
        TO recording_relay_operator;
    CREATE POLICY recording_jobs_operator_read ON recording_relay.recording_jobs
        FOR SELECT TO recording_relay_operator USING (true);
    CREATE POLICY webhook_quarantine_operator_read ON recording_relay.webhook_quarantine
        FOR SELECT TO recording_relay_operator USING (true);
END
$$;
