-- `recording_jobs_attach` applies the link's check (issue #19 review, L3).
--
-- The link writes an intake only while its `recording_object_path` is NULL
-- or this recording's (issue #19 item 9); attach checked only
-- `recording_id`, so it could attach a job to an intake that holds another
-- object, and the job ran only to fail at the link (after moving the
-- recording into that intake's folder). Attach refuses it now, saying why.
-- CREATE OR REPLACE with the same signature keeps SECURITY DEFINER's
-- owner, the search_path and the grants of 20261201000001.

SET LOCAL lock_timeout = '5s';

CREATE OR REPLACE FUNCTION recording_relay.recording_jobs_attach(job_id BIGINT, target_intake UUID) RETURNS BIGINT
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    job recording_relay.recording_jobs%ROWTYPE;
    other TEXT;
    other_path TEXT;
BEGIN
    SELECT * INTO job FROM recording_relay.recording_jobs WHERE id = job_id FOR UPDATE;
    IF NOT FOUND OR job.state <> 'unmatched' THEN
        RAISE EXCEPTION 'job % not found or not unmatched', job_id;
    END IF;
    IF job.recording_id IS NULL THEN
        RAISE EXCEPTION 'job % has no recording id yet: nothing to attach', job_id;
    END IF;
    SELECT recording_id, recording_object_path INTO other, other_path
    FROM public.intakes WHERE id = target_intake FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'intake % not found', target_intake;
    END IF;
    IF other IS NOT NULL AND other IS DISTINCT FROM job.recording_id THEN
        RAISE EXCEPTION 'intake % already holds recording %', target_intake, other;
    END IF;
    -- The link's own condition (issue #19 item 9): the intake's object must
    -- be none, or this recording's, where it is or in the intake's folder
    -- (`relocate` moves it there; the file name is the pipeline's).
    IF other_path IS NOT NULL AND other_path IS DISTINCT FROM job.object_path
       AND other_path IS DISTINCT FROM
           'intakes/' || target_intake::text || '/'
           || regexp_replace(job.recording_id, '[^A-Za-z0-9_-]', '_', 'g')
           || '.' || substring(job.object_path FROM '\.(wav|mp3)$') THEN
        RAISE EXCEPTION 'intake % already holds another object (%): the link would be refused',
            target_intake, other_path;
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
