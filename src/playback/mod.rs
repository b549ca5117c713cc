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
//!
//! Neither tokens nor signed URLs are logged: each is a credential. Every
//! signed URL handed out is recorded in the access audit first
//! ([`audit`]); when that write fails the URL is refused.

pub mod audit;
pub mod auth;
pub mod jwks;
pub mod recording;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ALLOW, AUTHORIZATION, CACHE_CONTROL,
    CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, ORIGIN, USER_AGENT,
    VARY, WWW_AUTHENTICATE,
};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use uuid::Uuid;

use self::auth::{AuthError, Authenticator};
use self::recording::RecordingStatus;
use crate::config::Config;
use crate::storage::{StorageClient, StorageError};

const PAGE: &str = include_str!("../../web/player.html");
const SCRIPT: &str = include_str!("../../web/player.js");

/// Bound on the database lookup and on minting one signed URL.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 512;

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
    pool: PgPool,
    auth: Authenticator,
    storage: StorageClient,
    signed_url_ttl: Duration,
    allowed_origins: Vec<HeaderValue>,
    /// The page's Content-Security-Policy: it holds a user's token, so it
    /// may load its own script and the storage origin's audio, nothing else.
    page_policy: HeaderValue,
    header_read_timeout: Duration,
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
/// (bounded) and returns.
pub async fn run(listener: TcpListener, state: Arc<PlaybackState>, shutdown: CancellationToken) {
    let limits = crate::server::Limits {
        header_read_timeout: state.header_read_timeout,
        max_connections: MAX_CONNECTIONS,
    };
    crate::server::serve("playback server", listener, limits, shutdown, move |peer| {
        let state = state.clone();
        service_fn(move |req| handle(req, state.clone(), peer))
    })
    .await;
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<PlaybackState>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let reply = route(&req, &state, peer).await;
    let latency_ms = (started.elapsed().as_secs_f64() * 100_000.0).round() / 100.0;
    let status = reply.status.as_u16();
    if reply.status.is_server_error() {
        error!(%method, %path, %peer, status, outcome = reply.outcome, latency_ms, detail = %reply.detail, "playback request");
    } else if reply.status.is_client_error() {
        warn!(%method, %path, %peer, status, outcome = reply.outcome, latency_ms, detail = %reply.detail, "playback request");
    } else if reply.kind == Kind::Api {
        info!(%method, %path, status, outcome = reply.outcome, latency_ms, "playback request");
    }
    Ok(reply.into_response(&state, req.headers()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Api,
    Preflight,
    Static,
}

/// The answer to one request plus what the request log says about it.
struct Reply {
    status: StatusCode,
    kind: Kind,
    /// A short machine-readable word for logs and error bodies.
    outcome: &'static str,
    /// For the log only (never a token or a signed URL).
    detail: String,
    body: Bytes,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Reply {
    fn new(status: StatusCode, kind: Kind, outcome: &'static str, body: Bytes) -> Self {
        Self {
            status,
            kind,
            outcome,
            detail: String::new(),
            body,
            headers: Vec::new(),
        }
    }

    fn json(status: StatusCode, outcome: &'static str, body: &impl Serialize) -> Self {
        let body = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
        Self::new(status, Kind::Api, outcome, body)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
    }

    fn error(status: StatusCode, outcome: &'static str, message: &str) -> Self {
        Self::json(
            status,
            outcome,
            &serde_json::json!({ "error": outcome, "message": message }),
        )
    }

    fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    fn asset(content_type: &'static str, body: &'static str) -> Self {
        let body = Bytes::from_static(body.as_bytes());
        Self::new(StatusCode::OK, Kind::Static, "ok", body)
            .header(CONTENT_TYPE, HeaderValue::from_static(content_type))
            .header(CACHE_CONTROL, HeaderValue::from_static("no-cache"))
    }

    fn into_response(self, state: &PlaybackState, request: &HeaderMap) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(self.body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            HeaderName::from_static("x-content-type-options"),
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(
            HeaderName::from_static("referrer-policy"),
            HeaderValue::from_static("no-referrer"),
        );
        if self.kind != Kind::Static {
            // Answers carry signed URLs: no cache may keep them.
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            if !state.allowed_origins.is_empty() {
                headers.append(VARY, HeaderValue::from_static("origin"));
            }
            if let Some(origin) = allowed_origin(state, request) {
                headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
                // The player reads Date to correct for clock skew when it
                // schedules the renewal of a signed URL.
                headers.insert(
                    ACCESS_CONTROL_EXPOSE_HEADERS,
                    HeaderValue::from_static("date"),
                );
            }
        }
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
        response
    }
}

fn allowed_origin(state: &PlaybackState, request: &HeaderMap) -> Option<HeaderValue> {
    let origin = request.get(ORIGIN)?;
    state
        .allowed_origins
        .iter()
        .any(|allowed| allowed == origin)
        .then(|| origin.clone())
}

async fn route(req: &Request<Incoming>, state: &PlaybackState, peer: SocketAddr) -> Reply {
    let path = req.uri().path();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method();
    match segments.as_slice() {
        ["healthz"] if matches!(*method, Method::GET | Method::HEAD) => {
            Reply::json(StatusCode::OK, "ok", &serde_json::json!({ "status": "ok" }))
        }
        ["v1", "intakes", id, "recording"] => match *method {
            Method::GET => recording(req.headers(), id, state, peer).await,
            Method::OPTIONS => preflight(),
            _ => Reply::error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "")
                .header(ALLOW, HeaderValue::from_static("GET, OPTIONS")),
        },
        ["play", id] if *method == Method::GET && !id.is_empty() => {
            Reply::asset("text/html; charset=utf-8", PAGE)
                .header(CONTENT_SECURITY_POLICY, state.page_policy.clone())
        }
        ["assets", "player.js"] if *method == Method::GET => {
            Reply::asset("text/javascript; charset=utf-8", SCRIPT)
        }
        _ => Reply::error(StatusCode::NOT_FOUND, "not_found", "no such route"),
    }
}

/// CORS preflight: the origin headers are added (or not) like on every API
/// answer, so a disallowed origin gets a 204 the browser will not act on.
fn preflight() -> Reply {
    Reply::new(
        StatusCode::NO_CONTENT,
        Kind::Preflight,
        "preflight",
        Bytes::new(),
    )
    .header(
        ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET"),
    )
    .header(
        ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization"),
    )
    .header(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"))
}

/// The API's answer for one intake.
#[derive(Debug, Serialize)]
pub struct RecordingResponse {
    pub status: RecordingStatus,
    pub duration_seconds: Option<i32>,
    /// A signed URL, only when `status` is `available`.
    pub url: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

async fn recording(
    headers: &HeaderMap,
    id: &str,
    state: &PlaybackState,
    peer: SocketAddr,
) -> Reply {
    // Authentication comes first, so nothing about intakes is revealed to
    // a caller without a valid token.
    let caller = match state.auth.authenticate(headers.get(AUTHORIZATION)).await {
        Ok(caller) => caller,
        Err(e) => return auth_failure(e),
    };
    let not_found = || Reply::error(StatusCode::NOT_FOUND, "not_found", "no such recording");
    let Ok(intake) = Uuid::parse_str(id) else {
        return not_found().detail("malformed intake id");
    };
    let found = tokio::time::timeout(
        STEP_TIMEOUT,
        recording::lookup(&state.pool, intake, &caller.organization),
    )
    .await;
    let found = match found {
        Ok(Ok(Some(found))) => found,
        Ok(Ok(None)) => return not_found().detail("unknown intake or another organization"),
        Ok(Err(e)) => return unavailable(format!("database: {e}")),
        Err(_) => return unavailable("database: timed out".to_owned()),
    };
    let mut body = RecordingResponse {
        status: found.status,
        duration_seconds: found.duration_seconds,
        url: None,
        expires_at: None,
    };
    if let (RecordingStatus::Available, Some(path)) = (found.status, found.object_path.as_deref()) {
        // Taken before the request, so the real expiry is never earlier.
        let expires_at = Utc::now() + state.signed_url_ttl;
        let signed = tokio::time::timeout(
            STEP_TIMEOUT,
            state.storage.signed_url(path, state.signed_url_ttl),
        )
        .await;
        match signed {
            Ok(Ok(url)) => {
                let access = audit::Access {
                    user_id: &caller.user_id,
                    organization: &caller.organization,
                    intake_id: intake,
                    object_path: path,
                    client_addr: peer.ip(),
                    user_agent: headers.get(USER_AGENT).and_then(|v| v.to_str().ok()),
                    expires_at,
                };
                // Fail closed: a URL nobody can trace back is not handed out.
                match tokio::time::timeout(STEP_TIMEOUT, audit::record(&state.pool, &access)).await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return unavailable(format!("access audit: {e}")),
                    Err(_) => return unavailable("access audit: timed out".to_owned()),
                }
                body.url = Some(url);
                body.expires_at = Some(expires_at);
            }
            Ok(Err(e)) => {
                return Reply::error(
                    StatusCode::BAD_GATEWAY,
                    "storage",
                    "the recording could not be signed",
                )
                .detail(format!("intake {intake}: {e}"));
            }
            Err(_) => {
                return Reply::error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "storage",
                    "storage did not answer",
                )
                .detail(format!("intake {intake}: signing timed out"));
            }
        }
    }
    Reply::json(StatusCode::OK, "ok", &body)
}

fn auth_failure(e: AuthError) -> Reply {
    let detail = e.to_string();
    let reply = match e {
        AuthError::Missing => Reply::error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a bearer token is required",
        )
        .header(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")),
        AuthError::Expired | AuthError::Rejected(_) => Reply::error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            if matches!(e, AuthError::Expired) {
                "the token has expired"
            } else {
                "the token is not valid"
            },
        )
        .header(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        ),
        AuthError::NoOrganization(_) => Reply::error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token names no organization",
        ),
        AuthError::KeysUnavailable(_) => Reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "tokens cannot be verified right now",
        ),
    };
    reply.detail(detail)
}

fn unavailable(detail: String) -> Reply {
    Reply::error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "try again later",
    )
    .detail(detail)
}
