//! A recording stored under `unmatched/` and then attached to an intake (or
//! matched on a requeue) is moved into the intake's own folder before it is
//! linked, so it plays through the API (issue #19): copied server-side,
//! verified against the SHA-256 the job recorded, linked, and only then is
//! the `unmatched/` object deleted.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::time::Duration;

use recording_relay::jobs::{Job, JobState, Queue};
use recording_relay::providers::storage_api::StorageClient;
use recording_relay_sim::{Fault, SimAudio, SimRecording};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{PipelineApp, STORAGE_KEY, spawn_pipeline, webhook_for};

const SECRET: &str = "test-jwt-secret-with-at-least-32-characters";

async fn start(pool: PgPool) -> PipelineApp {
    spawn_pipeline(pool, |c| {
        c.playback.addr = Some("127.0.0.1:0".parse().unwrap());
        c.playback.jwt_secret = Some(SECRET.to_owned().into());
    })
    .await
}

/// The daemon's own storage client, for what a crashed attempt or another
/// party left in the bucket.
fn storage_client(p: &PipelineApp) -> StorageClient {
    let t = Duration::from_secs(10);
    StorageClient::new(
        &p.storage.base_url(),
        STORAGE_KEY.to_owned().into(),
        &p.bucket,
        t,
        t,
        t,
    )
    .unwrap()
}

/// A recording whose call matches no intake: the job ends `unmatched`, the
/// object under `unmatched/`.
async fn unmatched(p: &PipelineApp, id: &str) -> (SimRecording, Job) {
    let rec = SimRecording::sample(id);
    p.telnyx.add_recording(rec.clone());
    let event = format!("ev-{id}");
    let res = p.app.post_signed(&webhook_for(&event, &rec)).await;
    assert_eq!(res.status(), 200);
    let job = p.finished_job(&event).await;
    assert_eq!(job.state, JobState::Unmatched, "{:?}", job.last_error);
    assert_eq!(
        job.object_path.as_deref(),
        Some(format!("unmatched/{id}.wav").as_str())
    );
    (rec, job)
}

async fn intake_of(pool: &PgPool, org: Uuid) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO public.intakes (organization_id, room_name) VALUES ($1, 'room') RETURNING id",
    )
    .bind(org)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// What an attempt that died mid-move leaves: the plan on the job (its
/// object path `to`, the original in `moved_from`; verified too when
/// `verified`), and the copy in the bucket.
async fn left_mid_move(p: &PipelineApp, job: &Job, to: &str, verified: bool) {
    sqlx::query(
        "UPDATE recording_relay.recording_jobs
         SET moved_from = object_path, object_path = $2,
             moved_at = CASE WHEN $3 THEN now() END
         WHERE id = $1",
    )
    .bind(job.id)
    .bind(to)
    .bind(verified)
    .execute(&p.app.pool)
    .await
    .unwrap();
    let from = job.object_path.as_deref().expect("stored under unmatched/");
    storage_client(p).copy_object(from, to).await.unwrap();
}

/// Waits until the job is final again after an operator made it runnable.
async fn rerun(p: &PipelineApp, job: &Job) -> Job {
    let job = p.finished_job(&job.event_id).await;
    assert!(job.state.is_final());
    job
}

async fn column(pool: &PgPool, intake: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT recording_object_path FROM public.intakes WHERE id = $1")
        .bind(intake)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn link_record(pool: &PgPool, intake: Uuid) -> Option<String> {
    sqlx::query_scalar(
        "SELECT object_path FROM recording_relay.recording_links WHERE intake_id = $1",
    )
    .bind(intake)
    .fetch_optional(pool)
    .await
    .unwrap()
}

fn token(org: Uuid) -> String {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({
        "sub": Uuid::new_v4(), "aud": "authenticated", "role": "authenticated",
        "iat": now, "exp": now + 3600,
        "app_metadata": {"organization_id": org.to_string()},
    });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn playback(p: &PipelineApp, intake: Uuid, org: Uuid) -> Value {
    let addr = p.app.playback_addr.expect("playback on");
    let res = reqwest::Client::new()
        .get(format!("http://{addr}/v1/intakes/{intake}/recording"))
        .bearer_auth(token(org))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

#[sqlx::test(migrations = false)]
async fn an_attached_recording_is_moved_into_the_intakes_folder_and_plays(pool: PgPool) {
    let p = start(pool).await;
    let (rec, job) = unmatched(&p, "rec-attach").await;
    let org = Uuid::new_v4();
    let intake = intake_of(&p.app.pool, org).await;

    Queue::new(p.app.pool.clone())
        .attach(job.id, intake)
        .await
        .unwrap();
    let job = rerun(&p, &job).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.last_error);

    let own = format!("intakes/{intake}/rec-attach.wav");
    assert_eq!(job.object_path.as_deref(), Some(own.as_str()));
    assert_eq!(
        column(&p.app.pool, intake).await.as_deref(),
        Some(own.as_str())
    );
    assert_eq!(
        link_record(&p.app.pool, intake).await.as_deref(),
        Some(own.as_str())
    );
    let moved = p.storage.object(&p.bucket, &own).expect("moved");
    assert_eq!(moved.sha256_hex, rec.content.sha256_hex());
    assert_eq!(moved.upload_count, 1, "copied once");
    assert!(
        p.storage
            .object(&p.bucket, "unmatched/rec-attach.wav")
            .is_none(),
        "the unmatched/ object is gone"
    );
    assert_eq!(
        p.telnyx.download_count("rec-attach"),
        1,
        "not fetched again"
    );

    let body = playback(&p, intake, org).await;
    assert_eq!(body["status"], "available", "{body}");
    let url = body["url"].as_str().unwrap();
    assert!(
        url.contains(&format!("/object/sign/{}/{own}?", p.bucket)),
        "{url}"
    );
    let played = reqwest::get(url).await.unwrap();
    assert_eq!(played.status(), 200);
    assert_eq!(played.bytes().await.unwrap().to_vec(), rec.content.to_vec());
    p.stop().await;
}

/// An earlier attempt planned the move and copied the object, then died
/// before it verified or linked: the next attempt finds the copy (409),
/// checks its bytes against the recorded SHA-256 and adopts it.
#[sqlx::test(migrations = false)]
async fn a_copy_an_earlier_attempt_made_is_adopted_not_copied_again(pool: PgPool) {
    let p = start(pool).await;
    let (rec, job) = unmatched(&p, "rec-crash").await;
    let org = Uuid::new_v4();
    let intake = intake_of(&p.app.pool, org).await;
    let own = format!("intakes/{intake}/rec-crash.wav");

    // What the crashed attempt left: the plan on the job, the copy in the
    // bucket, nothing verified, nothing linked.
    left_mid_move(&p, &job, &own, false).await;
    Queue::new(p.app.pool.clone())
        .attach(job.id, intake)
        .await
        .unwrap();

    let job = rerun(&p, &job).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.last_error);
    assert_eq!(job.attempts, 1);
    assert_eq!(
        column(&p.app.pool, intake).await.as_deref(),
        Some(own.as_str())
    );
    assert_eq!(
        link_record(&p.app.pool, intake).await.as_deref(),
        Some(own.as_str())
    );
    let moved = p.storage.object(&p.bucket, &own).expect("kept");
    assert_eq!(moved.sha256_hex, rec.content.sha256_hex());
    assert_eq!(moved.upload_count, 1, "the earlier copy, not a second one");
    assert!(
        p.storage
            .object(&p.bucket, "unmatched/rec-crash.wav")
            .is_none()
    );
    assert_eq!(playback(&p, intake, org).await["status"], "available");
    p.stop().await;
}

/// Other bytes already in the intake's folder under the recording's name:
/// never linked, never overwritten, and the recording stays under
/// `unmatched/`; the job fails saying where each is.
#[sqlx::test(migrations = false)]
async fn other_bytes_at_the_destination_are_never_linked(pool: PgPool) {
    let p = start(pool).await;
    let (rec, job) = unmatched(&p, "rec-taken").await;
    let org = Uuid::new_v4();
    let intake = intake_of(&p.app.pool, org).await;
    let own = format!("intakes/{intake}/rec-taken.wav");
    let storage = storage_client(&p);
    // Same size, other bytes: only the hash tells them apart.
    let other = SimAudio::generated(rec.content.len(), 99);
    storage
        .upload(
            &own,
            "audio/wav",
            reqwest::Body::from(other.to_vec()),
            Some(other.len()),
        )
        .await
        .unwrap();

    Queue::new(p.app.pool.clone())
        .attach(job.id, intake)
        .await
        .unwrap();
    let job = rerun(&p, &job).await;
    assert_eq!(job.state, JobState::Failed, "{:?}", job.last_error);
    let error = job.last_error.unwrap();
    assert!(
        error.contains(&own) && error.contains("unmatched/rec-taken.wav"),
        "{error}"
    );
    assert_eq!(
        (job.object_path.as_deref(), job.moved_from.as_deref()),
        (Some("unmatched/rec-taken.wav"), None),
        "the job names where the recording is again"
    );
    assert_eq!(column(&p.app.pool, intake).await, None);
    assert_eq!(link_record(&p.app.pool, intake).await, None);
    assert_eq!(
        p.storage.object(&p.bucket, &own).unwrap().sha256_hex,
        other.sha256_hex(),
        "not overwritten"
    );
    assert_eq!(
        p.storage
            .object(&p.bucket, "unmatched/rec-taken.wav")
            .unwrap()
            .sha256_hex,
        rec.content.sha256_hex(),
        "the recording stays where it was"
    );
    assert_eq!(playback(&p, intake, org).await["status"], "failed");
    p.stop().await;
}

/// The copy was checked and the attempt died before the link; the next one
/// links it, and the `unmatched/` original's delete fails: the job still
/// succeeds, the original is left as a counted orphan, not deleted twice.
#[sqlx::test(migrations = false)]
async fn an_original_that_cannot_be_deleted_is_an_orphan_not_a_failed_job(pool: PgPool) {
    let p = start(pool).await;
    let (rec, job) = unmatched(&p, "rec-orphaned").await;
    let org = Uuid::new_v4();
    let intake = intake_of(&p.app.pool, org).await;
    let own = format!("intakes/{intake}/rec-orphaned.wav");
    left_mid_move(&p, &job, &own, true).await;
    let orphans = recording_relay::metrics::metrics().orphaned_objects.get();
    // The link reads nothing from storage: the delete is the attempt's
    // first storage request.
    p.storage.fail_next_other(1, Fault::Status(503));
    Queue::new(p.app.pool.clone())
        .attach(job.id, intake)
        .await
        .unwrap();

    let job = rerun(&p, &job).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.last_error);
    assert_eq!(job.attempts, 1);
    assert_eq!(job.moved_from_deleted_at, None);
    assert_eq!(
        link_record(&p.app.pool, intake).await.as_deref(),
        Some(own.as_str())
    );
    assert!(recording_relay::metrics::metrics().orphaned_objects.get() > orphans);
    assert_eq!(
        p.storage
            .object(&p.bucket, "unmatched/rec-orphaned.wav")
            .unwrap()
            .sha256_hex,
        rec.content.sha256_hex(),
        "left behind"
    );
    assert_eq!(playback(&p, intake, org).await["status"], "available");
    p.stop().await;
}

/// Issue #19 review, M2: a move planned and verified, then a link refused
/// for good (the intake took another object meanwhile), left the job naming
/// the copy while the original stayed under `unmatched/`; retention then
/// deleted the copy and left the original unnamed. The plan is undone: the
/// copy is deleted (the original is there) and the job names the original.
#[sqlx::test(migrations = false)]
async fn a_move_whose_link_is_refused_for_good_is_undone(pool: PgPool) {
    let p = start(pool).await;
    let (rec, job) = unmatched(&p, "rec-undone").await;
    let org = Uuid::new_v4();
    let intake = intake_of(&p.app.pool, org).await;
    let own = format!("intakes/{intake}/rec-undone.wav");
    // In one transaction with the attach, so the rerun sees both: the
    // intake names another object by the time the link runs.
    let mut tx = p.app.pool.begin().await.unwrap();
    sqlx::query("SELECT recording_relay.recording_jobs_attach($1, $2)")
        .bind(job.id)
        .bind(intake)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE public.intakes SET recording_object_path = $2 WHERE id = $1")
        .bind(intake)
        .bind(format!("intakes/{intake}/someone-else.wav"))
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let job = rerun(&p, &job).await;
    assert_eq!(job.state, JobState::Failed, "{:?}", job.last_error);
    let error = job.last_error.unwrap();
    assert!(
        error.contains("undone") && error.contains("unmatched/rec-undone.wav"),
        "{error}"
    );
    assert_eq!(
        (job.object_path.as_deref(), job.moved_from.as_deref()),
        (Some("unmatched/rec-undone.wav"), None),
        "the job names the one object that holds the recording"
    );
    assert!(
        p.storage.object(&p.bucket, &own).is_none(),
        "the copy is gone"
    );
    assert_eq!(
        p.storage
            .object(&p.bucket, "unmatched/rec-undone.wav")
            .unwrap()
            .sha256_hex,
        rec.content.sha256_hex()
    );
    p.stop().await;
}

/// Issue #19 review, L6: a path outside the intake's own folder was
/// written to the intake's column with no link record (a recording that
/// never plays, and looks linked). It is a permanent job error now.
#[sqlx::test(migrations = false)]
async fn a_path_outside_the_intakes_folder_is_never_linked(pool: PgPool) {
    let p = start(pool).await;
    let (_rec, job) = unmatched(&p, "rec-elsewhere").await;
    let org = Uuid::new_v4();
    let intake = intake_of(&p.app.pool, org).await;
    let elsewhere = format!("intakes/{}/rec-elsewhere.wav", Uuid::new_v4());
    // As if moved and verified into another intake's folder (a DBA's edit).
    left_mid_move(&p, &job, &elsewhere, true).await;
    Queue::new(p.app.pool.clone())
        .attach(job.id, intake)
        .await
        .unwrap();

    let job = rerun(&p, &job).await;
    assert_eq!(job.state, JobState::Failed, "{:?}", job.last_error);
    assert!(job.last_error.unwrap().contains("own folder"), "says why");
    assert_eq!(column(&p.app.pool, intake).await, None);
    assert_eq!(link_record(&p.app.pool, intake).await, None);
    p.stop().await;
}
