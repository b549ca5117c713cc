//! What `/readyz` and `/metrics` ask the database, through a pool of their
//! own and at a bounded rate, so that no number of probes and scrapes can
//! take a connection a webhook or a heartbeat needs (issue #19: scrapes
//! shared the webhooks' 10 connections, each counted the whole table, and
//! the worker's heartbeats waited behind them).
//!
//! - The pool ([`pool`]) has `HEALTH_CONNECTIONS`
//!   connections and a short acquire timeout: under a flood of probes a
//!   probe fails, nothing else does.
//! - Readiness is asked at most once every `READY_MAX_AGE`; probes in
//!   between get the last answer, and concurrent ones wait for the one in
//!   flight instead of each asking.
//! - The queue gauges are read at most once every
//!   `QUEUE_GAUGES_MAX_AGE`, along indexes only
//!   ([`crate::jobs::Queue::gauges`]), and handed to the metrics registry
//!   as plain numbers when the text is rendered (`metrics_text`),
//!   so `metrics.rs` stays a leaf that knows nothing of the queue.
//! - `GET /metrics` on an address of its own (`serve_metrics`), when one
//!   is configured; otherwise the webhook listener answers it.

use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::Mutex;

use crate::config::Config;
use crate::db::{self, DbError};
use crate::jobs::Queue;
use crate::jobs::queue::QueueGauges;
use crate::metrics::{QueueReading, metrics};

/// The queue gauges are read from the database at most this often; a
/// scrape in between reports the last reading.
pub(crate) const QUEUE_GAUGES_MAX_AGE: Duration = Duration::from_secs(5);
/// The longest one reading of the gauges may take.
const GAUGES_TIMEOUT: Duration = Duration::from_secs(2);

/// The last reading of the queue gauges.
#[derive(Debug, Clone, Default)]
pub(crate) struct GaugeReading {
    /// Whether the last reading succeeded.
    pub(crate) database_up: bool,
    /// The last successful one.
    pub gauges: Option<QueueGauges>,
}

impl GaugeReading {
    /// What the metrics registry takes: state names and plain numbers.
    fn plain(&self) -> QueueReading {
        QueueReading {
            database_up: self.database_up,
            jobs: self
                .gauges
                .iter()
                .flat_map(|g| &g.jobs)
                .map(|(state, n)| (state.as_str(), *n))
                .collect(),
            oldest_runnable_age_seconds: self
                .gauges
                .as_ref()
                .map(|g| g.oldest_runnable_age_seconds),
        }
    }
}

/// Connections of the health pool: one for readiness, one for the gauges.
pub(crate) const HEALTH_CONNECTIONS: u32 = 2;
/// How long a probe waits for one of them.
pub(crate) const HEALTH_ACQUIRE_TIMEOUT: Duration = Duration::from_millis(500);
/// The small pool of `/readyz` and the queue gauges, apart from the one
/// webhooks and the worker use.
pub fn pool(config: &Config) -> Result<PgPool, DbError> {
    db::sized_pool(
        config,
        HEALTH_CONNECTIONS,
        HEALTH_ACQUIRE_TIMEOUT,
        db::PING_IF_IDLE_FOR,
    )
}

/// Readiness is asked of the database at most this often.
pub(crate) const READY_MAX_AGE: Duration = Duration::from_secs(1);
/// The longest one readiness check may take.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// The health pool and the last answers read through it.
pub struct Health {
    queue: Queue,
    /// When readiness was last asked, and the answer; held while asking,
    /// so concurrent probes share one query.
    ready: Mutex<Option<(Instant, Result<(), String>)>>,
    /// Likewise for the queue gauges.
    gauges: Mutex<Option<(Instant, GaugeReading)>>,
}

impl Health {
    pub fn new(pool: PgPool) -> Self {
        Self {
            queue: Queue::new(pool),
            ready: Mutex::new(None),
            gauges: Mutex::new(None),
        }
    }

    /// The queue gauges, read at most once every [`QUEUE_GAUGES_MAX_AGE`].
    /// A failed reading waits its turn too: a database that is down is not
    /// asked by every scrape.
    pub(crate) async fn queue_gauges(&self) -> GaugeReading {
        let mut last = self.gauges.lock().await;
        if let Some((at, reading)) = last.as_ref()
            && at.elapsed() < QUEUE_GAUGES_MAX_AGE
        {
            return reading.clone();
        }
        let previous = last.take().and_then(|(_, r)| r.gauges);
        let reading = match tokio::time::timeout(GAUGES_TIMEOUT, self.queue.gauges()).await {
            Ok(Ok(gauges)) => GaugeReading {
                database_up: true,
                gauges: Some(gauges),
            },
            _ => GaugeReading {
                database_up: false,
                gauges: previous,
            },
        };
        *last = Some((Instant::now(), reading.clone()));
        reading
    }

    /// The text of `GET /metrics`: the queue gauges as last read (at most
    /// [`QUEUE_GAUGES_MAX_AGE`] ago), then everything else.
    pub(crate) async fn metrics_text(&self) -> String {
        let reading = self.queue_gauges().await;
        metrics().render(&reading.plain())
    }

    /// Whether the database answers: asked at most once a second.
    pub async fn ready(&self) -> Result<(), String> {
        let mut last = self.ready.lock().await;
        if let Some((at, answer)) = last.as_ref()
            && at.elapsed() < READY_MAX_AGE
        {
            return answer.clone();
        }
        let ping = sqlx::query("SELECT 1").execute(self.queue.pool());
        let answer = match tokio::time::timeout(READY_TIMEOUT, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("database: {e}")),
            Err(_) => Err("database: timed out".to_owned()),
        };
        *last = Some((Instant::now(), answer.clone()));
        answer
    }
}

/// Connections the metrics listener holds at once.
pub(crate) const METRICS_CONNECTIONS: usize = 16;

/// Serves `GET /metrics` alone on its own address, so the metrics need not
/// be exposed wherever the webhook port is.
pub(crate) async fn serve_metrics(
    listener: tokio::net::TcpListener,
    health: std::sync::Arc<Health>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    // A Prometheus pair scrapes with one connection each.
    let limits = crate::server::Limits {
        header_read_timeout: Duration::from_secs(5),
        max_connections: METRICS_CONNECTIONS,
        max_connections_per_source: 8,
        max_connection_age: Duration::from_secs(60),
    };
    crate::server::serve("metrics listener", listener, limits, shutdown, move |_peer| {
        let health = health.clone();
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let health = health.clone();
            async move { Ok::<_, std::convert::Infallible>(metrics_response(&req, &health).await) }
        })
    })
    .await;
}

async fn metrics_response(
    req: &hyper::Request<hyper::body::Incoming>,
    health: &Health,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use http_body_util::Full;
    if req.method() != hyper::Method::GET || req.uri().path() != "/metrics" {
        let mut r = hyper::Response::new(Full::new(bytes::Bytes::new()));
        *r.status_mut() = hyper::StatusCode::NOT_FOUND;
        return r;
    }
    let mut r = hyper::Response::new(Full::new(bytes::Bytes::from(health.metrics_text().await)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    r
}
