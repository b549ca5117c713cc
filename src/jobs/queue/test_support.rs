//! Fixtures shared by the queue's tests: a prepared queue, a job to
//! enqueue, one claimed job, an expired lease, a failed job, and a table
//! filled and ANALYZEd for the plan tests.

pub(super) use std::time::Duration;

pub(super) use sqlx::PgPool;

pub(super) use super::{Queue, QueueError};
pub(super) use crate::call::CallFacts;
pub(super) use crate::jobs::{Job, JobError, JobState, NewJob};
pub(super) use crate::testing::{self, Plan};

pub(super) const LEASE: Duration = Duration::from_secs(30);

pub(super) fn new_job(event_id: &str) -> NewJob {
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

pub(super) async fn queue(pool: PgPool) -> Queue {
    Queue::new(testing::prepare(pool).await)
}

/// Runs `insert` and ANALYZEs the job table, so that a plan test's
/// statistics are the ones it describes.
pub(super) async fn fill_and_analyze(q: &Queue, insert: &str) {
    for sql in [insert, "ANALYZE recording_relay.recording_jobs"] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(q.pool())
            .await
            .unwrap();
    }
}

pub(super) async fn one_claimed(q: &Queue, worker: &str) -> Job {
    let mut jobs = q.claim(worker, 1, LEASE).await.unwrap();
    assert_eq!(jobs.len(), 1, "expected one claimable job");
    jobs.remove(0)
}

/// Moves the lease into the past, as if the worker died long ago.
pub(super) async fn expire_lease(q: &Queue, id: i64) {
    sqlx::query(
        "UPDATE recording_relay.recording_jobs SET locked_until = now() - interval '1 second' WHERE id = $1",
    )
    .bind(id)
    .execute(q.pool())
    .await
    .unwrap();
}

pub(super) async fn failed_job(q: &Queue, event_id: &str) -> i64 {
    q.enqueue(&new_job(event_id)).await.unwrap();
    let lease = one_claimed(q, "w").await.lease().unwrap();
    q.finish_unsuccessfully(&lease, JobState::Failed, "permanent", "boom")
        .await
        .unwrap();
    lease.job_id
}

/// The write was refused because the lease was lost.
pub(super) fn lost<T: std::fmt::Debug>(written: Result<T, QueueError>) {
    assert!(
        matches!(written, Err(QueueError::LeaseLost)),
        "expected a lost lease, got {written:?}"
    );
}
