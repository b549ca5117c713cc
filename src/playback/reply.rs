//! The answer to one request, and what the request log says about it.

use axum::body::Body;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue};
use axum::http::{Response, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Api,
    Preflight,
    Static,
}

/// What the request log says about an answer, carried to [`log_response`]
/// as a response extension.
#[derive(Debug, Clone)]
pub(super) struct Log {
    pub(super) kind: Kind,
    /// A short machine-readable word for logs and error bodies.
    pub(super) outcome: &'static str,
    /// For the log only (never a token or a signed URL).
    pub(super) detail: String,
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ErrorBody {
    /// A short machine-readable word: `unauthorized`, `forbidden`,
    /// `not_found`, `method_not_allowed`, `storage` or `unavailable`.
    #[schema(example = "not_found")]
    pub(super) error: &'static str,
    /// For people; may be empty.
    pub(super) message: &'static str,
}

/// The answer to one request plus what the request log says about it.
pub(super) struct Reply {
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

    pub(super) fn json(status: StatusCode, outcome: &'static str, body: &impl Serialize) -> Self {
        let body = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
        Self::new(status, Kind::Api, outcome, body)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
    }

    pub(super) fn error(status: StatusCode, outcome: &'static str, message: &'static str) -> Self {
        Self::json(
            status,
            outcome,
            &ErrorBody {
                error: outcome,
                message,
            },
        )
    }

    /// A JSON document already serialized.
    pub(super) fn json_text(body: &'static str) -> Self {
        Self::new(
            StatusCode::OK,
            Kind::Api,
            "ok",
            Bytes::from_static(body.as_bytes()),
        )
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
    }

    pub(super) fn detail(mut self, detail: impl Into<String>) -> Self {
        self.log.detail = detail.into();
        self
    }

    pub(super) fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub(super) fn asset(content_type: &'static str, body: &'static str) -> Self {
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
