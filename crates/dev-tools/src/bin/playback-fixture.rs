//! `playback-fixture`: the real `recording-relay serve` binary with the
//! playback API on, over a fresh database holding one intake in each state
//! the API reports, for `scripts/contract-test` (schemathesis against
//! `docs/openapi.json`).
//!
//! It recreates the `recording_relay_contract` database on DATABASE_URL's
//! server (the host schema and the migrations), starts the Supabase Storage
//! stand-in in-process with one stored recording, starts the binary, waits
//! for its playback address to answer, and writes what a client needs as
//! one JSON object to `--ready-file` (written whole, then renamed):
//!
//! ```json
//! {"base_url": "http://127.0.0.1:…", "token": "…", "intakes": {"available": "…", …},
//!  "bad_tokens": {"expired": "…", …}}
//! ```
//!
//! It then runs until SIGTERM or SIGINT, stops the binary and drops the
//! database. Nothing here is a credential outside this run: the JWT secret
//! and the service key are made up for it.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use recording_relay::config::Config;
use recording_relay::providers::storage_api::StorageClient;
use recording_relay_sim::{StorageSim, StorageSimConfig};
use recording_relay_test_kit as testing;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const DATABASE: &str = "recording_relay_contract";
const SERVICE_KEY: &str = "contract-service-role-key";
/// The stored recording's length, in seconds (8 kHz 16-bit mono WAV).
const SECONDS: u64 = 3;

#[derive(Debug, Parser)]
#[command(name = "playback-fixture")]
struct Args {
    /// The server to (re)create the `recording_relay_contract` database on.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// The daemon binary to run.
    #[arg(long, default_value = "target/release/recording-relay")]
    binary: PathBuf,
    /// Where the JSON object for the client goes once the API answers.
    #[arg(long)]
    ready_file: PathBuf,
    /// Where the daemon's log lines go.
    #[arg(long)]
    log_file: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("playback-fixture: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("playback-fixture: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut admin = PgConnection::connect(&args.database_url)
        .await
        .context("connecting to DATABASE_URL's server")?;
    testing::recreate_database(&mut admin, DATABASE).await?;
    let outcome = serve(&args).await;
    // Whatever happened, the database goes (the daemon has stopped by now).
    testing::drop_database(&mut admin, DATABASE).await?;
    outcome
}

async fn serve(args: &Args) -> anyhow::Result<()> {
    let db_url = testing::with_database(&args.database_url, DATABASE);
    let pool = PgPool::connect(&db_url).await?;
    testing::create_host_schema(&pool).await?;
    recording_relay::db::migrate(&pool).await?;

    let stop = CancellationToken::new();
    let data_dir = tempfile::tempdir()?;
    let storage = StorageSim::start(StorageSimConfig {
        service_key: SERVICE_KEY.to_owned(),
        data_dir: Some(data_dir.path().to_owned()),
        cancel: stop.child_token(),
        ..StorageSimConfig::default()
    })?;
    let playback = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let jwt_secret = format!("contract-jwt-secret-{}", Uuid::new_v4().simple());
    let key = testing::signing_key();
    let config_text = format!(
        "# Written by playback-fixture.\n\
         [database]\nurl = {db}\nmax_connections = 4\n\n\
         [listener]\naddr = \"127.0.0.1:0\"\n\n\
         [telnyx]\npublic_key = {public}\napi_key = \"KEY_contract\"\n\n\
         [supabase]\nurl = {storage}\nservice_role_key = {service}\n\n\
         [playback]\naddr = \"{playback}\"\njwt_secret = {secret}\n",
        db = toml_string(&db_url),
        public = toml_string(&testing::public_key_base64(&key)),
        storage = toml_string(&storage.base_url()),
        service = toml_string(SERVICE_KEY),
        secret = toml_string(&jwt_secret),
    );
    let config = Config::from_toml(&config_text)
        .map_err(|e| anyhow::anyhow!("the fixture's config: {e}"))?;
    recording_relay::cli::setup_bucket(&config).await?;

    let organization = Uuid::new_v4();
    let intakes = seed(&pool, &config, organization).await?;
    let config_dir = tempfile::tempdir()?;
    let config_path = config_dir.path().join("config.toml");
    std::fs::write(&config_path, &config_text)?;
    let mut daemon = start_daemon(&args.binary, &config_path, &args.log_file)?;
    let base_url = format!("http://{playback}");
    wait_until_up(&mut daemon, &base_url).await?;

    let claims = |org: Value, role: &str, expires_in: i64| {
        let now = chrono::Utc::now().timestamp();
        json!({
            "sub": Uuid::new_v4(), "aud": "authenticated", "role": role,
            "iat": now, "exp": now + expires_in,
            "app_metadata": {"organization_id": org},
        })
    };
    let org = json!(organization);
    let ready = json!({
        "base_url": base_url,
        "token": sign(&claims(org.clone(), "authenticated", 3 * 3600), &jwt_secret)?,
        "intakes": intakes,
        // Each is answered 401, except no_organization (403).
        "bad_tokens": {
            "expired": sign(&claims(org.clone(), "authenticated", -3600), &jwt_secret)?,
            "wrong_secret": sign(&claims(org.clone(), "authenticated", 3600), "not-the-project-secret-at-all-0000")?,
            "anon_role": sign(&claims(org.clone(), "anon", 3600), &jwt_secret)?,
            "no_organization": sign(&claims(Value::Null, "authenticated", 3600), &jwt_secret)?,
            "garbage": "not.a.jwt",
        },
    });
    let partial = args.ready_file.with_extension("partial");
    std::fs::write(&partial, serde_json::to_vec_pretty(&ready)?)?;
    std::fs::rename(&partial, &args.ready_file)?;

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let outcome = tokio::select! {
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
        status = daemon.wait() => Err(anyhow::anyhow!(
            "the daemon exited while under test ({}); see {}",
            status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
            args.log_file.display()
        )),
    };
    stop_daemon(&mut daemon).await;
    stop.cancel();
    pool.close().await;
    outcome
}

fn toml_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

fn sign(claims: &Value, secret: &str) -> anyhow::Result<String> {
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// One intake of `organization` per state, and one of another organization
/// (answered 404 as if unknown). The available one is linked the way the
/// relay links it (`recording_links` and the intake's column agree, in the
/// intake's own folder) and its object is in storage.
async fn seed(pool: &PgPool, config: &Config, organization: Uuid) -> anyhow::Result<Value> {
    let intake = |org: Uuid| async move {
        sqlx::query_scalar::<_, Uuid>(
            "INSERT INTO public.intakes (organization_id, room_name) VALUES ($1, 'room') RETURNING id",
        )
        .bind(org)
        .fetch_one(pool)
        .await
    };
    let available = intake(organization).await?;
    let path = format!("intakes/{available}/rec-contract.wav");
    let audio = wav(SECONDS);
    let length = audio.len() as u64;
    StorageClient::from_config(config)?
        .upload(&path, "audio/wav", audio.into(), Some(length))
        .await?;
    sqlx::query(
        "UPDATE public.intakes SET recording_id = 'rec-contract', recording_object_path = $2,
             recording_duration = $3 WHERE id = $1",
    )
    .bind(available)
    .bind(&path)
    .bind(SECONDS as i32)
    .execute(pool)
    .await?;
    sqlx::query(
        "INSERT INTO recording_relay.recording_links (intake_id, recording_id, object_path)
         VALUES ($1, 'rec-contract', $2)",
    )
    .bind(available)
    .bind(&path)
    .execute(pool)
    .await?;

    let processing = intake(organization).await?;
    job_for(pool, processing, "pending").await?;
    let failed = intake(organization).await?;
    job_for(pool, failed, "failed").await?;
    let claimed = intake(organization).await?;
    sqlx::query("UPDATE public.intakes SET recording_id = 'rec-on-its-way' WHERE id = $1")
        .bind(claimed)
        .execute(pool)
        .await?;
    let none = intake(organization).await?;
    let other_organization = intake(Uuid::new_v4()).await?;
    Ok(json!({
        "available": available, "processing": processing, "claimed": claimed,
        "failed": failed, "none": none, "other_organization": other_organization,
    }))
}

/// A job row for `intake` in `state` that no worker picks up (due in a day).
async fn job_for(pool: &PgPool, intake: Uuid, state: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO recording_relay.recording_jobs (event_id, event_type, event, state, attempts,
             last_error, finished_at, next_run_at, intake_id, matched_at, match_method)
         VALUES ($1, 'call.recording.saved', '{}', $2::recording_relay.recording_job_state,
             CASE WHEN $2 = 'pending' THEN 0 ELSE 1 END,
             CASE WHEN $2 = 'failed' THEN 'recording not found at Telnyx (404)' END,
             CASE WHEN $2 = 'failed' THEN now() END,
             now() + interval '1 day', $3, now(), 'client_state')",
    )
    .bind(format!("ev-{intake}"))
    .bind(state)
    .bind(intake)
    .execute(pool)
    .await?;
    Ok(())
}

/// `seconds` of silence as an 8 kHz 16-bit mono WAV.
fn wav(seconds: u64) -> Vec<u8> {
    let data = (seconds * 16_000) as u32;
    let mut w = Vec::with_capacity(44 + data as usize);
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes()); // PCM
    w.extend_from_slice(&1u16.to_le_bytes()); // mono
    w.extend_from_slice(&8_000u32.to_le_bytes());
    w.extend_from_slice(&16_000u32.to_le_bytes()); // bytes per second
    w.extend_from_slice(&2u16.to_le_bytes()); // block align
    w.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data.to_le_bytes());
    w.resize(44 + data as usize, 0);
    w
}

fn start_daemon(binary: &Path, config: &Path, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    Command::new(binary)
        .arg("--config")
        .arg(config)
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))
}

/// Polls `/healthz` until it answers 200; fails when the daemon exits or
/// 30 s pass.
async fn wait_until_up(daemon: &mut Child, base_url: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if let Some(status) = daemon.try_wait()? {
            bail!("the daemon exited at start-up ({status})");
        }
        let res = client
            .get(format!("{base_url}/healthz"))
            .timeout(Duration::from_secs(1))
            .send()
            .await;
        if res.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the playback API did not answer within 30 s")
}

/// SIGTERM (the daemon drains and exits), SIGKILL after 10 s.
async fn stop_daemon(daemon: &mut Child) {
    if let Some(pid) = daemon
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    if tokio::time::timeout(Duration::from_secs(10), daemon.wait())
        .await
        .is_err()
    {
        let _ = daemon.kill().await;
    }
}
