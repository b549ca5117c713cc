//! The routes and the tower-http layers around them: CORS (an exact-origin
//! allow-list), the request timeout, the common response headers and the
//! request log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, DATE, HeaderName, HeaderValue, ORIGIN};
use axum::http::{Method, Response, StatusCode};
use axum::middleware::{self, Next};
use axum::routing::get;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::{Span, error, info, warn};

use super::PlaybackState;
use super::handlers::{
    healthz, method_not_allowed, not_found, openapi, player_page, player_script, recording,
};
use super::reply::{Kind, Log};

/// A backstop over a whole request, above the sum of its steps' own bounds
/// (token keys, lookup, signing, audit), so it never pre-empts their answers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a browser may reuse a preflight's answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// The routes. API answers (everything but the page and its script, which
/// includes unknown paths and wrong methods) are never cached and carry
/// CORS headers; the page and script carry neither.
pub(super) fn router(state: Arc<PlaybackState>) -> Router {
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
        .route("/openapi.json", get(openapi).fallback(not_found))
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
