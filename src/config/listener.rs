//! `[listener]` (the webhook port) and `[database]`: what Telnyx's deliveries
//! meet, and the pool they share.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use super::Config;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub url: Option<SecretString>,
    pub max_connections: u32,
    /// How long a request may wait for a pooled connection. The webhook must
    /// answer within Telnyx's 2 s, so this stays well under it.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: 10,
            acquire_timeout: Duration::from_millis(1000),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    pub addr: SocketAddr,
    pub max_body_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub timestamp_tolerance: Duration,
    /// Upper bound on the whole verify+insert+commit of one webhook; past it
    /// the answer is 503 so Telnyx retries instead of timing out on us.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Slowloris guard: a client must finish sending headers within this.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// Webhooks being received and stored at once. One more is answered 503
    /// at once, before its body is read, so that under overload Telnyx
    /// retries later instead of every request queueing past its deadline.
    pub max_in_flight: usize,
    /// How long a webhook may wait for a database connection before it is
    /// answered 503 (shed): a short wait absorbs a burst, a long one only
    /// turns overload into timeouts.
    #[serde(with = "humantime_serde")]
    pub connection_wait: Duration,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 1024 * 1024,
            timestamp_tolerance: Duration::from_secs(300),
            request_timeout: Duration::from_millis(1500),
            header_read_timeout: Duration::from_secs(5),
            max_connections: 1024,
            max_in_flight: 64,
            connection_wait: Duration::from_millis(250),
        }
    }
}

impl Config {
    /// What a process that answers Telnyx needs of `[listener]`.
    pub(super) fn validate_listener(&self, problems: &mut Vec<String>) {
        if let Err(e) = self.telnyx_public_key() {
            problems.push(e);
        }
        if self.retry.max_attempts < 1 {
            problems.push("retry.max_attempts must be at least 1".to_owned());
        }
        let l = &self.listener;
        if l.max_in_flight == 0 {
            problems.push("listener.max_in_flight must be at least 1".to_owned());
        }
        if l.connection_wait >= l.request_timeout {
            problems.push(
                "listener.connection_wait must be shorter than listener.request_timeout".to_owned(),
            );
        }
        if l.max_body_bytes == 0 {
            problems.push("listener.max_body_bytes must be at least 1".to_owned());
        }
        if l.request_timeout >= Duration::from_secs(2) {
            problems.push(
                "listener.request_timeout must be below Telnyx's 2s delivery timeout".to_owned(),
            );
        }
    }
}
