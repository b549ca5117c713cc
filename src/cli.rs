//! Command line: subcommands, and mapping failures to exit codes
//! (0 clean shutdown, 2 bad configuration or usage, 1 runtime failure).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::app::{self, App, AppError, NoJobs};
use crate::config::{Config, ConfigError, ProcessEnv, Role};
use crate::db;
use crate::pipeline::Pipeline;
use crate::storage::Bucket;
use crate::telemetry::LogFormat;

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
        #[arg(long, default_value_t = 50 * 1024 * 1024)]
        file_size_limit: u64,
    },
    /// Run the whole flow locally against stand-ins for Telnyx and Supabase.
    Demo {
        /// PostgreSQL server to create the `recording_relay_demo` database on
        /// (default postgres://postgres@127.0.0.1:5432/postgres).
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
    },
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
            Command::Migrate => Role::Migrate,
            Command::SetupBucket { .. } => Role::Storage,
            Command::Demo { .. } => Role::Demo,
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
        Command::Demo { database_url } => crate::demo::run(database_url.as_deref())
            .await
            .map_err(Failure::Runtime),
        Command::SetupBucket { file_size_limit } => ensure_bucket(&config, file_size_limit)
            .await
            .map_err(Failure::Runtime),
        Command::Migrate => {
            let pool = db::pool(&config).map_err(anyhow::Error::from)?;
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

/// The bucket the daemon needs: private, audio only, size-limited.
pub async fn setup_bucket(config: &Config) -> anyhow::Result<()> {
    ensure_bucket(config, 50 * 1024 * 1024).await
}

async fn ensure_bucket(config: &Config, file_size_limit: u64) -> anyhow::Result<()> {
    let client = crate::pipeline::storage_client(config)?;
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
            client
                .create_bucket(&Bucket {
                    id: id.clone(),
                    name: id.clone(),
                    public: false,
                    file_size_limit: Some(file_size_limit),
                    allowed_mime_types: Some(
                        ["audio/wav", "audio/x-wav", "audio/mpeg"]
                            .map(str::to_owned)
                            .to_vec(),
                    ),
                })
                .await?;
            println!(
                "created private bucket {id} (file size limit {file_size_limit} bytes, audio only)"
            );
        }
    }
    Ok(())
}
