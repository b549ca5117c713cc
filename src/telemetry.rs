//! Logging set-up, and masking of personal data before it reaches a log.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable; colours only on a terminal, no timestamps under
    /// systemd (journald adds its own).
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// What is logged unless `RUST_LOG` says otherwise: the libraries' chatter
/// only when it is a warning.
pub const DEFAULT_FILTER: &str = "info,sqlx=warn,hyper=warn,reqwest=warn";

/// Installs the global subscriber. `RUST_LOG` overrides the default level.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text if under_journald => builder.with_ansi(false).without_time().try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}

/// Masks a phone number for logs: keeps the last two digits, so an operator
/// can tell two calls apart without the log holding the number.
pub fn mask_phone(number: &str) -> String {
    let digits: Vec<char> = number.chars().filter(char::is_ascii_digit).collect();
    if digits.len() < 4 {
        return "***".to_owned();
    }
    let tail: String = digits[digits.len() - 2..].iter().collect();
    format!("***{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_numbers_keep_only_two_digits() {
        assert_eq!(mask_phone("+1 (971) 265-6795"), "***95");
        assert_eq!(mask_phone("12"), "***");
        assert!(!mask_phone("+19712656795").contains("9712"));
    }
}
