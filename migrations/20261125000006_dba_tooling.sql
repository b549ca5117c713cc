-- Views and functions for DBAs (and the `recording-relay jobs` CLI, which
-- calls the same functions). Every function that makes a job runnable fires
-- the NOTIFY trigger, so a worker picks it up at once.

-- Terminal failures, newest first.
CREATE VIEW recording_jobs_failed AS
SELECT id, event_id, recording_id, intake_id, attempts, max_attempts, last_error,
       created_at, finished_at
FROM recording_jobs
WHERE state = 'failed'
ORDER BY finished_at DESC;

-- Recordings stored under unmatched/ that wait for an operator to attach them.
CREATE VIEW recording_jobs_unmatched AS
SELECT id, recording_id, object_path, object_size, recording_started_at,
       duration_millis, from_number, to_number, last_error, finished_at
FROM recording_jobs
WHERE state = 'unmatched'
ORDER BY finished_at DESC;

-- Running jobs whose lease ran out long ago: no live worker is rescuing them
-- (every worker rescues expired leases on its poll, so rows here mean no
-- worker is running at all).
CREATE VIEW recording_jobs_stuck AS
SELECT id, recording_id, locked_by, locked_until, now() - locked_until AS expired_for, attempts
FROM recording_jobs
WHERE state = 'running' AND locked_until < now() - interval '5 minutes'
ORDER BY locked_until;

-- Queue depth by state, and how long the oldest runnable job has waited.
CREATE VIEW recording_jobs_queue AS
SELECT state,
       count(*) AS jobs,
       min(created_at) AS oldest_created_at,
       extract(epoch FROM now() - min(next_run_at) FILTER (WHERE state = 'pending' AND next_run_at <= now()))
           AS oldest_runnable_age_seconds
FROM recording_jobs
GROUP BY state
ORDER BY state;

-- Makes one job runnable now with a fresh set of attempts. Works on failed,
-- cancelled and unmatched jobs, and on pending ones (to skip the backoff).
-- (A duplicate stays one: its recording belongs to another job.) Returns the job's id; raises when the job cannot be requeued.
CREATE FUNCTION recording_jobs_requeue(job_id BIGINT) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    requeued BIGINT;
BEGIN
    UPDATE recording_jobs
    SET state = 'pending', attempts = 0, next_run_at = now(), finished_at = NULL,
        locked_by = NULL, locked_until = NULL, updated_at = now(),
        errors = errors || jsonb_build_array(jsonb_build_object(
            'at', now(), 'kind', 'requeued', 'error', 'requeued by ' || current_user))
    WHERE id = job_id AND state IN ('failed', 'cancelled', 'unmatched', 'pending')
    RETURNING id INTO requeued;
    IF requeued IS NULL THEN
        RAISE EXCEPTION 'job % not found, running or succeeded: nothing to requeue', job_id;
    END IF;
    RETURN requeued;
END
$$;

-- Requeues every failed job; returns how many. The rows are locked first, so
-- none can leave `failed` between the choice and its requeue.
CREATE FUNCTION recording_jobs_requeue_failed() RETURNS INTEGER
LANGUAGE sql AS $$
    SELECT count(recording_jobs_requeue(id))::integer
    FROM (SELECT id FROM recording_jobs WHERE state = 'failed' ORDER BY id FOR UPDATE) failed;
$$;

-- Stops a job. A running job's worker notices at its next heartbeat or
-- write (they are fenced on the lease) and stops without changing anything.
CREATE FUNCTION recording_jobs_cancel(job_id BIGINT) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    cancelled BIGINT;
BEGIN
    UPDATE recording_jobs
    SET state = 'cancelled', finished_at = now(), locked_by = NULL, locked_until = NULL,
        updated_at = now(), last_error = 'cancelled by ' || current_user,
        errors = errors || jsonb_build_array(jsonb_build_object(
            'at', now(), 'kind', 'cancelled', 'error', 'cancelled by ' || current_user))
    WHERE id = job_id AND state IN ('pending', 'running', 'failed', 'unmatched')
    RETURNING id INTO cancelled;
    IF cancelled IS NULL THEN
        RAISE EXCEPTION 'job % not found or already finished: nothing to cancel', job_id;
    END IF;
    RETURN cancelled;
END
$$;

-- Attaches an unmatched (already stored) recording to the intake it belongs
-- to, and requeues the job so a worker links it (the object stays where it
-- is, under unmatched/). Raises when the intake holds another recording.
CREATE FUNCTION recording_jobs_attach(job_id BIGINT, target_intake UUID) RETURNS BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    job recording_jobs%ROWTYPE;
    other TEXT;
BEGIN
    SELECT * INTO job FROM recording_jobs WHERE id = job_id FOR UPDATE;
    IF NOT FOUND OR job.state <> 'unmatched' THEN
        RAISE EXCEPTION 'job % not found or not unmatched', job_id;
    END IF;
    SELECT recording_id INTO other FROM intakes WHERE id = target_intake FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'intake % not found', target_intake;
    END IF;
    IF other IS NOT NULL AND other IS DISTINCT FROM job.recording_id THEN
        RAISE EXCEPTION 'intake % already holds recording %', target_intake, other;
    END IF;
    UPDATE recording_jobs
    SET intake_id = target_intake, match_method = 'manual', matched_at = now(),
        state = 'pending', attempts = 0, next_run_at = now(), finished_at = NULL,
        updated_at = now(),
        errors = errors || jsonb_build_array(jsonb_build_object(
            'at', now(), 'kind', 'attached',
            'error', format('attached to intake %s by %s', target_intake, current_user)))
    WHERE id = job_id;
    RETURN job_id;
END
$$;
