use std::process::ExitCode;

use clap::Parser;
use recording_relay::cli::{self, Cli};
use recording_relay::telemetry;

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let config = match cli::load_config(&cli) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    // A listen-only process runs on one thread: each request is a short
    // handler waiting on one INSERT, and one scheduler has no wake-ups to
    // hand across threads (BENCHMARKS.md, "Where the ingest time goes").
    let runtime = if matches!(cli.command, Some(cli::Command::Listen)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli::run(cli, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            e.exit_code()
        }
    }
}
