//! Command line: subcommands, and mapping failures to exit codes
//! (0 clean shutdown, 2 bad configuration or usage, 1 runtime failure), in
//! one place ([`Failure`]). The `jobs` subcommands are in `jobs.rs`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::app::{self, App, AppError, NoJobs};
use crate::config::{Config, ConfigError, ProcessEnv, Role};
use crate::db;
use crate::jobs::Queue;
use crate::pipeline::Pipeline;
use crate::providers::storage_api::{BucketSpec, RECORDINGS_BUCKET, StorageClient};
use crate::telemetry::LogFormat;

mod jobs;

pub use jobs::JobsCommand;
use jobs::run_jobs;

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
        /// What this host runs: a `listen`-only host needs no Telnyx API key
        /// or storage (unless it serves playback), a `work`-only host no
        /// public key.
        #[arg(long, value_enum, default_value = "serve")]
        role: CheckRole,
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
    #[command(group(clap::ArgGroup::new("whose").required(true).args(["intake", "user"])))]
    Audit {
        /// The intake's id.
        #[arg(long)]
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

/// The process `check` judges the configuration for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckRole {
    Serve,
    Listen,
    Work,
}

impl From<CheckRole> for Role {
    fn from(role: CheckRole) -> Self {
        match role {
            CheckRole::Serve => Role::Serve,
            CheckRole::Listen => Role::Listen,
            CheckRole::Work => Role::Work,
        }
    }
}

/// Why the process ends unsuccessfully.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Runtime(anyhow::Error),
}

impl Failure {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Failure::Config(_) => ExitCode::from(2),
            Failure::Runtime(_) => ExitCode::from(1),
        }
    }
}

/// The one place a failure becomes an exit code: a configuration the app
/// found wrong (an address, a URL) is a usage error like the ones
/// `Config::validate` finds; anything else is a runtime failure.
impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<AppError>() {
            Ok(AppError::Config(msg)) => Failure::Config(ConfigError::Invalid(vec![msg])),
            Ok(other) => Failure::Runtime(other.into()),
            Err(e) => Failure::Runtime(e),
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
    if matches!(role, Role::Serve | Role::Work) {
        for warning in config.warnings(role) {
            tracing::warn!("{warning}");
        }
    }
    execute(command, role, config).await.map_err(Failure::from)
}

/// The subcommand itself: any failure, with its causes, as `anyhow`; [`run`]
/// sorts it into an exit code once ([`Failure::from`]).
async fn execute(command: Command, role: Role, config: Config) -> anyhow::Result<()> {
    match command {
        Command::SetupBucket { file_size_limit } => ensure_bucket(&config, file_size_limit).await,
        Command::Check { json, role } => {
            let checks = crate::ops::check::run(&config, role.into()).await;
            print_checks(&checks, json);
            if checks.iter().all(|c| c.ok) {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "{} of {} checks failed",
                    checks.iter().filter(|c| !c.ok).count(),
                    checks.len()
                ))
            }
        }
        Command::Reconcile { since, json } => {
            let pool = db::pool(&config)?;
            let telnyx = crate::providers::telnyx_api::TelnyxClient::from_config(&config)?;
            let queue = Queue::new(pool);
            let mut report =
                crate::ops::reconcile::reconcile(&queue, &telnyx, since, config.retry.max_attempts)
                    .await?;
            let alerter = match config.pipeline.alert_webhook_url.as_deref() {
                Some(url) => Some(crate::ops::alerts::Alerter::new(
                    url,
                    config.http.request_timeout,
                )?),
                None => None,
            };
            report.overdue_calls = crate::ops::missing::check_overdue_calls(
                &queue,
                &telnyx,
                alerter.as_ref(),
                crate::ops::missing::Patience::from_config(&config.pipeline),
                config.retry.max_attempts,
            )
            .await?;
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
                let calls = &report.overdue_calls;
                println!(
                    "overdue calls: {} asked about at Telnyx, {} recording(s) enqueued, {} reported missing",
                    calls.asked,
                    calls.enqueued.len(),
                    calls.missing.len()
                );
                for id in &calls.enqueued {
                    println!("  enqueued {id}");
                }
                for session in &calls.missing {
                    println!("  missing: call session {session}");
                }
            }
            Ok(())
        }
        Command::Jobs(jobs) => {
            let pool = db::pool(&config)?;
            run_jobs(&Queue::new(pool), jobs).await
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
            let pool = db::pool(&config)?;
            let entries = crate::playback::audit::list(&pool, &filter, limit).await?;
            print_audit(&entries, json);
            Ok(())
        }
        Command::Migrate => {
            db::check_session(&config).await?;
            let pool = db::migration_pool(&config)?;
            let applied = db::migrate(&pool).await?;
            if applied.is_empty() {
                println!(
                    "nothing to apply: all {} migrations were applied already",
                    db::MIGRATOR.iter().count()
                );
            } else {
                println!("applied {} migration(s):", applied.len());
                for name in &applied {
                    println!("  {name}");
                }
            }
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
            let handler = Pipeline::from_config(&config)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// A usage error names every alternative, not only the first.
    #[test]
    fn a_missing_choice_names_every_alternative() {
        for (args, alternatives) in [
            (
                &["recording-relay", "jobs", "requeue"][..],
                ["<ID|--all-failed>", "--all-failed"],
            ),
            (&["recording-relay", "audit"][..], ["--intake", "--user"]),
        ] {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
            let text = err.to_string();
            for alternative in alternatives {
                assert!(text.contains(alternative), "{args:?}: {text}");
            }
        }
        // Both at once is refused too.
        for args in [
            &["recording-relay", "jobs", "requeue", "7", "--all-failed"][..],
            &[
                "recording-relay",
                "audit",
                "--intake",
                "7f1c2a4e-1d2b-4c3d-9e8f-001122334455",
                "--user",
                "u",
            ],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
        for args in [
            &["recording-relay", "jobs", "requeue", "7"][..],
            &["recording-relay", "jobs", "requeue", "--all-failed"],
            &["recording-relay", "audit", "--user", "u"],
        ] {
            assert!(Cli::try_parse_from(args).is_ok(), "{args:?}");
        }
    }

    /// The README's table of commands says what `jobs requeue` takes in
    /// the CLI's own words.
    #[test]
    fn the_readme_and_the_cli_agree_on_what_jobs_requeue_accepts() {
        let cli = Cli::command();
        let about = cli
            .find_subcommand("jobs")
            .and_then(|jobs| jobs.find_subcommand("requeue"))
            .and_then(|requeue| requeue.get_about())
            .expect("jobs requeue has a description")
            .to_string();
        let readme = include_str!("../../README.md").replace('\n', " ");
        let row = readme
            .split("| `jobs requeue ID` / `jobs requeue --all-failed` |")
            .nth(1)
            .and_then(|rest| rest.split('|').next())
            .expect("README.md's commands table has jobs requeue");
        assert_eq!(
            row.trim().to_lowercase(),
            about.trim_end_matches('.').to_lowercase(),
            "README.md vs --help"
        );
    }

    /// The one mapping: a configuration the app found wrong exits 2 with
    /// the app's message, like `validate`'s; every other failure exits 1
    /// and keeps its causes for the log line.
    #[test]
    fn a_failure_maps_to_its_exit_code_in_one_place() {
        let config = Failure::from(anyhow::Error::from(AppError::Config(
            "playback.addr: in use".into(),
        )));
        assert!(matches!(&config, Failure::Config(_)), "{config:?}");
        assert_eq!(config.exit_code(), ExitCode::from(2));
        assert!(
            config.to_string().contains("playback.addr: in use"),
            "{config}"
        );

        let bind = Failure::from(anyhow::Error::from(AppError::Bind {
            addr: "127.0.0.1:1".parse().unwrap(),
            source: std::io::ErrorKind::AddrInUse.into(),
        }));
        assert_eq!(bind.exit_code(), ExitCode::from(1));

        let caused = anyhow::Error::from(std::io::Error::other("connection refused"))
            .context("cannot reach storage");
        let runtime = Failure::from(caused);
        assert_eq!(runtime.exit_code(), ExitCode::from(1));
        assert_eq!(
            format!("{runtime:#}"),
            "cannot reach storage: connection refused"
        );
    }
}
