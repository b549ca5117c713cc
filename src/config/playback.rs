//! `[playback]`: the API that hands the UI's users signed URLs (off unless
//! `addr` is set).

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::Config;
use super::providers::check_provider_url;

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
    pub(crate) audience: String,
    /// Dotted path of the organization id inside the token's claims.
    pub(crate) organization_claim: String,
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

impl Config {
    pub(super) fn validate_playback(&self, problems: &mut Vec<String>) {
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
