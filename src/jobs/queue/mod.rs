//! Every statement on `recording_relay.recording_jobs`, in this folder
//! (River's `internal/` services: one concept a file, each with its tests):
//!
//! - `lifecycle.rs`: enqueue, claim, heartbeat, complete, retry, release,
//!   rescue of expired leases;
//! - `progress.rs`: the pipeline's fenced step writes;
//! - `relocation.rs`: the move of an attached recording into its intake's
//!   folder;
//! - `operator.rs`: get, list, requeue, cancel, attach;
//! - `retention.rs`: pruning, and the jobs that point at patient data;
//! - `alerts.rs`: alerts owed for failed and unmatched jobs;
//! - `cleanup.rs`: deletes at Telnyx owed by succeeded jobs;
//! - `gauges.rs`: the `/metrics` gauges, depth and counts;
//! - `lookup.rs`: questions other modules ask (reconcile, playback);
//! - `quarantine.rs`: deliveries that could not be parsed;
//! - `overdue_calls.rs`: calls Telnyx announced whose recording no job
//!   knows yet (the look-up for recordings that never came).
//!
//! The claim commits at once (no transaction is held during HTTP work) and
//! gives the lease a fresh token from a sequence; every later change is
//! fenced on `(id, lease_id, locked_by)` and checks `rows_affected`, so a
//! worker that lost its lease changes nothing, even after a cancel, a
//! requeue and a re-claim by the same process have reset `attempts`.

use std::time::Duration;

use sqlx::postgres::{PgArguments, PgQueryResult};
use sqlx::query::Query;
use sqlx::{PgPool, Postgres};

use super::Lease;

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

/// A fenced UPDATE of one job: it matched its row, or the lease was lost.
fn one_row(done: &PgQueryResult) -> Result<(), QueueError> {
    if done.rows_affected() == 1 {
        Ok(())
    } else {
        Err(QueueError::LeaseLost)
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

// Declared after the fence macros above: a `macro_rules!` is visible only
// to the code that follows it.
mod alerts;
mod cleanup;
pub(crate) mod competitors;
mod gauges;
mod lifecycle;
mod lookup;
mod operator;
mod overdue_calls;
mod progress;
mod quarantine;
mod relocation;
mod retention;
#[cfg(test)]
mod test_support;

pub use gauges::QueueGauges;
pub(crate) use lifecycle::Completed;
pub use lifecycle::Enqueued;
pub(crate) use overdue_calls::OverdueCall;

/// The channel the `recording_jobs_notify` trigger sends on.
pub(crate) const NOTIFY_CHANNEL: &str = "recording_jobs";

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
    /// A write fenced on a lease matched no row: the lease expired and was
    /// rescued, or an operator cancelled the job, and another worker may
    /// own it now. Nothing was written; the holder must stop. (underway's
    /// `TaskNotFound`: an error, not a `bool` the caller must remember to
    /// check.) As a [`JobError`](super::JobError) it is retryable, with
    /// this message.
    #[error("lease lost during the job; another worker owns it now")]
    LeaseLost,
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

fn is_unique_violation(e: &sqlx::Error, constraint: &str) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505")
        && db.constraint() == Some(constraint))
}

#[derive(Clone, Debug)]
pub struct Queue {
    pool: PgPool,
}

impl Queue {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;

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
}
