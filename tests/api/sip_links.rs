//! Issue #21: the intake the dialer names in the SIP INVITE
//! (`X-Intake-Id`, reported in `call.initiated`) links a recording exactly,
//! ahead of phone and time, within the call's organization.

use std::time::Duration;

use recording_relay::jobs::JobState;
use recording_relay_sim::SimRecording;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{PipelineApp, eventually, spawn_listener, spawn_pipeline, webhook_for};
use crate::testing;

/// The sample recordings' patient (`to`).
const PATIENT_PHONE: &str = "+15557650002";

async fn patient(pool: &PgPool) -> Uuid {
    sqlx::query_scalar("INSERT INTO public.patients (phone) VALUES ($1) RETURNING id")
        .bind(PATIENT_PHONE)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// An intake of `patient` created `ago` before now, in `org` if given.
async fn intake(pool: &PgPool, patient: Uuid, ago: Duration, org: Option<Uuid>) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO public.intakes (patient_id, organization_id, room_name, created_at)
         VALUES ($1, $2, 'room', now() - $3 * interval '1 millisecond') RETURNING id",
    )
    .bind(patient)
    .bind(org)
    .bind(ago.as_millis() as i64)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn call_initiated(p: &PipelineApp, event_id: &str, rec: &SimRecording, intake: Uuid) {
    let event =
        testing::call_initiated_event(event_id, &rec.call_session_id, Some(&intake.to_string()));
    p.post_event(&event).await;
}

async fn recording(p: &PipelineApp, event_id: &str, rec: &SimRecording) {
    let res = p.app.post_signed(&webhook_for(event_id, rec)).await;
    assert_eq!(res.status(), 200);
}

async fn intake_recording(pool: &PgPool, intake: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT recording_id FROM public.intakes WHERE id = $1")
        .bind(intake)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrations = false)]
async fn call_initiated_with_the_intake_header_is_kept_once_per_session(pool: PgPool) {
    let app = spawn_listener(pool).await;
    let intake = Uuid::new_v4();
    let mut event = testing::call_initiated_event("ev-init", "sess-1", None);
    // SIP header names are case-insensitive; the value is what counts.
    event["data"]["payload"]["custom_headers"] =
        serde_json::json!([{"name": "x-intake-id", "value": intake.to_string().to_uppercase()}]);
    let body = event.to_string();
    for expected in ["stored", "merged"] {
        let res = app.post_signed(body.as_bytes()).await;
        assert_eq!(res.status(), 200);
        let answer: Value = res.json().await.unwrap();
        assert_eq!(answer["status"], expected, "{answer}");
    }
    let mut answered = testing::call_initiated_event("ev-answer", "sess-1", None);
    answered["data"]["event_type"] = "call.answered".into();
    assert_eq!(
        app.post_signed(answered.to_string().as_bytes())
            .await
            .status(),
        200
    );

    let rows: Vec<(Option<Uuid>, String, Option<String>)> =
        sqlx::query_as("SELECT intake_id, first_event_id, to_number FROM recording_relay.calls")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        [(
            Some(intake),
            "ev-init".to_owned(),
            Some(PATIENT_PHONE.to_owned())
        )]
    );
    assert_eq!(app.job_count().await, 0, "a call event is not a job");
    app.stop().await;
}

/// ZScribe's retry: the same patient called twice within ten minutes, an
/// intake for each call. By phone and time the two recordings and two
/// intakes are one patient's and minutes apart: no rule can tell which is
/// which. The header says.
#[sqlx::test(migrations = false)]
async fn a_patient_called_twice_within_ten_minutes_gets_each_recording_on_its_own_intake(
    pool: PgPool,
) {
    let p = spawn_pipeline(pool, |_| {}).await;
    let pool = p.app.pool.clone();
    let patient = patient(&pool).await;
    let first = intake(&pool, patient, Duration::from_secs(100), None).await;
    let second = intake(&pool, patient, Duration::from_secs(90), None).await;
    let rec_a = SimRecording::sample("rec-first-call");
    let rec_b = SimRecording::sample("rec-second-call");
    p.telnyx.add_recording(rec_a.clone());
    p.telnyx.add_recording(rec_b.clone());
    call_initiated(&p, "ev-init-a", &rec_a, first).await;
    call_initiated(&p, "ev-init-b", &rec_b, second).await;
    // The later call's recording first.
    recording(&p, "ev-rec-b", &rec_b).await;
    recording(&p, "ev-rec-a", &rec_a).await;

    for (event, intake, rec) in [
        ("ev-rec-a", first, "rec-first-call"),
        ("ev-rec-b", second, "rec-second-call"),
    ] {
        let job = p.finished_job(event).await;
        assert_eq!(
            job.state,
            JobState::Succeeded,
            "{event}: {:?}",
            job.last_error
        );
        assert_eq!(job.intake_id, Some(intake), "{event}");
        assert_eq!(job.match_method.as_deref(), Some("sip_header"));
        assert_eq!(intake_recording(&pool, intake).await.as_deref(), Some(rec));
    }
    p.stop().await;
}

/// Webhooks come out of order: the recording's before its call's. It
/// waits (`pipeline.link_wait`) instead of letting phone and time decide,
/// and the call event, when it comes, links it at once.
#[sqlx::test(migrations = false)]
async fn a_recording_before_its_call_initiated_waits_and_then_links_exactly(pool: PgPool) {
    let p = spawn_pipeline(pool, |c| c.pipeline.link_wait = Duration::from_secs(120)).await;
    let pool = p.app.pool.clone();
    let patient = patient(&pool).await;
    // Two free intakes: phone and time alone would not pick one.
    let named = intake(&pool, patient, Duration::from_secs(100), None).await;
    let _other = intake(&pool, patient, Duration::from_secs(90), None).await;
    // Call events arrive at all: an earlier call's.
    p.post_event(&testing::call_initiated_event(
        "ev-earlier",
        "sess-earlier",
        None,
    ))
    .await;
    let rec = SimRecording::sample("rec-early");
    p.telnyx.add_recording(rec.clone());
    recording(&p, "ev-rec", &rec).await;

    let waiting = eventually(Duration::from_secs(20), || async {
        p.job("ev-rec").await.is_some_and(|j| {
            j.state == JobState::Pending
                && j.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("pipeline.link_wait"))
        })
    })
    .await;
    assert!(waiting, "{:?}", p.job("ev-rec").await);
    let started = std::time::Instant::now();
    call_initiated(&p, "ev-init", &rec, named).await;

    let job = p.finished_job("ev-rec").await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.last_error);
    assert_eq!(job.intake_id, Some(named));
    assert_eq!(job.match_method.as_deref(), Some("sip_header"));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "woken by the call event, not at the end of the wait: {:?}",
        started.elapsed()
    );
    p.stop().await;
}

/// The header is the dialer's word: an intake of another organization than
/// the call's connection is none, and phone and time are not tried.
#[sqlx::test(migrations = false)]
async fn a_header_naming_another_organizations_intake_matches_nothing(pool: PgPool) {
    let ours = Uuid::new_v4();
    let theirs = Uuid::new_v4();
    let p = spawn_pipeline(pool, |c| {
        c.pipeline
            .connection_organizations
            .insert("1494404757140276705".to_owned(), ours);
    })
    .await;
    let pool = p.app.pool.clone();
    let patient = patient(&pool).await;
    let foreign = intake(&pool, patient, Duration::from_secs(100), Some(theirs)).await;
    let by_phone = intake(&pool, patient, Duration::from_secs(90), Some(ours)).await;
    let rec = SimRecording::sample("rec-foreign");
    p.telnyx.add_recording(rec.clone());
    call_initiated(&p, "ev-init", &rec, foreign).await;
    recording(&p, "ev-rec", &rec).await;

    let job = p.finished_job("ev-rec").await;
    assert_eq!(job.state, JobState::Unmatched);
    assert_eq!(job.intake_id, None);
    let reason = job.last_error.unwrap_or_default();
    assert!(
        reason.contains(&format!("the SIP header names intake {foreign}"))
            && reason.contains("organization"),
        "{reason}"
    );
    assert_eq!(intake_recording(&pool, foreign).await, None);
    assert_eq!(
        intake_recording(&pool, by_phone).await,
        None,
        "no guess by phone"
    );
    p.stop().await;
}
