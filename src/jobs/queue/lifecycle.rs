//! A job's life in the queue (River's `jobcompleter` and `job_rescuer`):
//! enqueue, claim, heartbeat, complete (one by one or batched), retry,
//! finish unsuccessfully, release at shutdown, and the rescue of leases
//! whose worker stopped heartbeating.

use std::time::Duration;

use super::{Queue, QueueError, fenced, millis, one_row};
use crate::jobs::{Job, JobError, JobState, Lease, NewJob};

/// What one lease of a batched completion ([`Queue::complete_batch`])
/// came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completed {
    /// The job is `succeeded`.
    Succeeded,
    /// The lease was lost first: nothing was written for it.
    LeaseLost,
}

impl Completed {
    /// As [`Queue::complete`] answers for one lease.
    pub(crate) fn into_result(self) -> Result<(), QueueError> {
        match self {
            Completed::Succeeded => Ok(()),
            Completed::LeaseLost => Err(QueueError::LeaseLost),
        }
    }
}

/// Result of an enqueue: Telnyx redelivers, so a duplicate is normal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Inserted(i64),
    Duplicate,
}

/// The claim: the oldest runnable jobs, skipping rows other workers hold,
/// leased and counted in one statement that commits at once. `$1` limit,
/// `$2` worker, `$3` lease in milliseconds. Its plan is tested to use
/// `recording_jobs_claim_idx`.
pub(crate) const CLAIM_SQL: &str = "WITH picked AS (
         SELECT id FROM recording_relay.recording_jobs
         WHERE state = 'pending' AND next_run_at <= now()
         ORDER BY next_run_at, id
         LIMIT $1
         FOR UPDATE SKIP LOCKED
     )
     UPDATE recording_relay.recording_jobs j
     SET state = 'running',
         attempts = j.attempts + 1,
         lease_id = nextval('recording_relay.recording_jobs_lease_seq'),
         session_woken_at = NULL,
         locked_by = $2,
         locked_until = now() + $3 * interval '1 millisecond',
         updated_at = now()
     FROM picked
     WHERE j.id = picked.id
     RETURNING j.*";

/// Completion of many claimed jobs, each fenced on its own lease: `$1` ids,
/// `$2` lease tokens, `$3` workers (parallel arrays, sorted by id so
/// concurrent batches lock rows in the same order). Returns `(id, token)` of
/// each row that matched; a lease that was lost matches nothing.
/// Matched like `lease_fence!`, per row: no `state = 'running'`.
pub(crate) const COMPLETE_BATCH_SQL: &str = "UPDATE recording_relay.recording_jobs j
     SET state = 'succeeded', finished_at = now(), locked_by = NULL, locked_until = NULL,
         updated_at = now()
     FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS c(id, token, worker)
     WHERE j.id = c.id AND j.lease_id = c.token AND j.locked_by = c.worker
     RETURNING j.id, j.lease_id";

impl Queue {
    /// Stores a verified event. Autocommit: when this returns, the row is
    /// durable and the listener may answer 2xx. A conflict on the event id
    /// (a redelivery) or on the recording id (a live job relays it already)
    /// inserts nothing.
    pub async fn enqueue(&self, job: &NewJob) -> Result<Enqueued, QueueError> {
        Self::enqueue_with(&self.pool, job).await
    }

    /// [`Queue::enqueue`] through `executor`: the listener passes a
    /// connection it acquired with a bound of its own (load shedding).
    pub(crate) async fn enqueue_with<'c>(
        executor: impl sqlx::PgExecutor<'c>,
        job: &NewJob,
    ) -> Result<Enqueued, QueueError> {
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO recording_relay.recording_jobs (
                 event_id, event_type, occurred_at, event, recording_id, call_session_id,
                 call_control_id, call_leg_id, connection_id, client_state, from_number,
                 to_number, duration_millis, channels, recording_started_at,
                 recording_ended_at, max_attempts)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
             ON CONFLICT DO NOTHING
             RETURNING id",
        )
        .bind(&job.event_id)
        .bind(&job.event_type)
        .bind(job.occurred_at)
        .bind(&job.event)
        .bind(&job.recording_id)
        .bind(&job.call.call_session_id)
        .bind(&job.call.call_control_id)
        .bind(&job.call.call_leg_id)
        .bind(&job.call.connection_id)
        .bind(&job.client_state)
        .bind(&job.call.from_number)
        .bind(&job.call.to_number)
        .bind(job.call.duration_millis)
        .bind(&job.call.channels)
        .bind(job.call.recording_started_at)
        .bind(job.call.recording_ended_at)
        .bind(job.max_attempts)
        .fetch_optional(executor)
        .await?;
        Ok(id.map_or(Enqueued::Duplicate, Enqueued::Inserted))
    }

    /// A call event of `session` arrived: its jobs that wait (for that event,
    /// mostly: see `pipeline::matching`) are runnable now, so an exact link
    /// that came late is used at once instead of after `pipeline.link_wait`.
    /// A job of the session in a provider's backoff is woken too and spends
    /// an attempt early; a session's call events come before its recording,
    /// so that is rare. A running job is marked (`session_woken_at`): its
    /// attempt may have looked for the event before it committed, and its
    /// retry then runs at once ([`Queue::retry`]). Both statements write the
    /// job's row, so whichever comes second waits for the first and sees
    /// what it wrote: no wake falls between them. A pending job that is
    /// runnable already is written too, so that it stays locked until the
    /// call event commits: a claim skips it until then (or, claiming first,
    /// makes the wake wait and then mark it running), and no attempt can
    /// look for the event before it is visible and be missed. Finds the
    /// jobs through `recording_jobs_call_session_idx`.
    pub async fn wake_session<'c>(
        executor: impl sqlx::PgExecutor<'c>,
        session: &str,
    ) -> Result<u64, QueueError> {
        let done = sqlx::query(
            "UPDATE recording_relay.recording_jobs
             SET next_run_at = CASE WHEN state = 'pending' THEN least(next_run_at, now())
                                    ELSE next_run_at END,
                 session_woken_at = CASE WHEN state = 'running' THEN now()
                                         ELSE session_woken_at END,
                 updated_at = now()
             WHERE call_session_id = $1 AND intake_id IS NULL
               AND state IN ('pending', 'running')",
        )
        .bind(session)
        .execute(executor)
        .await?;
        Ok(done.rows_affected())
    }

    /// Claims up to `limit` runnable jobs for `worker`: sets the lease and
    /// counts the attempt in one statement that commits at once.
    pub async fn claim(
        &self,
        worker: &str,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<Job>, QueueError> {
        let jobs = sqlx::query_as::<_, Job>(CLAIM_SQL)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .bind(worker)
            .bind(millis(lease))
            .fetch_all(&self.pool)
            .await?;
        Ok(jobs)
    }

    /// Extends the lease. `LeaseLost`: the lease expired and was rescued,
    /// or an operator cancelled the job; the caller must stop.
    pub async fn heartbeat(&self, lease: &Lease, duration: Duration) -> Result<(), QueueError> {
        let done = fenced(
            fenced_update!("locked_until = now() + $4 * interval '1 millisecond'"),
            lease,
        )
        .bind(millis(duration))
        .execute(&self.pool)
        .await?;
        one_row(&done)
    }

    /// Marks the job succeeded. `LeaseLost`: the lease was lost first.
    pub async fn complete(&self, lease: &Lease) -> Result<(), QueueError> {
        let done = fenced(
            fenced_update!(
                "state = 'succeeded', finished_at = now(), locked_by = NULL, locked_until = NULL"
            ),
            lease,
        )
        .execute(&self.pool)
        .await?;
        one_row(&done)
    }

    /// Marks many jobs succeeded in one statement, each fenced on its own
    /// lease exactly like [`Queue::complete`]. Returns, for each lease in
    /// order, whether its row matched (`LeaseLost`: that lease was lost
    /// first).
    /// The worker batches its completions through this (see
    /// `worker::Completions`): one round trip and one commit for many jobs.
    pub(crate) async fn complete_batch(
        &self,
        leases: &[Lease],
    ) -> Result<Vec<Completed>, QueueError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let mut sorted: Vec<&Lease> = leases.iter().collect();
        sorted.sort_by_key(|l| l.job_id);
        let ids: Vec<i64> = sorted.iter().map(|l| l.job_id).collect();
        let tokens: Vec<i64> = sorted.iter().map(|l| l.token).collect();
        let workers: Vec<&str> = sorted.iter().map(|l| l.worker.as_str()).collect();
        let done: Vec<(i64, i64)> = sqlx::query_as(COMPLETE_BATCH_SQL)
            .bind(&ids)
            .bind(&tokens)
            .bind(&workers)
            .fetch_all(&self.pool)
            .await?;
        let done: std::collections::HashSet<(i64, i64)> = done.into_iter().collect();
        Ok(leases
            .iter()
            .map(|l| {
                if done.contains(&(l.job_id, l.token)) {
                    Completed::Succeeded
                } else {
                    Completed::LeaseLost
                }
            })
            .collect())
    }

    /// Records a failed attempt. With attempts left the job goes back to
    /// `pending` at `now() + delay`; without, it ends `failed`. Returns the
    /// new state, or `LeaseLost` when the lease was lost first.
    pub async fn retry(
        &self,
        lease: &Lease,
        error: &JobError,
        delay: Duration,
    ) -> Result<JobState, QueueError> {
        let state: Option<JobState> = sqlx::query_scalar(concat!(
            "UPDATE recording_relay.recording_jobs
             SET state = CASE WHEN attempts >= max_attempts
                              THEN 'failed' ELSE 'pending' END::recording_relay.recording_job_state,
                 next_run_at = CASE WHEN attempts >= max_attempts THEN next_run_at
                                    -- A call event of the session arrived during
                                    -- the attempt (`wake_session`): it may be the
                                    -- link the attempt decided to wait for.
                                    WHEN session_woken_at IS NOT NULL THEN now()
                                    ELSE now() + $5 * interval '1 millisecond' END,
                 finished_at = CASE WHEN attempts >= max_attempts THEN now() END,
                 last_error = CASE WHEN attempts >= max_attempts
                                   THEN format('gave up after %s attempts: %s', attempts, $4::text)
                                   ELSE $4 END,
                 errors = errors || jsonb_build_array(jsonb_build_object(
                     'attempt', attempts, 'at', now(), 'worker', locked_by,
                     'kind', $6::text, 'error', $4::text)),
                 locked_by = NULL, locked_until = NULL, updated_at = now()
             WHERE ",
            lease_fence!(),
            "
             RETURNING state"
        ))
        .bind(lease.job_id)
        .bind(lease.token)
        .bind(&lease.worker)
        .bind(error.to_string())
        .bind(millis(delay))
        .bind(error.kind())
        .fetch_optional(&self.pool)
        .await?;
        state.ok_or(QueueError::LeaseLost)
    }

    /// Ends the job in a terminal state other than success (`failed` for a
    /// permanent error, `unmatched` when no intake matched). `LeaseLost`:
    /// the lease was lost first.
    pub async fn finish_unsuccessfully(
        &self,
        lease: &Lease,
        state: JobState,
        kind: &str,
        reason: &str,
    ) -> Result<(), QueueError> {
        debug_assert!(matches!(
            state,
            JobState::Failed | JobState::Unmatched | JobState::Duplicate
        ));
        let done = fenced(
            fenced_update!(
                "state = $4, last_error = $5, finished_at = now(),
                 errors = errors || jsonb_build_array(jsonb_build_object(
                     'attempt', attempts, 'at', now(), 'worker', locked_by,
                     'kind', $6::text, 'error', $5::text)),
                 locked_by = NULL, locked_until = NULL"
            ),
            lease,
        )
        .bind(state)
        .bind(reason)
        .bind(kind)
        .execute(&self.pool)
        .await?;
        one_row(&done)
    }

    /// Gives a claimed job back without counting the attempt (shutdown): it
    /// is runnable at once and the trigger wakes another worker.
    /// `LeaseLost`: the lease was lost first.
    pub async fn release(&self, lease: &Lease) -> Result<(), QueueError> {
        let done = fenced(
            fenced_update!(
                "state = 'pending', attempts = attempts - 1, next_run_at = now(),
                 locked_by = NULL, locked_until = NULL"
            ),
            lease,
        )
        .execute(&self.pool)
        .await?;
        one_row(&done)
    }

    /// Returns jobs whose worker stopped heartbeating (crashed, hung, or cut
    /// off from the database) to `pending`, or to `failed` when that was
    /// their last attempt. The attempt stays counted, so a job that kills its
    /// worker cannot loop forever. Returns how many were rescued.
    pub(crate) async fn rescue_expired_leases(&self) -> Result<u64, QueueError> {
        let done = sqlx::query(
            "UPDATE recording_relay.recording_jobs j
             SET state = CASE WHEN j.attempts >= j.max_attempts
                              THEN 'failed' ELSE 'pending' END::recording_relay.recording_job_state,
                 finished_at = CASE WHEN j.attempts >= j.max_attempts THEN now() END,
                 next_run_at = now(),
                 last_error = format('lease expired: worker %s stopped heartbeating', j.locked_by),
                 errors = j.errors || jsonb_build_array(jsonb_build_object(
                     'attempt', j.attempts, 'at', now(), 'worker', j.locked_by,
                     'kind', 'lease_expired',
                     'error', format('lease expired: worker %s stopped heartbeating', j.locked_by))),
                 locked_by = NULL, locked_until = NULL, updated_at = now()
             FROM (SELECT id FROM recording_relay.recording_jobs
                   WHERE state = 'running' AND locked_until < now()
                   ORDER BY locked_until
                   LIMIT 1000
                   FOR UPDATE SKIP LOCKED) expired
             WHERE j.id = expired.id",
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::super::NOTIFY_CHANNEL;
    use super::super::test_support::*;
    use super::Completed::{LeaseLost, Succeeded};
    use super::*;

    #[sqlx::test(migrations = false)]
    async fn enqueue_is_idempotent_on_event_id(pool: PgPool) {
        let q = queue(pool).await;
        let first = q.enqueue(&new_job("ev-1")).await.unwrap();
        assert!(matches!(first, Enqueued::Inserted(_)));
        assert_eq!(
            q.enqueue(&new_job("ev-1")).await.unwrap(),
            Enqueued::Duplicate
        );
        assert_eq!(
            q.count_by_state().await.unwrap(),
            vec![(JobState::Pending, 1)]
        );
    }

    #[sqlx::test(migrations = false)]
    async fn claim_sets_lease_and_counts_the_attempt(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let job = one_claimed(&q, "w1").await;
        assert_eq!(job.state, JobState::Running);
        assert_eq!(job.attempts, 1);
        assert_eq!(job.locked_by.as_deref(), Some("w1"));
        let until = job.locked_until.unwrap();
        let ahead = until - chrono::Utc::now();
        assert!(ahead > chrono::Duration::seconds(25) && ahead <= chrono::Duration::seconds(31));
        assert!(q.claim("w2", 10, LEASE).await.unwrap().is_empty());
    }

    #[sqlx::test(migrations = false)]
    async fn concurrent_claims_never_share_a_job(pool: PgPool) {
        let q = queue(pool).await;
        for i in 0..200 {
            q.enqueue(&new_job(&format!("ev-{i}"))).await.unwrap();
        }
        let mut tasks = Vec::new();
        for w in 0..8 {
            let q = q.clone();
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let jobs = q.claim(&format!("w{w}"), 7, LEASE).await.unwrap();
                    if jobs.is_empty() {
                        break mine;
                    }
                    mine.extend(jobs.into_iter().map(|j| j.id));
                }
            }));
        }
        let mut seen = HashSet::new();
        let mut total = 0;
        for t in tasks {
            for id in t.await.unwrap() {
                total += 1;
                assert!(seen.insert(id), "job {id} claimed twice");
            }
        }
        assert_eq!(total, 200);
    }

    #[sqlx::test(migrations = false)]
    async fn claim_takes_the_oldest_runnable_first_and_skips_future_ones(pool: PgPool) {
        let q = queue(pool).await;
        for id in ["a", "b", "c"] {
            q.enqueue(&new_job(id)).await.unwrap();
        }
        sqlx::query("UPDATE recording_relay.recording_jobs SET next_run_at = now() + interval '1 hour' WHERE event_id = 'a'")
            .execute(q.pool())
            .await
            .unwrap();
        let jobs = q.claim("w", 10, LEASE).await.unwrap();
        let ids: Vec<_> = jobs.iter().map(|j| j.event_id.as_str()).collect();
        assert_eq!(ids, ["b", "c"]);
    }

    #[sqlx::test(migrations = false)]
    async fn an_expired_lease_is_rescued_and_claimed_again_with_the_attempt_counted(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let job = one_claimed(&q, "dead-worker").await;
        assert_eq!(
            q.rescue_expired_leases().await.unwrap(),
            0,
            "a live lease is left alone"
        );
        expire_lease(&q, job.id).await;
        assert_eq!(q.rescue_expired_leases().await.unwrap(), 1);

        let again = one_claimed(&q, "w2").await;
        assert_eq!(again.id, job.id);
        assert_eq!(again.attempts, 2);
        assert!(again.last_error.unwrap().contains("dead-worker"));
        assert_eq!(again.errors[0]["kind"], "lease_expired");
    }

    #[sqlx::test(migrations = false)]
    async fn a_batched_completion_is_fenced_per_lease(pool: PgPool) {
        let q = queue(pool).await;
        for i in 0..5 {
            q.enqueue(&new_job(&format!("ev-{i}"))).await.unwrap();
        }
        let leases: Vec<Lease> = q
            .claim("w1", 5, LEASE)
            .await
            .unwrap()
            .iter()
            .map(|j| j.lease().unwrap())
            .collect();
        assert_eq!(leases.len(), 5);
        // Job 1: the lease expired and another worker owns the job now.
        expire_lease(&q, leases[1].job_id).await;
        q.rescue_expired_leases().await.unwrap();
        let fresh = one_claimed(&q, "w2").await.lease().unwrap();
        assert_eq!(fresh.job_id, leases[1].job_id);
        // Job 3: cancelled by an operator.
        q.cancel(leases[3].job_id).await.unwrap();

        // Out of id order on purpose: the answer follows the input order.
        let batch = vec![
            leases[4].clone(),
            leases[1].clone(),
            leases[0].clone(),
            leases[3].clone(),
            leases[2].clone(),
        ];
        let done = q.complete_batch(&batch).await.unwrap();
        assert_eq!(
            done,
            [Succeeded, LeaseLost, Succeeded, LeaseLost, Succeeded]
        );

        let state = |id| {
            let q = q.clone();
            async move { q.get(id).await.unwrap().unwrap() }
        };
        for i in [0, 2, 4] {
            let job = state(leases[i].job_id).await;
            assert_eq!(job.state, JobState::Succeeded);
            assert!(job.finished_at.is_some() && job.locked_by.is_none());
            assert_eq!(job.attempts, 1);
        }
        let stolen = state(leases[1].job_id).await;
        assert_eq!(
            stolen.state,
            JobState::Running,
            "the stale lease wrote nothing"
        );
        assert_eq!(stolen.locked_by.as_deref(), Some("w2"));
        assert_eq!(state(leases[3].job_id).await.state, JobState::Cancelled);

        // The same lease again: already finished, so nothing matches.
        assert_eq!(q.complete_batch(&leases[..1]).await.unwrap(), [LeaseLost]);
        assert!(q.complete_batch(&[]).await.unwrap().is_empty());
        // The new owner completes normally.
        assert_eq!(q.complete_batch(&[fresh]).await.unwrap(), [Succeeded]);
    }

    #[sqlx::test(migrations = false)]
    async fn a_batched_completion_tells_attempts_of_one_job_apart(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        // The same worker id claims the job twice (its first lease expired):
        // only the current attempt may complete it.
        let first = one_claimed(&q, "w1").await.lease().unwrap();
        expire_lease(&q, first.job_id).await;
        q.rescue_expired_leases().await.unwrap();
        let second = one_claimed(&q, "w1").await.lease().unwrap();
        assert_eq!(second.attempt, 2);
        let done = q
            .complete_batch(&[first.clone(), second.clone()])
            .await
            .unwrap();
        assert_eq!(done, [LeaseLost, Succeeded]);
    }

    #[sqlx::test(migrations = false)]
    async fn heartbeat_extends_the_lease(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let job = one_claimed(&q, "w1").await;
        let lease = job.lease().unwrap();
        q.heartbeat(&lease, Duration::from_secs(600)).await.unwrap();
        let after = q.get(job.id).await.unwrap().unwrap();
        assert!(
            after.locked_until.unwrap()
                > job.locked_until.unwrap() + chrono::Duration::seconds(500)
        );
    }

    #[sqlx::test(migrations = false)]
    async fn retry_schedules_the_next_run_in_the_backoff_window(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let lease = one_claimed(&q, "w1").await.lease().unwrap();
        let delay = Duration::from_secs(40);
        let before = chrono::Utc::now();
        let state = q
            .retry(&lease, &JobError::retryable("telnyx 503"), delay)
            .await
            .unwrap();
        assert_eq!(state, JobState::Pending);
        let job = q.get(lease.job_id).await.unwrap().unwrap();
        let wait = job.next_run_at - before;
        assert!(
            wait >= chrono::Duration::seconds(39) && wait <= chrono::Duration::seconds(41),
            "{wait}"
        );
        assert_eq!(job.last_error.as_deref(), Some("telnyx 503"));
        assert!(job.locked_by.is_none() && job.locked_until.is_none());
        assert!(
            q.claim("w1", 1, LEASE).await.unwrap().is_empty(),
            "not runnable before next_run_at"
        );
    }

    async fn store_call_initiated(q: &Queue, session: &str) {
        store_call_initiated_with(q.pool(), session).await;
    }

    /// The call's row as the listener stores it, through `executor` (the
    /// listener's own transaction, in the race tests).
    async fn store_call_initiated_with<'c>(executor: impl sqlx::PgExecutor<'c>, session: &str) {
        sqlx::query(
            "INSERT INTO recording_relay.calls (call_session_id, first_event_id, first_event_type)
             VALUES ($1, 'initiated-' || $1, 'call.initiated')",
        )
        .bind(session)
        .execute(executor)
        .await
        .unwrap();
    }

    /// The lost wake-up the partition chaos run found: the session's
    /// `call.initiated` is stored (and its wake finds the job running) while
    /// the job's attempt is deciding to wait for it; the retry written
    /// after must not park the job for the whole wait.
    #[sqlx::test(migrations = false)]
    async fn a_call_event_stored_during_the_attempt_makes_its_retry_run_at_once(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let lease = one_claimed(&q, "w1").await.lease().unwrap();
        store_call_initiated(&q, "session-ev-1").await;
        assert_eq!(
            Queue::wake_session(q.pool(), "session-ev-1").await.unwrap(),
            1,
            "the running job is marked"
        );
        q.retry(
            &lease,
            &JobError::retryable("waiting"),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
        let job = q.get(lease.job_id).await.unwrap().unwrap();
        assert!(job.next_run_at <= chrono::Utc::now(), "{}", job.next_run_at);
        assert_eq!(one_claimed(&q, "w1").await.id, lease.job_id);
    }

    /// The same race with the listener's transaction (the call's row and
    /// its wake) still open while the retry is written, which a look for
    /// committed call rows from the retry could not see (seen once in a
    /// partition run): the wake holds the job's row, the retry waits for it
    /// and sees its mark.
    #[sqlx::test(migrations = false)]
    async fn a_wake_whose_transaction_is_still_open_during_the_retry_is_not_lost(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let lease = one_claimed(&q, "w1").await.lease().unwrap();
        let job_id = lease.job_id;
        let mut listener = q.pool().begin().await.unwrap();
        store_call_initiated_with(&mut *listener, "session-ev-1").await;
        Queue::wake_session(&mut *listener, "session-ev-1")
            .await
            .unwrap();
        let retrying = {
            let q = q.clone();
            tokio::spawn(async move {
                q.retry(
                    &lease,
                    &JobError::retryable("waiting"),
                    Duration::from_secs(3600),
                )
                .await
            })
        };
        // The retry is blocked on the job's row lock before the listener
        // commits.
        let waiting = || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                                WHERE datname = current_database() AND wait_event_type = 'Lock')",
            )
            .fetch_one(q.pool())
            .await
            .unwrap()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !waiting().await {
            assert!(
                std::time::Instant::now() < deadline,
                "the retry never waited"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        listener.commit().await.unwrap();
        assert_eq!(retrying.await.unwrap().unwrap(), JobState::Pending);
        let job = q.get(job_id).await.unwrap().unwrap();
        assert!(job.next_run_at <= chrono::Utc::now(), "{}", job.next_run_at);
    }

    /// The other side of the race (found in review): the job is pending and
    /// runnable when the call event's transaction wakes it. The wake holds
    /// its row until that transaction commits, so no claim takes the job
    /// (and no attempt looks for the event) before the event is visible.
    #[sqlx::test(migrations = false)]
    async fn a_runnable_job_is_not_claimed_before_its_call_event_commits(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let mut listener = q.pool().begin().await.unwrap();
        assert_eq!(
            Queue::wake_session(&mut *listener, "session-ev-1")
                .await
                .unwrap(),
            1
        );
        assert!(
            q.claim("w1", 1, LEASE).await.unwrap().is_empty(),
            "claimed while the call event was not yet committed"
        );
        listener.commit().await.unwrap();
        assert_eq!(q.claim("w1", 1, LEASE).await.unwrap().len(), 1);
    }

    /// A call event stored before the attempt began does not shorten the
    /// retry's backoff (a provider's failure keeps its delay).
    #[sqlx::test(migrations = false)]
    async fn a_call_event_stored_before_the_attempt_keeps_the_backoff(pool: PgPool) {
        let q = queue(pool).await;
        store_call_initiated(&q, "session-ev-1").await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let lease = one_claimed(&q, "w1").await.lease().unwrap();
        q.retry(
            &lease,
            &JobError::retryable("telnyx 503"),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
        let job = q.get(lease.job_id).await.unwrap().unwrap();
        assert!(
            job.next_run_at > chrono::Utc::now() + chrono::Duration::minutes(59),
            "{}",
            job.next_run_at
        );
    }

    #[sqlx::test(migrations = false)]
    async fn the_last_attempt_ends_failed_with_reason_and_history(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap(); // max_attempts = 3
        for attempt in 1..=3 {
            sqlx::query("UPDATE recording_relay.recording_jobs SET next_run_at = now()")
                .execute(q.pool())
                .await
                .unwrap();
            let lease = one_claimed(&q, "w1").await.lease().unwrap();
            assert_eq!(lease.attempt, attempt);
            let err = JobError::retryable(format!("boom {attempt}"));
            let state = q.retry(&lease, &err, Duration::ZERO).await.unwrap();
            let expected = if attempt < 3 {
                JobState::Pending
            } else {
                JobState::Failed
            };
            assert_eq!(state, expected);
        }
        let job = q.get_by_event_id("ev-1").await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert!(job.finished_at.is_some());
        assert_eq!(
            job.last_error.as_deref(),
            Some("gave up after 3 attempts: boom 3")
        );
        let history: Vec<_> = job
            .errors
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["error"].clone())
            .collect();
        assert_eq!(history, ["boom 1", "boom 2", "boom 3"]);
        assert!(q.claim("w1", 1, LEASE).await.unwrap().is_empty());
    }

    #[sqlx::test(migrations = false)]
    async fn a_rescued_last_attempt_fails_instead_of_looping(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        sqlx::query("UPDATE recording_relay.recording_jobs SET attempts = 2")
            .execute(q.pool())
            .await
            .unwrap();
        let job = one_claimed(&q, "w1").await;
        expire_lease(&q, job.id).await;
        q.rescue_expired_leases().await.unwrap();
        let job = q.get(job.id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert!(job.last_error.unwrap().starts_with("lease expired"));
    }

    #[sqlx::test(migrations = false)]
    async fn permanent_failure_stops_at_once(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let lease = one_claimed(&q, "w1").await.lease().unwrap();
        q.finish_unsuccessfully(
            &lease,
            JobState::Failed,
            "permanent",
            "recording not found at Telnyx",
        )
        .await
        .unwrap();
        let job = q.get(lease.job_id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert_eq!(job.attempts, 1);
        assert_eq!(job.errors[0]["kind"], "permanent");
    }

    #[sqlx::test(migrations = false)]
    async fn release_returns_the_job_without_counting_the_attempt(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let lease = one_claimed(&q, "w1").await.lease().unwrap();
        q.release(&lease).await.unwrap();
        let again = one_claimed(&q, "w2").await;
        assert_eq!(again.attempts, 1);
    }

    #[sqlx::test(migrations = false)]
    async fn the_claim_uses_the_partial_index(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        fill_and_analyze(
            &q,
            "INSERT INTO recording_relay.recording_jobs (event_id, event_type, event, state, finished_at)
                 SELECT 'done-' || g, 'call.recording.saved', '{}', 'succeeded', now()
                 FROM generate_series(1, 5000) g",
        )
        .await;
        let mut conn = q.pool().acquire().await.unwrap();
        let plan = testing::explain(
            &mut conn,
            &format!("PREPARE claim(bigint, text, bigint) AS {CLAIM_SQL}"),
            "EXECUTE claim(10, 'w', 1000)",
            Plan::Chosen,
        )
        .await;
        assert!(plan.contains("recording_jobs_claim_idx"), "{plan}");
        assert!(
            !plan.contains("Sort"),
            "the index order must serve ORDER BY:\n{plan}"
        );
    }

    /// Found by `bench queue`: statistics taken while nothing ran (the
    /// table ANALYZEd full of pending jobs, as autovacuum does when a burst
    /// arrives) made the planner read every `running` entry of an index on
    /// `state`, dead ones included, for each batch of completions, instead
    /// of finding the batch's rows by primary key: 25 ms per batch, and the
    /// queue ran at half its rate.
    #[sqlx::test(migrations = false)]
    async fn completions_find_their_rows_by_primary_key_whatever_the_statistics(pool: PgPool) {
        let q = queue(pool).await;
        fill_and_analyze(
            &q,
            "INSERT INTO recording_relay.recording_jobs (event_id, event_type, event)
                 SELECT 'ev-' || g, 'call.recording.saved', '{}' FROM generate_series(1, 5000) g",
        )
        .await;
        let claimed = q.claim("w", 250, LEASE).await.unwrap();
        assert_eq!(claimed.len(), 250);
        let mut conn = q.pool().acquire().await.unwrap();
        let plan = testing::explain(
            &mut conn,
            &format!("PREPARE complete(bigint[], bigint[], text[]) AS {COMPLETE_BATCH_SQL}"),
            "EXECUTE complete('{1,2}', '{1,2}', '{w,w}')",
            Plan::Generic,
        )
        .await;
        assert!(plan.contains("recording_jobs_pkey"), "{plan}");
        for index in ["recording_jobs_by_state_idx", "recording_jobs_lease_idx"] {
            assert!(!plan.contains(index), "{plan}");
        }
        // Every other write of a claimed job is fenced the same way.
        let plan = testing::explain(
            &mut conn,
            &format!(
                "PREPARE fenced(bigint, bigint, text) AS {}",
                fenced_update!("locked_until = now()")
            ),
            "EXECUTE fenced(1, 1, 'w')",
            Plan::Generic,
        )
        .await;
        assert!(plan.contains("recording_jobs_pkey"), "{plan}");
    }

    #[sqlx::test(migrations = false)]
    async fn enqueue_and_requeue_notify_listeners(pool: PgPool) {
        let q = queue(pool).await;
        let mut listener = sqlx::postgres::PgListener::connect_with(q.pool())
            .await
            .unwrap();
        listener.listen(NOTIFY_CHANNEL).await.unwrap();
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await;
        assert!(n.is_ok(), "insert notified");

        let lease = one_claimed(&q, "w1").await.lease().unwrap();
        q.release(&lease).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await;
        assert!(n.is_ok(), "return to pending notified");
    }
}
