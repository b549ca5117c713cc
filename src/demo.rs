//! `recording-relay demo`: the whole flow on this machine, against the local
//! PostgreSQL and in-process stand-ins for Telnyx and Supabase Storage.
//!
//! It creates a fresh `recording_relay_demo` database with a minimal host
//! schema, starts the real daemon (listener + worker) on loopback, sends
//! signed `call.recording.saved` webhooks shaped like Telnyx's (no recording
//! id, no numbers), and reports what ended up in the bucket and on the
//! intakes.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::app::App;
use crate::config::{Config, Role};
use crate::db;
use crate::jobs::{Job, JobState};
use crate::pipeline::Pipeline;
use crate::sim::{
    SimAudio, SimRecording, StorageSim, StorageSimConfig, TelnyxSim, TelnyxSimConfig,
};
use crate::telemetry::mask_phone;
use crate::testing;

pub const DEMO_DATABASE: &str = "recording_relay_demo";
const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// One call of the demo: who was called, how long, and what should happen.
struct Call {
    label: &'static str,
    patient_phone: Option<&'static str>,
    dialled: &'static str,
    seconds: u64,
}

const CALLS: [Call; 3] = [
    Call {
        label: "3-minute intake call",
        patient_phone: Some("(555) 010-4477"),
        dialled: "+15550104477",
        seconds: 180,
    },
    Call {
        label: "12-minute intake call (resumable upload)",
        patient_phone: Some("555.010.9001"),
        dialled: "+1 555 010 9001",
        seconds: 720,
    },
    Call {
        label: "call to a number with no intake",
        patient_phone: None,
        dialled: "+15550100000",
        seconds: 30,
    },
];

pub async fn run(server_url: Option<&str>, database: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !database.is_empty()
            && database
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "--database-name takes letters, digits and underscores"
    );
    let server_url = server_url.unwrap_or(DEFAULT_SERVER);
    say(&format!(
        "database: recreating {database} on the server of {}",
        redact_db_url(server_url)
    ));
    let db_url = recreate_database(server_url, database).await?;
    let setup_pool = PgPool::connect(&db_url)
        .await
        .context("connecting to the demo database")?;
    db::create_demo_host_schema(&setup_pool).await?;
    db::migrate(&setup_pool).await?;

    let stop = CancellationToken::new();
    let data_dir = tempfile::tempdir().context("creating a temporary directory")?;
    let telnyx = TelnyxSim::start(TelnyxSimConfig {
        api_key: "KEY_demo".to_owned(),
        cancel: stop.child_token(),
        ..TelnyxSimConfig::default()
    })?;
    let storage = StorageSim::start(StorageSimConfig {
        service_key: "demo-service-role-key".to_owned(),
        data_dir: Some(data_dir.path().to_owned()),
        cancel: stop.child_token(),
        ..StorageSimConfig::default()
    })?;
    say(&format!(
        "Telnyx stand-in at {}, Supabase Storage stand-in at {}",
        telnyx.base_url(),
        storage.base_url()
    ));

    let key = testing::signing_key();
    let config = demo_config(&db_url, &key, &telnyx, &storage);
    crate::cli::setup_bucket(&config).await?;

    let mut expected = Vec::new();
    for (n, call) in CALLS.iter().enumerate() {
        expected.push(prepare_call(&setup_pool, &telnyx, n, call).await?);
    }

    let app = App::build(config.clone(), Role::Serve).await?;
    let addr = app.local_addr().context("listener address")?;
    let pipeline = Pipeline::from_config(&config)?;
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(app.run(pipeline, shutdown.clone()));
    say(&format!(
        "daemon listening on http://{addr}/webhooks/telnyx"
    ));

    let http = reqwest::Client::new();
    for (n, (rec, _)) in expected.iter().enumerate() {
        let event =
            testing::recording_saved_event(&format!("demo-event-{n}"), &rec.call_session_id);
        let mut event = event;
        event["data"]["payload"]["recording_started_at"] =
            rec.recording_started_at.to_rfc3339().into();
        event["data"]["payload"]["call_leg_id"] = rec.call_leg_id.clone().into();
        let body = event.to_string().into_bytes();
        let mut req = http.post(format!("http://{addr}/webhooks/telnyx"));
        for (name, value) in testing::signature_headers(&key, testing::unix_now(), &body) {
            req = req.header(name, value);
        }
        let t0 = Instant::now();
        let res = req.body(body).send().await?;
        say(&format!(
            "webhook {n}: {} in {:.1} ms",
            res.status(),
            t0.elapsed().as_secs_f64() * 1000.0
        ));
    }

    let finished =
        wait_for_final_states(&setup_pool, CALLS.len(), Duration::from_secs(120)).await?;
    shutdown.cancel();
    daemon.await??;
    let ok = report(&setup_pool, &storage, &telnyx, &config, &expected).await?;
    stop.cancel();
    if !finished || !ok {
        bail!("the demo did not end as expected");
    }
    say("demo finished: every recording is stored once, verified, and linked or kept as unmatched");
    Ok(())
}

fn say(line: &str) {
    println!("demo: {line}");
}

fn redact_db_url(url: &str) -> String {
    match url.split_once('@') {
        Some((_, host)) => format!("postgres://***@{host}"),
        None => url.to_owned(),
    }
}

async fn recreate_database(server_url: &str, database: &str) -> anyhow::Result<String> {
    let mut conn = PgConnection::connect(server_url)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", redact_db_url(server_url)))?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {database} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {database}")))
        .execute(&mut conn)
        .await?;
    let base = server_url.rsplit_once('/').map_or(server_url, |(b, _)| b);
    Ok(format!("{base}/{database}"))
}

fn demo_config(
    db_url: &str,
    key: &ed25519_dalek::SigningKey,
    telnyx: &TelnyxSim,
    storage: &StorageSim,
) -> Config {
    let mut c = Config::default();
    c.database.url = Some(db_url.to_owned().into());
    c.listener.addr = "127.0.0.1:0".parse().expect("static address");
    c.telnyx.public_key = Some(testing::public_key_base64(key));
    c.telnyx.api_key = Some("KEY_demo".to_owned().into());
    c.telnyx.api_url = telnyx.base_url();
    c.supabase.url = Some(storage.base_url());
    c.supabase.service_role_key = Some("demo-service-role-key".to_owned().into());
    c.worker.poll_interval = Duration::from_secs(1);
    c.retry.base = Duration::from_millis(500);
    c.retry.cap = Duration::from_secs(2);
    c.pipeline.match_attempts = 2;
    c.pipeline.match_retry_delay = Duration::from_millis(500);
    c.pipeline.delete_from_telnyx = true;
    c
}

/// Creates the host rows and the Telnyx recording for one call.
async fn prepare_call(
    pool: &PgPool,
    telnyx: &TelnyxSim,
    n: usize,
    call: &Call,
) -> anyhow::Result<(SimRecording, Option<Uuid>)> {
    let mut rec = SimRecording::sample(format!("demo-recording-{n}-{}", Uuid::new_v4().simple()));
    rec.to = call.dialled.to_owned();
    rec.from = "+15550001000".to_owned();
    rec.duration_millis = call.seconds * 1000;
    rec.content = SimAudio::generated(44 + 16_000 * call.seconds, n as u64 + 1);
    let intake = match call.patient_phone {
        Some(phone) => {
            let patient: Uuid = sqlx::query_scalar(
                "INSERT INTO public.patients (name, phone) VALUES ($1, $2) RETURNING id",
            )
            .bind(format!("Demo patient {n}"))
            .bind(phone)
            .fetch_one(pool)
            .await?;
            let intake: Uuid = sqlx::query_scalar(
                "INSERT INTO public.intakes (patient_id, room_name, created_at)
                 VALUES ($1, $2, $3 - interval '20 seconds') RETURNING id",
            )
            .bind(patient)
            .bind(format!("intake-demo-{n}"))
            .bind(rec.recording_started_at)
            .fetch_one(pool)
            .await?;
            Some(intake)
        }
        None => None,
    };
    say(&format!(
        "{}: patient {}, {} bytes at Telnyx",
        call.label,
        mask_phone(call.dialled),
        rec.content.len()
    ));
    telnyx.add_recording(rec.clone());
    Ok((rec, intake))
}

async fn wait_for_final_states(
    pool: &PgPool,
    jobs: usize,
    limit: Duration,
) -> anyhow::Result<bool> {
    let deadline = Instant::now() + limit;
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM recording_relay.recording_jobs WHERE state NOT IN ('pending', 'running')",
        )
        .fetch_one(pool)
        .await?;
        if done as usize >= jobs {
            return Ok(true);
        }
        if Instant::now() > deadline {
            say("timed out waiting for the jobs to finish");
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prints what happened to each call and checks it against the source.
async fn report(
    pool: &PgPool,
    storage: &StorageSim,
    telnyx: &TelnyxSim,
    config: &Config,
    expected: &[(SimRecording, Option<Uuid>)],
) -> anyhow::Result<bool> {
    let client = crate::pipeline::storage_client(config)?;
    let mut ok = true;
    for (rec, intake) in expected {
        let job: Option<Job> =
            sqlx::query_as("SELECT * FROM recording_relay.recording_jobs WHERE recording_id = $1")
                .bind(&rec.id)
                .fetch_optional(pool)
                .await?;
        let Some(Job {
            state,
            intake_id: job_intake,
            object_path: path,
            object_sha256: sha,
            attempts,
            last_error,
            ..
        }) = job
        else {
            say(&format!("recording {}: no job", rec.id));
            ok = false;
            continue;
        };
        let path = path.unwrap_or_default();
        let stored = storage.object(config.supabase.bucket.as_str(), &path);
        let same_bytes = stored
            .as_ref()
            .is_some_and(|o| o.sha256_hex == rec.content.sha256_hex())
            && sha.as_deref() == Some(rec.content.sha256_hex().as_str());
        let uploads = stored.as_ref().map_or(0, |o| o.upload_count);
        let wanted = if intake.is_some() {
            JobState::Succeeded
        } else {
            JobState::Unmatched
        };
        let linked: Option<(Option<String>, Option<i32>)> = sqlx::query_as(
            "SELECT recording_url, recording_duration FROM public.intakes WHERE recording_id = $1",
        )
        .bind(&rec.id)
        .fetch_optional(pool)
        .await?;
        say(&format!(
            "job for {}: {} after {attempts} attempt(s); object {path} ({} bytes, sha256 {} source, uploaded {uploads}x); {}",
            rec.id,
            state.as_str(),
            stored.as_ref().map_or(0, |o| o.size),
            if same_bytes {
                "matches"
            } else {
                "DOES NOT match"
            },
            match (&linked, intake) {
                (Some((Some(_), Some(secs))), Some(i)) => format!("intake {i} linked, {secs}s"),
                _ => format!("kept for an operator: {}", last_error.unwrap_or_default()),
            }
        ));
        ok &= state == wanted && same_bytes && uploads == 1 && job_intake == *intake;
    }
    let deleted = telnyx.deleted_ids().len();
    say(&format!(
        "recordings deleted at Telnyx after verification: {deleted} (unmatched ones are kept)"
    ));
    ok &= deleted == expected.iter().filter(|(_, i)| i.is_some()).count();

    // Playback: the private bucket needs a signed URL, which honours Range.
    if let Some((rec, Some(intake))) = expected.first() {
        let path = crate::pipeline::object_path(Some(*intake), &rec.id, config.pipeline.format);
        let url = client.signed_url(&path, Duration::from_secs(600)).await?;
        let res = reqwest::Client::new()
            .get(&url)
            .header("range", "bytes=0-1023")
            .send()
            .await?;
        say(&format!(
            "signed playback URL answers {} to a Range request (what <audio> seeking needs)",
            res.status()
        ));
        ok &= res.status() == reqwest::StatusCode::PARTIAL_CONTENT;
    }
    Ok(ok)
}
