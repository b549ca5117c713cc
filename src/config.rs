//! Configuration: built-in defaults, then an optional TOML file, then systemd
//! credentials, then environment variables (each layer overrides the last).
//!
//! Everything is validated once at start-up and every problem is reported at
//! the same time, so an operator fixes a broken config in one round instead of
//! one error per restart. A process never starts half-configured.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::VerifyingKey;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Where the config file is looked for when `--config` is not given. A missing
/// file at this default path is not an error (defaults plus environment).
pub const DEFAULT_CONFIG_PATH: &str = "/etc/recording-relay/config.toml";

/// The environment variables that override the file, also accepted as
/// systemd credentials (`LoadCredential=TELNYX_API_KEY:/etc/…`).
const OVERRIDES: &[&str] = &[
    "DATABASE_URL",
    "LISTEN_ADDR",
    "TELNYX_PUBLIC_KEY",
    "TELNYX_API_KEY",
    "TELNYX_API_URL",
    "SUPABASE_URL",
    "SUPABASE_SERVICE_ROLE_KEY",
    "STORAGE_BUCKET",
    "METRICS_ADDR",
    "PLAYBACK_ADDR",
    "SUPABASE_JWT_SECRET",
];

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
    fn listens(self) -> bool {
        matches!(self, Role::Listen | Role::Serve)
    }
    fn works(self) -> bool {
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

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` here instead of on the webhook port (so the metrics
    /// are not exposed wherever webhooks are).
    pub addr: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Succeeded (and duplicate, cancelled) jobs are deleted this long after
    /// they finished.
    #[serde(with = "humantime_serde")]
    pub succeeded_for: Duration,
    /// Failed jobs that point at no recording (no recording id, call
    /// session or object) are deleted this long after they finished.
    #[serde(with = "humantime_serde")]
    pub failed_for: Duration,
    /// Jobs that are the only pointer to patient data (unmatched jobs,
    /// failed jobs whose recording may still be at Telnyx or in the bucket,
    /// cancelled jobs with an unlinked object) are kept until someone
    /// resolves them, unless this is set: then they are deleted together
    /// with their bucket object this long after they finished, and an alert
    /// goes to `pipeline.alert_webhook_url` `unresolved_alert_before` first.
    #[serde(with = "humantime_serde")]
    pub unresolved_for: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub unresolved_alert_before: Duration,
    /// How often a worker prunes.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Playback access records (who listened to what) are kept this long.
    /// Six years by default: HIPAA's retention for such documentation.
    #[serde(with = "humantime_serde")]
    pub playback_audit_for: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            succeeded_for: Duration::from_secs(30 * 86_400),
            failed_for: Duration::from_secs(90 * 86_400),
            unresolved_for: None,
            unresolved_alert_before: Duration::from_secs(7 * 86_400),
            interval: Duration::from_secs(3600),
            playback_audit_for: Duration::from_secs(6 * 366 * 86_400),
        }
    }
}

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
    pub max_connections_per_source: usize,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelnyxConfig {
    /// Base64 of the account's 32-byte Ed25519 public key (Telnyx portal).
    pub public_key: Option<String>,
    pub api_key: Option<SecretString>,
    pub api_url: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupabaseConfig {
    pub url: Option<String>,
    pub service_role_key: Option<SecretString>,
    pub bucket: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Jobs processed at once by one daemon.
    pub concurrency: usize,
    /// Fallback poll; LISTEN/NOTIFY normally wakes the worker at once.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long a claim is valid without a heartbeat; a crashed worker's jobs
    /// become runnable again after this.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// In-flight jobs get this long to finish on SIGTERM before they are
    /// released; keep it below systemd's TimeoutStopSec (default 90 s).
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    #[serde(with = "humantime_serde")]
    pub base: Duration,
    #[serde(with = "humantime_serde")]
    pub cap: Duration,
    pub max_attempts: i32,
}

/// A party of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Party {
    To,
    From,
}

/// Audio format fetched from Telnyx and stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AudioFormat {
    Wav,
    Mp3,
}

impl AudioFormat {
    pub fn extension(self) -> &'static str {
        match self {
            AudioFormat::Wav => "wav",
            AudioFormat::Mp3 => "mp3",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            AudioFormat::Wav => "audio/wav",
            AudioFormat::Mp3 => "audio/mpeg",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    pub format: AudioFormat,
    /// An intake matches when its created_at is this close to the start of
    /// the recording.
    #[serde(with = "humantime_serde")]
    pub match_window: Duration,
    /// Attempts to find the intake (it may not be committed yet) before the
    /// recording is stored under `unmatched/` for an operator to attach.
    pub match_attempts: i32,
    /// At least this long between those attempts, so a late intake has time
    /// to appear (the job backoff alone can retry within a second).
    #[serde(with = "humantime_serde")]
    pub match_retry_delay: Duration,
    /// Which party of the call is the patient: "to" for calls ZScribe places
    /// (the original guide's flow: an agent calls the patient, whose number
    /// it read from `to_number`), "from" for calls patients place.
    pub patient_party: Party,
    /// Telnyx connection id → organization id. When the call's connection is
    /// listed, only that organization's intakes can match it.
    pub connection_organizations: std::collections::HashMap<String, uuid::Uuid>,
    /// Delete the recording at Telnyx once it is stored, verified and linked.
    pub delete_from_telnyx: bool,
    /// Recordings larger than this use resumable (TUS) uploads.
    pub resumable_threshold_bytes: u64,
    /// Optional: receives a JSON summary of every job that ends failed or
    /// unmatched.
    pub alert_webhook_url: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bound on one API call (metadata, list, delete, object info).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Longest silence tolerated while streaming a recording; transfers
    /// themselves have no total bound, since recordings can be large.
    #[serde(with = "humantime_serde")]
    pub read_idle_timeout: Duration,
}

/// The playback API and player page (off unless `addr` is set).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlaybackConfig {
    /// Its own address, apart from the webhook port: the webhook faces
    /// Telnyx, this faces the ZScribe UI's users.
    pub addr: Option<SocketAddr>,
    /// Lifetime of the signed URLs handed out; the player fetches a fresh
    /// one before it runs out, so short is fine.
    #[serde(with = "humantime_serde")]
    pub signed_url_ttl: Duration,
    /// The project's JWT secret (HS256), which signs Supabase user tokens.
    pub jwt_secret: Option<SecretString>,
    /// The project's JWKS (`{SUPABASE_URL}/auth/v1/.well-known/jwks.json`),
    /// for projects whose user tokens are signed with asymmetric keys.
    pub jwks_url: Option<String>,
    /// Required `aud` of user tokens.
    pub audience: String,
    /// Dotted path of the organization id inside the token's claims.
    pub organization_claim: String,
    /// Browser origins (`https://app.example.com`) allowed to call the API.
    pub allowed_origins: Vec<String>,
}

impl Default for PlaybackConfig {
    fn default() -> Self {
        Self {
            addr: None,
            signed_url_ttl: Duration::from_secs(600),
            jwt_secret: None,
            jwks_url: None,
            audience: "authenticated".to_owned(),
            organization_claim: "app_metadata.organization_id".to_owned(),
            allowed_origins: Vec::new(),
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            format: AudioFormat::Wav,
            match_window: Duration::from_secs(600),
            match_attempts: 3,
            match_retry_delay: Duration::from_secs(30),
            patient_party: Party::To,
            connection_organizations: std::collections::HashMap::new(),
            delete_from_telnyx: false,
            resumable_threshold_bytes: 6 * 1024 * 1024,
            alert_webhook_url: None,
        }
    }
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

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: 10,
            acquire_timeout: Duration::from_millis(1000),
        }
    }
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

impl Default for TelnyxConfig {
    fn default() -> Self {
        Self {
            public_key: None,
            api_key: None,
            api_url: "https://api.telnyx.com/v2".to_owned(),
        }
    }
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

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 4,
            poll_interval: Duration::from_secs(5),
            lease: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(10),
            cap: Duration::from_secs(3600),
            max_attempts: 12,
        }
    }
}

/// A source of override values, so tests can supply their own environment
/// instead of mutating the process's.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment plus systemd's credentials directory.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
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

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
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

    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    fn apply_overrides(&mut self, env: &dyn Env) -> Result<(), ConfigError> {
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let mut problems = Vec::new();
        for name in OVERRIDES {
            let value = env.var(name).or_else(|| {
                credentials
                    .as_deref()
                    .and_then(|dir| read_credential(dir, name))
            });
            let Some(value) = value else { continue };
            match *name {
                "DATABASE_URL" => self.database.url = Some(value.into()),
                "LISTEN_ADDR" => match value.parse() {
                    Ok(addr) => self.listener.addr = addr,
                    Err(_) => problems.push(format!(
                        "LISTEN_ADDR: {value:?} is not a socket address like 127.0.0.1:8080"
                    )),
                },
                "TELNYX_PUBLIC_KEY" => self.telnyx.public_key = Some(value),
                "TELNYX_API_KEY" => self.telnyx.api_key = Some(value.into()),
                "TELNYX_API_URL" => self.telnyx.api_url = value,
                "SUPABASE_URL" => self.supabase.url = Some(value),
                "SUPABASE_SERVICE_ROLE_KEY" => self.supabase.service_role_key = Some(value.into()),
                "STORAGE_BUCKET" => self.supabase.bucket = value,
                "METRICS_ADDR" => match value.parse() {
                    Ok(addr) => self.metrics.addr = Some(addr),
                    Err(_) => problems.push(format!(
                        "METRICS_ADDR: {value:?} is not a socket address like 127.0.0.1:9090"
                    )),
                },
                "PLAYBACK_ADDR" => match value.parse() {
                    Ok(addr) => self.playback.addr = Some(addr),
                    Err(_) => problems.push(format!(
                        "PLAYBACK_ADDR: {value:?} is not a socket address like 127.0.0.1:8081"
                    )),
                },
                "SUPABASE_JWT_SECRET" => self.playback.jwt_secret = Some(value.into()),
                _ => unreachable!("every override name is handled"),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Checks everything `role` needs, reporting every problem at once.
    pub fn validate(&self, role: Role) -> Result<(), ConfigError> {
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
            if let Err(e) = self.telnyx_public_key() {
                problems.push(e);
            }
            if self.retry.max_attempts < 1 {
                problems.push("retry.max_attempts must be at least 1".to_owned());
            }
            if self.listener.max_in_flight == 0 {
                problems.push("listener.max_in_flight must be at least 1".to_owned());
            }
            if self.listener.connection_wait >= self.listener.request_timeout {
                problems.push(
                    "listener.connection_wait must be shorter than listener.request_timeout"
                        .to_owned(),
                );
            }
            if self.listener.max_body_bytes == 0 {
                problems.push("listener.max_body_bytes must be at least 1".to_owned());
            }
            if self.listener.body_budget_bytes < self.listener.max_body_bytes {
                problems.push(
                    "listener.body_budget_bytes must be at least listener.max_body_bytes"
                        .to_owned(),
                );
            }
            if self.listener.max_connections == 0 || self.listener.max_connections_per_source == 0 {
                problems.push(
                    "listener.max_connections and listener.max_connections_per_source must be at least 1"
                        .to_owned(),
                );
            }
            if self.listener.max_connection_age < Duration::from_secs(1) {
                problems.push("listener.max_connection_age must be at least 1s".to_owned());
            }
            if self.listener.request_timeout >= Duration::from_secs(2) {
                problems.push(
                    "listener.request_timeout must be below Telnyx's 2s delivery timeout"
                        .to_owned(),
                );
            }
        }
        if role.works() {
            self.validate_worker(&mut problems);
        }
        if role == Role::Reconcile {
            if self.telnyx.api_key.is_none() {
                problems.push("telnyx.api_key is not set (or TELNYX_API_KEY)".to_owned());
            }
            check_provider_url("telnyx.api_url", &self.telnyx.api_url, &mut problems);
        }
        if role.listens() && self.playback.addr.is_some() {
            self.validate_playback(&mut problems);
        }
        finish(problems)
    }

    fn validate_playback(&self, problems: &mut Vec<String>) {
        let p = &self.playback;
        match (&p.jwt_secret, &p.jwks_url) {
            (None, None) => problems.push(
                "playback.jwt_secret (or SUPABASE_JWT_SECRET) or playback.jwks_url is needed \
                 to verify users' tokens"
                    .to_owned(),
            ),
            // An HMAC secret this short can be brute-forced from one token.
            (Some(secret), _) if secret.expose_secret().len() < 32 => problems.push(
                "playback.jwt_secret must be at least 32 characters (the project's JWT secret)"
                    .to_owned(),
            ),
            _ => {}
        }
        if let Some(url) = p.jwks_url.as_deref() {
            check_provider_url("playback.jwks_url", url, problems);
        }
        if p.signed_url_ttl < Duration::from_secs(1) || p.signed_url_ttl > Duration::from_secs(3600)
        {
            problems.push("playback.signed_url_ttl must be between 1s and 1h".to_owned());
        }
        if p.audience.is_empty() {
            problems.push("playback.audience must not be empty".to_owned());
        }
        if let Err(e) = check_claim_path(&p.organization_claim) {
            problems.push(format!("playback.organization_claim: {e}"));
        }
        for origin in &p.allowed_origins {
            if !is_origin(origin) {
                problems.push(format!(
                    "playback.allowed_origins: {origin:?} is not an origin like https://app.example.com"
                ));
            }
        }
        // Signing URLs needs the service key, even on a listener-only host.
        self.validate_storage(problems);
    }

    fn validate_storage(&self, problems: &mut Vec<String>) {
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

    fn validate_worker(&self, problems: &mut Vec<String>) {
        let w = &self.worker;
        if w.concurrency == 0 {
            problems.push("worker.concurrency must be at least 1".to_owned());
        }
        if w.lease < Duration::from_secs(3) {
            problems
                .push("worker.lease must be at least 3s (heartbeats run every lease/3)".to_owned());
        }
        if w.poll_interval.is_zero() {
            problems.push("worker.poll_interval must be above 0s".to_owned());
        }
        if self.telnyx.api_key.is_none() {
            problems.push("telnyx.api_key is not set (or TELNYX_API_KEY)".to_owned());
        }
        self.validate_storage(problems);
        check_provider_url("telnyx.api_url", &self.telnyx.api_url, problems);
        let p = &self.pipeline;
        if p.match_attempts < 1 || p.match_attempts > self.retry.max_attempts {
            problems.push(
                "pipeline.match_attempts must be between 1 and retry.max_attempts".to_owned(),
            );
        }
        if p.resumable_threshold_bytes == 0 {
            problems.push("pipeline.resumable_threshold_bytes must be above 0".to_owned());
        }
        if let Some(url) = p.alert_webhook_url.as_deref() {
            check_provider_url("pipeline.alert_webhook_url", url, problems);
        }
        if let Some(period) = self.retention.unresolved_for {
            // Deleting the only pointer to a recording without telling anyone
            // first is not an option.
            if p.alert_webhook_url.is_none() {
                problems.push(
                    "retention.unresolved_for needs pipeline.alert_webhook_url: \
                     unresolved recordings are deleted only after an alert"
                        .to_owned(),
                );
            }
            if self.retention.unresolved_alert_before.is_zero()
                || self.retention.unresolved_alert_before >= period
            {
                problems.push(
                    "retention.unresolved_alert_before must be above 0s and below \
                     retention.unresolved_for"
                        .to_owned(),
                );
            }
        }
        let r = &self.retry;
        if r.max_attempts < 1 {
            problems.push("retry.max_attempts must be at least 1".to_owned());
        }
        if r.base.is_zero() || r.base > r.cap {
            problems.push("retry.base must be above 0s and not above retry.cap".to_owned());
        }
    }

    /// Decodes `telnyx.public_key` into a verifying key, with a message that
    /// says what is wrong with it (never the key itself).
    pub fn telnyx_public_key(&self) -> Result<VerifyingKey, String> {
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

fn finish(problems: Vec<String>) -> Result<(), ConfigError> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

/// Provider URLs carry API keys: plain http is only allowed on loopback
/// (tests, the demo, a local proxy).
fn check_provider_url(name: &str, url: &str, problems: &mut Vec<String>) {
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

/// A dotted claim path must not read `user_metadata`: users can write it
/// themselves (`supabase.auth.updateUser`), so it would let anyone pick an
/// organization.
fn check_claim_path(path: &str) -> Result<(), String> {
    if path.split('.').any(str::is_empty) {
        return Err(format!(
            "{path:?} is not a dotted claim path like app_metadata.organization_id"
        ));
    }
    if path.split('.').any(|segment| segment == "user_metadata") {
        return Err(
            "must not point into user_metadata, which users can edit; use app_metadata".to_owned(),
        );
    }
    Ok(())
}

/// `scheme://host[:port]`, exactly what a browser sends in `Origin`.
fn is_origin(origin: &str) -> bool {
    let Some((scheme, host)) = origin.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !host.is_empty()
        && !host.contains(['/', '?', '#', '@', '*', ' '])
}

/// The secret settings a config holds, by name (never their values): what a
/// reader of the file would learn.
pub fn secret_settings(config: &Config) -> Vec<&'static str> {
    let mut found = Vec::new();
    if config.database_url().is_some_and(database_url_has_password) {
        found.push("database.url (with a password)");
    }
    if config.telnyx.api_key.is_some() {
        found.push("telnyx.api_key");
    }
    if config.supabase.service_role_key.is_some() {
        found.push("supabase.service_role_key");
    }
    found
}

/// `postgres://user:password@host/db`, or a `password=` parameter.
fn database_url_has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let userinfo_has_password = authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'));
    userinfo_has_password || url.to_ascii_lowercase().contains("password=")
}

/// A warning when the config file at `path` holds secrets (as parsed into
/// `file_config`, before the environment) and group or others may read it.
/// Logged once at start-up rather than refused: an operator may have good
/// reasons (a dedicated group), but should know. The fix is `chmod 600`, or
/// moving the secrets to the environment or systemd credentials.
pub fn permission_warning(path: &Path, file_config: &Config) -> Option<String> {
    let secrets = secret_settings(file_config);
    if secrets.is_empty() {
        return None;
    }
    let mode = file_mode(path)?;
    if mode & 0o044 == 0 {
        return None;
    }
    Some(format!(
        "config file {} holds secrets ({}) but is readable by {} (mode {:03o}): \
         chmod 600 it, or move the secrets to the environment or systemd credentials",
        path.display(),
        secrets.join(", "),
        match (mode & 0o040 != 0, mode & 0o004 != 0) {
            (true, true) => "group and others",
            (true, false) => "its group",
            _ => "others",
        },
        mode & 0o777,
    ))
}

#[cfg(unix)]
fn file_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).ok().map(|m| m.permissions().mode())
}

#[cfg(not(unix))]
fn file_mode(_path: &Path) -> Option<u32> {
    None
}

fn read_credential(dir: &Path, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(name)).ok()?;
    let value = text.trim_end_matches(['\n', '\r']).to_owned();
    (!value.is_empty()).then_some(value)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct MapEnv(HashMap<&'static str, &'static str>);

    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| (*v).to_owned())
        }
    }

    fn env(pairs: &[(&'static str, &'static str)]) -> MapEnv {
        MapEnv(pairs.iter().copied().collect())
    }

    const KEY: &str = "O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik=";

    #[test]
    fn the_example_config_parses_and_matches_the_defaults() {
        let text = include_str!("../config.toml.example");
        let parsed = Config::from_toml(text).expect("example parses");
        let defaults = Config::default();
        assert_eq!(parsed.worker.lease, defaults.worker.lease);
        assert_eq!(parsed.retry.cap, defaults.retry.cap);
        assert_eq!(parsed.listener.addr, defaults.listener.addr);
        assert_eq!(parsed.playback.addr, defaults.playback.addr);
        assert_eq!(
            parsed.playback.signed_url_ttl,
            defaults.playback.signed_url_ttl
        );
        assert_eq!(
            parsed.playback.organization_claim,
            defaults.playback.organization_claim
        );
        let (r, d) = (&parsed.retention, &defaults.retention);
        assert_eq!(
            (r.succeeded_for, r.failed_for, r.unresolved_for, r.interval),
            (d.succeeded_for, d.failed_for, d.unresolved_for, d.interval)
        );
        assert_eq!(r.unresolved_alert_before, d.unresolved_alert_before);
        assert_eq!(r.playback_audit_for, d.playback_audit_for);
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut c = Config::from_toml("[supabase]\nbucket = \"from-file\"\n").unwrap();
        c.apply_overrides(&env(&[
            ("STORAGE_BUCKET", "from-env"),
            ("LISTEN_ADDR", "0.0.0.0:9000"),
        ]))
        .unwrap();
        assert_eq!(c.supabase.bucket, "from-env");
        assert_eq!(c.listener.addr.port(), 9000);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let c = Config::from_toml("[worker]\nconcurrency = 0\n").unwrap();
        let Err(ConfigError::Invalid(problems)) = c.validate(Role::Serve) else {
            panic!("expected invalid");
        };
        let all = problems.join("\n");
        assert!(all.contains("database.url"), "{all}");
        assert!(all.contains("telnyx.public_key is not set"), "{all}");
        assert!(all.contains("worker.concurrency"), "{all}");
    }

    #[test]
    fn malformed_public_keys_are_explained() {
        for (key, expected) in [
            ("not base64!!", "not valid base64"),
            ("AAAA", "must decode to 32 bytes"),
        ] {
            let mut c = Config::default();
            c.telnyx.public_key = Some(key.to_owned());
            let err = c.telnyx_public_key().unwrap_err();
            assert!(err.contains(expected), "{key}: {err}");
            assert!(!err.contains(key), "the key must not be echoed: {err}");
        }
        let mut c = Config::default();
        c.telnyx.public_key = Some(KEY.to_owned());
        assert!(c.telnyx_public_key().is_ok());
    }

    #[test]
    fn bad_durations_and_unknown_keys_name_the_setting() {
        let err = Config::from_toml("[worker]\nlease = \"sixty\"\n").unwrap_err();
        assert!(err.contains("lease"), "{err}");
        let err = Config::from_toml("[worker]\nleese = \"60s\"\n").unwrap_err();
        assert!(err.contains("leese"), "{err}");
    }

    #[test]
    fn migrate_needs_only_the_database() {
        let mut c = Config::default();
        c.database.url = Some("postgres://localhost/x".to_owned().into());
        assert!(c.validate(Role::Admin).is_ok());
        assert!(c.validate(Role::Listen).is_err());
    }

    #[test]
    fn secrets_do_not_appear_in_debug_output() {
        let mut c = Config::default();
        c.telnyx.api_key = Some("KEYsecret123".to_owned().into());
        assert!(!format!("{c:?}").contains("KEYsecret123"));
    }

    #[test]
    fn provider_urls_need_tls_outside_loopback() {
        let check = |url: &str| {
            let mut p = Vec::new();
            check_provider_url("x", url, &mut p);
            p.is_empty()
        };
        assert!(check("https://abc.supabase.co"));
        assert!(check("http://127.0.0.1:5000/v2"));
        assert!(check("http://localhost:9"));
        assert!(check("http://[::1]:9/v2"));
        assert!(!check("http://abc.supabase.co"));
        assert!(!check("http://127.0.0.1.evil.com/"));
        assert!(!check("ftp://x"));
        assert!(!check("abc.supabase.co"));
    }

    #[test]
    fn the_worker_needs_provider_credentials() {
        let mut c = Config::default();
        c.database.url = Some("postgres://localhost/x".to_owned().into());
        let Err(ConfigError::Invalid(problems)) = c.validate(Role::Work) else {
            panic!("expected invalid");
        };
        let all = problems.join("\n");
        for needed in [
            "telnyx.api_key",
            "supabase.url",
            "supabase.service_role_key",
        ] {
            assert!(all.contains(needed), "{all}");
        }
        assert!(
            !all.contains("public_key"),
            "the worker does not verify webhooks"
        );
    }

    #[test]
    fn deleting_unresolved_jobs_needs_an_alert_and_a_notice_period() {
        let mut c = Config::default();
        c.database.url = Some("postgres://localhost/x".to_owned().into());
        c.retention.unresolved_for = Some(Duration::from_secs(3 * 86_400));
        c.retention.unresolved_alert_before = Duration::from_secs(7 * 86_400);
        let Err(ConfigError::Invalid(problems)) = c.validate(Role::Work) else {
            panic!("expected invalid");
        };
        let all = problems.join("\n");
        assert!(
            all.contains("retention.unresolved_for needs pipeline.alert_webhook_url"),
            "{all}"
        );
        assert!(
            all.contains("retention.unresolved_alert_before must be"),
            "{all}"
        );
        let parsed: Config = toml::from_str(
            "[retention]\nunresolved_for = \"365d\"\nunresolved_alert_before = \"14d\"\n",
        )
        .unwrap();
        assert_eq!(
            parsed.retention.unresolved_for,
            Some(Duration::from_secs(365 * 86_400))
        );
        assert_eq!(
            Config::default().retention.unresolved_for,
            None,
            "kept by default"
        );
    }

    fn playback_problems(tweak: impl FnOnce(&mut Config)) -> String {
        let mut c = Config::default();
        c.database.url = Some("postgres://localhost/x".to_owned().into());
        c.telnyx.public_key = Some(KEY.to_owned());
        c.supabase.url = Some("https://abc.supabase.co".to_owned());
        c.supabase.service_role_key = Some("service".to_owned().into());
        c.playback.addr = Some("127.0.0.1:8081".parse().unwrap());
        c.playback.jwt_secret = Some("s".repeat(40).into());
        tweak(&mut c);
        match c.validate(Role::Listen) {
            Ok(()) => String::new(),
            Err(ConfigError::Invalid(problems)) => problems.join("\n"),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn playback_is_off_by_default_and_checked_when_on() {
        assert!(Config::default().playback.addr.is_none());
        assert_eq!(playback_problems(|_| {}), "");
        let all = playback_problems(|c| {
            c.playback.jwt_secret = None;
            c.supabase.service_role_key = None;
        });
        assert!(all.contains("SUPABASE_JWT_SECRET"), "{all}");
        assert!(all.contains("service_role_key"), "{all}");
        let all = playback_problems(|c| c.playback.jwt_secret = Some("short".to_owned().into()));
        assert!(all.contains("at least 32"), "{all}");
        assert!(
            !all.contains("short"),
            "the secret must not be echoed: {all}"
        );
        let all = playback_problems(|c| c.playback.signed_url_ttl = Duration::ZERO);
        assert!(all.contains("signed_url_ttl"), "{all}");
    }

    #[test]
    fn the_organization_claim_cannot_come_from_user_metadata() {
        for bad in ["user_metadata.organization_id", "app_metadata..org", ""] {
            let all = playback_problems(|c| c.playback.organization_claim = bad.to_owned());
            assert!(all.contains("organization_claim"), "{bad}: {all}");
        }
        let all = playback_problems(|c| c.playback.organization_claim = "org_id".to_owned());
        assert_eq!(all, "");
    }

    #[test]
    fn allowed_origins_are_bare_origins() {
        assert_eq!(
            playback_problems(|c| c.playback.allowed_origins = vec![
                "https://app.example.com".into(),
                "http://localhost:5173".into()
            ]),
            ""
        );
        for bad in [
            "*",
            "https://app.example.com/",
            "app.example.com",
            "https://*.x.com",
        ] {
            let all = playback_problems(|c| c.playback.allowed_origins = vec![bad.to_owned()]);
            assert!(all.contains("allowed_origins"), "{bad}: {all}");
        }
    }

    #[test]
    fn playback_settings_come_from_the_environment() {
        let mut c = Config::default();
        c.apply_overrides(&env(&[
            ("PLAYBACK_ADDR", "127.0.0.1:9001"),
            ("SUPABASE_JWT_SECRET", "jwt-secret-from-env"),
        ]))
        .unwrap();
        assert_eq!(c.playback.addr.map(|a| a.port()), Some(9001));
        assert!(c.playback.jwt_secret.is_some());
        assert!(!format!("{c:?}").contains("jwt-secret-from-env"));
        let err = Config::default()
            .apply_overrides(&env(&[("PLAYBACK_ADDR", "on")]))
            .unwrap_err();
        assert!(err.to_string().contains("PLAYBACK_ADDR"), "{err}");
    }

    #[test]
    fn credentials_are_read_without_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("TELNYX_API_KEY"), "KEYabc\n").unwrap();
        assert_eq!(
            read_credential(dir.path(), "TELNYX_API_KEY").as_deref(),
            Some("KEYabc")
        );
        assert_eq!(read_credential(dir.path(), "MISSING"), None);
    }

    #[cfg(unix)]
    #[test]
    fn a_readable_config_file_with_secrets_is_warned_about() {
        use std::os::unix::fs::PermissionsExt as _;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let chmod =
            |mode| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let warning = |text: &str, mode| {
            std::fs::write(&path, text).unwrap();
            chmod(mode);
            let config = Config::from_toml(text).unwrap();
            permission_warning(&path, &config)
        };
        let with_key = "[telnyx]\napi_key = \"KEYsecret123\"\n";
        for mode in [0o644, 0o640, 0o604, 0o666] {
            let w = warning(with_key, mode).expect("warned");
            assert!(w.contains("telnyx.api_key"), "{w}");
            assert!(w.contains(&format!("{:03o}", mode)), "{w}");
            assert!(!w.contains("KEYsecret123"), "never the secret itself: {w}");
        }
        assert!(
            warning(with_key, 0o640)
                .unwrap()
                .contains("readable by its group")
        );
        assert_eq!(warning(with_key, 0o600), None);
        assert_eq!(warning(with_key, 0o400), None);

        // A database URL counts only with a password in it.
        let db = |url: &str| format!("[database]\nurl = \"{url}\"\n");
        assert!(warning(&db("postgres://relay:pw@db/zscribe"), 0o644).is_some());
        assert!(warning(&db("postgres://relay@db/zscribe?password=pw"), 0o644).is_some());
        assert_eq!(warning(&db("postgres://relay@db/zscribe"), 0o644), None);
        assert_eq!(warning(&db("postgres://db:5432/zscribe"), 0o644), None);
        // No secrets: nothing to say, whatever the mode.
        assert_eq!(warning("[worker]\nconcurrency = 2\n", 0o666), None);
        let w = warning(
            "[supabase]\nservice_role_key = \"sk\"\n[database]\nurl = \"postgres://u:p@h/d\"\n",
            0o644,
        )
        .unwrap();
        assert!(
            w.contains("supabase.service_role_key") && w.contains("database.url"),
            "{w}"
        );
    }
}
