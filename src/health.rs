//! What `/readyz` and `/metrics` ask the database, through a pool of their
//! own and at a bounded rate, so that no number of probes and scrapes can
//! take a connection a webhook or a heartbeat needs (issue #19: scrapes
//! shared the webhooks' 10 connections, each counted the whole table, and
//! the worker's heartbeats waited behind them).
//!
//! - The pool ([`crate::db::health_pool`]) has [`HEALTH_CONNECTIONS`]
//!   connections and a short acquire timeout: under a flood of probes a
//!   probe fails, nothing else does.
//! - Readiness is asked at most once every [`READY_MAX_AGE`]; probes in
//!   between get the last answer, and concurrent ones wait for the one in
//!   flight instead of each asking.
//! - The queue gauges are read at most once every
//!   [`QUEUE_GAUGES_MAX_AGE`], along indexes only
//!   ([`crate::jobs::Queue::gauges`]).

use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::Mutex;

use crate::jobs::Queue;
use crate::jobs::queue::QueueGauges;

/// The queue gauges are read from the database at most this often; a
/// scrape in between reports the last reading.
pub const QUEUE_GAUGES_MAX_AGE: Duration = Duration::from_secs(5);
/// The longest one reading of the gauges may take.
const GAUGES_TIMEOUT: Duration = Duration::from_secs(2);

/// The last reading of the queue gauges.
#[derive(Debug, Clone, Default)]
pub struct GaugeReading {
    /// Whether the last reading succeeded.
    pub database_up: bool,
    /// The last successful one.
    pub gauges: Option<QueueGauges>,
}

/// Connections of the health pool: one for readiness, one for the gauges.
pub const HEALTH_CONNECTIONS: u32 = 2;
/// How long a probe waits for one of them.
pub const HEALTH_ACQUIRE_TIMEOUT: Duration = Duration::from_millis(500);
/// Readiness is asked of the database at most this often.
pub const READY_MAX_AGE: Duration = Duration::from_secs(1);
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
    pub async fn queue_gauges(&self) -> GaugeReading {
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
