//! The request handlers: the recording API (a signed URL for a caller of
//! the intake's organization, audited before it leaves), the player page
//! and its script, health, and the answers for unknown routes and methods.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::http::header::{
    ALLOW, AUTHORIZATION, CONTENT_SECURITY_POLICY, HeaderMap, HeaderValue, USER_AGENT,
    WWW_AUTHENTICATE,
};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::warn;
use utoipa::ToSchema;
use uuid::Uuid;

use super::auth::AuthError;
use super::contract;
use super::recording::RecordingStatus;
use super::reply::{ErrorBody, Reply};
use super::{PlaybackState, audit, recording};

const PAGE: &str = include_str!("../../web/player.html");
const SCRIPT: &str = include_str!("../../web/player.js");

/// Bound on the database lookup and on minting one signed URL.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET /healthz`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Health {
    #[schema(example = "ok")]
    status: &'static str,
}

/// Whether the playback server is up (it answers without a database).
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "meta",
    responses((status = 200, description = "The server is up", body = Health)),
)]
pub(super) async fn healthz() -> Reply {
    Reply::json(StatusCode::OK, "ok", &Health { status: "ok" })
}

/// This document (`docs/openapi.json` in the repository).
///
/// It holds no secret and no data, so it is served without a token.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API",
               content_type = "application/json", body = Object)),
)]
pub(super) async fn openapi() -> Reply {
    static TEXT: std::sync::LazyLock<String> = std::sync::LazyLock::new(contract::document_json);
    Reply::json_text(TEXT.as_str())
}

pub(super) async fn not_found() -> Reply {
    Reply::error(StatusCode::NOT_FOUND, "not_found", "no such route")
}

pub(super) async fn method_not_allowed() -> Reply {
    Reply::error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "")
        .header(ALLOW, HeaderValue::from_static("GET, OPTIONS"))
}

pub(super) async fn player_page(State(state): State<Arc<PlaybackState>>) -> Reply {
    Reply::asset("text/html; charset=utf-8", PAGE)
        .header(CONTENT_SECURITY_POLICY, state.page_policy.clone())
}

pub(super) async fn player_script() -> Reply {
    Reply::asset("text/javascript; charset=utf-8", SCRIPT)
}

/// The API's answer for one intake. Every field is always present.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RecordingResponse {
    #[schema(required = true)]
    pub status: RecordingStatus,
    /// The call's length in whole seconds, when known.
    #[schema(required = true)]
    pub duration_seconds: Option<i32>,
    /// A signed URL, only when `status` is `available`.
    #[schema(required = true)]
    pub url: Option<String>,
    /// When `url` stops working (RFC 3339); set with `url`.
    #[schema(required = true)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// The recording of one intake, with a signed URL when it can be played.
///
/// Authentication comes first: without a valid token nothing else is
/// looked at. Every URL handed out is in the access audit first.
#[utoipa::path(
    get,
    path = "/v1/intakes/{id}/recording",
    operation_id = "getIntakeRecording",
    tag = "recordings",
    params(("id" = String, Path, min_length = 1,
             description = "The intake's id (a UUID; anything else is answered 404)")),
    security(("supabase_user" = [])),
    responses(
        (status = 200, description = "The recording's state, and a signed URL when it is available",
         body = RecordingResponse),
        (status = 401, description = "No bearer token, or one that is expired or not valid",
         body = ErrorBody,
         headers(("WWW-Authenticate" = String, description = "`Bearer`, or `Bearer error=\"invalid_token\"`"))),
        (status = 403, description = "The token names no organization", body = ErrorBody),
        (status = 404, description = "No such intake in the caller's organization (or a malformed id)",
         body = ErrorBody),
        (status = 502, description = "Storage refused to sign the recording", body = ErrorBody),
        (status = 503, description = "Tokens cannot be verified right now (signing keys unavailable), \
                                      or the database or the access audit failed", body = ErrorBody),
        (status = 504, description = "Storage did not answer in time", body = ErrorBody),
    ),
)]
pub(super) async fn recording(
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
