//! The environment variables that override the file, in one table: each
//! name with what it sets. Each is also accepted as a systemd credential
//! (`LoadCredential=TELNYX_API_KEY:/etc/…`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::{Config, ConfigError};

/// A source of override values, so tests can supply their own environment
/// instead of mutating the process's.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment plus systemd's credentials directory.
pub(crate) struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

/// One override: its name and the setting it sets.
pub(super) struct Override {
    pub(super) name: &'static str,
    apply: Apply,
}

pub(super) enum Apply {
    Text(fn(&mut Config, String)),
    /// A socket address; the port is the example a bad value's message shows.
    Addr(fn(&mut Config, SocketAddr), u16),
}

use Apply::{Addr, Text};

#[rustfmt::skip]
pub(super) const OVERRIDES: &[Override] = &[
    Override { name: "DATABASE_URL", apply: Text(|c, v| c.database.url = Some(v.into())) },
    Override { name: "LISTEN_ADDR", apply: Addr(|c, a| c.listener.addr = a, 8080) },
    Override { name: "TELNYX_PUBLIC_KEY", apply: Text(|c, v| c.telnyx.public_key = Some(v)) },
    Override { name: "TELNYX_API_KEY", apply: Text(|c, v| c.telnyx.api_key = Some(v.into())) },
    Override { name: "TELNYX_API_URL", apply: Text(|c, v| c.telnyx.api_url = v) },
    Override { name: "SUPABASE_URL", apply: Text(|c, v| c.supabase.url = Some(v)) },
    Override { name: "SUPABASE_SERVICE_ROLE_KEY", apply: Text(|c, v| c.supabase.service_role_key = Some(v.into())) },
    Override { name: "STORAGE_BUCKET", apply: Text(|c, v| c.supabase.bucket = v) },
    Override { name: "METRICS_ADDR", apply: Addr(|c, a| c.metrics.addr = Some(a), 9090) },
    Override { name: "PLAYBACK_ADDR", apply: Addr(|c, a| c.playback.addr = Some(a), 8081) },
    Override { name: "SUPABASE_JWT_SECRET", apply: Text(|c, v| c.playback.jwt_secret = Some(v.into())) },
];

impl Config {
    /// Applies every override that is set, in the environment or as a
    /// credential, reporting every bad value at once.
    pub(super) fn apply_overrides(&mut self, env: &dyn Env) -> Result<(), ConfigError> {
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let mut problems = Vec::new();
        for o in OVERRIDES {
            let value = env.var(o.name).or_else(|| {
                credentials
                    .as_deref()
                    .and_then(|dir| read_credential(dir, o.name))
            });
            let Some(value) = value else { continue };
            match o.apply {
                Text(set) => set(self, value),
                Addr(set, port) => match value.parse() {
                    Ok(addr) => set(self, addr),
                    Err(_) => problems.push(format!(
                        "{}: {value:?} is not a socket address like 127.0.0.1:{port}",
                        o.name
                    )),
                },
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

pub(super) fn read_credential(dir: &Path, name: &str) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(name)).ok()?;
    let value = text.trim_end_matches(['\n', '\r']).to_owned();
    (!value.is_empty()).then_some(value)
}
