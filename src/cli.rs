//! Command line: subcommands, and mapping failures to exit codes
//! (0 clean shutdown, 2 bad configuration or usage, 1 runtime failure).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::app::{self, App, AppError, NoJobs};
use crate::config::{Config, ConfigError, ProcessEnv, Role};
use crate::db;
use crate::pipeline::Pipeline;
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
