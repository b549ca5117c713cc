//! The relay against Telnyx as its OpenAPI spec and docs describe it, not
//! as a lenient simulator once assumed: one format per recording, no
//! numbers in older schemas, timestamps in several ISO 8601 shapes, and the
//! connection (tenant) carried over into reconciled jobs.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use recording_relay::config::AudioFormat;
use recording_relay::jobs::{JobState, Queue};
use recording_relay::providers::telnyx_api::{TelnyxClient, Timeouts};
use recording_relay_sim::{SimAudio, SimRecording, SimTimestamps, TelnyxSimBehaviour};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{PipelineApp, TELNYX_KEY, intake_for, spawn_pipeline, webhook_for};

/// Telnyx's recording ids are UUIDs.
fn recording() -> SimRecording {
    SimRecording::sample(Uuid::new_v4().to_string())
}

fn client_of(p: &PipelineApp) -> TelnyxClient {
    TelnyxClient::new(
        &p.telnyx.base_url(),
        TELNYX_KEY.to_owned().into(),
        Timeouts {
            connect: Duration::from_secs(2),
            request: Duration::from_secs(5),
            read_idle: Duration::from_secs(5),
        },
    )
    .unwrap()
}

fn mp3_bytes() -> SimAudio {
    // An ID3 tag and MPEG frame sync, then filler: not a WAV.
    let mut b = b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb\x90\x64".to_vec();
    b.resize(48_000, 0x55);
    SimAudio::Bytes(Bytes::from(b))
}

/// Tried: with `pipeline.format = "wav"` (the default) an mp3-only
/// recording retried until it ran out of attempts.
#[sqlx::test(migrations = false)]
async fn an_mp3_recording_is_stored_as_mp3_under_the_default_format(pool: PgPool) {
    let p = spawn_pipeline(pool, |_| {}).await;
    let mut rec = recording();
    rec.format = recording_relay_sim::AudioFormat::Mp3;
    rec.content = mp3_bytes();
    p.telnyx.add_recording(rec.clone());
    let intake = intake_for(&p.app.pool, &rec, "+15557650002").await;

    p.post_event(&serde_json::from_slice(&webhook_for("ev-mp3", &rec)).unwrap())
        .await;
    let job = p.finished_job("ev-mp3").await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.last_error);
    assert_eq!(job.attempts, 1, "{:?}", job.errors);
    let path = job.object_path.clone().unwrap();
    assert_eq!(path, format!("intakes/{intake}/{}.mp3", rec.id));
    assert_eq!(job.content_type.as_deref(), Some("audio/mpeg"));
    let stored = p.storage.object(&p.bucket, &path).unwrap();
    assert_eq!(stored.content_type, "audio/mpeg");
    assert_eq!(stored.sha256_hex, rec.content.sha256_hex());
    p.stop().await;
}

/// The other way round: mp3 configured, Telnyx recorded wav. And when
/// Telnyx offers both, the configured one is taken.
#[sqlx::test(migrations = false)]
async fn the_configured_format_is_taken_when_offered_else_the_other(pool: PgPool) {
    let p = spawn_pipeline(pool, |c| c.pipeline.format = AudioFormat::Mp3).await;
    let wav_only = recording();
    p.telnyx.add_recording(wav_only.clone());
    p.post_event(&serde_json::from_slice(&webhook_for("ev-wav", &wav_only)).unwrap())
        .await;
    let job = p.finished_job("ev-wav").await;
    // No intake: stored under unmatched/, which is enough to see the format.
    assert_eq!(job.state, JobState::Unmatched, "{:?}", job.last_error);
    let path = job.object_path.clone().unwrap();
    assert_eq!(path, format!("unmatched/{}.wav", wav_only.id));
    assert_eq!(
        p.storage.object(&p.bucket, &path).unwrap().content_type,
        "audio/wav"
    );

    p.telnyx.set_behaviour(TelnyxSimBehaviour {
        only_recorded_format: false,
        ..TelnyxSimBehaviour::default()
    });
    let both = recording();
    p.telnyx.add_recording(both.clone());
    p.post_event(&serde_json::from_slice(&webhook_for("ev-both", &both)).unwrap())
        .await;
    let job = p.finished_job("ev-both").await;
    let path = job.object_path.clone().unwrap();
    assert_eq!(path, format!("unmatched/{}.mp3", both.id));
    assert_eq!(
        p.storage.object(&p.bucket, &path).unwrap().content_type,
        "audio/mpeg"
    );
    p.stop().await;
}

/// Older schemas and Telnyx's own examples have no `from`/`to`: the
/// phone-and-time match cannot run, the reason says only `client_state`
/// can match, and `client_state` still does.
#[sqlx::test(migrations = false)]
async fn without_numbers_only_client_state_matches_and_the_reason_says_so(pool: PgPool) {
    let p = spawn_pipeline(pool, |_| {}).await;
    p.telnyx.set_behaviour(TelnyxSimBehaviour {
        numbers: false,
        ..TelnyxSimBehaviour::default()
    });
    let rec = recording();
    p.telnyx.add_recording(rec.clone());
    let by_phone = intake_for(&p.app.pool, &rec, "+15557650002").await;
    p.post_event(&serde_json::from_slice(&webhook_for("ev-nonum", &rec)).unwrap())
        .await;
    let job = p.finished_job("ev-nonum").await;
    assert_eq!(job.state, JobState::Unmatched, "{:?}", job.last_error);
    let reason = job.last_error.clone().unwrap_or_default();
    assert!(
        reason.contains("no from/to numbers") && reason.contains("client_state"),
        "{reason}"
    );
    assert_eq!(job.call.to_number, None);
    assert_eq!(job.attempts, 1, "retrying cannot find numbers: {reason}");

    let rec = recording();
    p.telnyx.add_recording(rec.clone());
    let named = intake_for(&p.app.pool, &rec, "+15550000009").await;
    let mut event: Value = serde_json::from_slice(&webhook_for("ev-cs", &rec)).unwrap();
    event["data"]["payload"]["client_state"] = base64::engine::general_purpose::STANDARD
        .encode(named.to_string())
        .into();
    p.post_event(&event).await;
    let job = p.finished_job("ev-cs").await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.last_error);
    assert_eq!(job.intake_id, Some(named));
    assert_eq!(job.match_method.as_deref(), Some("client_state"));
    let taken: Option<String> =
        sqlx::query_scalar("SELECT recording_id FROM public.intakes WHERE id = $1")
            .bind(by_phone)
            .fetch_one(&p.app.pool)
            .await
            .unwrap();
    assert_eq!(taken, None);
    p.stop().await;
}

/// With `connection_organizations` configured, a call through a connection
/// that is not listed could belong to any tenant: it matches nothing. Not by
/// phone (a number alone would cross tenants), and not by `client_state`
/// either (issue #19: it could name any tenant's intake, and did).
#[sqlx::test(migrations = false)]
async fn an_unknown_connection_matches_nothing_not_even_by_client_state(pool: PgPool) {
    let org = Uuid::new_v4();
    let p = spawn_pipeline(pool, |c| {
        c.pipeline
            .connection_organizations
            .insert("1111111111111111111".to_owned(), org);
    })
    .await;
    let (rec, by_phone) = p.recorded_call(&Uuid::new_v4().to_string()).await;
    p.post_event(&serde_json::from_slice(&webhook_for("ev-conn", &rec)).unwrap())
        .await;
    let job = p.finished_job("ev-conn").await;
    assert_eq!(job.state, JobState::Unmatched, "{:?}", job.last_error);
    let reason = job.last_error.clone().unwrap_or_default();
    assert!(reason.contains("connection_organizations"), "{reason}");
    assert_eq!(job.attempts, 1, "no later attempt can match: {reason}");
    let taken: Option<String> =
        sqlx::query_scalar("SELECT recording_id FROM public.intakes WHERE id = $1")
            .bind(by_phone)
            .fetch_one(&p.app.pool)
            .await
            .unwrap();
    assert_eq!(taken, None, "a phone match across tenants");

    // Another tenant's intake, named by client_state.
    let rec = recording();
    p.telnyx.add_recording(rec.clone());
    let named = intake_for(&p.app.pool, &rec, "+15550000009").await;
    sqlx::query("UPDATE public.intakes SET organization_id = $1 WHERE id = $2")
        .bind(Uuid::new_v4())
        .bind(named)
        .execute(&p.app.pool)
        .await
        .unwrap();
    let mut event: Value = serde_json::from_slice(&webhook_for("ev-conn-cs", &rec)).unwrap();
    event["data"]["payload"]["client_state"] = base64::engine::general_purpose::STANDARD
        .encode(format!("{{\"intake_id\":\"{named}\"}}"))
        .into();
    p.post_event(&event).await;
    let job = p.finished_job("ev-conn-cs").await;
    assert_eq!(job.state, JobState::Unmatched, "{:?}", job.last_error);
    assert_eq!(job.intake_id, None);
    let reason = job.last_error.clone().unwrap_or_default();
    assert!(
        reason.contains("connection_organizations") && reason.contains("client_state"),
        "{reason}"
    );
    let taken: (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT recording_id, recording_object_path FROM public.intakes WHERE id = $1",
    )
    .bind(named)
    .fetch_one(&p.app.pool)
    .await
    .unwrap();
    assert_eq!(
        taken,
        (None, None),
        "another tenant's intake, by client_state"
    );
    p.stop().await;
}

/// Reconcile's jobs used to have no connection at all, so scoping never
/// applied to them. Two patients share a number, each in another tenant:
/// the connection picks the tenant.
#[sqlx::test(migrations = false)]
async fn reconciled_jobs_carry_the_connection_from_the_api(pool: PgPool) {
    let (org_a, org_b) = (Uuid::new_v4(), Uuid::new_v4());
    let rec = recording();
    let connection = rec.connection_id.clone();
    let p = spawn_pipeline(pool, |c| {
        c.pipeline
            .connection_organizations
            .insert(connection.clone(), org_a);
    })
    .await;
    p.telnyx.add_recording(rec.clone());
    let ours = intake_for(&p.app.pool, &rec, "+15557650002").await;
    let theirs = intake_for(&p.app.pool, &rec, "+1 555 765 0002").await;
    for (intake, org) in [(ours, org_a), (theirs, org_b)] {
        sqlx::query("UPDATE public.intakes SET organization_id = $1 WHERE id = $2")
            .bind(org)
            .bind(intake)
            .execute(&p.app.pool)
            .await
            .unwrap();
    }

    let queue = Queue::new(p.app.pool.clone());
    let report = recording_relay::ops::reconcile::reconcile(
        &queue,
        &client_of(&p),
        Duration::from_secs(3600),
        5,
    )
    .await
    .unwrap();
    assert_eq!(report.enqueued, [rec.id.as_str()]);
    let event_id = format!("reconcile:{}", rec.id);
    let job = p.finished_job(&event_id).await;
    assert_eq!(job.call.connection_id.as_deref(), Some(connection.as_str()));
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.last_error);
    assert_eq!(job.intake_id, Some(ours));
    p.stop().await;
}

/// The spec's timestamps are plain strings "in ISO 8601": every shape the
/// simulator can send is read, through reconcile (a page) and the pipeline.
#[sqlx::test(migrations = false)]
async fn timestamps_in_other_iso_8601_shapes_are_read(pool: PgPool) {
    let p = spawn_pipeline(pool, |_| {}).await;
    let queue = Queue::new(p.app.pool.clone());
    for shape in SimTimestamps::ALL {
        p.telnyx.set_behaviour(TelnyxSimBehaviour {
            timestamps: shape,
            ..TelnyxSimBehaviour::default()
        });
        let (rec, intake) = p.recorded_call(&Uuid::new_v4().to_string()).await;
        let report = recording_relay::ops::reconcile::reconcile(
            &queue,
            &client_of(&p),
            Duration::from_secs(3600),
            5,
        )
        .await
        .unwrap_or_else(|e| panic!("{shape:?}: {e}"));
        assert_eq!(report.enqueued, [rec.id.as_str()], "{shape:?}");
        let job = p.finished_job(&format!("reconcile:{}", rec.id)).await;
        assert_eq!(
            job.state,
            JobState::Succeeded,
            "{shape:?}: {:?}",
            job.last_error
        );
        assert_eq!(
            job.call.recording_started_at,
            Some(rec.recording_started_at),
            "{shape:?}"
        );
        assert_eq!(job.intake_id, Some(intake), "{shape:?}");
    }
    p.stop().await;
}

/// `filter[call_session_id]` is a UUID at Telnyx; a malformed one is a
/// 422, which no retry can fix.
#[sqlx::test(migrations = false)]
async fn a_malformed_session_id_fails_at_once(pool: PgPool) {
    let p = spawn_pipeline(pool, |_| {}).await;
    let rec = recording();
    p.telnyx.add_recording(rec.clone());
    let mut event: Value = serde_json::from_slice(&webhook_for("ev-bad-session", &rec)).unwrap();
    event["data"]["payload"]["call_session_id"] = "sess-not-a-uuid".into();
    p.post_event(&event).await;
    let job = p.finished_job("ev-bad-session").await;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.attempts, 1);
    let error = job.last_error.unwrap_or_default();
    assert!(error.contains("422"), "{error}");
    p.stop().await;
}
