//! `[telnyx]`, `[supabase]` and `[http]`: where the providers are, the keys
//! they take, and how long a request to them may take.

use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use super::Config;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelnyxConfig {
    /// Base64 of the account's 32-byte Ed25519 public key (Telnyx portal).
    pub public_key: Option<String>,
    pub api_key: Option<SecretString>,
    pub api_url: String,
}

impl Default for TelnyxConfig {
    fn default() -> Self {
        Self {
            public_key: None,
            api_key: None,
            api_url: "https://api.telnyx.com/v2".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupabaseConfig {
    pub url: Option<String>,
    pub service_role_key: Option<SecretString>,
    pub bucket: String,
}

impl Default for SupabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            service_role_key: None,
            bucket: "call-recordings".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    #[serde(with = "humantime_serde")]
    pub(crate) connect_timeout: Duration,
    /// Bound on one API call (metadata, list, delete, object info).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Longest silence tolerated while streaming a recording; transfers
    /// themselves have no total bound, since recordings can be large.
    #[serde(with = "humantime_serde")]
    pub read_idle_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            read_idle_timeout: Duration::from_secs(60),
        }
    }
}

impl Config {
    pub(super) fn validate_storage(&self, problems: &mut Vec<String>) {
        match self.supabase.url.as_deref() {
            None => problems.push("supabase.url is not set (or SUPABASE_URL)".to_owned()),
            Some(url) => check_provider_url("supabase.url", url, problems),
        }
        if self.supabase.service_role_key.is_none() {
            problems.push(
                "supabase.service_role_key is not set (or SUPABASE_SERVICE_ROLE_KEY)".to_owned(),
            );
        }
        if self.supabase.bucket.is_empty() || self.supabase.bucket.contains('/') {
            problems.push("supabase.bucket must be a bucket id (no '/')".to_owned());
        }
    }
}

/// Provider URLs carry API keys: plain http is only allowed on loopback
/// (tests, the demo, a local proxy).
pub(super) fn check_provider_url(name: &str, url: &str, problems: &mut Vec<String>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        problems.push(format!("{name} must be an http(s) URL"));
        return;
    };
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = if host.starts_with('[') {
        host.split(']').next().unwrap_or("").trim_start_matches('[')
    } else {
        host.split(':').next().unwrap_or("")
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match scheme {
        "https" if !host.is_empty() => {}
        "http" if loopback => {}
        "http" => problems.push(format!("{name} must use https outside loopback")),
        _ => problems.push(format!("{name} must be an http(s) URL")),
    }
}
