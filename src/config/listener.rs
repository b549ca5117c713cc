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
    pub(crate) timestamp_tolerance: Duration,
    /// Upper bound on the whole verify+insert+commit of one webhook; past it
    /// the answer is 503 so Telnyx retries instead of timing out on us.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Slowloris guard: a client must finish sending headers within this.
    /// Also the idle timeout of a kept-alive connection: hyper starts it
    /// again whenever it waits for the next request.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Connections open at once, from everyone; further ones wait in the
    /// kernel's accept queue. Fitted to RLIMIT_NOFILE at start-up.
    pub max_connections: usize,
    /// Connections open at once from one address (an IPv6 /64); one more is
    /// closed at once, so a flood from one place cannot take the room
    /// Telnyx's few addresses need. Behind a reverse proxy every connection
    /// comes from the proxy: set it to `max_connections` there.
    pub(crate) max_connections_per_source: usize,
    /// A connection is closed after this (once its request is answered),
    /// so a client that keeps asking cannot keep its place for ever.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// Bytes of request bodies the listener holds at once, before their
    /// signature is checked and while they are stored. A body that would go
    /// over is answered 503 at once (Telnyx retries), never queued.
    pub body_budget_bytes: usize,
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
            max_connections: 8192,
            max_connections_per_source: 128,
            max_connection_age: Duration::from_secs(60),
            body_budget_bytes: 32 * 1024 * 1024,
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
        if l.body_budget_bytes < l.max_body_bytes {
            problems.push(
                "listener.body_budget_bytes must be at least listener.max_body_bytes".to_owned(),
            );
        }
        if l.max_connections == 0 || l.max_connections_per_source == 0 {
            problems.push(
                "listener.max_connections and listener.max_connections_per_source must be at least 1"
                    .to_owned(),
            );
        }
        if l.max_connection_age < Duration::from_secs(1) {
            problems.push("listener.max_connection_age must be at least 1s".to_owned());
        }
        if l.request_timeout >= Duration::from_secs(2) {
            problems.push(
                "listener.request_timeout must be below Telnyx's 2s delivery timeout".to_owned(),
            );
        }
    }
}
