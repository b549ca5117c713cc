//! Logging set-up, and masking of personal data before it reaches a log.

use std::io::IsTerminal;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
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

/// Cuts the query string off a URL: presigned and signed URLs carry their
/// credentials there.
pub fn redact_url(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

/// Escapes one URL path segment (ids and object names come from outside).
pub fn encode_segment(segment: &str) -> String {
    const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    utf8_percent_encode(segment, SEGMENT).to_string()
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

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(encode_segment("d8991cb0-c531"), "d8991cb0-c531");
        assert_eq!(encode_segment("../x?y"), "..%2Fx%3Fy");
    }

    #[test]
    fn urls_lose_their_query() {
        assert_eq!(
            redact_url("https://s3/x.wav?X-Amz-Signature=abc"),
            "https://s3/x.wav"
        );
    }
}
