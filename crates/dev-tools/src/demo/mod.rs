//! `cargo demo`: the whole flow on this machine, with in-process
//! stand-ins for Telnyx and Supabase Storage, told as a story.
//!
//! It creates a fresh `recording_relay_demo` database with a minimal host
//! schema (on the server it is given, else on a throwaway cluster of its
//! own: [`cluster`]), starts the real daemon (listener, worker and
//! playback API) on loopback, sends signed webhooks shaped like Telnyx's
//! the way ZScribe's calls produce them (issue #21): `call.initiated`
//! naming the intake in the SIP header `X-Intake-Id`, no `client_state`,
//! and `call.recording.saved` (no recording id, no numbers); one patient
//! is called twice within ten minutes. It prints one line per
//! change of each job ([`story`]), and ends with a table of what is in the
//! bucket and on the intakes, checked against the source.

pub mod audio;
pub mod cluster;
pub mod story;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::testing;
use recording_relay::app::App;
use recording_relay::config::{Config, Role};
use recording_relay::db;
use recording_relay::jobs::{Job, JobState};
use recording_relay::pipeline::Pipeline;
use recording_relay::telemetry::mask_phone;
use recording_relay_sim::{SimRecording, StorageSim, StorageSimConfig, TelnyxSim, TelnyxSimConfig};

use cluster::Cluster;

pub const DEMO_DATABASE: &str = "recording_relay_demo";
/// Where the demo looks when it is given no server (what `.cargo/config.toml`
/// also sets for `cargo run` and `cargo test`).
pub const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// How long the `--keep` player link's token stays valid.
const KEEP_TOKEN_LIFETIME: Duration = Duration::from_secs(8 * 3600);

/// One call of the demo: who was called, how long, when, and how Telnyx
/// announced it.
struct Call {
    label: &'static str,
    patient_phone: Option<&'static str>,
    dialled: &'static str,
    seconds: u64,
    /// When the recording started, in seconds after the demo's first call.
    starts_at: i64,
    /// When `call.initiated` (with the intake in `X-Intake-Id`, ZScribe's
    /// way) is sent relative to `call.recording.saved`.
    initiated: Initiated,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Initiated {
    /// As Telnyx does: the call starts, then its recording is saved.
    Before,
    /// A delivery that came late: the recording's webhook first.
    After,
}

/// ZScribe's dial path (issue #21): every call is announced by
/// `call.initiated` naming its intake in `X-Intake-Id`, none carries
/// `client_state`. Call 4 calls call 1's patient again six minutes later,
/// for a second intake: by phone number and time the two would be
/// ambiguous, by the header each lands on its own intake.
const CALLS: [Call; 4] = [
    Call {
        label: "3-minute intake call",
        patient_phone: Some("(555) 010-4477"),
        dialled: "+15550104477",
        seconds: 180,
        starts_at: 0,
        initiated: Initiated::Before,
    },
    Call {
        label: "12-minute intake call (resumable upload), call.initiated delivered late",
        patient_phone: Some("555.010.9001"),
        dialled: "+1 555 010 9001",
        seconds: 720,
        starts_at: 60,
        initiated: Initiated::After,
    },
    Call {
        label: "call to a number with no intake (no X-Intake-Id)",
        patient_phone: None,
        dialled: "+15550100000",
        seconds: 30,
        starts_at: 120,
        initiated: Initiated::Before,
    },
    Call {
        label: "call 1's patient called again 6 minutes later, for a new intake",
        patient_phone: Some("(555) 010-4477"),
        dialled: "+15550104477",
        seconds: 120,
        starts_at: 360,
        initiated: Initiated::Before,
    },
];

/// The organization's own number: ZScribe dials from it (`from`).
const ORGANIZATION_NUMBER: &str = "+15550001000";

/// Which PostgreSQL the demo runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Server {
    /// This server, named with `--database-url` or `DATABASE_URL`; failing
    /// to reach it is an error.
    Url(String),
    /// A throwaway cluster, asked for with `--embedded-postgres`.
    Embedded,
    /// No server named: a throwaway cluster too. The demo drops and
    /// recreates its database, so it never does that on a server nobody
    /// named (127.0.0.1:5432 may be shared).
    Unnamed,
}

impl Server {
    /// `--embedded-postgres` wins over any URL; then `--database-url`;
    /// then `DATABASE_URL`, unless it is the default address that
    /// `.cargo/config.toml` gives every `cargo run` (not a choice anyone
    /// made); else a throwaway cluster.
    pub fn choose(flag: Option<String>, env: Option<String>, embedded: bool) -> Self {
        match (flag, env) {
            _ if embedded => Server::Embedded,
            (Some(url), _) => Server::Url(url),
            (None, Some(url)) if !url.is_empty() && url != DEFAULT_SERVER => Server::Url(url),
            _ => Server::Unnamed,
        }
    }
}

pub struct Options {
    pub server: Server,
    pub database: String,
    /// Leave the stand-ins and the playback server running, until a signal.
    pub keep: bool,
    /// With `keep`, place another call this often (traffic for graphs:
    /// `scripts/ops-screenshots`).
    pub keep_calling: Option<Duration>,
    /// Where the daemon's own log lines went (`None`: to stderr).
    pub log_file: Option<PathBuf>,
}

/// The server's URL, and the cluster when the demo made one.
async fn open_server(server: Server) -> anyhow::Result<(String, Option<Cluster>)> {
    match server {
        Server::Url(url) => return Ok((url, None)),
        Server::Embedded => say("--embedded-postgres: using a throwaway PostgreSQL cluster"),
        Server::Unnamed => say(
            "no server named: using a throwaway PostgreSQL cluster (--database-url or DATABASE_URL names one to use instead)",
        ),
    }
    let started = Instant::now();
    let cluster = Cluster::start()
        .await
        .context("starting a throwaway PostgreSQL (demo --embedded-postgres)")?;
    say(&format!(
        "throwaway cluster ready in {:.1} s: {}, server binaries from {}, unix socket only; removed when the demo ends",
        started.elapsed().as_secs_f64(),
        cluster.path().display(),
        cluster.bindir().display()
    ));
    Ok((cluster.server_url(), Some(cluster)))
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let database = options.database.as_str();
    anyhow::ensure!(
        !database.is_empty()
            && database
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "--database-name takes letters, digits and underscores"
    );
    match &options.log_file {
        Some(path) => say(&format!(
            "the daemon's own log lines go to {} (--verbose shows them here)",
            path.display()
        )),
        None => say("the daemon's own log lines go to stderr (--verbose)"),
    }
    let (server_url, cluster) = open_server(options.server.clone()).await?;
    let outcome = run_on(&server_url, cluster.as_ref(), &options).await;
    if let Some(cluster) = cluster {
        let path = cluster.path().to_owned();
        cluster.stop().await?;
        say(&format!(
            "throwaway cluster stopped and {} removed",
            path.display()
        ));
    }
    outcome
}

async fn run_on(
    server_url: &str,
    cluster: Option<&Cluster>,
    options: &Options,
) -> anyhow::Result<()> {
    let database = options.database.as_str();
    say(&format!(
        "database: recreating {database} on {}",
        match cluster {
            Some(_) => "the throwaway cluster".to_owned(),
            None => format!("the server of {}", redact_db_url(server_url)),
        }
    ));
    let db_url = recreate_database(server_url, database).await?;
    let db_url = match cluster {
        Some(c) => c.database_url(database),
        None => db_url,
    };
    let setup_pool = PgPool::connect(&db_url)
        .await
        .context("connecting to the demo database")?;
    testing::create_host_schema(&setup_pool).await?;
    db::migrate(&setup_pool).await?;
    story::install(&setup_pool).await?;

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
    let jwt_secret = format!("demo-jwt-secret-{}", Uuid::new_v4().simple());
    let config = demo_config(&db_url, &key, &telnyx, &storage, &jwt_secret);
    recording_relay::cli::setup_bucket(&config).await?;

    let organization = Uuid::new_v4();
    let mut expected = Vec::new();
    let mut labels = HashMap::new();
    // Half an hour ago, so every call has ended (whole milliseconds, as
    // the API's timestamps have).
    let first_call = chrono::DateTime::from_timestamp_millis(
        (chrono::Utc::now() - chrono::Duration::minutes(30)).timestamp_millis(),
    )
    .context("the clock")?;
    for (n, call) in CALLS.iter().enumerate() {
        expected.push(prepare_call(&setup_pool, &telnyx, n, call, organization, first_call).await?);
        labels.insert(event_id(n), format!("call {}", n + 1));
    }

    let story_stop = CancellationToken::new();
    let (story, mut finished_jobs) = story::listen(&setup_pool, labels, story_stop.clone()).await?;

    let app = App::build(config.clone(), Role::Serve).await?;
    let addr = app.local_addr().context("listener address")?;
    let playback = app.playback_addr().context("playback address")?;
    let pipeline = Pipeline::from_config(&config)?;
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(app.run(pipeline, shutdown.clone()));
    say(&format!(
        "daemon listening on http://{addr}/webhooks/telnyx, playback API on http://{playback}"
    ));
    say(&format!(
        "sending {} calls ZScribe's way: call.initiated with X-Intake-Id (no client_state), and call.recording.saved; what happens to each job, as it happens:",
        CALLS.len()
    ));

    let http = reqwest::Client::new();
    let send = |event: serde_json::Value, what: String| {
        let http = http.clone();
        let key = key.clone();
        async move {
            let body = event.to_string().into_bytes();
            let mut req = http.post(format!("http://{addr}/webhooks/telnyx"));
            for (name, value) in testing::signature_headers(&key, testing::unix_now(), &body) {
                req = req.header(name, value);
            }
            let res = req.body(body).send().await?;
            if !res.status().is_success() {
                say(&format!("{what} answered {}", res.status()));
            }
            anyhow::Ok(())
        }
    };
    for (n, (call, (rec, intake))) in CALLS.iter().zip(&expected).enumerate() {
        let initiated = call_initiated(n, rec, *intake);
        let saved = recording_saved(n, rec);
        let told = format!("call {}: call.initiated", n + 1);
        let recorded = format!("call {}: call.recording.saved", n + 1);
        if call.initiated == Initiated::Before {
            send(initiated, told).await?;
            send(saved, recorded).await?;
        } else {
            send(saved, recorded).await?;
            send(initiated, told).await?;
        }
    }

    let finished = tokio::time::timeout(
        Duration::from_secs(120),
        finished_jobs.wait_for(|done| *done >= CALLS.len()),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    if !finished {
        say("timed out waiting for the jobs to finish");
    }
    story_stop.cancel();
    let _ = story.await;

    let token = user_token(&jwt_secret, organization, KEEP_TOKEN_LIFETIME)?;
    let ok = report(
        &setup_pool,
        &storage,
        &telnyx,
        &config,
        &expected,
        playback,
        &token,
    )
    .await?;

    if options.keep {
        if let Some((_, Some(intake))) = expected.first() {
            say(
                "--keep: the stand-ins, the daemon and the playback server stay up until Ctrl-C (SIGINT) or SIGTERM.",
            );
            say(
                "open this to listen to call 1 (a tick each second, a chime every ten, one low pip at each full minute):",
            );
            println!("\n    http://{playback}/play/{intake}#token={token}\n");
        }
        let signals = recording_relay::app::shutdown_on_signals();
        match options.keep_calling {
            Some(every) => {
                say(&format!(
                    "--keep-calling: another call every {} (each third one's recording webhook delivered twice), \
                     and the Telnyx stand-in answers one request in five with 503 (jobs retry)",
                    humantime::format_duration(every)
                ));
                telnyx.set_random_faults(0.2, vec![recording_relay_sim::Fault::Status(503)]);
                let calling = async {
                    for n in CALLS.len().. {
                        tokio::time::sleep(every).await;
                        let call = &CALLS[n % CALLS.len()];
                        // Its recording ended half a minute ago.
                        let first_call = chrono::Utc::now()
                            - chrono::Duration::seconds(call.starts_at)
                            - chrono::Duration::seconds(
                                i64::try_from(call.seconds).unwrap_or(0) + 30,
                            );
                        let (rec, intake) =
                            prepare_call(&setup_pool, &telnyx, n, call, organization, first_call)
                                .await?;
                        send(
                            call_initiated(n, &rec, intake),
                            format!("call {}: call.initiated", n + 1),
                        )
                        .await?;
                        let copies = if n % 3 == 0 { 2 } else { 1 };
                        for _ in 0..copies {
                            send(
                                recording_saved(n, &rec),
                                format!("call {}: call.recording.saved", n + 1),
                            )
                            .await?;
                        }
                    }
                    anyhow::Ok(())
                };
                tokio::select! {
                    () = signals.cancelled() => {}
                    result = calling => result?,
                }
            }
            None => signals.cancelled().await,
        }
        say("stopping");
    }
    shutdown.cancel();
    daemon.await??;
    stop.cancel();
    setup_pool.close().await;
    if !finished || !ok {
        bail!("the demo did not end as expected");
    }
    say("demo finished: every recording is stored once, verified, and linked or kept as unmatched");
    Ok(())
}

fn event_id(n: usize) -> String {
    format!("demo-event-{n}")
}

/// The `call.recording.saved` of call `n`, as Telnyx sends it.
fn recording_saved(n: usize, rec: &SimRecording) -> serde_json::Value {
    let mut event = testing::recording_saved_event(&event_id(n), &rec.call_session_id);
    event["data"]["payload"]["recording_started_at"] = rec.recording_started_at.to_rfc3339().into();
    event["data"]["payload"]["call_leg_id"] = rec.call_leg_id.clone().into();
    event
}

/// The `call.initiated` of call `n` as Telnyx sends it for a trunk call
/// LiveKit placed with `headers={"X-Intake-Id": …}`; without an intake,
/// no custom header at all.
fn call_initiated(n: usize, rec: &SimRecording, intake: Option<Uuid>) -> serde_json::Value {
    let mut event = testing::dialled_call_initiated_event(
        &format!("demo-initiated-{n}"),
        &rec.call_session_id,
        &intake.map(|i| i.to_string()).unwrap_or_default(),
        &rec.from,
        &rec.to,
    );
    let started = rec.recording_started_at - chrono::Duration::seconds(2);
    event["data"]["occurred_at"] = started.to_rfc3339().into();
    event["data"]["payload"]["start_time"] = started.to_rfc3339().into();
    event["data"]["payload"]["call_leg_id"] = rec.call_leg_id.clone().into();
    if intake.is_none() {
        event["data"]["payload"]["custom_headers"] = json!([]);
    }
    event
}

pub(crate) fn say(line: &str) {
    println!("demo: {line}");
}

/// Seconds as m:ss (h:mm:ss from an hour), as the player shows them.
pub fn m_ss(seconds: i64) -> String {
    let s = seconds.max(0);
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// An access token shaped like a signed-in Supabase user's, for the demo's
/// own organization.
fn user_token(secret: &str, organization: Uuid, lifetime: Duration) -> anyhow::Result<String> {
    let now = chrono::Utc::now().timestamp();
    let claims = json!({
        "sub": Uuid::new_v4(), "aud": "authenticated", "role": "authenticated",
        "iat": now, "exp": now + i64::try_from(lifetime.as_secs()).unwrap_or(3600),
        "app_metadata": {"organization_id": organization},
    });
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
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
    testing::recreate_database(&mut conn, database).await?;
    let _ = conn.close().await;
    Ok(testing::with_database(server_url, database))
}

fn demo_config(
    db_url: &str,
    key: &ed25519_dalek::SigningKey,
    telnyx: &TelnyxSim,
    storage: &StorageSim,
    jwt_secret: &str,
) -> Config {
    let mut c = Config::default();
    c.database.url = Some(db_url.to_owned().into());
    c.listener.addr = "127.0.0.1:0".parse().expect("static address");
    c.telnyx.public_key = Some(testing::public_key_base64(key));
    c.telnyx.api_key = Some("KEY_demo".to_owned().into());
    c.telnyx.api_url = telnyx.base_url();
    c.supabase.url = Some(storage.base_url());
    c.supabase.service_role_key = Some("demo-service-role-key".to_owned().into());
    c.playback.addr = Some("127.0.0.1:0".parse().expect("static address"));
    c.playback.jwt_secret = Some(jwt_secret.to_owned().into());
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
    organization: Uuid,
    first_call: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<(SimRecording, Option<Uuid>)> {
    let mut rec = SimRecording::sample(format!(
        "rec-{}-{}",
        n + 1,
        &Uuid::new_v4().simple().to_string()[..8]
    ));
    rec.to = call.dialled.to_owned();
    rec.from = ORGANIZATION_NUMBER.to_owned();
    rec.duration_millis = call.seconds * 1000;
    // The calls of the last half hour, in the order of `CALLS`.
    let seconds = i64::try_from(call.seconds).unwrap_or(0);
    rec.recording_started_at = first_call + chrono::Duration::seconds(call.starts_at);
    rec.recording_ended_at = rec.recording_started_at + chrono::Duration::seconds(seconds);
    rec.created_at = rec.recording_ended_at + chrono::Duration::seconds(2);
    rec.content = audio::timed_tones(call.seconds, u32::try_from(n + 1).unwrap_or(1));
    let intake = match call.patient_phone {
        Some(phone) => {
            // A patient called twice is one patient with two intakes.
            let known: Option<Uuid> = sqlx::query_scalar(
                "SELECT id FROM public.patients WHERE organization_id = $1 AND phone = $2",
            )
            .bind(organization)
            .bind(phone)
            .fetch_optional(pool)
            .await?;
            let patient: Uuid = match known {
                Some(id) => id,
                None => {
                    sqlx::query_scalar(
                        "INSERT INTO public.patients (organization_id, name, phone) VALUES ($1, $2, $3) RETURNING id",
                    )
                    .bind(organization)
                    .bind(format!("Demo patient {}", n + 1))
                    .bind(phone)
                    .fetch_one(pool)
                    .await?
                }
            };
            let intake: Uuid = sqlx::query_scalar(
                "INSERT INTO public.intakes (patient_id, organization_id, room_name, created_at)
                 VALUES ($1, $2, $3, $4 - interval '20 seconds') RETURNING id",
            )
            .bind(patient)
            .bind(organization)
            .bind(format!("intake-demo-{}", n + 1))
            .bind(rec.recording_started_at)
            .fetch_one(pool)
            .await?;
            Some(intake)
        }
        None => None,
    };
    say(&format!(
        "call {}: {}, patient {}, {:.1} MB at Telnyx{}",
        n + 1,
        call.label,
        mask_phone(call.dialled),
        rec.content.len() as f64 / 1e6,
        match intake {
            Some(i) => format!(", intake {}", &i.simple().to_string()[..8]),
            None => String::new(),
        }
    ));
    telnyx.add_recording(rec.clone());
    Ok((rec, intake))
}

/// One row of the final table, and whether it is what the demo expects.
struct Row {
    call: usize,
    intake: String,
    recording: String,
    duration: String,
    state: String,
    object: String,
    sha256: &'static str,
    /// How the job found its intake (`match_method`).
    method: String,
    ok: bool,
}

/// Prints the table of what happened to each call, checked against the
/// source, then plays the first recording through the playback API.
async fn report(
    pool: &PgPool,
    storage: &StorageSim,
    telnyx: &TelnyxSim,
    config: &Config,
    expected: &[(SimRecording, Option<Uuid>)],
    playback: SocketAddr,
    token: &str,
) -> anyhow::Result<bool> {
    let mut rows = Vec::new();
    for (n, (rec, intake)) in expected.iter().enumerate() {
        let job: Option<Job> =
            sqlx::query_as("SELECT * FROM recording_relay.recording_jobs WHERE event_id = $1")
                .bind(event_id(n))
                .fetch_optional(pool)
                .await?;
        let Some(job) = job else {
            rows.push(Row {
                call: n + 1,
                intake: "-".into(),
                recording: rec.id.clone(),
                duration: "-".into(),
                state: "no job".into(),
                object: "-".into(),
                sha256: "-",
                method: "-".into(),
                ok: false,
            });
            continue;
        };
        let path = job.object_path.clone().unwrap_or_default();
        let stored = storage.object(config.supabase.bucket.as_str(), &path);
        let source = rec.content.sha256_hex();
        let same_bytes = stored.as_ref().is_some_and(|o| o.sha256_hex == source)
            && job.object_sha256.as_deref() == Some(source.as_str());
        let uploads = stored.as_ref().map_or(0, |o| o.upload_count);
        let wanted = if intake.is_some() {
            JobState::Succeeded
        } else {
            JobState::Unmatched
        };
        let linked: Option<i32> = sqlx::query_scalar(
            "SELECT recording_duration FROM public.intakes WHERE recording_id = $1",
        )
        .bind(&rec.id)
        .fetch_optional(pool)
        .await?
        .flatten();
        let ok = job.state == wanted
            && same_bytes
            && uploads == 1
            && job.intake_id == *intake
            && (intake.is_none() || linked.is_some());
        rows.push(Row {
            call: n + 1,
            intake: job
                .intake_id
                .map_or("-".to_owned(), |i| i.simple().to_string()[..8].to_owned()),
            recording: job.recording_id.clone().unwrap_or_else(|| "-".to_owned()),
            duration: job
                .call
                .duration_millis
                .map_or("-".to_owned(), |ms| m_ss(ms / 1000)),
            state: job.state.as_str().to_owned(),
            object: if path.is_empty() {
                "-".to_owned()
            } else {
                path
            },
            sha256: match (stored.is_some(), same_bytes) {
                (false, _) => "-",
                (true, true) => "matches",
                (true, false) => "DIFFERS",
            },
            method: job.match_method.clone().unwrap_or_else(|| "-".to_owned()),
            ok,
        });
        if uploads > 1 {
            say(&format!("call {}: uploaded {uploads} times", n + 1));
        }
    }
    print_table(&rows);
    let mut ok = rows.iter().all(|r| r.ok);
    // The twice-called patient: each recording on the intake its call named.
    if let (Some(first), Some(again)) = (rows.first(), rows.get(3))
        && first.ok
        && again.ok
        && first.intake != again.intake
    {
        // Said as it happened: by the header, or (a daemon that does not
        // read it) by phone number and time, which the nearer-intake rule
        // happened to settle.
        say(&format!(
            "calls 1 and 4 called the same patient six minutes apart: each recording is on the intake its call.initiated named in X-Intake-Id, {} and {} (matched by {} and {})",
            first.intake, again.intake, first.method, again.method
        ));
    }

    let deleted = telnyx.deleted_ids().len();
    say(&format!(
        "deleted at Telnyx after verification: {deleted} of {} (unmatched ones are kept)",
        expected.len()
    ));
    ok &= deleted == expected.iter().filter(|(_, i)| i.is_some()).count();

    // Playback as the UI does it: the API signs a URL for a signed-in user
    // of the intake's organization, and the URL honours Range (seeking).
    if let Some((_, Some(intake))) = expected.first() {
        let http = reqwest::Client::new();
        let body: serde_json::Value = http
            .get(format!("http://{playback}/v1/intakes/{intake}/recording"))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let url = body["url"].as_str().unwrap_or_default();
        let res = http.get(url).header("range", "bytes=0-1023").send().await?;
        say(&format!(
            "playback API: call 1 is {}, {}; its signed URL answers {} to a Range request (what <audio> seeking needs)",
            body["status"].as_str().unwrap_or("?"),
            body["duration_seconds"]
                .as_i64()
                .map_or("-".to_owned(), m_ss),
            res.status()
        ));
        ok &= res.status() == reqwest::StatusCode::PARTIAL_CONTENT;
    }
    Ok(ok)
}

fn print_table(rows: &[Row]) {
    let header = [
        "call",
        "intake",
        "recording",
        "duration",
        "state",
        "object",
        "SHA-256",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.call.to_string(),
                r.intake.clone(),
                r.recording.clone(),
                r.duration.clone(),
                r.state.clone(),
                r.object.clone(),
                r.sha256.to_owned(),
            ]
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cols: Vec<&str>| {
        let padded: Vec<String> = cols
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("  {}", padded.join("  ").trim_end());
    };
    println!();
    line(header.to_vec());
    line(
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
    );
    for c in &cells {
        line(c.iter().map(String::as_str).collect());
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_named_server_is_used_and_the_default_address_is_not_a_name() {
        let other = "postgres://demo@db.example:5432/postgres".to_owned();
        let default = DEFAULT_SERVER.to_owned();
        assert_eq!(Server::choose(None, None, false), Server::Unnamed);
        // What cargo passes every `cargo run` (.cargo/config.toml).
        assert_eq!(
            Server::choose(None, Some(default.clone()), false),
            Server::Unnamed
        );
        assert_eq!(
            Server::choose(None, Some(String::new()), false),
            Server::Unnamed
        );
        assert_eq!(
            Server::choose(None, Some(other.clone()), false),
            Server::Url(other.clone())
        );
        // Named on the command line, even the default address is a choice.
        assert_eq!(
            Server::choose(Some(default.clone()), None, false),
            Server::Url(default)
        );
        assert_eq!(
            Server::choose(Some(other.clone()), Some(other), true),
            Server::Embedded
        );
    }

    #[test]
    fn durations_read_as_the_player_shows_them() {
        assert_eq!(m_ss(0), "0:00");
        assert_eq!(m_ss(75), "1:15");
        assert_eq!(m_ss(720), "12:00");
        assert_eq!(m_ss(3725), "1:02:05");
    }
}
