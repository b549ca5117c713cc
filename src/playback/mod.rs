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
//! Routing is axum's; CORS (an exact-origin allow-list), the request
//! timeout, the common response headers and the request log are tower-http
//! layers ([`router`]); connections are accepted by [`crate::server`].
//!
//! Neither tokens nor signed URLs are logged: each is a credential. Every
//! signed URL handed out is recorded in the access audit first
//! ([`audit`]); when that write fails the URL is refused.
//!
//! Only a path the relay itself linked to that intake, in the intake's own
//! folder, is signed ([`recording::lookup`]): `intakes.recording_object_path`
//! is the host's column, and the service key would sign whatever it names.

pub mod audit;
pub mod auth;
pub mod jwks;
pub mod recording;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::header::{
    ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, DATE, HeaderMap,
    HeaderName, HeaderValue, ORIGIN, USER_AGENT, WWW_AUTHENTICATE,
};
use axum::http::{Method, Response, StatusCode};
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::routing::get;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::Layer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::{Span, error, info, warn};
use uuid::Uuid;

use self::auth::{AuthError, Authenticator};
use self::recording::RecordingStatus;
use crate::config::Config;
use crate::providers::storage_api::{StorageClient, StorageError};

const PAGE: &str = include_str!("../../web/player.html");
const SCRIPT: &str = include_str!("../../web/player.js");

/// Bound on the database lookup and on minting one signed URL.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// A backstop over a whole request, above the sum of its steps' own bounds
/// (token keys, lookup, signing, audit), so it never pre-empts their answers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a browser may reuse a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);
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

/// The routes. API answers (everything but the page and its script, which
/// includes unknown paths and wrong methods) are never cached and carry
/// CORS headers; the page and script carry neither.
fn router(state: Arc<PlaybackState>) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::list(state.allowed_origins.iter().cloned()))
        .allow_methods([Method::GET])
        .allow_headers([AUTHORIZATION])
        // The player reads Date to correct for clock skew when it schedules
        // the renewal of a signed URL.
        .expose_headers([DATE])
        .max_age(PREFLIGHT_MAX_AGE)
        .vary([ORIGIN]);
    let api = Router::new()
        .route(
            "/v1/intakes/{id}/recording",
            // HEAD too: axum would otherwise run GET for it.
            get(recording)
                .head(method_not_allowed)
                .fallback(method_not_allowed),
        )
        .route("/healthz", get(healthz).fallback(not_found))
        .fallback(not_found)
        .with_state(state.clone())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        // Answers any OPTIONS on an API path as a preflight, before routing.
        .layer(cors)
        .layer(middleware::from_fn(preflight_no_content))
        // Answers carry signed URLs: no cache may keep them.
        .layer(SetResponseHeaderLayer::overriding(
            CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ));
    // Any other method on the page's paths is an API 404, as for any unknown path.
    Router::new()
        .route(
            "/play/{id}",
            get(player_page)
                .head_service(api.clone())
                .fallback_service(api.clone()),
        )
        .route(
            "/assets/player.js",
            get(player_script)
                .head_service(api.clone())
                .fallback_service(api.clone()),
        )
        .fallback_service(api)
        .with_state(state)
        .layer(SetResponseHeaderLayer::overriding(
            HeaderName::from_static("x-content-type-options"),
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            HeaderName::from_static("referrer-policy"),
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_request(())
                .on_response(log_response)
                .on_eos(())
                .on_failure(()),
        )
}

/// ERROR level so the span, and the request's method and path, stay on
/// its log line whatever level `RUST_LOG` keeps.
fn request_span(req: &Request) -> Span {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| *peer);
    tracing::error_span!(
        "playback",
        method = %req.method(),
        path = %req.uri().path(),
        peer = peer.map(tracing::field::display),
    )
}

/// One line per request: problems always, successful API calls at info.
fn log_response(res: &Response<Body>, latency: Duration, _span: &Span) {
    let latency_ms = (latency.as_secs_f64() * 100_000.0).round() / 100.0;
    let status = res.status().as_u16();
    let (kind, outcome, detail) = match res.extensions().get::<Log>() {
        Some(log) => (log.kind, log.outcome, log.detail.as_str()),
        // Only the layers answer without one: CorsLayer's preflights, and
        // TimeoutLayer when a request overran.
        None if res.status().is_success() => (Kind::Preflight, "preflight", ""),
        None => (Kind::Api, "timed_out", "the request overran its time"),
    };
    if res.status().is_server_error() {
        error!(status, outcome, latency_ms, %detail, "playback request");
    } else if res.status().is_client_error() {
        warn!(status, outcome, latency_ms, %detail, "playback request");
    } else if kind == Kind::Api {
        info!(status, outcome, latency_ms, "playback request");
    }
}

/// CorsLayer answers a preflight 200; ours were 204 (no content), and stay so.
async fn preflight_no_content(req: Request, next: Next) -> Response<Body> {
    let preflight = req.method() == Method::OPTIONS;
    let mut res = next.run(req).await;
    if preflight && res.status() == StatusCode::OK {
        *res.status_mut() = StatusCode::NO_CONTENT;
    }
    res
}

async fn healthz() -> Reply {
    Reply::json(StatusCode::OK, "ok", &serde_json::json!({ "status": "ok" }))
}

async fn not_found() -> Reply {
    Reply::error(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> Reply {
    Reply::error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "")
        .header(ALLOW, HeaderValue::from_static("GET, OPTIONS"))
}

async fn player_page(State(state): State<Arc<PlaybackState>>) -> Reply {
    Reply::asset("text/html; charset=utf-8", PAGE)
        .header(CONTENT_SECURITY_POLICY, state.page_policy.clone())
}

async fn player_script() -> Reply {
    Reply::asset("text/javascript; charset=utf-8", SCRIPT)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Api,
    Preflight,
    Static,
}

/// What the request log says about an answer, carried to [`log_response`]
/// as a response extension.
#[derive(Debug, Clone)]
struct Log {
    kind: Kind,
    /// A short machine-readable word for logs and error bodies.
    outcome: &'static str,
    /// For the log only (never a token or a signed URL).
    detail: String,
}

/// The answer to one request plus what the request log says about it.
struct Reply {
    status: StatusCode,
    log: Log,
    body: Bytes,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Reply {
    fn new(status: StatusCode, kind: Kind, outcome: &'static str, body: Bytes) -> Self {
        Self {
            status,
            log: Log {
                kind,
                outcome,
                detail: String::new(),
            },
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
        self.log.detail = detail.into();
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
}

impl IntoResponse for Reply {
    fn into_response(self) -> axum::response::Response {
        let mut response = Response::new(Body::from(self.body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
        response.extensions_mut().insert(self.log);
        response
    }
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
    State(state): State<Arc<PlaybackState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Reply {
    // Authentication comes first, so nothing about intakes is revealed to
    // a caller without a valid token.
    let caller = match state.auth.authenticate(headers.get(AUTHORIZATION)).await {
        Ok(caller) => caller,
        Err(e) => return auth_failure(e),
    };
    let not_found = || Reply::error(StatusCode::NOT_FOUND, "not_found", "no such recording");
    // An id that does not decode is as unknown as any other.
    let Some(Ok(intake)) = id.ok().map(|Path(id)| Uuid::parse_str(&id)) else {
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
    if found.refused_path {
        // The column is the host's to write; its value is not logged (it
        // may be anything a user typed), only that it was refused.
        warn!(
            intake.id = %intake,
            "the intake's recording_object_path is not what the relay linked to it: \
             not signed, answered as no recording"
        );
    }
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
