//! All SQL of the job queue, in one place.
//!
//! The claim commits at once (no transaction is held during HTTP work) and
//! gives the lease a fresh token from a sequence; every later change is
//! fenced on `(id, lease_id, locked_by)` and checks `rows_affected`, so a
//! worker that lost its lease changes nothing, even after a cancel, a
//! requeue and a re-claim by the same process have reset `attempts`.

use std::time::Duration;

use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgPool, Postgres};

use super::{Job, JobError, JobState, Lease, NewJob};
use crate::call::CallFacts;

/// The channel the `recording_jobs_notify` trigger sends on.
pub const NOTIFY_CHANNEL: &str = "recording_jobs";

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// An operator function refused (e.g. requeueing a running job); the
    /// message is PostgreSQL's, written for the operator.
    #[error("{0}")]
    Refused(String),
    /// A live job already owns this recording (or its storage object).
    #[error("recording {recording} is already relayed by job {job_id}")]
    AlreadyOwned { recording: String, job_id: i64 },
}

impl QueueError {
    /// The connection died under the statement (the server restarted, a
    /// network cut): the same statement on another connection may succeed.
    pub(crate) fn is_connection_lost(&self) -> bool {
        matches!(self, Self::Database(e) if crate::db::is_connection_lost(e))
    }
}

impl From<QueueError> for super::JobError {
    fn from(e: QueueError) -> Self {
        super::JobError::retryable(e.to_string())
    }
}

/// Operator functions RAISE with an explanation (SQLSTATE P0001).
fn refused_or(e: sqlx::Error) -> QueueError {
    match &e {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("P0001") => {
            QueueError::Refused(db.message().to_owned())
        }
        _ => QueueError::Database(e),
    }
}

/// Jobs of one state counted exactly by [`Queue::gauges`]; past this the
/// estimate stands in. 10,000 index entries are a few milliseconds.
pub const GAUGE_EXACT_UP_TO: i64 = 10_000;

/// `$1`: [`GAUGE_EXACT_UP_TO`]. Each state's count stops at `$1` entries
/// of the state index; the estimate comes from the statistics alone. The
/// ORDER BY is the index's: without it the planner may take the first `$1`
/// rows of a sequential scan, which for a state with few rows reads the
/// whole table to find them (its plan test caught this).
pub const GAUGES_SQL: &str = "SELECT s.state,
            (SELECT count(*) FROM (
                 SELECT 1 FROM recording_relay.recording_jobs j
                 WHERE j.state = s.state ORDER BY j.state, j.updated_at LIMIT $1
             ) capped) AS counted,
            e.estimate
     FROM unnest(enum_range(NULL::recording_relay.recording_job_state)) AS s(state)
     LEFT JOIN (
         SELECT m.state, (m.freq * greatest(c.reltuples, 0))::int8 AS estimate
         FROM pg_catalog.pg_class c
         JOIN pg_catalog.pg_stats st
           ON st.schemaname = 'recording_relay' AND st.tablename = 'recording_jobs'
          AND st.attname = 'state',
              unnest(st.most_common_vals::text::text[], st.most_common_freqs) AS m(state, freq)
         WHERE c.oid = 'recording_relay.recording_jobs'::regclass
     ) e ON e.state = s.state::text";

/// How long the oldest runnable job has waited: the first entry of
/// `recording_jobs_claim_idx`.
pub const OLDEST_RUNNABLE_SQL: &str = "SELECT extract(epoch FROM now() - min(next_run_at))::float8
     FROM recording_relay.recording_jobs
     WHERE state = 'pending' AND next_run_at <= now()";

/// What [`Queue::gauges`] reads.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueGauges {
    pub jobs: Vec<(JobState, i64)>,
    pub oldest_runnable_age_seconds: f64,
}

/// One row of the `recording_jobs_queue` view.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct QueueDepth {
    pub state: JobState,
    pub jobs: i64,
    pub oldest_runnable_age_seconds: Option<f64>,
}

fn is_unique_violation(e: &sqlx::Error, constraint: &str) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505")
        && db.constraint() == Some(constraint))
}

/// Result of an enqueue: Telnyx redelivers, so a duplicate is normal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Inserted(i64),
    Duplicate,
}

#[derive(Clone, Debug)]
pub struct Queue {
    pool: PgPool,
}

/// The claim: the oldest runnable jobs, skipping rows other workers hold,
/// leased and counted in one statement that commits at once. `$1` limit,
/// `$2` worker, `$3` lease in milliseconds. Its plan is tested to use
/// `recording_jobs_claim_idx`.
pub const CLAIM_SQL: &str = "WITH picked AS (
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
pub const COMPLETE_BATCH_SQL: &str = "UPDATE recording_relay.recording_jobs j
     SET state = 'succeeded', finished_at = now(), locked_by = NULL, locked_until = NULL,
         updated_at = now()
     FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS c(id, token, worker)
     WHERE j.id = c.id AND j.lease_id = c.token AND j.locked_by = c.worker
     RETURNING j.id, j.lease_id";

/// Reconcile's "is this recording known" lookup, once per listed
/// recording. `state <> 'duplicate'` lets the partial unique index
/// `recording_jobs_recording_id_key` answer the first half (a bare
/// `recording_id = $1` cannot use it and scans the table); a duplicate job
/// always has an owner with the same recording id, which that index finds.
/// The second half uses the call-session index. Its plan is tested.
pub const HAS_JOB_FOR_RECORDING_SQL: &str = "SELECT EXISTS (
         SELECT 1 FROM recording_relay.recording_jobs
         WHERE recording_id = $1 AND state <> 'duplicate')
     OR EXISTS (
         SELECT 1 FROM recording_relay.recording_jobs
         WHERE call_session_id = $2 AND recording_id IS NULL
           AND state IN ('pending', 'running'))";

/// Claims up to `$1` owed alerts for `$2` milliseconds: jobs that ended
/// `failed` or `unmatched` and whose alert has not gone out (the trigger
/// `recording_jobs_alert_on_state` sets `alert_due_at` whenever a job enters
/// those states, whoever moves it). The claim commits at once, like the
/// job claim: no transaction is held while the alert is sent, and a sender
/// that dies leaves the claim to run out, then another sends. The new
/// `alert_due_at` of each row is its claim token. Its plan is tested to use
/// `recording_jobs_alert_due_idx`.
pub const CLAIM_ALERTS_SQL: &str = "UPDATE recording_relay.recording_jobs j
     SET alert_due_at = now() + $2 * interval '1 millisecond'
     FROM (SELECT id FROM recording_relay.recording_jobs
           WHERE alert_due_at <= now() AND state IN ('failed', 'unmatched')
           ORDER BY alert_due_at
           LIMIT $1
           FOR UPDATE SKIP LOCKED) due
     WHERE j.id = due.id
     RETURNING j.*";

/// One owed alert, claimed by [`Queue::claim_alerts`].
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OwedAlert {
    #[sqlx(flatten)]
    pub job: Job,
    /// The claim: [`Queue::alert_sent`] and [`Queue::alert_failed`] match
    /// it, so a job that was requeued and ended again meanwhile (a new
    /// alert owed) is not marked by the old one.
    #[sqlx(rename = "alert_due_at")]
    pub claimed_until: chrono::DateTime<chrono::Utc>,
}

/// A finished job that is the only pointer to patient data, as a condition
/// on `recording_relay.recording_jobs j`: unmatched (its object under
/// `unmatched/` is known nowhere else); failed with a recording id, a call
/// session or an object (the recording may still be at Telnyx, or in the
/// bucket); cancelled with an object no intake was linked to. Ordinary
/// retention never deletes these.
pub const HOLDS_PATIENT_DATA: &str = "j.state = 'unmatched'
     OR (j.state = 'failed' AND (j.recording_id IS NOT NULL OR j.call_session_id IS NOT NULL
                                 OR j.object_path IS NOT NULL))
     OR (j.state = 'cancelled' AND j.object_path IS NOT NULL AND j.linked_at IS NULL)";

/// One retention batch: `$1` succeeded/duplicate/cancelled retention and
/// `$2` failed retention in milliseconds, `$3` the batch size. Oldest first
/// along `recording_jobs_finished_idx`, bounded by the shorter period, so a
/// table of millions of finished jobs is not read whole for each batch (it
/// was: a sequential scan of 6 GB, 3.8 s, per batch at 5 million rows).
/// `= ANY (ARRAY(…))` makes the batch's ids one array, so the DELETE finds
/// them by primary key whatever the planner thinks of the batch's size.
fn prune_finished_sql() -> String {
    format!(
        "DELETE FROM recording_relay.recording_jobs
         WHERE id = ANY (ARRAY(
             SELECT id FROM recording_relay.recording_jobs j
             WHERE j.state IN ('succeeded', 'duplicate', 'cancelled', 'failed')
               AND j.finished_at < now() - least($1, $2) * interval '1 millisecond'
               AND NOT ({HOLDS_PATIENT_DATA})
               AND ((j.state IN ('succeeded', 'duplicate', 'cancelled')
                     AND j.finished_at < now() - $1 * interval '1 millisecond')
                 OR (j.state = 'failed'
                     AND j.finished_at < now() - $2 * interval '1 millisecond'))
             ORDER BY j.finished_at
             LIMIT $3
             FOR UPDATE SKIP LOCKED))"
    )
}

/// The condition that finds one claimed job through its lease: `$1` id,
/// `$2` lease token, `$3` worker. A worker that lost the lease matches no
/// row.
///
/// No `state = 'running'`: a row may carry a lease only while it runs
/// (CHECKs `recording_jobs_lease_iff_running` and
/// `recording_jobs_lease_fields_together`, tested), so matching `locked_by`
/// is that test already. The state condition let the planner, with
/// statistics taken while nothing ran, read the whole running part of an
/// index on `state` (dead entries too) for every write instead of the
/// job's row by primary key. The plans are tested.
macro_rules! lease_fence {
    () => {
        "id = $1 AND lease_id = $2 AND locked_by = $3"
    };
}

/// An UPDATE of one claimed job, fenced on its lease (`lease_fence!`).
macro_rules! fenced_update {
    ($set:literal) => {
        concat!(
            "UPDATE recording_relay.recording_jobs SET ",
            $set,
            ", updated_at = now() WHERE ",
            lease_fence!()
        )
    };
}

fn fenced<'a>(sql: &'static str, lease: &'a Lease) -> Query<'a, Postgres, PgArguments> {
    sqlx::query(sql)
        .bind(lease.job_id)
        .bind(lease.token)
        .bind(&lease.worker)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Queue {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Stores a verified event. Autocommit: when this returns, the row is
    /// durable and the listener may answer 2xx. A conflict on the event id
    /// (a redelivery) or on the recording id (a live job relays it already)
    /// inserts nothing.
    pub async fn enqueue(&self, job: &NewJob) -> Result<Enqueued, QueueError> {
        Self::enqueue_with(&self.pool, job).await
    }

    /// [`Queue::enqueue`] through `executor`: the listener passes a
    /// connection it acquired with a bound of its own (load shedding).
    pub async fn enqueue_with<'c>(
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

    /// Keeps a verified delivery that could not be parsed, byte for byte;
    /// a redelivery of the same body only counts up.
    pub async fn quarantine(
        &self,
        reason: &str,
        signed_at: Option<chrono::DateTime<chrono::Utc>>,
        raw_body: &[u8],
    ) -> Result<i64, QueueError> {
        use sha2::Digest as _;
        let id = sqlx::query_scalar(
            "INSERT INTO recording_relay.webhook_quarantine (reason, signed_at, body_sha256, raw_body)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (body_sha256) DO UPDATE
             SET deliveries = webhook_quarantine.deliveries + 1, last_received_at = now()
             RETURNING id",
        )
        .bind(reason)
        .bind(signed_at)
        .bind(sha2::Sha256::digest(raw_body).to_vec())
        .bind(raw_body)
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
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

    /// Extends the lease. `false` means the lease was lost (expired and
    /// rescued, or cancelled by an operator): the caller must stop.
    pub async fn heartbeat(&self, lease: &Lease, duration: Duration) -> Result<bool, QueueError> {
        let done = fenced(
            fenced_update!("locked_until = now() + $4 * interval '1 millisecond'"),
            lease,
        )
        .bind(millis(duration))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks the job succeeded. `false`: the lease was lost first.
    pub async fn complete(&self, lease: &Lease) -> Result<bool, QueueError> {
        let done = fenced(
            fenced_update!(
                "state = 'succeeded', finished_at = now(), locked_by = NULL, locked_until = NULL"
            ),
            lease,
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks many jobs succeeded in one statement, each fenced on its own
    /// lease exactly like [`Queue::complete`]. Returns, for each lease in
    /// order, whether its row matched (`false`: that lease was lost first).
    /// The worker batches its completions through this (see
    /// `worker::Completions`): one round trip and one commit for many jobs.
    pub async fn complete_batch(&self, leases: &[Lease]) -> Result<Vec<bool>, QueueError> {
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
            .map(|l| done.contains(&(l.job_id, l.token)))
            .collect())
    }

    /// Records a failed attempt. With attempts left the job goes back to
    /// `pending` at `now() + delay`; without, it ends `failed`. Returns the
    /// new state, or `None` when the lease was lost first.
    pub async fn retry(
        &self,
        lease: &Lease,
        error: &JobError,
        delay: Duration,
    ) -> Result<Option<JobState>, QueueError> {
        let state = sqlx::query_scalar(concat!(
            "UPDATE recording_relay.recording_jobs
             SET state = CASE WHEN attempts >= max_attempts
                              THEN 'failed' ELSE 'pending' END::recording_relay.recording_job_state,
                 next_run_at = CASE WHEN attempts >= max_attempts THEN next_run_at
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
        Ok(state)
    }

    /// Ends the job in a terminal state other than success (`failed` for a
    /// permanent error, `unmatched` when no intake matched).
    pub async fn finish_unsuccessfully(
        &self,
        lease: &Lease,
        state: JobState,
        kind: &str,
        reason: &str,
    ) -> Result<bool, QueueError> {
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
        Ok(done.rows_affected() == 1)
    }

    /// Gives a claimed job back without counting the attempt (shutdown): it
    /// is runnable at once and the trigger wakes another worker.
    pub async fn release(&self, lease: &Lease) -> Result<bool, QueueError> {
        let done = fenced(
            fenced_update!(
                "state = 'pending', attempts = attempts - 1, next_run_at = now(),
                 locked_by = NULL, locked_until = NULL"
            ),
            lease,
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Returns jobs whose worker stopped heartbeating (crashed, hung, or cut
    /// off from the database) to `pending`, or to `failed` when that was
    /// their last attempt. The attempt stays counted, so a job that kills its
    /// worker cannot loop forever. Returns how many were rescued.
    pub async fn rescue_expired_leases(&self) -> Result<u64, QueueError> {
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

    /// Step 1 done: the recording id and what the Recordings API said about
    /// the call are known. A fact it does not have keeps what the webhook
    /// said; which call and leg it was are not touched, and the job's own
    /// connection wins ([`CallFacts::resolve_with`] does the same in
    /// memory). Fails with `AlreadyOwned` when another live job has the
    /// same recording.
    pub async fn save_resolution(
        &self,
        lease: &Lease,
        recording_id: &str,
        r: &CallFacts,
    ) -> Result<bool, QueueError> {
        let done = fenced(
            fenced_update!(
                "recording_id = $4,
                 from_number = coalesce($5, from_number),
                 to_number = coalesce($6, to_number),
                 duration_millis = coalesce($7, duration_millis),
                 recording_started_at = coalesce($8, recording_started_at),
                 recording_ended_at = coalesce($9, recording_ended_at),
                 channels = coalesce($10, channels),
                 connection_id = coalesce(connection_id, $11),
                 resolved_at = now()"
            ),
            lease,
        )
        .bind(recording_id)
        .bind(&r.from_number)
        .bind(&r.to_number)
        .bind(r.duration_millis)
        .bind(r.recording_started_at)
        .bind(r.recording_ended_at)
        .bind(&r.channels)
        .bind(&r.connection_id)
        .execute(&self.pool)
        .await;
        match done {
            Ok(done) => Ok(done.rows_affected() == 1),
            Err(e) if is_unique_violation(&e, "recording_jobs_recording_id_key") => {
                Err(self.owner_of(recording_id, lease.job_id).await)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn owner_of(&self, recording: &str, not_job: i64) -> QueueError {
        let owner: Result<Option<i64>, _> = sqlx::query_scalar(
            "SELECT id FROM recording_relay.recording_jobs
             WHERE recording_id = $1 AND state <> 'duplicate' AND id <> $2",
        )
        .bind(recording)
        .bind(not_job)
        .fetch_optional(&self.pool)
        .await;
        match owner {
            Ok(Some(job_id)) => QueueError::AlreadyOwned {
                recording: recording.to_owned(),
                job_id,
            },
            Ok(None) => QueueError::Database(sqlx::Error::RowNotFound),
            Err(e) => e.into(),
        }
    }

    /// Locks the job row inside `tx` while the lease holds; `false` when it
    /// was lost. Transactions that change an intake and the job call this
    /// first, so every path locks the job row before the intake row (as the
    /// operator functions and the release trigger do) and none deadlocks.
    pub async fn lock_lease(
        &self,
        tx: &mut sqlx::PgConnection,
        lease: &Lease,
    ) -> Result<bool, QueueError> {
        let held: Option<i64> = sqlx::query_scalar(concat!(
            "SELECT id FROM recording_relay.recording_jobs WHERE ",
            lease_fence!(),
            " FOR UPDATE"
        ))
        .bind(lease.job_id)
        .bind(lease.token)
        .bind(&lease.worker)
        .fetch_optional(&mut *tx)
        .await?;
        Ok(held.is_some())
    }

    /// Step 2 done: the intake this recording belongs to. Runs inside the
    /// transaction that claims the intake (see `pipeline::intakes`).
    pub async fn save_match(
        &self,
        tx: &mut sqlx::PgConnection,
        lease: &Lease,
        intake_id: uuid::Uuid,
        method: &str,
    ) -> Result<bool, QueueError> {
        let done = fenced(
            fenced_update!(
                "intake_id = $4, match_method = $5, matched_at = now(), unmatched_reason = NULL"
            ),
            lease,
        )
        .bind(intake_id)
        .bind(method)
        .execute(&mut *tx)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Claims the object path before the first byte is uploaded, so a retry
    /// knows where an upload that finished unobserved would be. An
    /// `unmatched/` path is saved with the reason no intake matched, which
    /// the attempt that finishes the job reports.
    pub async fn plan_object(
        &self,
        lease: &Lease,
        path: &str,
        content_type: &str,
        unmatched_reason: Option<&str>,
    ) -> Result<bool, QueueError> {
        let done = fenced(
            fenced_update!(
                "object_path = $4, content_type = $5, tus_upload_url = NULL, unmatched_reason = $6"
            ),
            lease,
        )
        .bind(path)
        .bind(content_type)
        .bind(unmatched_reason)
        .execute(&self.pool)
        .await;
        match done {
            Ok(done) => Ok(done.rows_affected() == 1),
            Err(e) if is_unique_violation(&e, "recording_jobs_object_path_key") => {
                let owner: i64 = sqlx::query_scalar(
                    "SELECT id FROM recording_relay.recording_jobs WHERE object_path = $1",
                )
                .bind(path)
                .fetch_one(&self.pool)
                .await?;
                Err(QueueError::AlreadyOwned {
                    recording: path.to_owned(),
                    job_id: owner,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Remembers (or forgets) the resumable upload in progress.
    pub async fn save_tus_upload(
        &self,
        lease: &Lease,
        url: Option<&str>,
    ) -> Result<bool, QueueError> {
        let done = fenced(fenced_update!("tus_upload_url = $4"), lease)
            .bind(url)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Step 3 done: the object is in the bucket and its size verified.
    /// `unproven`: why the stored bytes are not proven the whole recording
    /// (the recording is then kept at Telnyx); `None` when they are.
    pub async fn save_stored(
        &self,
        lease: &Lease,
        sha256: &str,
        size: i64,
        unproven: Option<&str>,
    ) -> Result<bool, QueueError> {
        let done = fenced(
            fenced_update!(
                "object_sha256 = $4, object_size = $5, stored_at = now(), tus_upload_url = NULL,
                 source_complete = ($6::text IS NULL), telnyx_kept_reason = $6"
            ),
            lease,
        )
        .bind(sha256)
        .bind(size)
        .bind(unproven)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Step 4 done, inside the transaction that updates the intake, so the
    /// intake is linked exactly when the job says so.
    pub async fn mark_linked(
        &self,
        tx: &mut sqlx::PgConnection,
        lease: &Lease,
    ) -> Result<bool, QueueError> {
        let done = fenced(fenced_update!("linked_at = now()"), lease)
            .execute(&mut *tx)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// A late-matched recording's move is planned: `object_path` becomes
    /// the intake's own folder and `moved_from` keeps the `unmatched/`
    /// object it is copied from, before the copy, so a retry knows both.
    /// Only from `from`: a job already planned (or moved by another
    /// attempt) is not planned twice. Fails with `AlreadyOwned` when
    /// another job owns the destination.
    pub async fn plan_move(&self, lease: &Lease, from: &str, to: &str) -> Result<bool, QueueError> {
        let done = sqlx::query(concat!(
            "UPDATE recording_relay.recording_jobs
             SET moved_from = object_path, object_path = $5, updated_at = now()
             WHERE ",
            lease_fence!(),
            " AND object_path = $4 AND moved_from IS NULL"
        ))
        .bind(lease.job_id)
        .bind(lease.token)
        .bind(&lease.worker)
        .bind(from)
        .bind(to)
        .execute(&self.pool)
        .await;
        match done {
            Ok(done) => Ok(done.rows_affected() == 1),
            Err(e) if is_unique_violation(&e, "recording_jobs_object_path_key") => {
                Err(self.object_owner(to).await)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn object_owner(&self, path: &str) -> QueueError {
        let owner: Result<i64, _> = sqlx::query_scalar(
            "SELECT id FROM recording_relay.recording_jobs WHERE object_path = $1",
        )
        .bind(path)
        .fetch_one(&self.pool)
        .await;
        match owner {
            Ok(job_id) => QueueError::AlreadyOwned {
                recording: path.to_owned(),
                job_id,
            },
            Err(e) => e.into(),
        }
    }

    /// Undoes a planned move whose destination holds other bytes: the job
    /// names the `unmatched/` object again, where the recording is, so
    /// nothing (an operator, retention) takes the other object for it.
    pub async fn cancel_move(&self, lease: &Lease) -> Result<bool, QueueError> {
        let done = fenced(
            concat!(
                fenced_update!("object_path = moved_from, moved_from = NULL"),
                " AND moved_from IS NOT NULL AND moved_at IS NULL"
            ),
            lease,
        )
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The moved copy holds the recorded bytes: it may be linked.
    pub async fn save_moved(&self, lease: &Lease) -> Result<bool, QueueError> {
        let done = fenced(fenced_update!("moved_at = now()"), lease)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The `unmatched/` original of a moved recording is deleted.
    pub async fn save_moved_from_deleted(&self, lease: &Lease) -> Result<bool, QueueError> {
        let done = fenced(fenced_update!("moved_from_deleted_at = now()"), lease)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Whether a job other than `job_id` has `path` as its object: a moved
    /// recording's `unmatched/` original is deleted only while none does
    /// (the path is free for another recording once the move is planned).
    pub async fn object_owned_by_another(
        &self,
        path: &str,
        job_id: i64,
    ) -> Result<bool, QueueError> {
        let owned = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM recording_relay.recording_jobs
                            WHERE object_path = $1 AND id <> $2)",
        )
        .bind(path)
        .bind(job_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(owned)
    }

    /// Step 5 done: the recording was deleted at Telnyx.
    pub async fn save_telnyx_deleted(&self, lease: &Lease) -> Result<bool, QueueError> {
        let done = fenced(fenced_update!("telnyx_deleted_at = now()"), lease)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn get(&self, id: i64) -> Result<Option<Job>, QueueError> {
        let job =
            sqlx::query_as::<_, Job>("SELECT * FROM recording_relay.recording_jobs WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(job)
    }

    pub async fn get_by_event_id(&self, event_id: &str) -> Result<Option<Job>, QueueError> {
        let job = sqlx::query_as::<_, Job>(
            "SELECT * FROM recording_relay.recording_jobs WHERE event_id = $1",
        )
        .bind(event_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(job)
    }

    /// Makes a failed, cancelled, unmatched or waiting job runnable now with
    /// fresh attempts (the `recording_jobs_requeue` SQL function).
    pub async fn requeue(&self, id: i64) -> Result<(), QueueError> {
        sqlx::query("SELECT recording_relay.recording_jobs_requeue($1)")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(refused_or)?;
        Ok(())
    }

    /// Requeues every failed job; returns how many.
    pub async fn requeue_failed(&self) -> Result<i32, QueueError> {
        let n = sqlx::query_scalar("SELECT recording_relay.recording_jobs_requeue_failed()")
            .fetch_one(&self.pool)
            .await
            .map_err(refused_or)?;
        Ok(n)
    }

    pub async fn cancel(&self, id: i64) -> Result<(), QueueError> {
        sqlx::query("SELECT recording_relay.recording_jobs_cancel($1)")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(refused_or)?;
        Ok(())
    }

    /// Attaches an unmatched recording to an intake and requeues it for linking.
    pub async fn attach(&self, id: i64, intake: uuid::Uuid) -> Result<(), QueueError> {
        sqlx::query("SELECT recording_relay.recording_jobs_attach($1, $2)")
            .bind(id)
            .bind(intake)
            .execute(&self.pool)
            .await
            .map_err(refused_or)?;
        Ok(())
    }

    /// Newest first, optionally of one state.
    pub async fn list(&self, state: Option<JobState>, limit: i64) -> Result<Vec<Job>, QueueError> {
        let jobs = sqlx::query_as::<_, Job>(
            "SELECT * FROM recording_relay.recording_jobs
             WHERE $1::recording_relay.recording_job_state IS NULL OR state = $1
             ORDER BY id DESC LIMIT $2",
        )
        .bind(state)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(jobs)
    }

    pub async fn queue_depth(&self) -> Result<Vec<QueueDepth>, QueueError> {
        let rows = sqlx::query_as::<_, QueueDepth>(
            "SELECT state, jobs, oldest_runnable_age_seconds::float8 AS oldest_runnable_age_seconds
             FROM recording_relay.recording_jobs_queue",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Retention: deletes up to `batch` finished jobs older than their
    /// state's period, oldest first, in one short transaction; the caller
    /// repeats it (and paces it: `retention`). Jobs that point at patient
    /// data ([`HOLDS_PATIENT_DATA`]) are never deleted here: see
    /// [`Queue::unresolved_due`]. Returns how many rows were deleted.
    pub async fn prune_finished_batch(
        &self,
        succeeded_for: Duration,
        failed_for: Duration,
        batch: i64,
    ) -> Result<u64, QueueError> {
        let done = sqlx::query(sqlx::AssertSqlSafe(prune_finished_sql()))
            .bind(millis(succeeded_for))
            .bind(millis(failed_for))
            .bind(batch)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Jobs holding patient data that finished more than `older_than` ago,
    /// oldest first; with `alerted_before`, only those whose retention alert
    /// went out before then, else only those never alerted.
    pub async fn unresolved_due(
        &self,
        older_than: Duration,
        alerted_before: Option<Duration>,
        limit: i64,
    ) -> Result<Vec<(i64, Option<String>)>, QueueError> {
        let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id, object_path FROM recording_relay.recording_jobs j
             WHERE ({HOLDS_PATIENT_DATA})
               AND finished_at < now() - $1 * interval '1 millisecond'
               AND CASE WHEN $2::bigint IS NULL THEN retention_alerted_at IS NULL
                        ELSE retention_alerted_at < now() - $2 * interval '1 millisecond' END
             ORDER BY finished_at, id
             LIMIT $3"
        )))
        .bind(millis(older_than))
        .bind(alerted_before.map(millis))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Claims up to `limit` owed alerts (see [`CLAIM_ALERTS_SQL`]) for
    /// `hold`: no other sweep takes them until then.
    pub async fn claim_alerts(
        &self,
        limit: i64,
        hold: Duration,
    ) -> Result<Vec<OwedAlert>, QueueError> {
        let owed = sqlx::query_as::<_, OwedAlert>(CLAIM_ALERTS_SQL)
            .bind(limit)
            .bind(millis(hold))
            .fetch_all(&self.pool)
            .await?;
        Ok(owed)
    }

    /// The alert went out: nothing is owed any more. `false` when the claim
    /// no longer holds (requeued, or claimed by another after it ran out).
    pub async fn alert_sent(&self, owed: &OwedAlert) -> Result<bool, QueueError> {
        let done = sqlx::query(
            "UPDATE recording_relay.recording_jobs SET alert_due_at = NULL
             WHERE id = $1 AND alert_due_at = $2",
        )
        .bind(owed.job.id)
        .bind(owed.claimed_until)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The alert could not be sent: owed again after `retry_in`.
    pub async fn alert_failed(
        &self,
        owed: &OwedAlert,
        retry_in: Duration,
    ) -> Result<bool, QueueError> {
        let done = sqlx::query(
            "UPDATE recording_relay.recording_jobs
             SET alert_due_at = now() + $3 * interval '1 millisecond'
             WHERE id = $1 AND alert_due_at = $2",
        )
        .bind(owed.job.id)
        .bind(owed.claimed_until)
        .bind(millis(retry_in))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records that the retention alert for `id` went out.
    pub async fn mark_retention_alerted(&self, id: i64) -> Result<(), QueueError> {
        sqlx::query(
            "UPDATE recording_relay.recording_jobs SET retention_alerted_at = now()
             WHERE id = $1 AND retention_alerted_at IS NULL",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Deletes job `id` after `delete_object` removed its object, in one
    /// transaction that holds the row, so an operator's requeue or attach
    /// in between waits and then finds no job (rather than a job whose
    /// object is gone). The row must still be due: finished more than
    /// `finished_before` ago, holding patient data, alerted at least
    /// `alerted_before` ago (any change of state since forgets that alert:
    /// `recording_jobs_alert_on_state`). An object that an intake links is
    /// left alone. `Ok(false)`: not due any more, nothing deleted.
    pub async fn delete_unresolved<F, Fut, E>(
        &self,
        id: i64,
        finished_before: Duration,
        alerted_before: Duration,
        delete_object: F,
    ) -> Result<Result<bool, E>, QueueError>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        let mut tx = self.pool.begin().await?;
        let due: Option<(Option<String>, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT object_path,
                    EXISTS (SELECT 1 FROM public.intakes i
                            WHERE i.recording_object_path = j.object_path)
             FROM recording_relay.recording_jobs j
             WHERE id = $1 AND ({HOLDS_PATIENT_DATA})
               AND finished_at < now() - $2 * interval '1 millisecond'
               AND retention_alerted_at < now() - $3 * interval '1 millisecond'
             FOR UPDATE"
        )))
        .bind(id)
        .bind(millis(finished_before))
        .bind(millis(alerted_before))
        .fetch_optional(&mut *tx)
        .await?;
        let Some((path, linked)) = due else {
            tx.rollback().await?;
            return Ok(Ok(false));
        };
        if let Some(path) = path.filter(|_| !linked)
            && let Err(e) = delete_object(path).await
        {
            tx.rollback().await?;
            return Ok(Err(e));
        }
        sqlx::query("DELETE FROM recording_relay.recording_jobs WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(true))
    }

    /// Whether a job covers this recording (reconcile's question for each
    /// listed recording): by id, or a live unresolved job of the same call,
    /// which will find this recording when it resolves. An unresolved job
    /// that ended (failed, cancelled, or refused the session as ambiguous)
    /// finds nothing more, so it covers nothing: otherwise the session's
    /// recordings could never be enqueued by id, which is what the
    /// ambiguous-session error tells the operator to do.
    pub async fn has_job_for_recording(
        &self,
        recording_id: &str,
        call_session_id: Option<&str>,
    ) -> Result<bool, QueueError> {
        let known = sqlx::query_scalar(HAS_JOB_FOR_RECORDING_SQL)
            .bind(recording_id)
            .bind(call_session_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(known)
    }

    /// Jobs per state, for readiness output and tests.
    pub async fn count_by_state(&self) -> Result<Vec<(JobState, i64)>, QueueError> {
        let rows = sqlx::query_as(
            "SELECT state, count(*) FROM recording_relay.recording_jobs GROUP BY state ORDER BY state",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// The queue gauges of `/metrics`, at a cost that does not grow with
    /// the finished history (a scrape used to count the whole table): each
    /// state is counted along `recording_jobs_state_idx` up to
    /// [`GAUGE_EXACT_UP_TO`] entries, exactly, so the alerts on failed and
    /// unmatched jobs see every one; a state with more than that (the
    /// succeeded history) gets the planner's estimate instead, its share of
    /// the column in `pg_stats` times the table's `reltuples`, which
    /// autovacuum's ANALYZE keeps current. The lag is the first entry of
    /// the claim index.
    pub async fn gauges(&self) -> Result<QueueGauges, QueueError> {
        let rows: Vec<(JobState, i64, Option<i64>)> = sqlx::query_as(GAUGES_SQL)
            .bind(GAUGE_EXACT_UP_TO)
            .fetch_all(&self.pool)
            .await?;
        let jobs = rows
            .into_iter()
            .map(|(state, counted, estimate)| {
                let n = if counted < GAUGE_EXACT_UP_TO {
                    counted
                } else {
                    estimate.unwrap_or(0).max(counted)
                };
                (state, n)
            })
            .collect();
        let lag: Option<f64> = sqlx::query_scalar(OLDEST_RUNNABLE_SQL)
            .fetch_one(&self.pool)
            .await?;
        Ok(QueueGauges {
            jobs,
            oldest_runnable_age_seconds: lag.unwrap_or(0.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use sqlx::PgPool;

    use super::*;
    use crate::testing::{self, Plan};

    const LEASE: Duration = Duration::from_secs(30);

    fn new_job(event_id: &str) -> NewJob {
        NewJob {
            event_id: event_id.to_owned(),
            event_type: "call.recording.saved".to_owned(),
            event: serde_json::json!({"data": {"id": event_id}}),
            call: CallFacts {
                call_session_id: Some(format!("session-{event_id}")),
                ..CallFacts::default()
            },
            max_attempts: 3,
            ..NewJob::default()
        }
    }

    async fn queue(pool: PgPool) -> Queue {
        Queue::new(testing::prepare(pool).await)
    }

    /// Every write a worker makes through its lease, each refused (false,
    /// None): what a stale lease must amount to.
    async fn assert_every_write_is_refused(q: &Queue, stale: &Lease) {
        assert!(!q.heartbeat(stale, LEASE).await.unwrap());
        assert!(
            !q.save_resolution(stale, "rec-1", &CallFacts::default())
                .await
                .unwrap()
        );
        assert!(
            !q.plan_object(stale, "intakes/x/rec-1.wav", "audio/wav", None)
                .await
                .unwrap()
        );
        assert!(
            !q.save_tus_upload(stale, Some("http://tus/1"))
                .await
                .unwrap()
        );
        assert!(
            !q.save_stored(stale, &"0".repeat(64), 1, None)
                .await
                .unwrap()
        );
        assert!(!q.save_telnyx_deleted(stale).await.unwrap());
        let mut tx = q.pool().begin().await.unwrap();
        assert!(!q.mark_linked(&mut tx, stale).await.unwrap());
        tx.rollback().await.unwrap();
        assert!(!q.complete(stale).await.unwrap());
        assert_eq!(
            q.complete_batch(std::slice::from_ref(stale)).await.unwrap(),
            [false]
        );
        assert_eq!(
            q.retry(stale, &JobError::retryable("x"), LEASE)
                .await
                .unwrap(),
            None
        );
        assert!(!q.release(stale).await.unwrap());
        assert!(
            !q.finish_unsuccessfully(stale, JobState::Failed, "permanent", "x")
                .await
                .unwrap()
        );
    }

    /// Retention's loop without its rests.
    async fn prune_all(
        q: &Queue,
        succeeded_for: Duration,
        failed_for: Duration,
        batch: i64,
    ) -> u64 {
        let mut total = 0;
        loop {
            let n = q
                .prune_finished_batch(succeeded_for, failed_for, batch)
                .await
                .unwrap();
            total += n;
            if n < u64::try_from(batch).unwrap() {
                return total;
            }
        }
    }

    /// Runs `insert` and ANALYZEs the job table, so that a plan test's
    /// statistics are the ones it describes.
    async fn fill_and_analyze(q: &Queue, insert: &str) {
        for sql in [insert, "ANALYZE recording_relay.recording_jobs"] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
                .execute(q.pool())
                .await
                .unwrap();
        }
    }

    async fn one_claimed(q: &Queue, worker: &str) -> Job {
        let mut jobs = q.claim(worker, 1, LEASE).await.unwrap();
        assert_eq!(jobs.len(), 1, "expected one claimable job");
        jobs.remove(0)
    }

    /// Moves the lease into the past, as if the worker died long ago.
    async fn expire_lease(q: &Queue, id: i64) {
        sqlx::query(
            "UPDATE recording_relay.recording_jobs SET locked_until = now() - interval '1 second' WHERE id = $1",
        )
        .bind(id)
        .execute(q.pool())
        .await
        .unwrap();
    }

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
    async fn a_stale_worker_cannot_change_a_job_it_lost(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let stale = one_claimed(&q, "w1").await.lease().unwrap();
        expire_lease(&q, stale.job_id).await;
        q.rescue_expired_leases().await.unwrap();
        let fresh = one_claimed(&q, "w2").await.lease().unwrap();

        assert_every_write_is_refused(&q, &stale).await;

        let job = q.get(stale.job_id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Running);
        assert_eq!(job.locked_by.as_deref(), Some("w2"));
        assert!(q.complete(&fresh).await.unwrap());
        assert_eq!(
            q.get(stale.job_id).await.unwrap().unwrap().state,
            JobState::Succeeded
        );
    }

    /// Cancel, requeue (attempts back to 0) and a re-claim by the same
    /// worker recreate the old (id, worker, attempt) triple: the first
    /// lease must still match nothing.
    #[sqlx::test(migrations = false)]
    async fn a_lease_cancelled_requeued_and_reclaimed_by_the_same_worker_stays_fenced_out(
        pool: PgPool,
    ) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let stale = one_claimed(&q, "w1").await.lease().unwrap();
        q.cancel(stale.job_id).await.unwrap();
        q.requeue(stale.job_id).await.unwrap();
        let fresh = one_claimed(&q, "w1").await.lease().unwrap();
        assert_eq!(fresh.job_id, stale.job_id);
        assert_eq!(
            (&fresh.worker, fresh.attempt),
            (&stale.worker, stale.attempt)
        );

        assert_every_write_is_refused(&q, &stale).await;

        let job = q.get(stale.job_id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Running);
        assert!(job.resolved_at.is_none() && job.object_path.is_none());
        assert_eq!(job.attempts, 1);
        assert!(q.heartbeat(&fresh, LEASE).await.unwrap());
        assert!(q.complete(&fresh).await.unwrap());
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
        assert_eq!(done, [true, false, true, false, true]);

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
        assert_eq!(q.complete_batch(&leases[..1]).await.unwrap(), [false]);
        assert!(q.complete_batch(&[]).await.unwrap().is_empty());
        // The new owner completes normally.
        assert_eq!(q.complete_batch(&[fresh]).await.unwrap(), [true]);
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
        assert_eq!(done, [false, true]);
    }

    #[sqlx::test(migrations = false)]
    async fn heartbeat_extends_the_lease(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let job = one_claimed(&q, "w1").await;
        let lease = job.lease().unwrap();
        assert!(q.heartbeat(&lease, Duration::from_secs(600)).await.unwrap());
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
        assert_eq!(state, Some(JobState::Pending));
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
            assert_eq!(state, Some(expected));
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
        assert!(
            q.finish_unsuccessfully(
                &lease,
                JobState::Failed,
                "permanent",
                "recording not found at Telnyx"
            )
            .await
            .unwrap()
        );
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
        assert!(q.release(&lease).await.unwrap());
        let again = one_claimed(&q, "w2").await;
        assert_eq!(again.attempts, 1);
    }

    #[sqlx::test(migrations = false)]
    async fn check_constraints_reject_inconsistent_rows(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        for bad in [
            "UPDATE recording_relay.recording_jobs SET state = 'running'",
            "UPDATE recording_relay.recording_jobs SET state = 'succeeded'",
            "UPDATE recording_relay.recording_jobs SET state = 'failed', finished_at = now()",
            "UPDATE recording_relay.recording_jobs SET attempts = max_attempts",
        ] {
            let err = sqlx::query(bad).execute(q.pool()).await.unwrap_err();
            assert!(
                err.to_string().contains("violates check constraint"),
                "{bad}: {err}"
            );
        }
    }

    /// The fences match `locked_by` and not `state`: that holds only while
    /// no row outside `running` can carry a lease, which these two
    /// constraints guarantee together.
    #[sqlx::test(migrations = false)]
    async fn only_a_running_job_can_carry_a_lease(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        for (bad, constraint) in [
            (
                "UPDATE recording_relay.recording_jobs
                 SET locked_by = 'w', locked_until = now() + interval '1 minute'",
                "recording_jobs_lease_iff_running",
            ),
            (
                "UPDATE recording_relay.recording_jobs SET locked_by = 'w'",
                "recording_jobs_lease_fields_together",
            ),
        ] {
            let err = sqlx::query(bad).execute(q.pool()).await.unwrap_err();
            let violated = err.as_database_error().and_then(|e| e.constraint());
            assert_eq!(violated, Some(constraint), "{bad}: {err}");
        }
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
        for index in ["recording_jobs_state_idx", "recording_jobs_lease_idx"] {
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

    /// Issue #13: reconcile asks this once per listed recording; with
    /// `recording_id = $1` alone the partial unique index does not apply and
    /// every call scans the table.
    #[sqlx::test(migrations = false)]
    async fn reconciles_lookup_uses_the_recording_id_index(pool: PgPool) {
        let q = queue(pool).await;
        fill_and_analyze(
            &q,
            "INSERT INTO recording_relay.recording_jobs
                     (event_id, event_type, event, state, finished_at, recording_id, call_session_id)
                 SELECT 'done-' || g, 'call.recording.saved', '{}', 'succeeded', now(),
                        'rec-' || g, 'sess-' || g
                 FROM generate_series(1, 5000) g",
        )
        .await;
        let mut conn = q.pool().acquire().await.unwrap();
        let plan = testing::explain(
            &mut conn,
            &format!("PREPARE known(text, text) AS {HAS_JOB_FOR_RECORDING_SQL}"),
            "EXECUTE known('rec-42', 'sess-42')",
            Plan::Generic,
        )
        .await;
        assert!(plan.contains("recording_jobs_recording_id_key"), "{plan}");
        assert!(!plan.contains("Seq Scan"), "{plan}");
        drop(conn);
        assert!(q.has_job_for_recording("rec-42", None).await.unwrap());
        assert!(!q.has_job_for_recording("rec-none", None).await.unwrap());
    }

    /// PostgreSQL's defaults vacuum a table after a fifth of it is dead and
    /// analyze it after a tenth changed: at 5 million finished jobs, a
    /// million dead row versions of the few live jobs could pile up in the
    /// claim's indexes before a vacuum. The job table's thresholds are
    /// counts.
    #[sqlx::test(migrations = false)]
    async fn the_job_table_is_vacuumed_by_its_churn_not_its_size(pool: PgPool) {
        let q = queue(pool).await;
        let trigger_at = |kind: &'static str| {
            format!(
                "WITH o AS (
                     SELECT split_part(opt, '=', 1) AS name, split_part(opt, '=', 2) AS value
                     FROM pg_class, unnest(coalesce(reloptions, '{{}}')) opt
                     WHERE oid = 'recording_relay.recording_jobs'::regclass)
                 SELECT (coalesce((SELECT value FROM o WHERE name = 'autovacuum_{kind}_threshold'),
                                  current_setting('autovacuum_{kind}_threshold'))::float8
                         + coalesce((SELECT value FROM o WHERE name = 'autovacuum_{kind}_scale_factor'),
                                    current_setting('autovacuum_{kind}_scale_factor'))::float8
                           * 5000000)::bigint"
            )
        };
        for kind in ["vacuum", "vacuum_insert", "analyze"] {
            let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(trigger_at(kind)))
                .fetch_one(q.pool())
                .await
                .unwrap();
            assert!(
                rows <= 20_000,
                "autovacuum {kind} waits for {rows} changed rows at 5 million jobs"
            );
        }
    }

    /// Found by `bench history`: at 5 million finished jobs every retention
    /// batch read the whole table.
    #[sqlx::test(migrations = false)]
    async fn retention_batches_use_the_finished_index(pool: PgPool) {
        let q = queue(pool).await;
        fill_and_analyze(
            &q,
            "INSERT INTO recording_relay.recording_jobs
                     (event_id, event_type, event, state, finished_at)
                 SELECT 'done-' || g, 'call.recording.saved', '{}', 'succeeded',
                        now() - (g % 60) * interval '1 day'
                 FROM generate_series(1, 20000) g",
        )
        .await;
        let mut conn = q.pool().acquire().await.unwrap();
        let day: i64 = 86_400_000;
        let plan = testing::explain(
            &mut conn,
            &format!(
                "PREPARE prune(bigint, bigint, bigint) AS {}",
                prune_finished_sql()
            ),
            &format!("EXECUTE prune({}, {}, 500)", 30 * day, 90 * day),
            Plan::Generic,
        )
        .await;
        assert!(plan.contains("recording_jobs_finished_idx"), "{plan}");
        assert!(!plan.contains("Seq Scan"), "{plan}");
        drop(conn);
        let due: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM recording_relay.recording_jobs
             WHERE finished_at < now() - interval '30 days'",
        )
        .fetch_one(q.pool())
        .await
        .unwrap();
        assert!(due > 9000, "{due}");
        let pruned = prune_all(
            &q,
            Duration::from_secs(30 * 86_400),
            Duration::from_secs(90 * 86_400),
            500,
        )
        .await;
        assert_eq!(
            pruned,
            u64::try_from(due).unwrap(),
            "every due job, in batches"
        );
    }

    /// Issue #10: an unresolved job that ended (failed, cancelled, an
    /// ambiguous session) hid every recording of its session from
    /// reconcile, so "enqueue the right one by recording id" never worked.
    #[sqlx::test(migrations = false)]
    async fn an_ended_unresolved_job_does_not_hide_its_sessions_recordings(pool: PgPool) {
        let q = queue(pool).await;
        let mut job = new_job("ev-session");
        job.call.call_session_id = Some("sess-1".into());
        q.enqueue(&job).await.unwrap();
        assert!(
            q.has_job_for_recording("rec-a", Some("sess-1"))
                .await
                .unwrap(),
            "a pending unresolved job will resolve its session's recording"
        );
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        assert!(
            q.has_job_for_recording("rec-a", Some("sess-1"))
                .await
                .unwrap()
        );
        q.finish_unsuccessfully(
            &lease,
            JobState::Failed,
            "permanent",
            "2 recordings of call session sess-1 fit this event",
        )
        .await
        .unwrap();
        assert!(
            !q.has_job_for_recording("rec-a", Some("sess-1"))
                .await
                .unwrap(),
            "a failed unresolved job covers nothing"
        );
        q.requeue(lease.job_id).await.unwrap();
        q.cancel(lease.job_id).await.unwrap();
        assert!(
            !q.has_job_for_recording("rec-a", Some("sess-1"))
                .await
                .unwrap()
        );
        // A job that knows its recording covers it whatever its state.
        let mut known = new_job("ev-known");
        known.recording_id = Some("rec-b".into());
        known.call.call_session_id = Some("sess-1".into());
        q.enqueue(&known).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.finish_unsuccessfully(&lease, JobState::Failed, "permanent", "boom")
            .await
            .unwrap();
        assert!(
            q.has_job_for_recording("rec-b", Some("sess-1"))
                .await
                .unwrap()
        );
    }

    async fn failed_job(q: &Queue, event_id: &str) -> i64 {
        q.enqueue(&new_job(event_id)).await.unwrap();
        let lease = one_claimed(q, "w").await.lease().unwrap();
        q.finish_unsuccessfully(&lease, JobState::Failed, "permanent", "boom")
            .await
            .unwrap();
        lease.job_id
    }

    async fn owed(q: &Queue) -> Vec<i64> {
        sqlx::query_scalar(
            "SELECT id FROM recording_relay.recording_jobs WHERE alert_due_at IS NOT NULL ORDER BY id",
        )
        .fetch_all(q.pool())
        .await
        .unwrap()
    }

    /// Issue #19: only the worker that wrote a failure itself alerted. The
    /// row owes the alert now, whoever ended the job.
    #[sqlx::test(migrations = false)]
    async fn every_way_a_job_ends_failed_or_unmatched_owes_one_alert(pool: PgPool) {
        let q = queue(pool).await;
        // Ended by a permanent error, as unmatched, by the last retry, by
        // the rescuer on the last attempt.
        let permanent = failed_job(&q, "permanent").await;
        q.enqueue(&new_job("unmatched")).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.finish_unsuccessfully(&lease, JobState::Unmatched, "unmatched", "no intake")
            .await
            .unwrap();
        let unmatched = lease.job_id;
        let mut last = new_job("last-retry");
        last.max_attempts = 1;
        q.enqueue(&last).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        let state = q.retry(&lease, &JobError::retryable("503"), LEASE).await;
        assert_eq!(state.unwrap(), Some(JobState::Failed));
        let last_retry = lease.job_id;
        let mut rescued = new_job("rescued");
        rescued.max_attempts = 1;
        q.enqueue(&rescued).await.unwrap();
        let rescued = one_claimed(&q, "gone").await.id;
        expire_lease(&q, rescued).await;
        assert_eq!(q.rescue_expired_leases().await.unwrap(), 1);
        // None of these owes one: success, a retry with attempts left, a
        // duplicate, a cancel, a job that was failed before the upgrade.
        q.enqueue(&new_job("succeeded")).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        assert!(q.complete(&lease).await.unwrap());
        q.enqueue(&new_job("retried")).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        let state = q.retry(&lease, &JobError::retryable("503"), LEASE).await;
        assert_eq!(state.unwrap(), Some(JobState::Pending));
        q.enqueue(&new_job("duplicate")).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.finish_unsuccessfully(&lease, JobState::Duplicate, "duplicate", "dup")
            .await
            .unwrap();
        q.enqueue(&new_job("cancelled")).await.unwrap();
        q.cancel(q.get_by_event_id("cancelled").await.unwrap().unwrap().id)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO recording_relay.recording_jobs
                 (event_id, event_type, event, state, finished_at, last_error)
             VALUES ('failed-before-the-upgrade', 'call.recording.saved', '{}', 'failed', now(), 'x')",
        )
        .execute(q.pool())
        .await
        .unwrap();
        assert_eq!(owed(&q).await, [permanent, unmatched, last_retry, rescued]);

        // One sweep claims them; another finds nothing while they are sent.
        let claimed = q.claim_alerts(10, LEASE).await.unwrap();
        assert_eq!(claimed.len(), 4);
        assert!(q.claim_alerts(10, LEASE).await.unwrap().is_empty());
        for alert in &claimed {
            assert!(q.alert_sent(alert).await.unwrap());
        }
        assert!(owed(&q).await.is_empty());
        // A requeued job that ends failed again owes a new alert.
        q.requeue(permanent).await.unwrap();
        assert!(owed(&q).await.is_empty());
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.finish_unsuccessfully(&lease, JobState::Failed, "permanent", "again")
            .await
            .unwrap();
        assert_eq!(owed(&q).await, [permanent]);
    }

    /// At least once: a sender that died holding claimed alerts, or whose
    /// send failed, leaves them to be sent again; a stale claim marks
    /// nothing.
    #[sqlx::test(migrations = false)]
    async fn an_alert_whose_sender_died_or_failed_is_sent_again(pool: PgPool) {
        let q = queue(pool).await;
        let id = failed_job(&q, "ev-1").await;
        let died = q.claim_alerts(10, LEASE).await.unwrap().remove(0);
        assert!(q.claim_alerts(10, LEASE).await.unwrap().is_empty());
        // Its claim runs out.
        sqlx::query(
            "UPDATE recording_relay.recording_jobs SET alert_due_at = now() - interval '1 second'
             WHERE id = $1",
        )
        .bind(id)
        .execute(q.pool())
        .await
        .unwrap();
        let again = q.claim_alerts(10, LEASE).await.unwrap().remove(0);
        assert_eq!(again.job.id, id);
        assert!(!q.alert_sent(&died).await.unwrap(), "a stale claim");
        assert!(
            q.alert_failed(&again, Duration::from_millis(1))
                .await
                .unwrap()
        );
        assert!(
            eventually_claimed(&q).await,
            "owed again after a failed send"
        );
        // Requeued while being sent: the old claim marks nothing, and the
        // job owes nothing until it ends again.
        let sending = q.claim_alerts(10, LEASE).await.unwrap();
        assert!(sending.is_empty());
        sqlx::query("UPDATE recording_relay.recording_jobs SET alert_due_at = now() WHERE id = $1")
            .bind(id)
            .execute(q.pool())
            .await
            .unwrap();
        let sending = q.claim_alerts(10, LEASE).await.unwrap().remove(0);
        q.requeue(id).await.unwrap();
        assert!(!q.alert_sent(&sending).await.unwrap());
        assert!(owed(&q).await.is_empty());
    }

    async fn eventually_claimed(q: &Queue) -> bool {
        for _ in 0..100 {
            if !q.claim_alerts(10, LEASE).await.unwrap().is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Issue #19: `retention_alerted_at` outlived the ending it was about,
    /// so a job an operator requeued (or attached) to keep it was deleted
    /// the next time it ended, with no fresh alert.
    #[sqlx::test(migrations = false)]
    async fn any_change_of_state_forgets_the_retention_alert(pool: PgPool) {
        let q = queue(pool).await;
        let alerted = |id: i64| {
            let q = q.clone();
            async move {
                q.mark_retention_alerted(id).await.unwrap();
                assert!(retention_alerted(&q, id).await);
            }
        };
        let id = failed_job(&q, "requeued").await;
        alerted(id).await;
        q.requeue(id).await.unwrap();
        assert!(!retention_alerted(&q, id).await, "requeue");
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.finish_unsuccessfully(&lease, JobState::Unmatched, "unmatched", "no intake")
            .await
            .unwrap();
        sqlx::query(
            "UPDATE recording_relay.recording_jobs SET recording_id = 'rec-1' WHERE id = $1",
        )
        .bind(id)
        .execute(q.pool())
        .await
        .unwrap();
        alerted(id).await;
        let intake: uuid::Uuid =
            sqlx::query_scalar("INSERT INTO public.intakes DEFAULT VALUES RETURNING id")
                .fetch_one(q.pool())
                .await
                .unwrap();
        q.attach(id, intake).await.unwrap();
        assert!(!retention_alerted(&q, id).await, "attach");
        let id = failed_job(&q, "cancelled").await;
        alerted(id).await;
        q.cancel(id).await.unwrap();
        assert!(
            !retention_alerted(&q, id).await,
            "cancel restarts the clock"
        );
    }

    async fn retention_alerted(q: &Queue, id: i64) -> bool {
        sqlx::query_scalar(
            "SELECT retention_alerted_at IS NOT NULL FROM recording_relay.recording_jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_one(q.pool())
        .await
        .unwrap()
    }

    /// Retention lists due jobs, then deletes them one by one: a job that
    /// ended again in between (requeued, run, failed) is not due, whatever
    /// its alert says.
    #[sqlx::test(migrations = false)]
    async fn retention_deletes_no_job_that_finished_again_since_it_was_listed(pool: PgPool) {
        let q = queue(pool).await;
        let id = failed_job(&q, "ev-1").await;
        sqlx::query(
            "UPDATE recording_relay.recording_jobs
             SET recording_id = 'rec-1', retention_alerted_at = now() - interval '8 days'
             WHERE id = $1",
        )
        .bind(id)
        .execute(q.pool())
        .await
        .unwrap();
        let day = Duration::from_secs(86_400);
        let deleted = q
            .delete_unresolved(id, 90 * day, 7 * day, |_| async { Ok::<_, ()>(()) })
            .await
            .unwrap();
        assert_eq!(deleted, Ok(false), "finished just now");
        sqlx::query(
            "UPDATE recording_relay.recording_jobs SET finished_at = now() - interval '91 days'
             WHERE id = $1",
        )
        .bind(id)
        .execute(q.pool())
        .await
        .unwrap();
        let deleted = q
            .delete_unresolved(id, 90 * day, 7 * day, |_| async { Ok::<_, ()>(()) })
            .await
            .unwrap();
        assert_eq!(deleted, Ok(true));
    }

    /// Every worker sweeps for owed alerts on each poll: it must not read
    /// the history of finished jobs to find the few owed ones.
    #[sqlx::test(migrations = false)]
    async fn the_alert_sweep_uses_its_partial_index(pool: PgPool) {
        let q = queue(pool).await;
        fill_and_analyze(
            &q,
            "INSERT INTO recording_relay.recording_jobs
                     (event_id, event_type, event, state, finished_at, last_error)
                 SELECT 'done-' || g, 'call.recording.saved', '{}',
                        (CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'succeeded' END)::recording_relay.recording_job_state,
                        now(), 'x'
                 FROM generate_series(1, 20000) g",
        )
        .await;
        failed_job(&q, "owed").await;
        let mut conn = q.pool().acquire().await.unwrap();
        let plan = testing::explain(
            &mut conn,
            &format!("PREPARE claim_alerts(bigint, bigint) AS {CLAIM_ALERTS_SQL}"),
            "EXECUTE claim_alerts(20, 300000)",
            Plan::Generic,
        )
        .await;
        assert!(plan.contains("recording_jobs_alert_due_idx"), "{plan}");
        assert!(!plan.contains("Seq Scan"), "{plan}");
    }

    #[sqlx::test(migrations = false)]
    async fn requeue_gives_a_failed_job_fresh_attempts(pool: PgPool) {
        let q = queue(pool).await;
        let id = failed_job(&q, "ev-1").await;
        q.requeue(id).await.unwrap();
        let job = q.get(id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Pending);
        assert_eq!(job.attempts, 0);
        assert!(job.finished_at.is_none());
        assert_eq!(
            job.errors.as_array().unwrap().last().unwrap()["kind"],
            "requeued"
        );
        assert_eq!(one_claimed(&q, "w").await.id, id);
        // Running now: refused with an explanation.
        let err = q.requeue(id).await.unwrap_err();
        assert!(
            matches!(err, QueueError::Refused(ref m) if m.contains("nothing to requeue")),
            "{err}"
        );
        assert!(matches!(q.requeue(999).await, Err(QueueError::Refused(_))));
    }

    #[sqlx::test(migrations = false)]
    async fn requeue_failed_takes_every_failed_job(pool: PgPool) {
        let q = queue(pool).await;
        failed_job(&q, "a").await;
        failed_job(&q, "b").await;
        q.enqueue(&new_job("c")).await.unwrap();
        assert_eq!(q.requeue_failed().await.unwrap(), 2);
        assert_eq!(
            q.count_by_state().await.unwrap(),
            vec![(JobState::Pending, 3)]
        );
    }

    #[sqlx::test(migrations = false)]
    async fn cancel_fences_out_the_running_worker(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.cancel(lease.job_id).await.unwrap();
        assert!(!q.heartbeat(&lease, LEASE).await.unwrap());
        assert!(!q.complete(&lease).await.unwrap());
        let job = q.get(lease.job_id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Cancelled);
        assert!(job.last_error.unwrap().starts_with("cancelled by"));
        assert!(matches!(
            q.cancel(lease.job_id).await,
            Err(QueueError::Refused(_))
        ));
    }

    #[sqlx::test(migrations = false)]
    async fn attach_links_an_unmatched_recording_to_an_intake(pool: PgPool) {
        let q = queue(pool).await;
        q.enqueue(&new_job("ev-1")).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.finish_unsuccessfully(&lease, JobState::Unmatched, "unmatched", "no intake")
            .await
            .unwrap();
        sqlx::query("UPDATE recording_relay.recording_jobs SET recording_id = 'rec-1'")
            .execute(q.pool())
            .await
            .unwrap();
        let intakes: Vec<uuid::Uuid> = sqlx::query_scalar(
            "INSERT INTO public.intakes (recording_id) VALUES (NULL), ('rec-other') RETURNING id",
        )
        .fetch_all(q.pool())
        .await
        .unwrap();
        let err = q.attach(lease.job_id, intakes[1]).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("already holds recording rec-other"),
            "{err}"
        );
        q.attach(lease.job_id, intakes[0]).await.unwrap();
        let job = q.get(lease.job_id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Pending);
        assert_eq!(job.intake_id, Some(intakes[0]));
        assert_eq!(job.match_method.as_deref(), Some("manual"));
        assert!(matches!(
            q.attach(lease.job_id, intakes[0]).await,
            Err(QueueError::Refused(_))
        ));
    }

    #[sqlx::test(migrations = false)]
    async fn dba_views_show_failed_unmatched_stuck_and_depth(pool: PgPool) {
        let q = queue(pool).await;
        failed_job(&q, "failed").await;
        q.enqueue(&new_job("stuck")).await.unwrap();
        let stuck = one_claimed(&q, "gone-worker").await;
        sqlx::query(
            "UPDATE recording_relay.recording_jobs SET locked_until = now() - interval '1 hour' WHERE id = $1",
        )
        .bind(stuck.id)
        .execute(q.pool())
        .await
        .unwrap();
        q.enqueue(&new_job("waiting")).await.unwrap();
        sqlx::query("UPDATE recording_relay.recording_jobs SET next_run_at = now() - interval '90 seconds' WHERE event_id = 'waiting'")
            .execute(q.pool())
            .await
            .unwrap();

        let failed: Vec<String> =
            sqlx::query_scalar("SELECT event_id FROM recording_relay.recording_jobs_failed")
                .fetch_all(q.pool())
                .await
                .unwrap();
        assert_eq!(failed, ["failed"]);
        let stuck_ids: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM recording_relay.recording_jobs_stuck")
                .fetch_all(q.pool())
                .await
                .unwrap();
        assert_eq!(stuck_ids, [stuck.id]);
        let depth = q.queue_depth().await.unwrap();
        let pending = depth.iter().find(|d| d.state == JobState::Pending).unwrap();
        assert_eq!(pending.jobs, 1);
        let age = pending.oldest_runnable_age_seconds.unwrap();
        assert!((89.0..120.0).contains(&age), "{age}");
        q.enqueue(&new_job("orphan")).await.unwrap();
        let lease = one_claimed(&q, "w").await.lease().unwrap();
        q.finish_unsuccessfully(&lease, JobState::Unmatched, "unmatched", "no intake")
            .await
            .unwrap();
        let unmatched: Vec<i64> =
            sqlx::query_scalar("SELECT id FROM recording_relay.recording_jobs_unmatched")
                .fetch_all(q.pool())
                .await
                .unwrap();
        assert_eq!(unmatched, [lease.job_id]);
    }

    /// Issue #10: retention deleted unmatched jobs (the only record of
    /// `unmatched/{id}.wav`) and failed jobs whose recording may still be at
    /// Telnyx after 90 days. They are kept now.
    #[sqlx::test(migrations = false)]
    async fn retention_deletes_only_what_it_should(pool: PgPool) {
        let q = queue(pool).await;
        // name, state, finished how many days ago, recording id, object path
        type Row<'a> = (&'a str, &'a str, i32, Option<&'a str>, Option<&'a str>);
        let rows: [Row<'_>; 9] = [
            (
                "succeeded-old",
                "succeeded",
                40,
                Some("r1"),
                Some("intakes/a/r1.wav"),
            ),
            (
                "succeeded-new",
                "succeeded",
                10,
                Some("r2"),
                Some("intakes/b/r2.wav"),
            ),
            ("duplicate-old", "duplicate", 40, Some("r1"), None),
            ("failed-nothing-40", "failed", 40, None, None),
            ("failed-nothing-100", "failed", 100, None, None),
            ("failed-at-telnyx-100", "failed", 100, Some("r3"), None),
            (
                "unmatched-100",
                "unmatched",
                100,
                Some("r4"),
                Some("unmatched/r4.wav"),
            ),
            (
                "cancelled-stored-40",
                "cancelled",
                40,
                Some("r5"),
                Some("unmatched/r5.wav"),
            ),
            ("cancelled-empty-40", "cancelled", 40, None, None),
        ];
        for (name, state, days, recording, object) in rows {
            sqlx::query(
                "INSERT INTO recording_relay.recording_jobs
                     (event_id, event_type, event, state, finished_at, last_error,
                      recording_id, object_path, call_session_id)
                 VALUES ($1, 'call.recording.saved', '{}', $2::recording_relay.recording_job_state,
                         now() - $3 * interval '1 day', 'x', $4, $5, NULL)",
            )
            .bind(name)
            .bind(state)
            .bind(f64::from(days))
            .bind(recording)
            .bind(object)
            .execute(q.pool())
            .await
            .unwrap();
        }
        q.enqueue(&new_job("pending")).await.unwrap();
        let day = Duration::from_secs(86_400);
        let deleted = prune_all(&q, 30 * day, 90 * day, 1).await;
        assert_eq!(deleted, 4, "batches of one until done");
        let mut left: Vec<String> =
            sqlx::query_scalar("SELECT event_id FROM recording_relay.recording_jobs")
                .fetch_all(q.pool())
                .await
                .unwrap();
        left.sort();
        assert_eq!(
            left,
            [
                "cancelled-stored-40",
                "failed-at-telnyx-100",
                "failed-nothing-40",
                "pending",
                "succeeded-new",
                "unmatched-100"
            ]
        );
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

    /// A history past the exact count: succeeded jobs beyond
    /// [`GAUGE_EXACT_UP_TO`], a few failed and pending ones, ANALYZEd.
    async fn history(q: &Queue, succeeded: i64) {
        fill_and_analyze(
            q,
            &format!(
                "INSERT INTO recording_relay.recording_jobs (event_id, event_type, event, state, finished_at, last_error, next_run_at)
                 SELECT 'ev-' || g, 'call.recording.saved', '{{}}',
                        CASE WHEN g <= 2 THEN 'failed' WHEN g <= 5 THEN 'pending' ELSE 'succeeded' END::recording_relay.recording_job_state,
                        CASE WHEN g > 5 OR g <= 2 THEN now() END,
                        CASE WHEN g <= 2 THEN 'gone' END,
                        now() - interval '1 minute'
                 FROM generate_series(1, {}) g",
                succeeded + 5
            ),
        )
        .await;
    }

    #[sqlx::test(migrations = false)]
    async fn gauges_count_small_states_exactly_and_estimate_the_history(pool: PgPool) {
        let q = queue(pool).await;
        history(&q, GAUGE_EXACT_UP_TO + 2_000).await;
        let gauges = q.gauges().await.unwrap();
        let n = |state| gauges.jobs.iter().find(|(s, _)| *s == state).unwrap().1;
        assert_eq!(n(JobState::Failed), 2);
        assert_eq!(n(JobState::Pending), 3);
        assert_eq!(n(JobState::Unmatched), 0);
        let succeeded = n(JobState::Succeeded);
        assert!(
            (GAUGE_EXACT_UP_TO..=GAUGE_EXACT_UP_TO + 4_000).contains(&succeeded),
            "{succeeded}"
        );
        assert_eq!(gauges.jobs.len(), JobState::ALL.len());
        assert!(
            (60.0..120.0).contains(&gauges.oldest_runnable_age_seconds),
            "{gauges:?}"
        );
    }

    /// A scrape used to count every row (`GROUP BY state`); now no gauge
    /// reads the table itself, only the state and claim indexes.
    #[sqlx::test(migrations = false)]
    async fn gauges_read_indexes_only_however_long_the_history(pool: PgPool) {
        let q = queue(pool).await;
        history(&q, 50_000).await;
        let mut conn = q.pool().acquire().await.unwrap();
        let plan = testing::explain(
            &mut conn,
            &format!("PREPARE gauges(bigint) AS {GAUGES_SQL}"),
            "EXECUTE gauges(10000)",
            Plan::Generic,
        )
        .await;
        assert!(!plan.contains("Seq Scan on recording_jobs"), "{plan}");
        assert!(plan.contains("recording_jobs_state_idx"), "{plan}");
        let plan = testing::explain(
            &mut conn,
            &format!("PREPARE lag AS {OLDEST_RUNNABLE_SQL}"),
            "EXECUTE lag",
            Plan::Generic,
        )
        .await;
        assert!(!plan.contains("Seq Scan"), "{plan}");
        assert!(plan.contains("recording_jobs_claim_idx"), "{plan}");
    }
}
