//! `cargo demo`: the whole flow on this machine (see the README's quick
//! start and [`recording_relay_dev_tools::demo`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use recording_relay::telemetry::{self, DEFAULT_FILTER, LogFormat};
use recording_relay_dev_tools::demo;
use tracing_subscriber::EnvFilter;

/// Runs the whole flow locally against stand-ins for Telnyx and Supabase.
#[derive(Debug, Parser)]
#[command(name = "demo", version)]
struct Args {
    /// PostgreSQL server to create the `recording_relay_demo` database on
    /// (or DATABASE_URL, unless it is the default address .cargo/config.toml
    /// sets for every `cargo run`). Without one the demo runs on a
    /// throwaway cluster of its own: it drops and recreates its database,
    /// so it never does that on a server it was not named.
    #[arg(long)]
    database_url: Option<String>,
    /// The database the demo (re)creates on that server.
    #[arg(long, default_value = demo::DEMO_DATABASE)]
    database_name: String,
    /// Run on a throwaway cluster made from the installed PostgreSQL server
    /// binaries (removed afterwards), whatever DATABASE_URL says.
    #[arg(long)]
    embedded_postgres: bool,
    /// Leave the stand-ins, the daemon and the playback server running until
    /// Ctrl-C, and print a link that plays a stored recording.
    #[arg(long)]
    keep: bool,
    /// With --keep, place another call this often (e.g. 5s), so graphs of
    /// the daemon's metrics have traffic to show.
    #[arg(long, requires = "keep", value_parser = humantime::parse_duration)]
    keep_calling: Option<std::time::Duration>,
    /// The daemon's own log lines on stderr, instead of in a log file.
    #[arg(long)]
    verbose: bool,
    /// Where the daemon's log lines go without --verbose (default: a new
    /// file in the temporary directory).
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Format of the daemon's log lines.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The demo tells its own story on stdout; the daemon's log lines would
    // drown it, so they go to a file unless asked for.
    let log_file = if args.verbose {
        telemetry::init(args.log_format);
        None
    } else {
        match log_to_file(args.log_format, args.log_file.as_deref()) {
            Ok(path) => Some(path),
            Err(e) => {
                eprintln!("cannot open the demo's log file: {e}");
                return ExitCode::from(1);
            }
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let options = demo::Options {
        server: demo::Server::choose(
            args.database_url,
            std::env::var("DATABASE_URL").ok(),
            args.embedded_postgres,
        ),
        database: args.database_name,
        keep: args.keep,
        keep_calling: args.keep_calling,
        log_file,
    };
    match runtime.block_on(demo::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("demo failed: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The daemon's log lines into `path`, or a new file in the temporary
/// directory. Returns the file's path.
fn log_to_file(format: LogFormat, path: Option<&Path>) -> std::io::Result<PathBuf> {
    let (file, path) = match path {
        Some(p) => (std::fs::File::create(p)?, p.to_owned()),
        None => tempfile::Builder::new()
            .prefix("recording-relay-demo-")
            .suffix(".log")
            .tempfile()?
            .keep()
            .map_err(|e| e.error)?,
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::sync::Mutex::new(file))
        .with_ansi(false);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    Ok(path)
}
