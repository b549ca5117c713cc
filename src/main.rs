use std::process::ExitCode;

use clap::Parser;
use recording_relay::cli::{self, Cli, Command};
use recording_relay::telemetry;

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // The demo tells its own story on stdout; the daemon's log lines would
    // drown it, so they go to a file unless asked for.
    let mut demo_logs_to_file = false;
    match &mut cli.command {
        Some(Command::Demo(args)) if !args.verbose => {
            match telemetry::init_to_file(cli.log_format, args.log_file.as_deref()) {
                Ok(path) => {
                    args.log_file = Some(path);
                    demo_logs_to_file = true;
                }
                Err(e) => {
                    eprintln!("cannot open the demo's log file: {e}");
                    return ExitCode::from(1);
                }
            }
        }
        _ => telemetry::init(cli.log_format),
    }
    let config = match cli::load_config(&cli) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
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
            if demo_logs_to_file {
                eprintln!("demo failed: {e:#}");
            }
            e.exit_code()
        }
    }
}
