//! Prometheus metrics (`GET /metrics`, text format).
//!
//! Counters and histograms are process-local and live in one global
//! registry; queue gauges (jobs by state, queue lag) are read from the
//! database at scrape time, so every daemon reports the same shared queue.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::jobs::{JobState, Queue};

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    webhooks: Family<Labels, Counter>,
    job_duration: Family<Labels, Histogram, fn() -> Histogram>,
    processing: Histogram,
    pub bytes_relayed: Counter,
    /// Objects the relay meant to delete and could not: the `unmatched/`
    /// original of a recording moved into its intake's folder. Each is
    /// logged with its path; the job still succeeds.
    pub orphaned_objects: Counter,
    provider_errors: Family<Labels, Counter>,
    jobs: Family<Labels, Gauge>,
    queue_lag: Gauge<f64, AtomicU64>,
    database_up: Gauge,
}

/// 100 ms .. ~29 h: a prompt relay to one that waited out a long outage.
fn processing_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.1, 2.0, 21))
}

fn duration_histogram() -> Histogram {
    // 50 ms .. ~30 min: webhook-sized jobs to long recordings.
    Histogram::new(exponential_buckets(0.05, 2.0, 16))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("recording_relay");
        let webhooks = Family::<Labels, Counter>::default();
        registry.register("webhooks", "Webhook requests by outcome", webhooks.clone());
        let job_duration = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "job_duration_seconds",
            "Duration of job attempts by outcome",
            job_duration.clone(),
        );
        let processing = processing_histogram();
        registry.register(
            "processing_seconds",
            "Time from a webhook's receipt to its intake being linked: queueing, retries and transfer included",
            processing.clone(),
        );
        let bytes_relayed = Counter::default();
        registry.register(
            "relayed_bytes",
            "Recording bytes stored and verified",
            bytes_relayed.clone(),
        );
        let orphaned_objects = Counter::default();
        registry.register(
            "orphaned_objects",
            "Objects left in the bucket because deleting them failed (the unmatched/ original of a moved recording)",
            orphaned_objects.clone(),
        );
        let provider_errors = Family::<Labels, Counter>::default();
        registry.register(
            "provider_errors",
            "Errors from Telnyx and Supabase Storage by kind",
            provider_errors.clone(),
        );
        let jobs = Family::<Labels, Gauge>::default();
        registry.register("jobs", "Jobs in the queue by state", jobs.clone());
        let queue_lag = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "queue_lag_seconds",
            "How long the oldest runnable job has waited",
            queue_lag.clone(),
        );
        let database_up = Gauge::default();
        registry.register(
            "database_up",
            "Whether the last scrape could read the queue",
            database_up.clone(),
        );
        Self {
            registry,
            webhooks,
            job_duration,
            processing,
            bytes_relayed,
            orphaned_objects,
            provider_errors,
            jobs,
            queue_lag,
            database_up,
        }
    }

    /// `status` as a label too, so alerts can select 5xx answers without
    /// knowing every outcome name.
    pub fn webhook(&self, outcome: &'static str, status: u16) {
        self.webhooks
            .get_or_create(&vec![
                ("outcome", outcome.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    /// The relay's own promise, end to end: from the moment the webhook was
    /// committed (the job's `created_at`) to the intake pointing at the
    /// stored recording. Job durations leave out queueing and retries.
    pub fn recording_linked(&self, received_at: chrono::DateTime<chrono::Utc>) {
        let waited = (chrono::Utc::now() - received_at)
            .to_std()
            .unwrap_or_default();
        self.processing.observe(waited.as_secs_f64());
    }

    pub fn job_finished(&self, outcome: &'static str, took: Duration) {
        self.job_duration
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .observe(took.as_secs_f64());
    }

    pub fn provider_error(&self, provider: &'static str, kind: &'static str) {
        self.provider_errors
            .get_or_create(&vec![
                ("provider", provider.to_owned()),
                ("kind", kind.to_owned()),
            ])
            .inc();
    }

    /// Refreshes the queue gauges from the database, then renders everything.
    pub async fn render(&self, queue: &Queue) -> String {
        let read = tokio::time::timeout(Duration::from_secs(2), async {
            Ok::<_, crate::jobs::QueueError>((
                queue.count_by_state().await?,
                queue.queue_depth().await?,
            ))
        })
        .await;
        match read {
            Ok(Ok((counts, depth))) => {
                for state in JobState::ALL {
                    let n = counts
                        .iter()
                        .find(|(s, _)| *s == state)
                        .map_or(0, |(_, n)| *n);
                    self.jobs
                        .get_or_create(&vec![("state", state.as_str().to_owned())])
                        .set(n);
                }
                let lag = depth
                    .iter()
                    .filter_map(|d| d.oldest_runnable_age_seconds)
                    .fold(0.0, f64::max);
                self.queue_lag.set(lag);
                self.database_up.set(1);
            }
            _ => {
                self.database_up.set(0);
            }
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Serves `GET /metrics` alone on its own address, so the metrics need not
/// be exposed wherever the webhook port is.
pub async fn serve(
    listener: tokio::net::TcpListener,
    queue: Queue,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let limits = crate::server::Limits {
        header_read_timeout: Duration::from_secs(5),
        max_connections: 16,
    };
    crate::server::serve("metrics listener", listener, limits, shutdown, move |_peer| {
        let queue = queue.clone();
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let queue = queue.clone();
            async move { Ok::<_, std::convert::Infallible>(metrics_response(&req, &queue).await) }
        })
    })
    .await;
}

async fn metrics_response(
    req: &hyper::Request<hyper::body::Incoming>,
    queue: &Queue,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use http_body_util::Full;
    if req.method() != hyper::Method::GET || req.uri().path() != "/metrics" {
        let mut r = hyper::Response::new(Full::new(bytes::Bytes::new()));
        *r.status_mut() = hyper::StatusCode::NOT_FOUND;
        return r;
    }
    let mut r = hyper::Response::new(Full::new(bytes::Bytes::from(metrics().render(queue).await)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(CONTENT_TYPE),
    );
    r
}

/// The Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
