-- Intake reservations (issue #10).
--
-- The match writes `intakes.recording_id` before the recording is stored:
-- that reserves the intake (other recordings skip it, the player shows
-- "processing"). A job that then ended `failed` or `cancelled` without
-- linking left the intake reserved for ever. Now:
-- 1. a trigger gives the intake back when a job enters `failed` or
--    `cancelled` unlinked, whoever made it so (the worker, the lease
--    rescuer, an operator's `recording_jobs_cancel`), in the same
--    transaction, and only while the intake still holds this recording and
--    no object: an intake another recording took, or a linked one, is left
--    alone;
-- 2. `recording_jobs_requeue` reserves the intake again when it is free, so
--    a requeued job resumes where it was;
-- 3. `recording_jobs_attach` reserves the intake in its own transaction, so
--    no phone match can take it before a worker links it.
-- Lock order everywhere is job row, then intake row (the worker's match and
-- link lock the job row first too), so none of these can deadlock a worker.
-- The migration itself takes no lock on `public.intakes` (function bodies
-- are not checked against tables, and the trigger is on the job table).

SET LOCAL lock_timeout = '500ms';

CREATE FUNCTION recording_relay.recording_jobs_release_intake() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE public.intakes
    SET recording_id = NULL, recording_duration = NULL
    WHERE id = NEW.intake_id
      AND recording_id = NEW.recording_id
      AND recording_object_path IS NULL;
    RETURN NULL;
END
$$;

CREATE TRIGGER recording_jobs_release_intake
    AFTER UPDATE OF state ON recording_relay.recording_jobs
    FOR EACH ROW
    WHEN (NEW.state IN ('failed', 'cancelled') AND OLD.state IS DISTINCT FROM NEW.state
          AND NEW.intake_id IS NOT NULL AND NEW.recording_id IS NOT NULL
          AND NEW.linked_at IS NULL)
    EXECUTE FUNCTION recording_relay.recording_jobs_release_intake();

CREATE OR REPLACE FUNCTION recording_relay.recording_jobs_requeue(job_id BIGINT) RETURNS BIGINT
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    requeued recording_relay.recording_jobs%ROWTYPE;
BEGIN
    UPDATE recording_relay.recording_jobs
    SET state = 'pending', attempts = 0, next_run_at = now(), finished_at = NULL,
        locked_by = NULL, locked_until = NULL, updated_at = now(),
        errors = errors || jsonb_build_array(jsonb_build_object(
            'at', now(), 'kind', 'requeued', 'error', 'requeued by ' || session_user))
    WHERE id = job_id AND state IN ('failed', 'cancelled', 'unmatched', 'pending')
    RETURNING * INTO requeued;
    IF requeued.id IS NULL THEN
        RAISE EXCEPTION 'job % not found, running or succeeded: nothing to requeue', job_id;
    END IF;
    -- Taken by another recording meanwhile: the link will say so.
    IF requeued.intake_id IS NOT NULL AND requeued.recording_id IS NOT NULL
       AND requeued.linked_at IS NULL THEN
        UPDATE public.intakes
        SET recording_id = requeued.recording_id,
            recording_duration = coalesce(
                CASE WHEN requeued.duration_millis >= 0
                     THEN least((requeued.duration_millis + 500) / 1000, 2147483647)::integer END,
                recording_duration)
        WHERE id = requeued.intake_id AND recording_id IS NULL;
    END IF;
    RETURN requeued.id;
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
    IF job.recording_id IS NULL THEN
        RAISE EXCEPTION 'job % has no recording id yet: nothing to attach', job_id;
    END IF;
    SELECT recording_id INTO other FROM public.intakes WHERE id = target_intake FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'intake % not found', target_intake;
    END IF;
    IF other IS NOT NULL AND other IS DISTINCT FROM job.recording_id THEN
        RAISE EXCEPTION 'intake % already holds recording %', target_intake, other;
    END IF;
    UPDATE public.intakes
    SET recording_id = job.recording_id,
        recording_duration = coalesce(
            CASE WHEN job.duration_millis >= 0
                 THEN least((job.duration_millis + 500) / 1000, 2147483647)::integer END,
            recording_duration)
    WHERE id = target_intake;
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

-- CREATE OR REPLACE keeps the grants of the two operator functions; the
-- trigger function is new, and PUBLIC may execute new functions by default.
REVOKE ALL ON FUNCTION recording_relay.recording_jobs_release_intake() FROM PUBLIC;
DO $$
DECLARE
    api_role TEXT;
BEGIN
    FOREACH api_role IN ARRAY ARRAY['anon', 'authenticated', 'service_role'] LOOP
        CONTINUE WHEN to_regrole(api_role) IS NULL;
        EXECUTE format('REVOKE ALL ON FUNCTION recording_relay.recording_jobs_release_intake() FROM %I', api_role);
    END LOOP;
END
$$;
