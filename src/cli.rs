//! Command line: subcommands, and mapping failures to exit codes
//! (0 clean shutdown, 2 bad configuration or usage, 1 runtime failure).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::app::{self, App, AppError, NoJobs};
use crate::config::{Config, ConfigError, ProcessEnv, Role};
use crate::db;
use crate::jobs::{Job, JobState, Queue};
use crate::pipeline::Pipeline;
use crate::providers::storage_api::{BucketSpec, RECORDINGS_BUCKET, StorageClient};
use crate::telemetry::LogFormat;
use crate::telemetry::mask_phone;

#[derive(Debug, Parser)]
#[command(
    name = "recording-relay",
    version,
    about = "Relays Telnyx call recordings into private Supabase Storage"
)]
pub struct Cli {
    /// Config file (default /etc/recording-relay/config.toml when it exists).
    #[arg(long, global = true, env = "RECORDING_RELAY_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Webhook listener and worker in one process (the default).
    Serve,
    /// Webhook listener only.
    Listen,
    /// Worker only.
    Work,
    /// Apply database migrations and exit.
    Migrate,
    /// Create the private recordings bucket (or check the existing one).
    SetupBucket {
        /// Largest object the bucket accepts, in bytes (Supabase's free plan
        /// allows 50 MB in all).
        #[arg(long, default_value_t = RECORDINGS_BUCKET.file_size_limit)]
        file_size_limit: u64,
    },
    /// Validate the configuration and test every dependency (one line each).
    Check {
        #[arg(long)]
        json: bool,
    },
    /// Enqueue recordings Telnyx made in a recent window that no job knows
    /// about (missed webhooks). Safe to run repeatedly.
    Reconcile {
        /// How far back to look, e.g. 24h, 3d.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        since: std::time::Duration,
        #[arg(long)]
        json: bool,
    },
    /// Inspect and act on jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Who was handed a playback URL: newest first, by intake or by user.
    Audit {
        #[arg(long, required_unless_present = "user", conflicts_with = "user")]
        intake: Option<uuid::Uuid>,
        /// The user's id (the token's `sub`).
        #[arg(long)]
        user: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Newest jobs first.
    List {
        #[arg(long, value_parser = parse_state)]
        state: Option<JobState>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// One job with its error history.
    Show {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Make a failed, cancelled or unmatched job runnable now.
    Requeue {
        #[arg(required_unless_present = "all_failed", conflicts_with = "all_failed")]
        id: Option<i64>,
        /// Requeue every failed job.
        #[arg(long)]
        all_failed: bool,
    },
    /// Stop a job.
    Cancel { id: i64 },
    /// Attach an unmatched recording to an intake and link it.
    Attach { id: i64, intake: uuid::Uuid },
}

fn parse_state(s: &str) -> Result<JobState, String> {
    JobState::ALL
        .into_iter()
        .find(|state| state.as_str() == s)
        .ok_or_else(|| {
            let names: Vec<_> = JobState::ALL.iter().map(|s| s.as_str()).collect();
            format!("unknown state {s:?}; one of {}", names.join(", "))
        })
}

/// Why the process ends unsuccessfully.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Runtime(#[from] anyhow::Error),
}

impl Failure {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Failure::Config(_) => ExitCode::from(2),
            Failure::Runtime(_) => ExitCode::from(1),
        }
    }
}

impl From<AppError> for Failure {
    fn from(e: AppError) -> Self {
        match e {
            AppError::Config(msg) => Failure::Config(ConfigError::Invalid(vec![msg])),
            other => Failure::Runtime(other.into()),
        }
    }
}

impl Command {
    fn role(&self) -> Role {
        match self {
            Command::Serve => Role::Serve,
            Command::Listen => Role::Listen,
            Command::Work => Role::Work,
            Command::Migrate | Command::Jobs(_) | Command::Audit { .. } => Role::Admin,
            Command::Reconcile { .. } => Role::Reconcile,
            Command::Check { .. } => Role::Own,
            Command::SetupBucket { .. } => Role::Storage,
        }
    }
}

pub fn load_config(cli: &Cli) -> Result<Config, ConfigError> {
    Config::load(cli.config.as_deref(), &ProcessEnv)
}

/// Runs the chosen subcommand to completion.
pub async fn run(cli: Cli, config: Config) -> Result<(), Failure> {
    let command = cli.command.unwrap_or(Command::Serve);
    let role = command.role();
    config.validate(role)?;
    match command {
        Command::SetupBucket { file_size_limit } => ensure_bucket(&config, file_size_limit)
            .await
            .map_err(Failure::Runtime),
        Command::Check { json } => {
            let checks = crate::ops::check::run(&config).await;
            print_checks(&checks, json);
            if checks.iter().all(|c| c.ok) {
                Ok(())
            } else {
                Err(Failure::Runtime(anyhow::anyhow!(
                    "{} of {} checks failed",
                    checks.iter().filter(|c| !c.ok).count(),
                    checks.len()
                )))
            }
        }
        Command::Reconcile { since, json } => {
            let pool = db::pool(&config).map_err(anyhow::Error::from)?;
            let telnyx = crate::providers::telnyx_api::TelnyxClient::from_config(&config)
                .map_err(anyhow::Error::from)?;
            let report = crate::ops::reconcile::reconcile(
                &Queue::new(pool),
                &telnyx,
                since,
                config.retry.max_attempts,
            )
            .await
            .map_err(anyhow::Error::from)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                println!(
                    "listed {} recording(s) from the last {}: {} already known, {} enqueued",
                    report.listed,
                    humantime::format_duration(since),
                    report.known,
                    report.enqueued.len()
                );
                for id in &report.enqueued {
                    println!("  enqueued {id}");
                }
            }
            Ok(())
        }
        Command::Jobs(jobs) => {
            let pool = db::pool(&config).map_err(anyhow::Error::from)?;
            run_jobs(&Queue::new(pool), jobs)
                .await
                .map_err(Failure::Runtime)
        }
        Command::Audit {
            intake,
            user,
            limit,
            json,
        } => {
            let filter = match (intake, user) {
                (Some(id), _) => crate::playback::audit::Filter::Intake(id),
                (None, Some(sub)) => crate::playback::audit::Filter::User(sub),
                (None, None) => unreachable!("clap requires --intake or --user"),
            };
            let pool = db::pool(&config).map_err(anyhow::Error::from)?;
            let entries = crate::playback::audit::list(&pool, &filter, limit)
                .await
                .map_err(anyhow::Error::from)?;
            print_audit(&entries, json);
            Ok(())
        }
        Command::Migrate => {
            db::check_session(&config)
                .await
                .map_err(anyhow::Error::from)?;
            let pool = db::migration_pool(&config).map_err(anyhow::Error::from)?;
            db::migrate(&pool).await.map_err(anyhow::Error::from)?;
            Ok(())
        }
        Command::Listen => {
            let shutdown = app::shutdown_on_signals();
            let app = App::build(config, role).await?;
            app.run(NoJobs, shutdown).await?;
            Ok(())
        }
        Command::Serve | Command::Work => {
            let shutdown = app::shutdown_on_signals();
            let handler = Pipeline::from_config(&config).map_err(anyhow::Error::from)?;
            let app = App::build(config, role).await?;
            app.run(handler, shutdown).await?;
            Ok(())
        }
    }
}

/// The bucket the daemon needs: [`RECORDINGS_BUCKET`].
pub async fn setup_bucket(config: &Config) -> anyhow::Result<()> {
    ensure_bucket(config, RECORDINGS_BUCKET.file_size_limit).await
}

async fn ensure_bucket(config: &Config, file_size_limit: u64) -> anyhow::Result<()> {
    let client = StorageClient::from_config(config)?;
    let id = client.bucket().to_owned();
    match client.get_bucket(&id).await? {
        Some(bucket) if bucket.public => anyhow::bail!(
            "bucket {id} exists but is public: anyone with a URL could play patient recordings; \
             make it private in the Supabase dashboard"
        ),
        Some(bucket) => {
            println!(
                "bucket {id} exists and is private (file size limit: {}, mime types: {})",
                bucket
                    .file_size_limit
                    .map_or("project default".to_owned(), |l| l.to_string()),
                bucket
                    .allowed_mime_types
                    .map_or("any".to_owned(), |m| m.join(", "))
            );
        }
        None => {
            let spec = BucketSpec {
                file_size_limit,
                ..RECORDINGS_BUCKET
            };
            client.create_bucket(&spec.bucket(&id)).await?;
            println!(
                "created private bucket {id} (file size limit {file_size_limit} bytes, audio only)"
            );
        }
    }
    Ok(())
}

fn print_checks(checks: &[crate::ops::check::Check], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(checks).unwrap_or_default()
        );
        return;
    }
    for c in checks {
        println!(
            "{:<4}  {:<10}  {}",
            if c.ok { "ok" } else { "FAIL" },
            c.name,
            c.detail
        );
    }
}

async fn run_jobs(queue: &Queue, command: JobsCommand) -> anyhow::Result<()> {
    match command {
        JobsCommand::List { state, limit, json } => {
            let jobs = queue.list(state, limit).await?;
            if json {
                let views: Vec<_> = jobs.iter().map(JobView::from).collect();
                println!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                print_job_table(&jobs);
            }
        }
        JobsCommand::Show { id, json } => {
            let job = queue
                .get(id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("job {id} not found"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&JobView::from(&job))?);
            } else {
                print_job(&job);
            }
        }
        JobsCommand::Requeue { id: Some(id), .. } => {
            queue.requeue(id).await?;
            println!("job {id} requeued");
        }
        JobsCommand::Requeue { id: None, .. } => {
            let n = queue.requeue_failed().await?;
            println!("{n} failed job(s) requeued");
        }
        JobsCommand::Cancel { id } => {
            queue.cancel(id).await?;
            println!("job {id} cancelled");
        }
        JobsCommand::Attach { id, intake } => {
            queue.attach(id, intake).await?;
            println!("job {id} attached to intake {intake}; a worker links it now");
        }
    }
    Ok(())
}

/// A job as the CLI shows it: phone numbers masked (the full ones are in
/// the table for whoever has SQL access).
#[derive(serde::Serialize)]
struct JobView<'a> {
    id: i64,
    event_id: &'a str,
    state: JobState,
    attempts: i32,
    max_attempts: i32,
    recording_id: Option<&'a str>,
    call_session_id: Option<&'a str>,
    intake_id: Option<uuid::Uuid>,
    match_method: Option<&'a str>,
    from: Option<String>,
    to: Option<String>,
    duration_millis: Option<i64>,
    object_path: Option<&'a str>,
    object_size: Option<i64>,
    object_sha256: Option<&'a str>,
    next_run_at: chrono::DateTime<chrono::Utc>,
    locked_by: Option<&'a str>,
    locked_until: Option<chrono::DateTime<chrono::Utc>>,
    last_error: Option<&'a str>,
    errors: &'a serde_json::Value,
    created_at: chrono::DateTime<chrono::Utc>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl<'a> From<&'a Job> for JobView<'a> {
    fn from(j: &'a Job) -> Self {
        Self {
            id: j.id,
            event_id: &j.event_id,
            state: j.state,
            attempts: j.attempts,
            max_attempts: j.max_attempts,
            recording_id: j.recording_id.as_deref(),
            call_session_id: j.call.call_session_id.as_deref(),
            intake_id: j.intake_id,
            match_method: j.match_method.as_deref(),
            from: j.call.from_number.as_deref().map(mask_phone),
            to: j.call.to_number.as_deref().map(mask_phone),
            duration_millis: j.call.duration_millis,
            object_path: j.object_path.as_deref(),
            object_size: j.object_size,
            object_sha256: j.object_sha256.as_deref(),
            next_run_at: j.next_run_at,
            locked_by: j.locked_by.as_deref(),
            locked_until: j.locked_until,
            last_error: j.last_error.as_deref(),
            errors: &j.errors,
            created_at: j.created_at,
            finished_at: j.finished_at,
        }
    }
}

fn print_audit(entries: &[crate::playback::audit::Entry], json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(entries).unwrap_or_default()
        );
        return;
    }
    if entries.is_empty() {
        println!("no playback URL was handed out for this");
        return;
    }
    println!(
        "{:<20} {:<36} {:<36} {:<15} object",
        "at (UTC)", "user", "intake", "client"
    );
    for e in entries {
        println!(
            "{:<20} {:<36} {:<36} {:<15} {}",
            e.at.format("%Y-%m-%d %H:%M:%S"),
            e.user_id,
            e.intake_id,
            e.client_addr.as_deref().unwrap_or("-"),
            e.object_path
        );
    }
}

fn print_job_table(jobs: &[Job]) {
    println!(
        "{:>8}  {:<10}  {:>5}  {:<38}  {:<20}  LAST ERROR",
        "ID", "STATE", "TRIES", "RECORDING", "UPDATED"
    );
    for j in jobs {
        let error: String = j
            .last_error
            .as_deref()
            .unwrap_or("")
            .chars()
            .take(60)
            .collect();
        println!(
            "{:>8}  {:<10}  {:>2}/{:<2}  {:<38}  {:<20}  {error}",
            j.id,
            j.state.as_str(),
            j.attempts,
            j.max_attempts,
            j.recording_id.as_deref().unwrap_or("-"),
            j.updated_at.format("%Y-%m-%d %H:%M:%S"),
        );
    }
}

fn print_job(j: &Job) {
    let v = JobView::from(j);
    let opt = |o: Option<&str>| o.unwrap_or("-").to_owned();
    let rows = [
        ("id", j.id.to_string()),
        ("event", j.event_id.clone()),
        ("state", j.state.as_str().to_owned()),
        ("attempts", format!("{}/{}", j.attempts, j.max_attempts)),
        ("recording", opt(j.recording_id.as_deref())),
        ("call session", opt(j.call.call_session_id.as_deref())),
        (
            "intake",
            j.intake_id.map_or("-".to_owned(), |i| i.to_string()),
        ),
        ("matched by", opt(j.match_method.as_deref())),
        (
            "from / to",
            format!(
                "{} / {}",
                v.from.unwrap_or_default(),
                v.to.unwrap_or_default()
            ),
        ),
        ("object", opt(j.object_path.as_deref())),
        // Where an attached recording was before its move into the
        // intake's folder; "(not deleted)" once linked without the
        // delete: an orphan when the job has finished.
        (
            "moved from",
            match (&j.moved_from, j.moved_from_deleted_at, j.linked_at) {
                (None, _, _) => "-".to_owned(),
                (Some(from), Some(_), _) => format!("{from} (deleted)"),
                (Some(from), None, Some(_)) => format!("{from} (not deleted)"),
                (Some(from), None, None) => from.clone(),
            },
        ),
        (
            "size / sha256",
            format!(
                "{} / {}",
                j.object_size.unwrap_or(0),
                opt(j.object_sha256.as_deref())
            ),
        ),
        ("next run", j.next_run_at.to_rfc3339()),
        (
            "lease",
            format!(
                "{} until {}",
                opt(j.locked_by.as_deref()),
                j.locked_until.map_or("-".into(), |t| t.to_rfc3339())
            ),
        ),
        ("last error", opt(j.last_error.as_deref())),
    ];
    for (k, v) in rows {
        println!("{k:>14}: {v}");
    }
    println!("{:>14}:", "history");
    for e in j.errors.as_array().into_iter().flatten() {
        println!(
            "    {}  attempt {}  {:<13} {}",
            e["at"].as_str().unwrap_or(""),
            e["attempt"].as_i64().map_or("-".into(), |a| a.to_string()),
            e["kind"].as_str().unwrap_or(""),
            e["error"].as_str().unwrap_or("")
        );
    }
}
