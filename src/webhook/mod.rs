//! The webhook listener: verify, insert, answer. Nothing else happens on the
//! request path, so the answer comes well inside Telnyx's 2 s window.
//!
//! A 2xx means the event is committed. Anything that could lose an event (the
//! database is down, the insert is slow) answers 503 so Telnyx retries, and
//! redeliveries are deduplicated on `data.id`.

mod body;
mod calls;
pub mod event;
pub mod verify;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    ACCEPT_ENCODING, ALLOW, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, HeaderValue,
    RETRY_AFTER,
};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use self::body::{BODY_SHARES, BodyShares, read_body};
use self::event::Envelope;
use self::verify::{SIGNATURE_HEADER, TIMESTAMP_HEADER, Verifier};
use crate::config::Config;
use crate::health::Health;
use crate::jobs::{Enqueued, Queue};
use crate::server::Limits;

/// Telnyx's path, and the one the original integration guide told the
/// backend to create (`POST /api/webhooks/telnyx/recording`).
pub(crate) const WEBHOOK_PATHS: [&str; 2] = ["/webhooks/telnyx", "/api/webhooks/telnyx/recording"];

/// Everything a request handler needs; shared by all connections.
pub struct WebhookState {
    pub queue: Queue,
    pub verifier: Verifier,
    pub max_body_bytes: usize,
    /// Budget for reading the body and storing the event.
    pub request_timeout: Duration,
    pub max_attempts: i32,
    /// `/metrics` here too, unless it has an address of its own.
    pub(crate) serve_metrics: bool,
    /// One permit per webhook being received and stored: with none left the
    /// next is shed (see `shed`).
    pub in_flight: Arc<Semaphore>,
    /// The longest a webhook waits for a database connection.
    pub connection_wait: Duration,
    /// One permit per body byte the listener holds (see `body.rs`).
    pub(crate) body_budget: Arc<Semaphore>,
    /// What one source (an IPv4 address, an IPv6 /64) may hold of that
    /// budget at once, so one unsigned client cannot take it all.
    body_shares: BodyShares,
    /// `/readyz` and `/metrics` reach the database through this, never
    /// through the webhooks' pool.
    pub health: Arc<Health>,
    /// The SIP header that names the intake (`pipeline.intake_header`).
    pub intake_header: String,
}

impl WebhookState {
    pub fn from_config(config: &Config, queue: Queue, health: Arc<Health>) -> Result<Self, String> {
        Ok(Self {
            queue,
            verifier: Verifier::new(
                config.telnyx_public_key()?,
                config.listener.timestamp_tolerance,
            ),
            max_body_bytes: config.listener.max_body_bytes,
            request_timeout: config.listener.request_timeout,
            max_attempts: config.retry.max_attempts,
            serve_metrics: config.metrics.addr.is_none(),
            in_flight: Arc::new(Semaphore::new(config.listener.max_in_flight)),
            connection_wait: config.listener.connection_wait,
            body_budget: Arc::new(Semaphore::new(config.listener.body_budget_bytes)),
            body_shares: BodyShares::new(
                (config.listener.body_budget_bytes / BODY_SHARES)
                    .max(config.listener.max_body_bytes),
            ),
            health,
            intake_header: config.pipeline.intake_header.clone(),
        })
    }
}

/// The webhook port's connection limits.
pub fn limits(config: &Config) -> Limits {
    Limits {
        header_read_timeout: config.listener.header_read_timeout,
        max_connections: config.listener.max_connections,
        max_connections_per_source: config.listener.max_connections_per_source,
        max_connection_age: config.listener.max_connection_age,
    }
}

/// Serves until `shutdown` is cancelled, then lets open requests finish
/// (bounded) and returns.
pub async fn run(
    listener: TcpListener,
    state: Arc<WebhookState>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    crate::server::serve(
        "webhook listener",
        listener,
        limits,
        shutdown,
        move |peer| {
            let state = state.clone();
            service_fn(move |req| handle(req, state.clone(), peer))
        },
    )
    .await;
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<WebhookState>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let reply = route(req, &state, peer).await;
    let latency_ms = (started.elapsed().as_secs_f64() * 100_000.0).round() / 100.0;
    if WEBHOOK_PATHS.contains(&path.as_str()) {
        crate::metrics::metrics().webhook(reply.outcome, reply.status.as_u16());
    }
    let status = reply.status.as_u16();
    let event_id = reply.event_id.as_deref().unwrap_or("");
    if reply.outcome == SHED {
        // Expected under overload, and one line per request: not an error.
        warn!(%method, %path, %peer, status, outcome = reply.outcome, event.id = event_id, latency_ms, detail = %reply.detail, "webhook request");
    } else if reply.status.is_server_error() {
        error!(%method, %path, %peer, status, outcome = reply.outcome, event.id = event_id, latency_ms, detail = %reply.detail, "webhook request");
    } else if reply.status.is_client_error() {
        warn!(%method, %path, %peer, status, outcome = reply.outcome, event.id = event_id, latency_ms, detail = %reply.detail, "webhook request");
    } else if !matches!(path.as_str(), "/healthz" | "/readyz" | "/metrics") {
        info!(%method, %path, status, outcome = reply.outcome, event.id = event_id, job.id = reply.job_id, latency_ms, "webhook request");
    }
    Ok(reply.into_response())
}

/// The answer to one request plus what the request log line says about it.
struct Reply {
    status: StatusCode,
    outcome: &'static str,
    detail: String,
    event_id: Option<String>,
    job_id: Option<i64>,
    allow: Option<&'static str>,
    /// A non-JSON body (the metrics page).
    text: Option<String>,
    accept_encoding: Option<&'static str>,
    /// Ask the client to come back later, on a new connection.
    retry_later: bool,
}

impl Reply {
    fn new(status: StatusCode, outcome: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            outcome,
            detail: detail.into(),
            event_id: None,
            job_id: None,
            allow: None,
            text: None,
            accept_encoding: None,
            retry_later: false,
        }
    }

    fn event(mut self, id: &str) -> Self {
        self.event_id = Some(id.to_owned());
        self
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        if let Some(text) = self.text {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            return response;
        }
        let mut body = json!({ "status": self.outcome });
        // Server-side details (database errors) go to the log, not to the caller.
        if !self.detail.is_empty() && !self.status.is_server_error() {
            body["detail"] = json!(self.detail);
        }
        if let Some(id) = self.job_id {
            body["job_id"] = json!(id);
        }
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(allow) = self.allow {
            headers.insert(ALLOW, HeaderValue::from_static(allow));
        }
        if let Some(encodings) = self.accept_encoding {
            headers.insert(ACCEPT_ENCODING, HeaderValue::from_static(encodings));
        }
        if self.retry_later {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

async fn route(req: Request<Incoming>, state: &WebhookState, peer: SocketAddr) -> Reply {
    let path = req.uri().path();
    let is_webhook = WEBHOOK_PATHS.contains(&path);
    match (req.method(), path) {
        (&Method::POST, _) if is_webhook => receive(req, state, peer).await,
        (&Method::GET | &Method::HEAD, "/healthz") => Reply::new(StatusCode::OK, "ok", ""),
        (&Method::GET | &Method::HEAD, "/readyz") => readiness(state).await,
        (&Method::GET, "/metrics") if state.serve_metrics => Reply {
            text: Some(state.health.metrics_text().await),
            ..Reply::new(StatusCode::OK, "metrics", "")
        },
        (_, "/healthz" | "/readyz") => Reply {
            allow: Some("GET, HEAD"),
            ..Reply::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "")
        },
        _ if is_webhook => Reply {
            allow: Some("POST"),
            ..Reply::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "")
        },
        _ => Reply::new(StatusCode::NOT_FOUND, "not_found", ""),
    }
}

async fn readiness(state: &WebhookState) -> Reply {
    match state.health.ready().await {
        Ok(()) => Reply::new(StatusCode::OK, "ready", ""),
        Err(e) => Reply::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", e),
    }
}

// `content-type` is deliberately not checked: the signature, not a header,
// vouches for the bytes. Telnyx sends `application/json`; a proxy that drops
// or rewrites the header must not cost us an event, and a body that is not
// JSON is quarantined after verification anyway.
async fn receive(req: Request<Incoming>, state: &WebhookState, peer: SocketAddr) -> Reply {
    let deadline = Instant::now() + state.request_timeout;
    if !is_identity_encoded(req.headers()) {
        return Reply {
            accept_encoding: Some("identity"),
            ..Reply::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_encoding",
                "compressed bodies are not accepted; send the body as signed",
            )
        };
    }
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > state.max_body_bytes as u64) {
        return too_large(state);
    }
    let (parts, body) = req.into_parts();
    let (body, _budget) =
        match tokio::time::timeout_at(deadline.into(), read_body(body, state, peer)).await {
            Ok(Ok(read)) => read,
            Ok(Err(reply)) => return reply,
            Err(_) => {
                return Reply::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    "the body did not arrive in time",
                );
            }
        };

    let header = |name| parts.headers.get(name).map(HeaderValue::as_bytes);
    let signed_at = match state.verifier.verify(
        header(TIMESTAMP_HEADER),
        header(SIGNATURE_HEADER),
        &body,
        SystemTime::now(),
    ) {
        Ok(t) => t,
        Err(e) => return Reply::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
    };

    // Only now, so that requests nobody signed cannot take the room: a
    // permit per webhook being stored, for as long as it is.
    let Ok(_permit) = state.in_flight.clone().try_acquire_owned() else {
        return shed("webhooks being stored at the limit (listener.max_in_flight)");
    };
    let envelope = match Envelope::parse(&body) {
        Ok(envelope) => envelope,
        Err(e) => return quarantine(state, deadline, &e.to_string(), signed_at, &body).await,
    };
    if envelope.is_call_event() {
        return store_call(state, deadline, &envelope).await;
    }
    if !envelope.is_job() {
        return Reply::new(
            StatusCode::OK,
            "ignored",
            format!("event type {}", envelope.event_type),
        )
        .event(&envelope.id);
    }
    let event_id = envelope.id.clone();
    let job = envelope.into_job(state.max_attempts);
    // A second try on another connection when the first one turns out dead
    // (the database came back, but the pool still held connections from
    // before): the insert is idempotent on the event id, and a blip should
    // cost Telnyx one 503 at most, not one per dead connection.
    let mut tries = 0;
    let outcome = loop {
        tries += 1;
        let mut conn = match connection_within(state, deadline).await {
            Ok(conn) => conn,
            Err(reply) => return reply.event(&event_id),
        };
        let insert = Queue::enqueue_with(&mut *conn, &job);
        match tokio::time::timeout_at(deadline.into(), insert).await {
            Ok(Err(e)) if tries == 1 && e.is_connection_lost() => {
                conn.close_on_drop();
                continue;
            }
            outcome => break outcome,
        }
    };
    match outcome {
        Ok(Ok(Enqueued::Inserted(id))) => Reply {
            job_id: Some(id),
            ..Reply::new(StatusCode::OK, "stored", "").event(&event_id)
        },
        Ok(Ok(Enqueued::Duplicate)) => Reply::new(StatusCode::OK, "duplicate", "").event(&event_id),
        Ok(Err(e)) => unavailable(e.to_string()).event(&event_id),
        // The insert may still commit after this; the redelivery is then a
        // duplicate, which is harmless.
        Err(_) => unavailable("storing the event timed out".to_owned()).event(&event_id),
    }
}

/// `call.initiated` / `call.answered`: the session's row in
/// `recording_relay.calls`, and any job of the session waiting for it made
/// runnable now, in one transaction committed before the 200.
async fn store_call(state: &WebhookState, deadline: Instant, envelope: &Envelope) -> Reply {
    let Some(call) = calls::CallEvent::from_envelope(envelope, &state.intake_header) else {
        return Reply::new(StatusCode::OK, "ignored", "no call_session_id").event(&envelope.id);
    };
    // One more try on a fresh connection, as for jobs (see `receive`):
    // the upsert is idempotent.
    let mut tries = 0;
    let outcome = loop {
        tries += 1;
        let mut conn = match connection_within(state, deadline).await {
            Ok(conn) => conn,
            Err(reply) => return reply.event(&envelope.id),
        };
        let store = async {
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            let stored = calls::upsert(&mut *tx, &call).await?;
            Queue::wake_session(&mut *tx, &call.call_session_id).await?;
            tx.commit().await?;
            Ok::<_, crate::jobs::QueueError>(stored)
        };
        match tokio::time::timeout_at(deadline.into(), store).await {
            Ok(Err(e)) if tries == 1 && e.is_connection_lost() => {
                conn.close_on_drop();
                continue;
            }
            outcome => break outcome,
        }
    };
    match outcome {
        Ok(Ok(stored)) => {
            if let Some(values) = &stored.intake_conflict
                && call.intake != calls::IntakeHeader::Absent
            {
                // The session links no intake now; its recording goes to
                // phone and time's strict rules, or to a person.
                warn!(event.id = %envelope.id, call.session_id = %call.call_session_id,
                      header = %state.intake_header, values = %values,
                      "the call session's events name different intakes; it links none");
            }
            let outcome = if stored.inserted { "stored" } else { "merged" };
            Reply::new(StatusCode::OK, outcome, "").event(&envelope.id)
        }
        Ok(Err(e)) => unavailable(e.to_string()).event(&envelope.id),
        Err(_) => unavailable("storing the call event timed out".to_owned()).event(&envelope.id),
    }
}

/// A pooled connection. When every connection is busy, within
/// `listener.connection_wait`, past which the webhook is shed: waiting longer
/// only turns overload into timeouts. Otherwise within the request's
/// deadline: the acquire may have to open a connection (TLS and SCRAM to a
/// distant database can take longer than the wait), and cancelling that
/// would shed every webhook of a cold pool.
async fn connection_within(
    state: &WebhookState,
    deadline: Instant,
) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, Reply> {
    let pool = state.queue.pool();
    let saturated = pool.size() >= pool.options().get_max_connections() && pool.num_idle() == 0;
    let wait = if saturated {
        (Instant::now() + state.connection_wait).min(deadline)
    } else {
        deadline
    };
    match tokio::time::timeout_at(wait.into(), state.queue.pool().acquire()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(unavailable(e.to_string())),
        Err(_) => Err(shed(
            "no database connection free within listener.connection_wait",
        )),
    }
}

/// A verified body we cannot read is still Telnyx's data: keep it. If even
/// that fails, 503 makes Telnyx deliver it again.
async fn quarantine(
    state: &WebhookState,
    deadline: Instant,
    reason: &str,
    signed_at: i64,
    body: &[u8],
) -> Reply {
    let signed_at = chrono::DateTime::from_timestamp(signed_at, 0);
    let stored = tokio::time::timeout_at(
        deadline.into(),
        state.queue.quarantine(reason, signed_at, body),
    )
    .await;
    match stored {
        Ok(Ok(id)) => Reply::new(
            StatusCode::BAD_REQUEST,
            "quarantined",
            format!("{reason} (kept as quarantine row {id})"),
        ),
        Ok(Err(e)) => unavailable(e.to_string()),
        Err(_) => unavailable("quarantining the event timed out".to_owned()),
    }
}

/// Telnyx never compresses webhooks, and the signature covers the bytes as
/// sent, so a compressed body could only be verified after inflating it:
/// exactly what a gzip bomb wants. Such a request is refused with 415 (and
/// `Accept-Encoding: identity`, RFC 7694) from its headers alone, before a
/// byte of the body is read. 415 rather than the 401 a signature check
/// would give: it is decided without reading or hashing the body, and it
/// tells an operator whose proxy compresses what is wrong instead of
/// sending them after the key.
fn is_identity_encoded(headers: &HeaderMap) -> bool {
    headers.get_all(CONTENT_ENCODING).iter().all(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .map(str::trim)
                .all(|coding| coding.is_empty() || coding.eq_ignore_ascii_case("identity"))
        })
    })
}

fn too_large(state: &WebhookState) -> Reply {
    Reply::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("body over {} bytes", state.max_body_bytes),
    )
}

/// The outcome of a shed webhook, in the answer, the log and the metrics.
const SHED: &str = "shed";

/// Load shedding: a 503 that costs no database work, so an overloaded
/// listener answers at once and Telnyx retries later, instead of every
/// request waiting past its deadline. Nothing is lost: the event was not
/// acknowledged.
fn shed(detail: &'static str) -> Reply {
    Reply {
        retry_later: true,
        ..Reply::new(StatusCode::SERVICE_UNAVAILABLE, SHED, detail)
    }
}

fn unavailable(detail: String) -> Reply {
    Reply::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
}
