//! Configuration: built-in defaults, then an optional TOML file, then systemd
//! credentials, then environment variables (each layer overrides the last).
//!
//! Everything is validated once at start-up and every problem is reported at
//! the same time, so an operator fixes a broken config in one round instead of
//! one error per restart. A process never starts half-configured.
//!
//! One file per section, each with its defaults and its checks
//! (`listener.rs`, `providers.rs`, `worker.rs`, `playback.rs`,
//! `retention.rs`); `overrides.rs` is the one table of environment variables
//! and systemd credentials, `secrets.rs` what a readable file would give away.

mod listener;
mod overrides;
mod playback;
mod providers;
mod retention;
mod secrets;
#[cfg(test)]
mod tests;
mod worker;

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::VerifyingKey;
use secrecy::ExposeSecret;
use serde::Deserialize;

pub use listener::DatabaseConfig;

pub use listener::ListenerConfig;
pub use overrides::Env;
pub(crate) use overrides::ProcessEnv;
pub use playback::PlaybackConfig;
pub use providers::HttpConfig;
pub use providers::SupabaseConfig;
pub use providers::TelnyxConfig;
pub use retention::MetricsConfig;
pub use retention::RetentionConfig;
pub(crate) use secrets::permission_warning;
pub use worker::AudioFormat;
pub use worker::CallerIdOrganizations;
pub(crate) use worker::Party;
pub use worker::PipelineConfig;
pub use worker::RetryConfig;
pub use worker::WorkerConfig;

/// Where the config file is looked for when `--config` is not given. A missing
/// file at this default path is not an error (defaults plus environment).
pub(crate) const DEFAULT_CONFIG_PATH: &str = "/etc/recording-relay/config.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// What a process is about to run; each role needs a different subset of
/// settings (a listener-only host need not hold the Supabase key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Database only: `migrate`, `jobs …`.
    Admin,
    /// Database and the Telnyx API: `reconcile`.
    Reconcile,
    Listen,
    Work,
    Serve,
    /// Storage administration (`setup-bucket`): Supabase settings only.
    Storage,
    /// Commands that judge the configuration themselves: `check` reports
    /// every problem as a line of its own, `demo` builds its own.
    Own,
}

impl Role {
    pub(crate) fn listens(self) -> bool {
        matches!(self, Role::Listen | Role::Serve)
    }
    pub(crate) fn works(self) -> bool {
        matches!(self, Role::Work | Role::Serve)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database: DatabaseConfig,
    pub listener: ListenerConfig,
    pub telnyx: TelnyxConfig,
    pub supabase: SupabaseConfig,
    pub worker: WorkerConfig,
    pub retry: RetryConfig,
    pub pipeline: PipelineConfig,
    pub http: HttpConfig,
    pub metrics: MetricsConfig,
    pub retention: RetentionConfig,
    pub playback: PlaybackConfig,
}

impl Config {
    /// Loads the file (an explicit path must exist; the default path may be
    /// absent), then applies credentials and environment overrides.
    pub fn load(explicit: Option<&Path>, env: &dyn Env) -> Result<Self, ConfigError> {
        let mut config = match explicit {
            Some(path) => Self::from_file(path)?,
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Self::from_file(Path::new(DEFAULT_CONFIG_PATH))?
            }
            None => Self::default(),
        };
        config.apply_overrides(env)?;
        Ok(config)
    }

    pub(crate) fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        if let Some(warning) = permission_warning(path, &config) {
            tracing::warn!("{warning}");
        }
        Ok(config)
    }

    /// Parses a config file. A file that is valid TOML but holds settings
    /// of the wrong type or unknown names gets every such problem listed at
    /// once, as [`validate`](Self::validate) lists bad values; a syntax
    /// error stops at the first.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let first = match toml::from_str(text) {
            Ok(config) => return Ok(config),
            Err(e) => e,
        };
        let Ok(table) = text.parse::<toml::Table>() else {
            return Err(first.to_string());
        };
        let problems = setting_problems(&table);
        if problems.len() < 2 {
            return Err(first.to_string());
        }
        Err(format!("\n  - {}", problems.join("\n  - ")))
    }

    /// Checks everything `role` needs, reporting every problem at once.
    pub(crate) fn validate(&self, role: Role) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        match role {
            Role::Own => return Ok(()),
            Role::Storage => {
                self.validate_storage(&mut problems);
                return finish(problems);
            }
            _ => {}
        }
        if self.database.url.is_none() {
            problems.push("database.url is not set (or DATABASE_URL)".to_owned());
        }
        if self.database.max_connections == 0 {
            problems.push("database.max_connections must be at least 1".to_owned());
        }
        if role.listens() {
            self.validate_listener(&mut problems);
        }
        if role.works() {
            self.validate_worker(&mut problems);
        }
        if role == Role::Reconcile {
            if self.telnyx.api_key.is_none() {
                problems.push("telnyx.api_key is not set (or TELNYX_API_KEY)".to_owned());
            }
            providers::check_provider_url("telnyx.api_url", &self.telnyx.api_url, &mut problems);
        }
        if role.listens() && self.playback.addr.is_some() {
            self.validate_playback(&mut problems);
        }
        finish(problems)
    }

    /// What is allowed but probably wrong for `role`: logged at start-up and
    /// shown by `check`.
    pub(crate) fn warnings(&self, role: Role) -> Vec<String> {
        let mut warnings = Vec::new();
        if role.works() {
            warnings.extend(self.worker.shutdown_warning());
        }
        warnings
    }

    /// Decodes `telnyx.public_key` into a verifying key, with a message that
    /// says what is wrong with it (never the key itself).
    pub(crate) fn telnyx_public_key(&self) -> Result<VerifyingKey, String> {
        let Some(b64) = self.telnyx.public_key.as_deref() else {
            return Err("telnyx.public_key is not set (or TELNYX_PUBLIC_KEY): \
                        the base64 Ed25519 public key from the Telnyx portal"
                .to_owned());
        };
        let bytes = BASE64
            .decode(b64.trim())
            .map_err(|_| "telnyx.public_key is not valid base64".to_owned())?;
        let bytes: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            format!(
                "telnyx.public_key must decode to 32 bytes (an Ed25519 public key), got {}",
                bytes.len()
            )
        })?;
        VerifyingKey::from_bytes(&bytes)
            .map_err(|_| "telnyx.public_key is not a valid Ed25519 public key".to_owned())
    }

    pub fn database_url(&self) -> Option<&str> {
        self.database.url.as_ref().map(|s| s.expose_secret())
    }
}

/// Each setting of `table` tried on its own, so that one wrong type does not
/// hide the next: one line per setting serde refuses, named by its path.
fn setting_problems(table: &toml::Table) -> Vec<String> {
    let mut problems = Vec::new();
    let mut try_one = |path: String, one: toml::Table| {
        if let Err(e) = toml::Value::Table(one).try_into::<Config>() {
            // toml's message, without its own "in `path`" line.
            let message = e.to_string();
            let message = message.lines().next().unwrap_or_default();
            problems.push(format!("{path}: {message}"));
        }
    };
    for (section, value) in table {
        match value.as_table() {
            Some(keys) if !keys.is_empty() => {
                for (key, value) in keys {
                    let inner = toml::Table::from_iter([(key.clone(), value.clone())]);
                    let one = toml::Table::from_iter([(section.clone(), inner.into())]);
                    try_one(format!("{section}.{key}"), one);
                }
            }
            _ => try_one(
                section.clone(),
                toml::Table::from_iter([(section.clone(), value.clone())]),
            ),
        }
    }
    problems
}

/// Every problem once, in the order found (the storage settings are
/// checked for the worker and again for playback).
fn finish(mut problems: Vec<String>) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    problems.retain(|p| seen.insert(p.clone()));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid(problems))
    }
}
