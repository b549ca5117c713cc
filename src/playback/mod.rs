//! Playback for the ZScribe UI: the bucket is private, so `recording_url`
//! cannot play in a browser. This server, on its own address (it faces the
//! UI's users, not Telnyx), hands a signed-in user a short-lived signed URL
//! for a recording of their organization, and serves a small player page.
//!
//! - `GET /v1/intakes/{id}/recording` → `{status, duration_seconds, url,
//!   expires_at}` for a caller with a Supabase user token
//!   (`Authorization: Bearer …`) whose organization owns the intake.
//!   Unknown intakes and other organizations' intakes both answer 404, so
//!   ids cannot be probed.
//! - `GET /play/{id}`: the player page (`web/player.html`, `web/player.js`).
//! - `GET /openapi.json`: the API's OpenAPI 3.1 document ([`contract`]),
//!   committed as `docs/openapi.json`.
//!
//! Routing is axum's; CORS (an exact-origin allow-list), the request
//! timeout, the common response headers and the request log are tower-http
//! layers (`router.rs`), the handlers are `handlers.rs` and their answers
//! `reply.rs`; connections are accepted by `server.rs`.
//!
//! Neither tokens nor signed URLs are logged: each is a credential. Every
//! signed URL handed out is recorded in the access audit first
//! ([`audit`]); when that write fails the URL is refused.
//!
//! Only a path the relay itself linked to that intake, in the intake's own
//! folder, is signed (`lookup`): `intakes.recording_object_path`
//! is the host's column, and the service key would sign whatever it names.

pub mod audit;
pub mod auth;
pub mod contract;
mod handlers;
pub mod jwks;
pub mod recording;
mod reply;
mod router;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::HeaderValue;
use hyper_util::service::TowerToHyperService;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::Layer;

use self::auth::Authenticator;
use self::router::router;
use crate::config::Config;
use crate::providers::storage_api::{StorageClient, StorageError};

pub(crate) const MAX_CONNECTIONS: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum PlaybackError {
    #[error("playback needs {0}")]
    Missing(&'static str),
    #[error("supabase.url is not a URL: {0}")]
    BadStorageUrl(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Auth(String),
    #[error("playback.allowed_origins holds a value that is not an origin")]
    BadOrigin,
}

/// Everything a request handler needs; shared by all connections.
pub struct PlaybackState {
    pub(super) pool: PgPool,
    pub(super) auth: Authenticator,
    pub(super) storage: StorageClient,
    pub(super) signed_url_ttl: Duration,
    pub(super) allowed_origins: Vec<HeaderValue>,
    /// The page's Content-Security-Policy: it holds a user's token, so it
    /// may load its own script and the storage origin's audio, nothing else.
    pub(super) page_policy: HeaderValue,
    pub(super) header_read_timeout: Duration,
}

impl PlaybackState {
    pub fn from_config(config: &Config, pool: PgPool) -> Result<Self, PlaybackError> {
        let storage_url = config
            .supabase
            .url
            .as_deref()
            .ok_or(PlaybackError::Missing("supabase.url"))?;
        let storage = StorageClient::from_config(config)
            .map_err(|_| PlaybackError::Missing("supabase.url and supabase.service_role_key"))?;
        let media_origin = reqwest::Url::parse(storage_url)
            .map_err(|e| PlaybackError::BadStorageUrl(e.to_string()))?
            .origin()
            .ascii_serialization();
        let p = &config.playback;
        let frame_ancestors = std::iter::once("'self'")
            .chain(p.allowed_origins.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        let policy = format!(
            "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; \
             media-src {media_origin}; base-uri 'none'; form-action 'none'; \
             frame-ancestors {frame_ancestors}"
        );
        Ok(Self {
            pool,
            auth: Authenticator::from_config(config).map_err(PlaybackError::Auth)?,
            storage,
            signed_url_ttl: p.signed_url_ttl,
            // The config check refuses `*`, which CorsLayer's list would panic on.
            allowed_origins: p
                .allowed_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect(),
            page_policy: HeaderValue::from_str(&policy).map_err(|_| PlaybackError::BadOrigin)?,
            header_read_timeout: config.listener.header_read_timeout,
        })
    }
}

/// Serves until `shutdown` is cancelled, then lets open requests finish
/// (bounded) and returns. The accept loop is the listener's: axum's own
/// `serve` has no connection bound, header-read timeout or bounded drain.
pub async fn run(listener: TcpListener, state: Arc<PlaybackState>, shutdown: CancellationToken) {
    let limits = crate::server::Limits {
        header_read_timeout: state.header_read_timeout,
        max_connections: MAX_CONNECTIONS,
        // The UI's users often share an address (a clinic's NAT, a reverse
        // proxy): no share per source below the whole.
        max_connections_per_source: MAX_CONNECTIONS,
        max_connection_age: Duration::from_secs(300),
    };
    let app = router(state);
    crate::server::serve("playback server", listener, limits, shutdown, move |peer| {
        // The audit records the client address, which axum reads from here.
        TowerToHyperService::new(axum::Extension(ConnectInfo(peer)).layer(app.clone()))
    })
    .await;
}
