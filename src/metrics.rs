//! Prometheus metrics (the text format of `GET /metrics`).
//!
//! A leaf that others report into: counters and histograms are
//! process-local and live in one global registry. The queue gauges (jobs by
//! state, queue lag) come in as plain numbers with each rendering
//! ([`QueueReading`]); reading them from the database, and serving the
//! text, is `health.rs`'s, so every daemon reports the same shared queue
//! and no number of scrapes costs the database more.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    webhooks: Family<Labels, Counter>,
    job_duration: Family<Labels, Histogram, fn() -> Histogram>,
    processing: Histogram,
    pub(crate) bytes_relayed: Counter,
    pub kept_at_telnyx: Counter,
    /// Objects the relay meant to delete and could not: the `unmatched/`
    /// original of a recording moved into its intake's folder. Each is
    /// logged with its path; the job still succeeds.
    pub orphaned_objects: Counter,
    /// Calls Telnyx announced whose recording never came (`ops::missing`),
    /// each counted once, by the process that reported it.
    pub recordings_missing: Counter,
    /// Deletes at Telnyx that failed after the recording was linked (the
    /// job succeeded; the delete is retried apart: issue #21 item 6).
    pub telnyx_cleanup_failed: Counter,
    /// Deletes at Telnyx owed, as this process's clean-up sweep last
    /// counted them in the database (every worker counts the same rows).
    pub telnyx_cleanup_pending: Gauge,
    /// `call.recording.error` jobs handled: calls Telnyx could not record.
    /// Each also ends its job `failed`, which alerts.
    pub recording_errors: Counter,
    provider_errors: Family<Labels, Counter>,
    jobs: Family<Labels, Gauge>,
    queue_lag: Gauge<f64, AtomicU64>,
    database_up: Gauge,
    refused_connections: Family<Labels, Counter>,
    /// Held from setting the queue gauges to encoding them, so a scrape
    /// shows one reading whole.
    rendering: std::sync::Mutex<()>,
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
        let kept_at_telnyx = Counter::default();
        registry.register(
            "kept_at_telnyx",
            "Recordings stored and linked but not deleted at Telnyx: the stored bytes were not proven the whole recording (the job's telnyx_kept_reason says why)",
            kept_at_telnyx.clone(),
        );
        let orphaned_objects = Counter::default();
        registry.register(
            "orphaned_objects",
            "Objects left in the bucket because deleting them failed (the unmatched/ original of a moved recording)",
            orphaned_objects.clone(),
        );
        let recordings_missing = Counter::default();
        registry.register(
            "recordings_missing",
            "Calls announced by call.initiated for which Telnyx listed no recording within pipeline.recording_missing_after (or that nobody answered)",
            recordings_missing.clone(),
        );
        let telnyx_cleanup_failed = Counter::default();
        registry.register(
            "telnyx_cleanup_failed",
            "Deletes at Telnyx that failed after the recording was stored and linked (it plays; the delete is retried)",
            telnyx_cleanup_failed.clone(),
        );
        let telnyx_cleanup_pending = Gauge::default();
        registry.register(
            "telnyx_cleanup_pending",
            "Recordings that play from the bucket and whose delete at Telnyx is still owed (recording_cleanups_pending)",
            telnyx_cleanup_pending.clone(),
        );
        let recording_errors = Counter::default();
        registry.register(
            "recording_errors",
            "Calls Telnyx could not record (call.recording.error events handled; the view recording_relay.recording_errors lists them)",
            recording_errors.clone(),
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
        let refused_connections = Family::<Labels, Counter>::default();
        registry.register(
            "refused_connections",
            "Connections closed as soon as accepted, by listener and reason (per_source: the address holds its share)",
            refused_connections.clone(),
        );
        Self {
            registry,
            refused_connections,
            rendering: std::sync::Mutex::new(()),
            webhooks,
            job_duration,
            processing,
            bytes_relayed,
            kept_at_telnyx,
            orphaned_objects,
            recordings_missing,
            telnyx_cleanup_failed,
            telnyx_cleanup_pending,
            recording_errors,
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
    pub(crate) fn recording_linked(&self, received_at: chrono::DateTime<chrono::Utc>) {
        let waited = (chrono::Utc::now() - received_at)
            .to_std()
            .unwrap_or_default();
        self.processing.observe(waited.as_secs_f64());
    }

    pub(crate) fn connection_refused(&self, listener: &'static str, reason: &'static str) {
        self.refused_connections
            .get_or_create(&vec![
                ("listener", listener.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
    }

    pub(crate) fn job_finished(&self, outcome: &'static str, took: Duration) {
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

    /// Everything, with the queue gauges set from `queue` first.
    pub fn render(&self, queue: &QueueReading) -> String {
        let _whole = self.rendering.lock().unwrap_or_else(|e| e.into_inner());
        for (state, n) in &queue.jobs {
            self.jobs
                .get_or_create(&vec![("state", (*state).to_owned())])
                .set(*n);
        }
        if let Some(lag) = queue.oldest_runnable_age_seconds {
            self.queue_lag.set(lag);
        }
        self.database_up.set(i64::from(queue.database_up));
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The queue as one rendering reports it, in plain numbers. Without a
/// reading that ever succeeded, `jobs` is empty and the lag `None`: the
/// gauges keep what they last showed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueReading {
    /// Whether the last attempt to read the queue succeeded.
    pub(crate) database_up: bool,
    /// Jobs by state (the state's name), from the last successful reading.
    pub jobs: Vec<(&'static str, i64)>,
    /// How long the oldest runnable job had waited, in seconds, likewise.
    pub(crate) oldest_runnable_age_seconds: Option<f64>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// The Prometheus text exposition format.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
