//! An intake reserved for a recording (`intakes.recording_id` set at match
//! time, before the recording is stored) is given back when the job ends
//! without linking it, and never taken over by a link.

use std::time::Duration;

use crate::testing;
use recording_relay::call::CallFacts;
use recording_relay::jobs::{JobError, JobState, Lease, NewJob, Queue};
use recording_relay::pipeline::intakes::{IntakeWrite, MatchMethod, claim_intake};
use recording_relay_sim::{Fault, SimRecording};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{eventually, intake_for, spawn_pipeline, webhook_for};

const LEASE: Duration = Duration::from_secs(30);

async fn new_intake(pool: &PgPool) -> Uuid {
    sqlx::query_scalar("INSERT INTO public.intakes DEFAULT VALUES RETURNING id")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn held_by(pool: &PgPool, intake: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT recording_id FROM public.intakes WHERE id = $1")
        .bind(intake)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A claimed job that resolved `recording` and reserved `intake` for it.
async fn matched_job(q: &Queue, event: &str, recording: &str, intake: Uuid) -> Lease {
    q.enqueue(&NewJob {
        event_id: event.into(),
        event_type: "call.recording.saved".into(),
        event: serde_json::json!({}),
        max_attempts: 2,
        ..NewJob::default()
    })
    .await
    .unwrap();
    let lease = q
        .claim("w", 1, LEASE)
        .await
        .unwrap()
        .remove(0)
        .lease()
        .unwrap();
    q.save_resolution(&lease, recording, &CallFacts::default())
        .await
        .unwrap();
    let claim = claim_intake(
        q,
        &lease,
        intake,
        MatchMethod::PhoneAndTime,
        recording,
        Some(60),
    )
    .await
    .unwrap();
    assert_eq!(claim, IntakeWrite::Written);
    assert_eq!(held_by(q.pool(), intake).await.as_deref(), Some(recording));
    lease
}

#[sqlx::test(migrations = false)]
async fn an_operator_cancelling_a_matched_job_releases_its_intake(pool: PgPool) {
    let q = Queue::new(testing::prepare(pool).await);
    let intake = new_intake(q.pool()).await;
    let lease = matched_job(&q, "ev-1", "rec-1", intake).await;
    q.cancel(lease.job_id).await.unwrap();
    assert_eq!(held_by(q.pool(), intake).await, None, "released");
    let duration: Option<i32> =
        sqlx::query_scalar("SELECT recording_duration FROM public.intakes WHERE id = $1")
            .bind(intake)
            .fetch_one(q.pool())
            .await
            .unwrap();
    assert_eq!(duration, None);
    // Requeued: the intake is reserved again for the same recording.
    q.requeue(lease.job_id).await.unwrap();
    assert_eq!(held_by(q.pool(), intake).await.as_deref(), Some("rec-1"));
}

#[sqlx::test(migrations = false)]
async fn a_job_failing_after_its_match_releases_its_intake(pool: PgPool) {
    let q = Queue::new(testing::prepare(pool).await);
    // A permanent error.
    let a = new_intake(q.pool()).await;
    let lease = matched_job(&q, "ev-a", "rec-a", a).await;
    q.finish_unsuccessfully(&lease, JobState::Failed, "permanent", "gone at Telnyx")
        .await
        .unwrap();
    assert_eq!(held_by(q.pool(), a).await, None);
    // Attempts exhausted (max_attempts 2: this retry is the last one).
    let b = new_intake(q.pool()).await;
    let lease = matched_job(&q, "ev-b", "rec-b", b).await;
    sqlx::query("UPDATE recording_relay.recording_jobs SET max_attempts = 1 WHERE id = $1")
        .bind(lease.job_id)
        .execute(q.pool())
        .await
        .unwrap();
    let state = q
        .retry(&lease, &JobError::retryable("storage 503"), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(state, JobState::Failed);
    assert_eq!(held_by(q.pool(), b).await, None);
}

#[sqlx::test(migrations = false)]
async fn a_release_leaves_an_intake_that_holds_another_recording_or_is_linked(pool: PgPool) {
    let q = Queue::new(testing::prepare(pool).await);
    // The intake went to another recording meanwhile (by hand).
    let taken = new_intake(q.pool()).await;
    let lease = matched_job(&q, "ev-1", "rec-1", taken).await;
    sqlx::query("UPDATE public.intakes SET recording_id = 'rec-other' WHERE id = $1")
        .bind(taken)
        .execute(q.pool())
        .await
        .unwrap();
    q.cancel(lease.job_id).await.unwrap();
    assert_eq!(held_by(q.pool(), taken).await.as_deref(), Some("rec-other"));
    // Linked, then cancelled: the recording stays where the UI plays it.
    let linked = new_intake(q.pool()).await;
    let lease = matched_job(&q, "ev-2", "rec-2", linked).await;
    let path = format!("intakes/{linked}/rec-2.wav");
    q.plan_object(&lease, &path, "audio/wav", None)
        .await
        .unwrap();
    q.save_stored(&lease, &"0".repeat(64), 1, None)
        .await
        .unwrap();
    let _ = recording_relay::pipeline::intakes::link(
        &q,
        &lease,
        linked,
        "rec-2",
        Some(60),
        &path,
        "http://x",
    )
    .await
    .unwrap();
    let linked_path: Option<String> =
        sqlx::query_scalar("SELECT recording_object_path FROM public.intakes WHERE id = $1")
            .bind(linked)
            .fetch_one(q.pool())
            .await
            .unwrap();
    assert_eq!(linked_path.as_deref(), Some(path.as_str()));
    q.cancel(lease.job_id).await.unwrap();
    assert_eq!(held_by(q.pool(), linked).await.as_deref(), Some("rec-2"));
}

#[sqlx::test(migrations = false)]
async fn attach_reserves_the_intake_at_once(pool: PgPool) {
    let q = Queue::new(testing::prepare(pool).await);
    q.enqueue(&NewJob {
        event_id: "ev-1".into(),
        event_type: "call.recording.saved".into(),
        event: serde_json::json!({}),
        recording_id: Some("rec-1".into()),
        max_attempts: 3,
        ..NewJob::default()
    })
    .await
    .unwrap();
    let lease = q
        .claim("w", 1, LEASE)
        .await
        .unwrap()
        .remove(0)
        .lease()
        .unwrap();
    q.finish_unsuccessfully(&lease, JobState::Unmatched, "unmatched", "no intake")
        .await
        .unwrap();
    let intake = new_intake(q.pool()).await;
    q.attach(lease.job_id, intake).await.unwrap();
    assert_eq!(
        held_by(q.pool(), intake).await.as_deref(),
        Some("rec-1"),
        "no other recording can match it before a worker links it"
    );
}

#[sqlx::test(migrations = false)]
async fn a_link_to_an_intake_taken_meanwhile_fails_at_once_with_a_clear_reason(pool: PgPool) {
    let p = spawn_pipeline(pool, |c| c.retry.max_attempts = 12).await;
    let rec = SimRecording::sample("rec-late");
    p.telnyx.add_recording(rec.clone());
    let intake = intake_for(&p.app.pool, &rec, "+15557650002").await;
    // Uploads fail until the intake has been taken by another recording.
    p.storage.fail_next(10_000, Fault::Status(503));
    let res = p.app.post_signed(&webhook_for("ev-1", &rec)).await;
    assert_eq!(res.status(), 200);
    assert!(
        eventually(Duration::from_secs(20), || async {
            p.job("ev-1").await.is_some_and(|j| j.matched_at.is_some())
        })
        .await
    );
    sqlx::query("UPDATE public.intakes SET recording_id = 'rec-other' WHERE id = $1")
        .bind(intake)
        .execute(&p.app.pool)
        .await
        .unwrap();
    p.storage.clear_faults();
    let job = p.finished_job("ev-1").await;
    assert_eq!(job.state, JobState::Failed);
    let reason = job.last_error.unwrap_or_default();
    assert!(
        reason.contains(&format!("intake {intake} now holds recording rec-other")),
        "{reason}"
    );
    assert!(
        job.attempts < 12,
        "not retried until exhausted: {}",
        job.attempts
    );
    assert_eq!(
        held_by(&p.app.pool, intake).await.as_deref(),
        Some("rec-other")
    );
    p.stop().await;
}
